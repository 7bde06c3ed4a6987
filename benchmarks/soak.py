"""Load and soak tool: drive a loraplex server over gRPC with concurrent streams, zipf adapter
popularity, cancellations, short deadlines and adapter load/unload during traffic; report what
happened to every request, latencies, and the server's memory at start, after warm-up and at end.

    # an in-process server on the embedded default model (SmolLM2-135M, bfloat16, CPU)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/soak.py --spawn --duration 120 --md-out /tmp/soak.md
    # a running server (adapters are written under --adapter-dir, which must be one of its roots)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/soak.py --target 127.0.0.1:50051 \
        --adapter-dir /srv/adapters/soak --server-pid 1234   # or --metrics-url http://HOST:PORT/metrics

--spawn builds everything itself: N random PEFT adapters of mixed ranks and targets under a
temporary --adapter-root (loaded on demand, more adapters than device slots so slots are evicted),
a few "churn" adapters in an allowed root, and an engine whose submits and finished events are
recorded, so the report also checks the server's own account against the client's (no request
lost, none finished twice) and that the KV cache and adapter reference counts drain to zero.

Memory: with --spawn, the RSS of this process (server and client together: /proc/self/statm);
with --target, /proc/PID/statm for --server-pid, else process_resident_memory_bytes from
--metrics-url if the server exports it, else n/a.

Exit status 0 when every request ended with exactly one final status and (with --spawn) the server
agrees and drained; 1 otherwise; the report lists the violations.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak_driver as sd  # noqa: E402
import soak_server as ss  # noqa: E402

MiB = 2**20


def _pair(kind):
    def parse(text: str):
        lo, hi = (kind(x) for x in text.split(","))
        return lo, hi
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", metavar="HOST:PORT", help="drive a running server")
    where.add_argument("--spawn", action="store_true", help="start an in-process server (ServerThread)")
    p.add_argument("--model", help="--spawn: model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--cache-dir", help="--spawn: where the default model is converted to")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="--spawn")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the spawned server (default 1: on a shared 2-core box a "
                        "2-thread op waits for the busy core)")
    p.add_argument("--requests", type=int, default=500, help="requests to send (a cap with --duration)")
    p.add_argument("--duration", type=float, help="seconds of traffic (after warm-up)")
    p.add_argument("--warmup-requests", type=int, default=50, help="same mix, before the measured run")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--adapters", type=int, default=24, help="zipf-ranked adapters to create and use")
    p.add_argument("--churn-adapters", type=int, default=4, help="adapters loaded/unloaded by churn")
    p.add_argument("--ranks", default="4,8,16", help="adapter ranks, cycled")
    p.add_argument("--max-loras", type=int, default=8, help="--spawn: device slots")
    p.add_argument("--max-lora-rank", type=int, default=16, help="--spawn")
    p.add_argument("--max-cpu-loras", type=int, default=64, help="--spawn: host tier")
    p.add_argument("--zipf", type=float, default=1.0, help="popularity exponent s")
    p.add_argument("--stream-fraction", type=float, default=0.5)
    p.add_argument("--base-fraction", type=float, default=0.05)
    p.add_argument("--cancel-fraction", type=float, default=0.15)
    p.add_argument("--deadline-fraction", type=float, default=0.15)
    p.add_argument("--deadline-range", type=_pair(float), default=(0.2, 2.0), metavar="LO,HI",
                   help="seconds, uniform")
    p.add_argument("--cancel-after", type=_pair(float), default=(0.05, 1.0), metavar="LO,HI",
                   help="unary cancellations: seconds after sending, uniform")
    p.add_argument("--max-new-tokens", type=_pair(int), default=(8, 32), metavar="LO,HI")
    p.add_argument("--churn-every", type=float, default=1.0, help="seconds between churn rounds; 0 = off")
    p.add_argument("--churn-traffic", type=float, default=0.1, help="share of requests on churn adapters")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of requests without a short one")
    p.add_argument("--admin-token",
                   help="sent as `authorization: Bearer TOKEN` on every call (adapter calls need the admin "
                        "token; the server accepts it on generation calls too); with --spawn the spawned "
                        "server requires it")
    p.add_argument("--adapter-dir", help="--target: write adapters here (one of the server's roots)")
    p.add_argument("--server-pid", type=int, help="--target: read the server's RSS from /proc/PID")
    p.add_argument("--metrics-url", help="--target: Prometheus endpoint (RSS, running/waiting, KV)")
    p.add_argument("--rss-every", type=float, default=10.0,
                   help="sample the server's RSS every this many seconds during the run (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", help="write the summary and every outcome as JSON")
    p.add_argument("--md-out", help="write a Markdown report")
    p.add_argument("--keep", action="store_true", help="keep the temporary adapter folders")
    args = p.parse_args(argv)
    if args.target and (args.model or args.cache_dir):
        p.error("--model/--cache-dir apply to --spawn only")
    if args.churn_every < 0:
        p.error("--churn-every must be >= 0")
    return args


# --- memory and remote state ---------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    """Unlabelled samples (and the sum of labelled ones, per name) of a Prometheus text page."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            values[m[1]] = values.get(m[1], 0.0) + float(m[3])
    return values


