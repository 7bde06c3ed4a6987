"""Serving throughput on the default model: loraplex's engine at 1/8/32 streams vs transformers.

One run measures, side by side and per dtype:
- transformers `generate`, one request at a time (the baseline a user would otherwise write);
- loraplex `Engine.submit` with 1, 8 and 32 concurrent streams (closed loop: each stream submits
  its next request as soon as its previous one finishes);
- optionally the same closed loop through gRPC (GenerateStream with prompt_token_ids), which adds
  the gRPC + protobuf cost: --grpc serves the same engine from an in-process server,
  --grpc-target HOST:PORT drives a running `loraplex serve` on the default model.

Every request is greedy, has the same max_new_tokens and ignores EOS, so every system produces
exactly the same number of tokens per request; the prompts are the same chat-formatted questions.
Reported: generated tokens/s over the wall time of the whole case, and time to first token
(median, p90) measured by the client from submit to the first token it receives. The 1-stream
engine run is also compared token by token with transformers' answers (same dtype) as a sanity
check that the engine computes the same model.

    .venv/bin/python benchmarks/bench_serving.py                  # both dtypes, ~5-10 min, 2 cores
    .venv/bin/python benchmarks/bench_serving.py --dtypes bfloat16 --streams 1,8,32
    .venv/bin/python benchmarks/bench_serving.py --quick          # smoke run, seconds

Writes benchmarks/results/serving_cpu.md (table, the command, the machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import queue
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "serving_cpu.md"

# Varied lengths so prefill chunks differ; the chat template adds the ~20-token system prompt.
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in simple terms.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
    "Give me a short recipe for pancakes.",
    "What is the difference between a virus and a bacterium?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I reverse a list in Python?",
    "What are the planets of the solar system?",
    "Tell me a fun fact about octopuses.",
    "How does a rainbow form?",
    "Suggest a name for a friendly robot.",
    "What is 17 times 23? Show your work.",
    "Describe the water cycle.",
    "What should I pack for a weekend hiking trip in the mountains?",
]


@dataclasses.dataclass
class CaseResult:
    system: str  # "transformers" | "engine" | "grpc"
    dtype: str
    streams: int
    requests: int
    tokens: int
    wall_s: float
    ttfts: list[float]
    outputs: list[list[int]]  # generated ids per request, in request order
    request_s: list[float] = dataclasses.field(default_factory=list)  # sequential runs only

    @property
    def median_request_tok_per_s(self) -> float | None:
        """tokens/s of the median request: robust to a few requests slowed by other processes."""
        if not self.request_s:
            return None
        return statistics.median(len(o) for o in self.outputs) / statistics.median(self.request_s)

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.wall_s

    def ttft_ms(self, q: float) -> float:
        xs = sorted(self.ttfts)
        if q == 0.5:
            return 1e3 * statistics.median(xs)
        # nearest-rank percentile: with few samples, interpolation would invent values
        return 1e3 * xs[min(len(xs), max(1, math.ceil(q * len(xs)))) - 1]


# --------------------------------------------------------------------------------------------
# transformers, one request at a time
# --------------------------------------------------------------------------------------------

class _FirstTokenTimer:
    """A transformers streamer that only timestamps the first generated token.

    generate() calls put() once with the prompt, then once per new token.
    """

    def __init__(self):
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()

    def end(self):
        pass


def run_transformers(model_dir: Path, dtype: torch.dtype, prompts: list[list[int]],
                     max_new_tokens: int) -> CaseResult:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    # eos_token_id=None: generate never stops early, like the engine's ignore_eos. The explicit
    # attention_mask matters: without one, generate infers padding from pad_token_id (2 =
    # <|im_end|>, which every ChatML prompt contains) once it differs from eos, and masks out
    # the prompt's turn ends, silently changing the answers.
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=2)
    with torch.inference_mode():
        warm = torch.tensor([prompts[0]])
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, **kw)
        ttfts, outputs, request_s = [], [], []
        t0 = time.perf_counter()
        for ids in prompts:
            timer = _FirstTokenTimer()
            start = time.perf_counter()
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x),
                                 max_new_tokens=max_new_tokens, streamer=timer, **kw)
            request_s.append(time.perf_counter() - start)
            ttfts.append(timer.first_token_at - start)
            outputs.append(out[0, len(ids):].tolist())
        wall = time.perf_counter() - t0
    del model
    return CaseResult("transformers", _dtype_name(dtype), 1, len(prompts),
                      sum(map(len, outputs)), wall, ttfts, outputs, request_s)


# --------------------------------------------------------------------------------------------
# loraplex engine, N concurrent streams (closed loop)
# --------------------------------------------------------------------------------------------

def run_engine(engine, dtype: torch.dtype, prompts: list[list[int]], max_new_tokens: int,
               streams: int, system: str = "engine") -> CaseResult:
    from loraplex.engine.request import FinishReason, Request, SamplingParams

    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    n = len(prompts)
    outputs: list[list[int]] = [[] for _ in range(n)]
    submitted_at = [0.0] * n
    first_at = [0.0] * n
    finished: queue.Queue = queue.Queue()

    def callback_for(i: int):
        def on_output(out):  # runs on the engine thread: record and return quickly
            if out.new_token_ids and not outputs[i]:
                first_at[i] = time.perf_counter()
            outputs[i].extend(out.new_token_ids)
            if out.finished:
                finished.put((i, out.finish_reason, out.error))
        return on_output

    def submit(i: int):
        submitted_at[i] = time.perf_counter()
        engine.submit(Request(f"bench-{system}-{streams}-{i}", list(prompts[i]), sampling),
                      callback_for(i))

    t0 = time.perf_counter()
    next_i = 0
    while next_i < min(streams, n):
        submit(next_i)
        next_i += 1
    for _ in range(n):
        i, reason, error = finished.get(timeout=600)
        if reason not in (FinishReason.LENGTH, FinishReason.EOS):
            raise RuntimeError(f"request {i} finished with {reason}: {error}")
        if next_i < n:
            submit(next_i)
            next_i += 1
    wall = time.perf_counter() - t0
    ttfts = [f - s for f, s in zip(first_at, submitted_at)]
    return CaseResult(system, _dtype_name(dtype), streams, n, sum(map(len, outputs)), wall,
                      ttfts, outputs)


def make_engine(model_dir: Path, dtype: torch.dtype, max_streams: int, prompt_len: int,
                max_new_tokens: int):
    from loraplex.config import EngineConfig
    from loraplex.engine.engine import Engine
    from loraplex.model.loader import load_model

    loaded = load_model(model_dir, dtype, torch.device("cpu"))
    block = 16
    per_seq_blocks = -(-(prompt_len + max_new_tokens) // block) + 1
    config = EngineConfig(block_size=block, num_kv_blocks=max(64, max_streams * per_seq_blocks),
                          max_num_seqs=max_streams, max_model_len=prompt_len + max_new_tokens + 16,
                          max_new_tokens_cap=max(max_new_tokens, 16))
    engine = Engine(loaded, config)
    engine.start()
    engine.warmup()
    return engine, loaded


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """How many requests produced identical tokens, and where the others first diverge."""
    same = sum(x == y for x, y in zip(a, b))
    firsts = [next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
              for x, y in zip(a, b) if x != y]
    extra = f"; others diverge at token {sorted(firsts)}" if firsts else ""
    return f"{same}/{len(a)} identical{extra}"


def machine_info(load_at_start: tuple[float, float, float]) -> list[str]:
    from machine import cpu_info

    info = cpu_info()
    cpu, flags = info.name, info.flags
    import transformers
    amx = "yes" if {"amx_bf16", "amx_tile"} <= flags else "no"
    return [
        f"- CPU: {cpu}; {os.cpu_count()} logical cores visible; torch threads "
        f"{torch.get_num_threads()}; AMX-BF16: {amx}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {platform.system()} {platform.release()}",
        f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        # Other processes on the same cores distort every number above; this shows if they ran.
        f"- Load average (1/5/15 min) at start {_fmt_load(load_at_start)}, at end "
        f"{_fmt_load(os.getloadavg())}",
    ]


def _fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def write_report(path: Path, results: list[CaseResult], notes: list[str], args,
                 load_at_start: tuple[float, float, float]) -> str:
    lines = [
        "# Serving throughput on CPU: loraplex engine vs transformers",
        "",
        f"Model: SmolLM2-135M-Instruct (embedded default, converted from the GGUF). "
        f"{args.max_new_tokens} new tokens per request, greedy, EOS ignored (every request "
        f"generates exactly {args.max_new_tokens} tokens). Tokens/s = generated tokens / wall "
        "time of the case; TTFT measured by the client from submit to first token. "
        "`streams` = concurrent requests in flight (closed loop).",
        "",
        "| dtype | system | streams | requests | tokens | wall s | tokens/s | vs transformers "
        "| TTFT median ms | TTFT p90 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r.dtype: r.tok_per_s for r in results if r.system == "transformers"}
    for r in results:
        ratio = f"{r.tok_per_s / base[r.dtype]:.2f}x" if r.dtype in base else "-"
        lines.append(
            f"| {r.dtype} | {r.system} | {r.streams} | {r.requests} | {r.tokens} | "
            f"{r.wall_s:.1f} | {r.tok_per_s:.1f} | {ratio} | {r.ttft_ms(0.5):.0f} | "
            f"{r.ttft_ms(0.9):.0f} |")
    lines += ["", "## Headline", ""]
    top = max(args.streams)
    for dtype, b in base.items():
        eng = [r for r in results if r.system == "engine" and r.dtype == dtype and r.streams == top]
        if eng:
            ratio = eng[0].tok_per_s / b
            verdict = "meets" if ratio >= 8 else "below"
            hf = next(r for r in results if r.system == "transformers" and r.dtype == dtype)
            robust = eng[0].tok_per_s / hf.median_request_tok_per_s
            lines.append(f"- {dtype}: engine at {top} streams = {eng[0].tok_per_s:.1f} tokens/s vs "
                         f"transformers one-at-a-time {b:.1f} tokens/s -> **{ratio:.2f}x** "
                         f"({verdict} the >= 8x target); against transformers' median request "
                         f"({hf.median_request_tok_per_s:.1f} tokens/s, less sensitive to other "
                         f"load on the machine): {robust:.2f}x")
    if notes:
        lines += ["", "## Checks", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Command", "", "```",
              " ".join([".venv/bin/python", "benchmarks/bench_serving.py"]
                       + [shlex.quote(a) for a in sys.argv[1:]]),
              "```", "", "## Machine", ""] + machine_info(load_at_start) + [""]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


# --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default=None,
                   help="comma list of bfloat16,float32 (default both; bfloat16 is the fast CPU "
                        "dtype on AMX machines)")
    p.add_argument("--streams", default="1,8,32", help="comma list of concurrent streams")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-requests", type=int, default=8,
                   help="each case runs max(streams, this) requests")
    p.add_argument("--hf-requests", type=int, default=8,
                   help="requests for the transformers one-at-a-time baseline")
    p.add_argument("--cache-dir", default=None, help="default model cache (~/.cache/loraplex)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--grpc", action="store_true",
                   help="also run every stream count through an in-process gRPC server "
                        "(GenerateStream) on the same engine")
    p.add_argument("--grpc-target", default=None, metavar="HOST:PORT",
                   help="also run every stream count through a running `loraplex serve` "
                        "(default model) via GenerateStream")
    p.add_argument("--no-transformers", action="store_true", help="skip the baseline")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: bfloat16, streams 1,4, 8 new tokens, 4 requests")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.dtypes = args.dtypes or "bfloat16"
        args.streams, args.max_new_tokens, args.min_requests, args.hf_requests = "1,4", 8, 4, 2
    args.dtypes = args.dtypes or "bfloat16,float32"
    args.dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",") if d.strip()]
    args.streams = sorted({int(s) for s in args.streams.split(",") if s.strip()})
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from loraplex.model.default_model import ensure_default_model

    model_dir = ensure_default_model(args.cache_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    n_max = max(max(args.streams), args.min_requests, args.hf_requests)
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}],
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=False))
               for q in (QUESTIONS * (n_max // len(QUESTIONS) + 1))[:n_max]]
    prompt_len = max(map(len, prompts))
    results: list[CaseResult] = []
    notes: list[str] = []

    def show(r: CaseResult):
        print(f"  {r.dtype:9} {r.system:12} streams={r.streams:3} requests={r.requests:3} "
              f"{r.tok_per_s:8.1f} tok/s  TTFT p50 {r.ttft_ms(0.5):6.0f} ms "
              f"p90 {r.ttft_ms(0.9):6.0f} ms  ({r.wall_s:.1f} s)", flush=True)

    for dtype in args.dtypes:
        print(f"== {_dtype_name(dtype)}", flush=True)
        hf = None
        if not args.no_transformers:
            hf = run_transformers(model_dir, dtype, prompts[:args.hf_requests], args.max_new_tokens)
            results.append(hf)
            show(hf)
        engine, loaded = make_engine(model_dir, dtype, max(args.streams), prompt_len,
                                     args.max_new_tokens)
        try:
            for s in args.streams:
                r = run_engine(engine, dtype, prompts[:max(s, args.min_requests)],
                               args.max_new_tokens, s)
                results.append(r)
                show(r)
                wrong = [len(o) for o in r.outputs if len(o) != args.max_new_tokens]
                if wrong:
                    notes.append(f"{r.dtype} engine streams={s}: {len(wrong)} requests produced "
                                 f"{wrong} tokens instead of {args.max_new_tokens}")
                if hf is not None and s == 1:
                    k = min(len(hf.outputs), len(r.outputs))
                    why = (" (bfloat16: different kernels round differently, so greedy paths may "
                           "part at near-ties; float32 is the exactness check)"
                           if dtype == torch.bfloat16 and r.outputs[:k] != hf.outputs[:k] else "")
                    notes.append(f"{r.dtype}: engine (1 stream) vs transformers greedy tokens: "
                                 f"{_agreement(r.outputs[:k], hf.outputs[:k])}{why}")
            if args.grpc:
                results.extend(run_grpc_in_process(loaded, engine, prompts, args, show))
        finally:
            engine.shutdown(0.0)  # idempotent: the gRPC server may have shut it down already
        del engine, loaded

    if args.grpc_target:
        # A separate server process on the same cores: run it after the in-process cases so the
        # two never compete. Its dtype labels the rows (compare with that dtype's baseline).
        dtype_name = grpc_server_dtype(args.grpc_target)
        print(f"== gRPC {args.grpc_target} ({dtype_name})", flush=True)
        for s in args.streams:
            r = run_grpc(args.grpc_target, prompts[:max(s, args.min_requests)],
                         args.max_new_tokens, s)
            r.dtype = dtype_name
            results.append(r)
            show(r)

    text = write_report(args.out, results, notes, args, load_at_start)
    print(f"\nwrote {args.out}\n")
    print(text)
    return 0


def run_grpc(target: str, prompts: list[list[int]], max_new_tokens: int,
             streams: int) -> CaseResult:
    """The same closed loop through a running server's GenerateStream (one thread per stream)."""
    import grpc

    from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb
    from loraplex.api.pb.loraplex.v1 import generation_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(target)
    stub = pb_grpc.GenerationStub(channel)
    sampling = pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    n = len(prompts)
    outputs: list[list[int]] = [[] for _ in range(n)]
    ttfts = [0.0] * n
    errors: list[str] = []
    counter = iter(range(n))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompts[i]),
                                     sampling=sampling, request_id=f"bench-grpc-{streams}-{i}")
            start = time.perf_counter()
            try:
                for msg in stub.GenerateStream(req, timeout=600):
                    if msg.token_ids and not outputs[i]:
                        ttfts[i] = time.perf_counter() - start
                    outputs[i].extend(msg.token_ids)
            except grpc.RpcError as e:
                errors.append(f"request {i}: {e.code().name}: {e.details()}")

    threads = [threading.Thread(target=worker) for _ in range(min(streams, n))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    channel.close()
    if errors:
        raise RuntimeError("gRPC requests failed: " + "; ".join(errors[:5]))
    return CaseResult("grpc", "?", streams, n, sum(map(len, outputs)), wall, ttfts, outputs)


def run_grpc_in_process(loaded, engine, prompts, args, show) -> list[CaseResult]:
    """The same engine behind an in-process gRPC server (client threads in this process too, so
    the rows include the client's protobuf work competing for the GIL with the server)."""
    from loraplex.api.generation_servicer import Runtime
    from loraplex.serve import ServerThread

    out = []
    with ServerThread(Runtime(loaded=loaded, engine=engine)) as srv:  # stop() shuts the engine
        for s in args.streams:
            r = run_grpc(srv.address, prompts[:max(s, args.min_requests)], args.max_new_tokens, s)
            r.dtype = _dtype_name(loaded.dtype)
            out.append(r)
            show(r)
    return out


def grpc_server_dtype(target: str) -> str:
    import grpc

    from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb
    from loraplex.api.pb.loraplex.v1 import generation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        info = pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
    if info.model_name != "smollm2-135m-instruct":
        raise SystemExit(f"--grpc-target serves {info.model_name!r}, not the default model")
    return info.dtype


if __name__ == "__main__":
    sys.exit(main())
