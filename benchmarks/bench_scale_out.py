"""What nginx in front of the replicas adds to a request's latency.

Three `loraplex serve` replicas on loopback (the tiny random Llama in float32, so the model costs
little and the proxy's share shows) behind nginx running the shipped deploy/nginx/loraplex.conf
(only its addresses replaced; tests/fixtures/scale_out.py). After a warm-up that loads each
adapter on its replica, each round sends one 1-token Generate for an adapter straight to the
replica that holds it and one through nginx (which routes it there by `x-adapter-id`), in
alternating order, sequentially, with loraplex.client. Reports p50 / p90 / p99 of each path and
their differences, side by side from one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_scale_out.py             # -> results/scale_out_cpu.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_scale_out.py --rounds 50 --out /tmp/so.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraplex.client import Client  # noqa: E402
from tests.fixtures import scale_out as so  # noqa: E402
from tests.fixtures.tiny_models import make_tiny_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "scale_out_cpu.md"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--adapters", type=int, default=12)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_out_"))
    model = make_tiny_model(tmp / "model", family="llama", seed=0)
    names = so.make_adapters(model, tmp / "adapters", args.adapters)
    replicas = so.start_replicas(model, tmp / "adapters", 3, tmp)
    nginx = None
    try:
        grpc_port, http_port = so.free_port(), so.free_port()
        conf = so.render_nginx(so.NGINX_CONF.read_text(), replicas, grpc_port, http_port)
        nginx = so.start_nginx(conf, tmp, (grpc_port, http_port))
        proxy = f"127.0.0.1:{grpc_port}"
        with Client(proxy, timeout=60) as c:  # warm-up: each adapter loads on its replica
            for name in names:
                c.generate("Hi", adapter=name, max_new_tokens=1)
        owner = {}
        for r in replicas:
            counts = r.metric("loraplex_requests_total", "adapter")
            owner.update({n: r.grpc for n in names if counts.get(n)})
        assert set(owner) == set(names)
        clients = {t: Client(t, timeout=60) for t in {proxy, *owner.values()}}
        direct, proxied = [], []
        for k in range(args.rounds):
            name = names[k % len(names)]
            order = [(owner[name], direct), (proxy, proxied)]
            for target, sink in (order if k % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                clients[target].generate("Hi", adapter=name, max_new_tokens=1, ignore_eos=True)
                sink.append(time.perf_counter() - t0)
        for c in clients.values():
            c.close()
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        for r in replicas:
            r.stop()
    nginx_version = subprocess.run([so.NGINX, "-v"], capture_output=True, text=True).stderr.strip()
    rows = []
    for q in (50, 90, 99):
        d, p = so.percentile(direct, q) * 1e3, so.percentile(proxied, q) * 1e3
        rows.append(f"| p{q} | {d:.2f} | {p:.2f} | {p - d:+.2f} | {p / d:.2f}x |")
    # Paired: each round's nginx time minus its direct time (same adapter, same replica, adjacent).
    diffs = [(p - d) * 1e3 for d, p in zip(direct, proxied)]
    paired = (f"Per-round difference (through nginx minus direct, same round): median "
              f"{so.percentile(diffs, 50):+.2f} ms, p90 {so.percentile(diffs, 90):+.2f} ms.")
    load_end = os.getloadavg()
    report = "\n".join([
        "# Scale-out: latency nginx adds in front of the replicas (CPU, loopback)",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/bench_scale_out.py', *sys.argv[1:]])}`",
        "",
        f"Three `loraplex serve` replicas (tiny random Llama, float32, one torch thread each) behind "
        f"{nginx_version.removeprefix('nginx version: ')} running `deploy/nginx/loraplex.conf` (addresses "
        f"replaced). {args.rounds} rounds over {args.adapters} adapters, each round one 1-token `Generate` "
        f"straight to the adapter's replica and one through nginx (hash on `x-adapter-id` -> the same "
        f"replica), in alternating order, one at a time, end-to-end as loraplex.client sees it.",
        "",
        "| | direct (ms) | through nginx (ms) | nginx adds (ms) | ratio |",
        "|---|---|---|---|---|",
        *rows,
        "",
        paired,
        "",
        f"- CPU: {cpu_name()}; {os.cpu_count()} logical cores; Python {platform.python_version()}",
        f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load_start)}, at end "
        f"{'/'.join(f'{x:.2f}' for x in load_end)}",
        "- The machine was shared with other jobs during the run: absolute numbers are noisy; the two "
        "paths were measured interleaved in the same run, so their difference is the comparable figure. "
        "p99 of a few hundred samples on a shared machine mostly shows scheduling hiccups.",
        "",
    ])
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
