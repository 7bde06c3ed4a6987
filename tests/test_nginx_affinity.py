"""The shipped deploy/nginx/loraplex.conf's consistent hashing, checked for real: adding a
replica moves about 1/N of the adapters, and only onto the new replica.

The replicas are tiny HTTP stand-ins that answer with their own name (what is checked is where
nginx sends each `x-adapter-id`, not what a replica computes; the real three-replica cluster is in
test_scale_out.py). nginx runs the shipped file with its addresses replaced, first with the three
`server` lines it ships, then with a fourth line added as an operator would: the addresses of the
first three stay, so their points on the hash ring stay.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.fixtures import scale_out as so
from tests.fixtures.prometheus import stop

pytestmark = pytest.mark.skipif(so.NGINX is None, reason="nginx not installed (Debian: apt-get install -y nginx; "
                                                         "make test-deps)")

KEYS = [f"adapter-{i:03d}" for i in range(300)]


class _Named(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = self.server.name.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def stand_in(name: str) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Named)
    srv.name = name
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def with_servers(conf: str, n: int) -> str:
    """The shipped file with each upstream's last `server` line repeated until it lists n."""
    def grow(m: re.Match) -> str:
        lines = re.findall(r"\n\s*server [^\n]*", m.group(2))
        return f"upstream {m.group(1)} {{{m.group(2).replace(lines[-1], ''.join([lines[-1]] * (n - len(lines) + 1)))}}}"

    return re.sub(r"upstream (\w+) \{(.*?)\}", grow, conf, flags=re.S)


def routes(conf_text: str, stand_ins: list[ThreadingHTTPServer], tmp) -> dict[str, str]:
    """adapter id -> name of the stand-in nginx sent it to."""
    replicas = [so.Replica(proc=None, log_path=tmp, grpc=f"127.0.0.1:{so.free_port()}",
                           http=f"http://127.0.0.1:{s.server_address[1]}") for s in stand_ins]
    grpc_port, http_port = so.free_port(), so.free_port()
    nginx = so.start_nginx(so.render_nginx(conf_text, replicas, grpc_port, http_port), tmp, (http_port,))
    try:
        out = {}
        for key in KEYS:
            req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", data=b"{}",
                                         headers={"x-adapter-id": key, "content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                out[key] = r.read().decode()
        return out
    finally:
        stop(nginx)


def test_adding_a_replica_moves_about_a_quarter_of_the_adapters(tmp_path):
    stand_ins = [stand_in(f"r{i}") for i in range(4)]
    try:
        shipped = so.NGINX_CONF.read_text()
        (tmp_path / "three").mkdir()
        (tmp_path / "four").mkdir()
        three = routes(shipped, stand_ins[:3], tmp_path / "three")
        assert routes(shipped, stand_ins[:3], tmp_path / "three") == three  # the same key, the same replica
        four = routes(with_servers(shipped, 4), stand_ins, tmp_path / "four")
    finally:
        for s in stand_ins:
            s.shutdown()
    for name in ("r0", "r1", "r2"):  # spread over all three (ketama: 160 points per server)
        assert 0.15 < sum(v == name for v in three.values()) / len(KEYS) < 0.55, three
    moved = {k for k in KEYS if four[k] != three[k]}
    assert all(four[k] == "r3" for k in moved), "an adapter moved between the old replicas"
    assert 0.12 < len(moved) / len(KEYS) < 0.40, f"{len(moved)} of {len(KEYS)} adapters moved"