class Memory:
    def __init__(self, args):
        self.pid = "self" if args.spawn else args.server_pid
        self.url = args.metrics_url

    def read(self) -> int | None:
        gc.collect()  # our own garbage (spawn: server and client share this heap)
        return self.sample()

    def sample(self) -> int | None:
        """RSS without collecting first (the timeline sampler's thread must not run gc)."""
        if self.pid is not None:
            return ss.rss_bytes(self.pid)
        if self.url:
            value = scrape(self.url).get("process_resident_memory_bytes")
            return None if value is None else int(value)
        return None

    def timeline(self, every_s: float, stop: threading.Event, out: list) -> threading.Thread:
        """Append (seconds since start, RSS) every `every_s` until `stop`: growth that levels off
        is a cache filling up, growth that keeps its slope is a leak."""
        def run() -> None:
            t0 = time.monotonic()
            while not stop.wait(every_s):
                out.append((round(time.monotonic() - t0, 1), self.sample()))
        thread = threading.Thread(target=run, name="soak-rss", daemon=True)
        thread.start()
        return thread

    def read_trimmed(self) -> int | None:
        """This process only: RSS after glibc's malloc_trim(0) hands free heap pages back to the
        OS. What it removes is memory no object uses (freed adapter tensors fragment the heap);
        a leak stays, so raw minus trimmed growth tells retention from leaks."""
        if self.pid != "self":
            return None
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            return None
        return ss.rss_bytes()


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / MiB:.1f} MiB"


# --- set-up ----------------------------------------------------------------------------------------
def make_adapters(args, model_dir: Path, top: Path) -> tuple[dict, dict]:
    ranks = tuple(int(r) for r in args.ranks.split(","))
    ids = [f"soak-a{i:03d}" for i in range(args.adapters)]
    churn_ids = [f"soak-churn{i:02d}" for i in range(args.churn_adapters)]
    zipf = ss.write_adapters(top / "zipf", ids, model_dir, ranks, seed=args.seed)
    churn = ss.write_adapters(top / "churn", churn_ids, model_dir, ranks, seed=args.seed + 1)
    return zipf, churn


def soak_config(args, zipf: dict, churn: dict, requests: int, prefix: str, duration=None) -> sd.SoakConfig:
    ids = tuple(zipf)
    return sd.SoakConfig(
        adapter_ids=ids, requests=requests, duration_s=duration, concurrency=args.concurrency,
        zipf_s=args.zipf, base_fraction=args.base_fraction, stream_fraction=args.stream_fraction,
        cancel_fraction=args.cancel_fraction, deadline_fraction=args.deadline_fraction,
        deadline_s=args.deadline_range, cancel_after_s=args.cancel_after, max_new_tokens=args.max_new_tokens,
        churn=tuple((k, str(v)) for k, v in churn.items()),
        churn_every_s=args.churn_every or None, churn_traffic=args.churn_traffic if churn else 0.0,
        popular_paths=tuple((k, str(zipf[k])) for k in ids[:4]), timeout_s=args.timeout,
        seed=args.seed, id_prefix=prefix, admin_token=args.admin_token)


async def _load_all(target: str, zipf: dict, token: str | None) -> None:
    import grpc
    from loraplex.api.pb.loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc

    md = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(target) as channel:
        stub = adapters_pb2_grpc.AdaptersStub(channel)
        for aid, path in zipf.items():
            await stub.LoadAdapter(apb.LoadAdapterRequest(adapter_id=aid, path=str(path)), timeout=60,
                                   metadata=md)


async def _model_path(target: str, token: str | None) -> Path:
    import grpc
    from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        md = (("authorization", f"Bearer {token}"),) if token else None
        stub = generation_pb2_grpc.GenerationStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30, metadata=md)
    return Path(info.model_path)


def wait_drained(engine, timeout: float = 15.0):
    """Engine stats once nothing runs, waits or holds KV blocks (or the last poll at the timeout):
    aborts land within a step, so a short poll covers clients that gave up a moment ago."""
    end = time.monotonic() + timeout
    while True:
        st = engine.stats()
        if (st.num_running, st.num_waiting, st.kv_blocks_used) == (0, 0, 0) or time.monotonic() > end:
            return st
        time.sleep(0.05)


