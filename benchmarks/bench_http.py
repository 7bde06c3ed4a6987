"""The two front doors side by side: the same closed-loop workload through gRPC (GenerateStream)
and through the OpenAI-compatible HTTP API (/v1/completions, stream=true), against ONE
`loraplex serve` process, in alternating rounds (grpc, http, grpc, http, ...) so that drift on a
shared machine hits both alike.

Workload: `--streams` concurrent streams (default 32), each sending its next request as soon as
its previous one finished, `--requests` requests per round; every request is the same
chat-formatted question as token ids (gRPC `prompt_token_ids`, HTTP `prompt` as a list of ids),
greedy, `--max-new-tokens` tokens with EOS ignored, so both doors generate exactly the same
tokens. Reported per round: generated tokens / wall time of the round, and the client-measured
time to first token (submit -> first chunk carrying a token), median and p90. The verdict
compares the medians over rounds: HTTP may lose at most 5% of gRPC's tokens/s.

The clients run in this process on one asyncio loop (grpc.aio and httpx, the HTTP one reading
the SSE lines without parsing more than the usage chunk), the server in its own process: on a
2-core machine both share the cores, as they would on a small box.

    .venv/bin/python benchmarks/bench_http.py                          # default model, ~5 min
    .venv/bin/python benchmarks/bench_http.py --model DIR --quick      # smoke run

Writes benchmarks/results/http_vs_grpc_cpu.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "http_vs_grpc_cpu.md"

from benchmarks.bench_serving import QUESTIONS, machine_info  # noqa: E402


def start_server(args) -> tuple[subprocess.Popen, str, str, list[str]]:
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--port", "0", "--http-port", "0",
           "--dtype", args.dtype, "--max-num-seqs", str(args.streams)]
    if args.model:
        cmd += ["--model", args.model]
    cmd += shlex.split(args.server_args)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if args.server_threads:
        # torch's intra-op pool size of the server (OMP_NUM_THREADS is read at torch's start-up).
        # 1 is contention-proof on a shared 2-core box: two threads spin-wait for each other
        # whenever another process runs (see tests/conftest.py one_torch_thread).
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    log, grpc_addr, http_url = [], None, None
    deadline = time.monotonic() + 600
    while grpc_addr is None:
        line = proc.stderr.readline()
        if not line or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server did not start:\n" + "".join(log))
        log.append(line)
        m = re.search(r"OpenAI-compatible HTTP on (http://\S+)", line)
        http_url = m.group(1) if m else http_url
        m = re.search(r"serving .* on (\S+:\d+)", line)
        grpc_addr = m.group(1) if m else None
    # Keep draining stderr (the request log) so the server never blocks on a full pipe.
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    if args.server_threads:
        cmd = [f"OMP_NUM_THREADS={args.server_threads}"] + cmd
    return proc, grpc_addr, http_url, cmd


def prompts(args, tokenizer_dir: str | None) -> list[list[int]]:
    """Chat-formatted questions as token ids, from the served model's tokenizer."""
    from transformers import AutoTokenizer

    from loraplex.model.default_model import ensure_default_model

    folder = tokenizer_dir or ensure_default_model(None)
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    for q in QUESTIONS:
        conv = [{"role": "user", "content": q}]
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            out.append(tok.encode(text, add_special_tokens=False))
        else:
            out.append(tok.encode(q))
    return out


async def run_grpc(address: str, ids: list[list[int]], args) -> dict:
    import grpc

    from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc

    sampling = pb.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        async def one(i: int) -> tuple[float, int]:
            start, ttft, tokens = time.perf_counter(), None, 0
            req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids[i % len(ids)]), sampling=sampling)
            async for msg in stub.GenerateStream(req):
                if msg.token_ids and ttft is None:
                    ttft = time.perf_counter() - start
                tokens += len(msg.token_ids)
            return ttft, tokens

        return await closed_loop(one, args)


