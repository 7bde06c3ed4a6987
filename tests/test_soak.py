"""Soak: hundreds of gRPC requests over dozens of adapters with cancellations, short deadlines and
adapter load/unload during traffic, against an in-process server on the tiny random Llama.

The driver and its checks are benchmarks/soak_driver.py and soak_server.py (the soak tool's own
code, loaded by path). What is asserted, and why:

- Client side (`check_outcome`): every request sent has exactly one final status. OK means exactly
  one final message, the last, whose usage counts the tokens received; any other status means no
  second ending. CANCELLED only where the client cancelled; DEADLINE_EXCEEDED only on the requests
  given a short deadline (the others have a 60 s safety deadline: hitting it is a hang).
- Server side (`reconcile`, against an engine observer + a recorder on engine.submit): each id
  the engine took finished exactly once, nothing finished that was not taken or not sent, OK
  requests finished as length with the same token count. A cancel or deadline races with the
  request's end, so for those any server finish reason is accepted (LENGTH when the request ended
  before the abort arrived, CANCELLED otherwise), and also no engine entry at all (the client may
  give up while the server is still reading the adapter from disk) -- but never two.
  NOT_FOUND requests must never have reached the engine. The engine's finished counters (what
  Prometheus exports) must move by exactly the number of finished events.
- Statuses: only OK, CANCELLED, DEADLINE_EXCEEDED and NOT_FOUND (a churn adapter not loaded at the
  moment, or a popular one being unloaded). RESOURCE_EXHAUSTED cannot happen here: max_waiting
  (128) and the server's default limits on concurrent calls are far above the 12 client streams,
  and the host tier (64) holds all 38 adapters, so no adapter is ever dropped from it (asserted:
  host_evictions == 0).
- End state: nothing running or waiting, no KV block in use, no adapter with requests in flight.
- Memory: RSS (server and client share this process) after the main run (3x the warm-up's
  requests) within 32 MiB of RSS after the warm-up run of the same mix, both after gc.collect().
  The tiny model's whole KV cache is 2 MiB and all 38 adapters ~2 MiB more, and every adapter is
  on the host tier before the warm-up (primed), so a steady state moves by allocator noise only
  (+1 MiB measured); a leak of ~40 KB or more per request would exceed the margin over 900
  requests. Smaller leaks are caught only where they leave state behind (KV blocks, in-flight
  adapter counts, unfinished requests: asserted above).

`test_checks_fail_on_broken_endings` feeds the checks broken records (no final message, two
final statuses, a lost request, a request finished twice on the server...), and
`test_soak_detects_a_stream_without_final_message` breaks the live server (final messages
stripped), so the assertions above are shown to fail when they should.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc  # noqa: F401 - imported before the driver so a broken install fails here
import pytest
import torch

from loraplex.config import EngineConfig, LoraConfig

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    """A benchmarks/ module by path (benchmarks is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


sd = _load("soak_driver")
ss = _load("soak_server")

ENGINE = EngineConfig(block_size=16, num_kv_blocks=256, max_num_seqs=32, max_num_batched_tokens=256,
                      max_model_len=256, max_new_tokens_cap=64, max_waiting=128)
N_ADAPTERS, N_CHURN, MAX_LORAS = 32, 6, 6  # fewer device slots than adapters: slots are evicted
WARM_REQUESTS, MAIN_REQUESTS = 300, 900
RSS_MARGIN = 32 * 2**20
EXPECTED = {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "NOT_FOUND"}
TOKEN = "soak-admin-token-0123456789"


@pytest.fixture(scope="module")
def soak_env(tiny_model_dir, tmp_path_factory):
    top = tmp_path_factory.mktemp("soak")
    ids = [f"a{i:02d}" for i in range(N_ADAPTERS)]
    churn_ids = [f"churn{i}" for i in range(N_CHURN)]
    zipf = ss.write_adapters(top / "zipf", ids, tiny_model_dir, ranks=(2, 4, 8), seed=0)
    churn = ss.write_adapters(top / "churn", churn_ids, tiny_model_dir, ranks=(2, 4, 8), seed=1)
    lora = LoraConfig(max_loras=MAX_LORAS, max_lora_rank=8, max_cpu_loras=64,
                      adapter_root=str(top / "zipf"), allowed_roots=(str(top / "churn"),))
    # One torch thread for the whole run, not only the engine's: adapter reads run torch ops in the
    # server's worker threads, and with 2 threads on a busy 2-core box they stalled engine steps
    # for seconds (main-run p99 8.4 s against 0.3 s with 1 thread; see benchmarks/README.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        srv = ss.spawn_server(tiny_model_dir, ENGINE, lora, dtype="float32")
        yield srv, zipf, churn
        srv.stop()
    finally:
        torch.set_num_threads(threads)


def _config(zipf, churn, requests: int, prefix: str) -> "sd.SoakConfig":
    ids = tuple(zipf)
    return sd.SoakConfig(
        adapter_ids=ids, requests=requests, concurrency=12, zipf_s=1.0, stream_fraction=0.5,
        cancel_fraction=0.15, deadline_fraction=0.15, deadline_s=(0.01, 0.25), cancel_after_s=(0.005, 0.15),
        max_new_tokens=(4, 24), churn=tuple((k, str(v)) for k, v in churn.items()), churn_every_s=0.1,
        churn_traffic=0.1, popular_paths=tuple((k, str(zipf[k])) for k in ids[:4]), timeout_s=60.0,
        seed=7, id_prefix=prefix)


def _drained(engine, timeout: float = 15.0):
    end = time.monotonic() + timeout
    while True:
        st = engine.stats()
        if (st.num_running, st.num_waiting, st.kv_blocks_used) == (0, 0, 0) or time.monotonic() > end:
            return st
        time.sleep(0.02)


def _rss() -> int:
    gc.collect()
    return ss.rss_bytes()


def _all_violations(srv, res, prefix: str) -> list[str]:
    submitted, finished = srv.audit.snapshot(prefix + "-")
    return (list(res.violations) + [v for o in res.outcomes.values() for v in sd.check_outcome(o)]
            + sd.reconcile(res.sent_ids, res.outcomes, submitted, finished))


def test_soak(soak_env):
    srv, zipf, churn = soak_env
    engine, manager = srv.engine, srv.manager
    t0 = time.monotonic()
    # Every adapter onto the host tier first, so RSS after warm-up holds them all.
    assert asyncio.run(sd.prime(srv.address, zipf)) == {"OK": N_ADAPTERS}
    warm = asyncio.run(sd.run_soak(srv.address, _config(zipf, churn, WARM_REQUESTS, "warm")))
    _drained(engine)
    assert not _all_violations(srv, warm, "warm")
    rss_warm = _rss()
    before = engine.stats()
    evictions_before = manager.stats.device_evictions

    res = asyncio.run(sd.run_soak(srv.address, _config(zipf, churn, MAIN_REQUESTS, "main")))
    st = _drained(engine)
    rss_end = _rss()
    summary = sd.summarize(res)
    print(f"\nsoak: warm-up {warm.wall_s:.1f} s, main {res.wall_s:.1f} s, total {time.monotonic() - t0:.1f} s")
    print("summary:", json.dumps(summary))
    slowest = sorted((o for o in res.outcomes.values() if o.status == "OK"), key=lambda o: -o.e2e_s)[:5]
    server = {f.request_id: f for f in srv.audit.snapshot("main-")[1]}
    print("slowest OK (id, adapter, kind, client e2e s, server queue s, server total s):",
          [(o.request_id, o.adapter_id, "stream" if o.stream else "unary", round(o.e2e_s, 2),
            round(server[o.request_id].queue_s, 2), round(server[o.request_id].total_s, 2)) for o in slowest])
    print(f"RSS after warm-up {rss_warm / 2**20:.1f} MiB, after main run {rss_end / 2**20:.1f} MiB, "
          f"delta {(rss_end - rss_warm) / 2**20:+.1f} MiB (margin {RSS_MARGIN / 2**20:.0f} MiB)")

    # Every request sent has exactly one final status, on both sides.
    assert res.sent == MAIN_REQUESTS and len(res.outcomes) == MAIN_REQUESTS
    violations = _all_violations(srv, res, "main")
    assert not violations, violations[:20]

    statuses = {o.status for o in res.outcomes.values()}
    assert statuses <= EXPECTED, statuses
    allowed_missing = set(churn) | set(list(zipf)[:4])  # churn adapters and unloaded popular ones
    stray = [o.request_id for o in res.outcomes.values()
             if o.status == "NOT_FOUND" and o.adapter_id not in allowed_missing]
    assert not stray, stray

    # The server's counters (Prometheus' source) agree with the finished events it reported.
    submitted, finished = srv.audit.snapshot("main-")
    moved = sum(st.finished_total.values()) - sum(before.finished_total.values())
    assert moved == len(finished) == len(submitted)

    # The workload did what it is meant to: otherwise the checks above prove little.
    assert summary["completed"] > MAIN_REQUESTS // 2
    assert summary["cancelled"] >= 20 and summary["deadline_exceeded"] >= 10
    assert summary["failed_by_status"].get("NOT_FOUND", 0) >= 1
    assert 0 < summary["streams"] < MAIN_REQUESTS and summary["adapters_used"] >= 20
    assert any(o.status == "CANCELLED" and o.stream and o.tokens > 0 for o in res.outcomes.values())
    assert any(f.finish_reason == "cancelled" for f in finished)  # aborts reached the engine
    assert res.admin["unload OK"] > 0 and res.admin["load OK"] > 0 and res.admin["unload_popular OK"] > 0
    assert manager.stats.device_evictions > evictions_before
    assert manager.stats.host_evictions == 0  # why RESOURCE_EXHAUSTED cannot happen (see top)

    # Drained: no KV block, no running or waiting sequence, no adapter reference left.
    assert (st.num_running, st.num_waiting, st.kv_blocks_used) == (0, 0, 0), st
    infos = asyncio.run(sd.list_adapters(srv.address))
    assert len(infos) >= N_ADAPTERS // 2
    assert all(a.requests_in_flight == 0 for a in infos), [(a.adapter_id, a.requests_in_flight) for a in infos]

    assert rss_end - rss_warm <= RSS_MARGIN


def test_soak_detects_a_stream_without_final_message(soak_env, monkeypatch):
    """Break the server: strip the finish_reason from final stream messages. Every stream that
    ended OK must then be reported, on the client side and against the server's account."""
    from loraplex.api import convert
    from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb

    srv, zipf, _ = soak_env
    original = convert.stream_chunk_to_proto

    def no_final(out, *args):
        chunk = original(out, *args)
        chunk.finish_reason = pb.FINISH_REASON_UNSPECIFIED
        return chunk

    monkeypatch.setattr(convert, "stream_chunk_to_proto", no_final)
    cfg = sd.SoakConfig(adapter_ids=tuple(zipf)[:4], requests=12, concurrency=4, stream_fraction=1.0,
                        cancel_fraction=0.0, deadline_fraction=0.0, max_new_tokens=(3, 5), seed=3,
                        id_prefix="broken", timeout_s=60.0)
    res = asyncio.run(sd.run_soak(srv.address, cfg))
    assert {o.status for o in res.outcomes.values()} == {"OK"}
    violations = _all_violations(srv, res, "broken")
    assert sum("status OK with 0 final messages" in v for v in violations) == 12, violations


def _outcome(rid="r1", status="OK", **kw):
    base = dict(request_id=rid, adapter_id="a", stream=True, action=sd.NORMAL, status=status, messages=3,
                finals=1, tokens=3, usage_tokens=3, finish_reason="length")
    base.update(kw)
    return sd.Outcome(**base)


def _fin(rid="r1", reason="length", tokens=3):
    return ss.ServerFinished(rid, "a", reason, tokens)


def test_checks_fail_on_broken_endings():
    # A clean record passes; each broken one is named.
    assert sd.check_outcome(_outcome()) == []
    assert sd.reconcile(["r1"], {"r1": _outcome()}, ["r1"], [_fin()]) == []
    cases = {
        "status OK with 0 final messages": _outcome(finals=0, finish_reason=""),
        "status OK with 2 final messages": _outcome(finals=2),
        "a message after the final one": _outcome(final_not_last=True),
        "usage says 3 tokens, 2 received": _outcome(tokens=2),
        "status CANCELLED after 2 final messages": _outcome(status="CANCELLED", finals=2, cancel_sent=True),
        "CANCELLED without a client cancel": _outcome(status="CANCELLED", finals=0),
        "hit the safety timeout": _outcome(status="DEADLINE_EXCEEDED", finals=0),
        "no final status": _outcome(status="", finals=0),
        "another request id": _outcome(id_mismatch=True),
    }
    for needle, o in cases.items():
        found = sd.check_outcome(o)
        assert any(needle in v for v in found), (needle, found)
    # A deadline between a stream's final message and its trailers is one ending, not two.
    assert sd.check_outcome(_outcome(status="DEADLINE_EXCEEDED", action=sd.DEADLINE)) == []

    ok = {"r1": _outcome()}
    server_cases = {
        "sent but no final status": (["r1", "r2"], ok, ["r1"], [_fin()]),
        "finished 2 times on the server": (["r1"], ok, ["r1"], [_fin(), _fin()]),
        "submitted 2 times": (["r1"], ok, ["r1", "r1"], [_fin()]),
        "submitted but never finished": (["r1", "r2"], {**ok, "r2": _outcome("r2", "CANCELLED", finals=0,
                                                                             cancel_sent=True)},
                                         ["r1", "r2"], [_fin()]),
        "finished on the server but never submitted": (["r1"], ok, ["r1"], [_fin(), _fin("r9")]),
        "OK on the client, never finished on the server": (["r1"], ok, [], []),
        "server says cancelled": (["r1"], ok, ["r1"], [_fin(reason="cancelled")]),
        "server says length with 5": (["r1"], ok, ["r1"], [_fin(tokens=5)]),
        "NOT_FOUND on the client but the engine took it": (
            ["r1"], {"r1": _outcome(status="NOT_FOUND", finals=0)}, ["r1"], [_fin()]),
        "an outcome for a request never sent": ([], ok, ["r1"], [_fin()]),
    }
    for needle, (sent, outs, sub, fin) in server_cases.items():
        found = sd.reconcile(sent, outs, sub, fin)
        assert any(needle in v for v in found), (needle, found)
    # A cancel that lost the race (the server finished first) or never reached the engine is fine.
    cancelled = {"r1": _outcome(status="CANCELLED", finals=0, cancel_sent=True)}
    assert sd.reconcile(["r1"], cancelled, ["r1"], [_fin()]) == []
    assert sd.reconcile(["r1"], cancelled, [], []) == []

    # The driver refuses a second final status for one id.
    drv = sd._Driver("127.0.0.1:1", sd.SoakConfig(adapter_ids=("a",)))
    drv._record(_outcome())
    drv._record(_outcome(status="CANCELLED"))
    assert drv.violations and "a second final status" in drv.violations[0]
    assert drv.outcomes["r1"].status == "OK"


def test_cli_spawn_writes_reports(tiny_model_dir, tmp_path):
    """The command line end to end on the tiny model, its server requiring an admin token: exit 0,
    the report's numbers add up."""
    out_json, out_md = tmp_path / "soak.json", tmp_path / "soak.md"
    cmd = [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--spawn", "--model", str(tiny_model_dir),
           "--dtype", "float32", "--requests", "80", "--warmup-requests", "20", "--concurrency", "8",
           "--adapters", "10", "--churn-adapters", "2", "--ranks", "2,4", "--max-lora-rank", "4",
           "--max-loras", "4", "--churn-every", "0.1", "--deadline-range", "0.01,0.2",
           "--cancel-after", "0.005,0.1", "--max-new-tokens", "4,12", "--seed", "1",
           "--admin-token", TOKEN, "--json-out", str(out_json), "--md-out", str(out_md)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    s = report["summary"]
    assert s["sent"] == 80 and len(report["outcomes"]) == 80
    assert s["completed"] + s["cancelled"] + s["deadline_exceeded"] + sum(s["failed_by_status"].values()) == 80
    assert report["violations"] == []
    assert report["end_state"]["kv_blocks_used"] == 0
    assert all(isinstance(report["rss_bytes"][k], int) for k in ("start", "after_warmup", "end"))
    assert "| sent | 80 |" in out_md.read_text()
    # The spawned server requires the admin token and the tool sent it: adapter calls went through.
    admin = s["admin"]
    assert admin.get("load OK", 0) > 0 and not any("UNAUTHENTICATED" in k or "PERMISSION" in k for k in admin)
    assert TOKEN not in out_md.read_text() and TOKEN not in out_json.read_text()