def command_line(argv: list[str]) -> str:
    """The command as run, the admin token replaced: reports get committed and shared."""
    out, hide = [sys.executable], False
    for arg in argv:
        if hide:
            out.append("***")
        elif arg.startswith("--admin-token="):
            out.append("--admin-token=***")
        else:
            out.append(arg)
        hide = arg == "--admin-token"
    return " ".join(shlex.quote(a) for a in out)


# --- the run ---------------------------------------------------------------------------------------
def run(args) -> tuple[dict, sd.SoakResult]:
    torch.set_num_threads(args.threads)
    top = Path(args.adapter_dir) if args.adapter_dir else Path(tempfile.mkdtemp(prefix="loraplex-soak-"))
    spawned = None
    report: dict = {"command": command_line(sys.argv),
                    "load_at_start": os.getloadavg()}
    try:
        if args.spawn:
            from loraplex.config import EngineConfig, LoraConfig
            from loraplex.serve import model_path
            from loraplex.config import ModelConfig

            model_dir = Path(args.model) if args.model else model_path(ModelConfig(cache_dir=args.cache_dir))
            zipf, churn = make_adapters(args, model_dir, top)
            lora = LoraConfig(max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                              max_cpu_loras=args.max_cpu_loras, adapter_root=str(top / "zipf"),
                              allowed_roots=(str(top / "churn"),))
            engine = EngineConfig(max_new_tokens_cap=max(args.max_new_tokens[1], 64))
            auth = None
            if args.admin_token:  # the spawned server requires it on LoadAdapter/UnloadAdapter
                from loraplex.config import AuthConfig
                auth = AuthConfig(admin_token=args.admin_token)
            spawned = ss.spawn_server(model_dir, engine, lora, dtype=args.dtype, auth=auth)
            target = spawned.address
            report["server"] = {**spawned.info, "max_loras": args.max_loras, "max_cpu_loras": args.max_cpu_loras,
                                "torch_threads": args.threads, "engine": vars(engine)}
        else:
            target = args.target
            model_dir = asyncio.run(_model_path(target, args.admin_token))
            zipf, churn = make_adapters(args, model_dir, top) if args.adapters or args.churn_adapters else ({}, {})
            asyncio.run(_load_all(target, zipf, args.admin_token))  # adapter_root or not, they exist now
            report["server"] = {"target": target, "model": str(model_dir)}
        memory = Memory(args)
        rss, trimmed = {"start": memory.read()}, {"start": memory.read_trimmed()}
        if zipf:
            report["prime"] = dict(asyncio.run(sd.prime(target, zipf, args.admin_token)))
        if args.warmup_requests:
            warm = asyncio.run(sd.run_soak(target, soak_config(args, zipf, churn, args.warmup_requests, "warm")))
            report["warmup"] = sd.summarize(warm)
            if spawned is not None:
                wait_drained(spawned.engine)
        rss["after_warmup"], trimmed["after_warmup"] = memory.read(), memory.read_trimmed()
        requests = args.requests if args.duration is None else max(args.requests, 10**9)
        cfg = soak_config(args, zipf, churn, requests, "main", args.duration)
        timeline: list = []
        stop_sampling = threading.Event()
        sampler = memory.timeline(args.rss_every, stop_sampling, timeline) if args.rss_every else None
        try:
            res = asyncio.run(sd.run_soak(target, cfg))
        finally:
            stop_sampling.set()
            if sampler is not None:
                sampler.join()
        report["rss_timeline"] = timeline
        report["summary"] = sd.summarize(res)
        violations = list(res.violations) + [v for o in res.outcomes.values() for v in sd.check_outcome(o)]
        end: dict = {}
        if spawned is not None:
            st = wait_drained(spawned.engine)
            submitted, finished = spawned.audit.snapshot("main-")
            violations += sd.reconcile(res.sent_ids, res.outcomes, submitted, finished)
            m = spawned.manager.stats
            end.update(num_running=st.num_running, num_waiting=st.num_waiting, kv_blocks_used=st.kv_blocks_used,
                       server_submitted=len(submitted), server_finished=len(finished),
                       server_finish_reasons=spawned.audit.reasons("main-"), preemptions=st.preemptions_total,
                       device_slot_hits=m.hits, device_slot_misses=m.misses, device_evictions=m.device_evictions,
                       host_evictions=m.host_evictions, adapter_loads=dict(m.loads), adapter_unloads=m.unloads)
        elif args.metrics_url:
            vals = scrape(args.metrics_url)
            end.update({k: vals.get(k) for k in ("loraplex_requests_running", "loraplex_requests_waiting",
                                                 "loraplex_kv_cache_usage_ratio")})
        if zipf or churn:
            infos = asyncio.run(sd.list_adapters(target, args.admin_token))
            busy = {a.adapter_id: a.requests_in_flight for a in infos if a.requests_in_flight}
            end["adapters_listed"], end["adapters_in_flight"] = len(infos), busy
            violations += [f"adapter {k}: {v} requests still in flight at the end" for k, v in busy.items()]
        if spawned is not None and (end["num_running"], end["num_waiting"], end["kv_blocks_used"]) != (0, 0, 0):
            violations.append(f"engine not drained: {end}")
        rss["end"], trimmed["end"] = memory.read(), memory.read_trimmed()
        report.update(end_state=end, rss_bytes=rss, rss_trimmed_bytes=trimmed, violations=violations,
                      load_at_end=os.getloadavg())
        return report, res
    finally:
        if spawned is not None:
            spawned.stop()
        if not args.adapter_dir and not args.keep:
            shutil.rmtree(top, ignore_errors=True)