async def run_http(url: str, model: str, ids: list[list[int]], args) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=args.streams + 8, max_keepalive_connections=args.streams + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        async def one(i: int) -> tuple[float, int]:
            body = {"model": model, "prompt": ids[i % len(ids)], "max_tokens": args.max_new_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            start, ttft, tokens = time.perf_counter(), None, 0
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    if ttft is None and '"text":""' not in line:
                        ttft = time.perf_counter() - start
                    if '"choices":[]' in line:  # the usage chunk
                        tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            return ttft, tokens

        return await closed_loop(one, args)


async def closed_loop(one, args) -> dict:
    queue = iter(range(args.requests))
    ttfts, tokens = [], 0

    async def stream():
        nonlocal tokens
        for i in queue:
            ttft, n = await one(i)
            ttfts.append(ttft)
            tokens += n

    t0 = time.perf_counter()
    await asyncio.gather(*[stream() for _ in range(args.streams)])
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall": wall, "ttfts": ttfts}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return 1e3 * (statistics.median(xs) if q == 0.5 else xs[min(len(xs), max(1, math.ceil(q * len(xs)))) - 1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--requests", type=int, default=96, help="requests per round")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="rounds per door (alternating)")
    p.add_argument("--server-args", default="", help="extra `loraplex serve` flags")
    p.add_argument("--server-threads", type=int, default=None,
                   help="torch threads of the server (OMP_NUM_THREADS; default: torch's, one per core)")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 streams, 16 requests, 1 round, 8 tokens")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.streams, args.requests, args.rounds, args.max_new_tokens = 8, 16, 1, 8
    load_start = os.getloadavg()
    ids = prompts(args, args.model)
    proc, grpc_addr, http_url, cmd = start_server(args)
    rows = []
    try:
        import httpx

        model = httpx.get(http_url + "/v1/models").json()["data"][0]["id"]
        # Warm-up through both doors (first-use costs: connections, prefix cache, allocator).
        warm = argparse.Namespace(**{**vars(args), "requests": args.streams})
        asyncio.run(run_grpc(grpc_addr, ids, warm))
        asyncio.run(run_http(http_url, model, ids, warm))
        for r in range(args.rounds):
            for door in ("grpc", "http"):
                res = asyncio.run(run_grpc(grpc_addr, ids, args) if door == "grpc"
                                  else run_http(http_url, model, ids, args))
                row = dict(door=door, round=r + 1, **res)
                rows.append(row)
                print(f"{door} round {r + 1}: {res['tokens']} tokens in {res['wall']:.1f}s = "
                      f"{res['tokens'] / res['wall']:.1f} tok/s; TTFT p50 {pct(res['ttfts'], 0.5):.0f} ms "
                      f"p90 {pct(res['ttfts'], 0.9):.0f} ms", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    write_report(args, rows, cmd, load_start)
    return 0


def write_report(args, rows, cmd, load_start) -> None:
    expected = args.requests * args.max_new_tokens
    by = {d: [r for r in rows if r["door"] == d] for d in ("grpc", "http")}
    med = {d: statistics.median(r["tokens"] / r["wall"] for r in by[d]) for d in by}
    ttft = {d: [t for r in by[d] for t in r["ttfts"]] for d in by}
    loss = 1 - med["http"] / med["grpc"]
    lines = [
        "# HTTP (OpenAI-compatible) vs gRPC: the same workload through both doors of one server",
        "",
        f"One `loraplex serve` process ({'the embedded SmolLM2-135M-Instruct' if not args.model else args.model}, "
        f"{args.dtype}); {args.streams} concurrent streams, closed loop, {args.requests} requests per round, "
        f"greedy, {args.max_new_tokens} new tokens per request with EOS ignored (every round generates "
        f"{expected} tokens). Rounds alternate gRPC / HTTP after one warm-up round through each. gRPC: "
        "GenerateStream with prompt_token_ids (grpc.aio client); HTTP: POST /v1/completions, stream=true, "
        "prompt as token ids (httpx client reading the SSE lines). TTFT is measured by the client, from "
        "sending the request to the first chunk carrying a token.",
        "",
        "| door | round | requests | tokens | wall s | tokens/s | TTFT p50 ms | TTFT p90 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['door']} | {r['round']} | {args.requests} | {r['tokens']} | {r['wall']:.1f} | "
                     f"{r['tokens'] / r['wall']:.1f} | {pct(r['ttfts'], 0.5):.0f} | {pct(r['ttfts'], 0.9):.0f} |")
    lines += [
        "",
        "## Headline",
        "",
        f"- tokens/s, median over rounds: gRPC {med['grpc']:.1f}, HTTP {med['http']:.1f} -> HTTP "
        f"{'loses' if loss > 0 else 'gains'} {abs(loss) * 100:.1f}% "
        f"({'meets' if loss <= 0.05 else 'misses'} the <= 5% target)",
        f"- TTFT over all rounds: gRPC p50 {pct(ttft['grpc'], 0.5):.0f} ms / p90 {pct(ttft['grpc'], 0.9):.0f} ms; "
        f"HTTP p50 {pct(ttft['http'], 0.5):.0f} ms / p90 {pct(ttft['http'], 0.9):.0f} ms",
        f"- every round generated the expected {expected} tokens: "
        f"{'yes' if all(r['tokens'] == expected for r in rows) else 'NO'}",
        "",
        "## Command",
        "",
        "```",
        " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_http.py", *sys.argv[1:]]),
        "```",
        "",
        f"Server: `{' '.join(shlex.quote(c) for c in cmd if c not in (sys.executable, '-m'))}`",
        "",
        "## Machine",
        "",
        *machine_info(load_start),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