# --- output ----------------------------------------------------------------------------------------
def markdown(report: dict, args) -> str:
    s, rss, trim, end = report["summary"], report["rss_bytes"], report["rss_trimmed_bytes"], report["end_state"]
    load = lambda t: "/".join(f"{x:.2f}" for x in t)  # noqa: E731
    lines = [
        "# Soak: loraplex under mixed gRPC traffic", "",
        "```bash", report["command"], "```", "",
        f"- Server: {json.dumps(report['server'])}",
        f"- Load average at start {load(report['load_at_start'])}, at end {load(report['load_at_end'])} "
        f"({os.cpu_count()} cores)",
        f"- Workload: {args.concurrency} closed-loop streams, {args.adapters} zipf adapters (s={args.zipf}), "
        f"{args.churn_adapters} churn adapters, {args.stream_fraction:.0%} streams, "
        f"{args.cancel_fraction:.0%} cancelled, {args.deadline_fraction:.0%} short deadlines "
        f"({args.deadline_range[0]}-{args.deadline_range[1]} s), {args.max_new_tokens[0]}-{args.max_new_tokens[1]} "
        f"new tokens (greedy, EOS ignored), churn every {args.churn_every} s; "
        f"{args.warmup_requests} warm-up requests first, after one 1-token request per zipf adapter "
        f"(statuses {json.dumps(report.get('prime', {}))}) so the host tier holds them all before RSS "
        "is taken after warm-up", "",
        "| requests | count |", "|---|---:|",
        f"| sent | {s['sent']} |", f"| completed (OK) | {s['completed']} |",
        f"| cancelled | {s['cancelled']} |", f"| deadline exceeded | {s['deadline_exceeded']} |",
        *(f"| failed: {k} | {v} |" for k, v in s["failed_by_status"].items()),
        f"| streams / unary | {s['streams']} / {s['sent'] - s['streams']} |",
        f"| distinct adapters used | {s['adapters_used']} |", "",
        f"By client action: `{json.dumps(s['by_action'])}`", "",
        f"Adapter calls during traffic: `{json.dumps(s['admin'])}`", "",
        "| throughput and latency | value |", "|---|---:|",
        f"| wall time | {s['wall_s']} s |", f"| tokens received | {s['tokens']} |",
        f"| tokens/s | {s['tokens_per_s']} |",
        f"| TTFT p50 / p90 / p99 (streams, OK) | {_ms(s['ttft_ms_streams'])} |",
        f"| end-to-end p50 / p90 / p99 (OK) | {_ms(s['e2e_ms'])} |", "",
        "| process RSS | raw | after malloc_trim(0) |", "|---|---:|---:|",
        *(f"| {label} | {_mib(rss[k])} | {_mib(trim[k])} |"
          for label, k in (("start", "start"), ("after warm-up", "after_warmup"), ("end", "end"))),
        f"| end - after warm-up | {_delta(rss)} | {_delta(trim)} |",
    ]
    if report.get("rss_timeline"):
        lines += ["", "RSS during the run (s: MiB, no gc): " + ", ".join(
            f"{t:g}: {'n/a' if b is None else f'{b / MiB:.0f}'}" for t, b in report["rss_timeline"])]
    lines += ["", f"End state: `{json.dumps(end)}`", "",
              f"Violations: {len(report['violations'])}"]
    lines += [f"- {v}" for v in report["violations"][:50]]
    return "\n".join(lines) + "\n"


def _delta(m: dict) -> str:
    if m["end"] is None or m["after_warmup"] is None:
        return "n/a"
    return f"{(m['end'] - m['after_warmup']) / MiB:+.1f} MiB"


def _ms(p: dict) -> str:
    return " / ".join("-" if p[k] is None else f"{p[k]:.0f} ms" for k in ("p50", "p90", "p99"))


def main(argv=None) -> int:
    args = parse_args(argv)
    report, res = run(args)
    text = markdown(report, args)
    print(text)
    if args.md_out:
        Path(args.md_out).write_text(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({**report, "outcomes": sd.outcome_rows(res)}, indent=1))
    return 0 if not report["violations"] else 1


if __name__ == "__main__":
    sys.exit(main())
