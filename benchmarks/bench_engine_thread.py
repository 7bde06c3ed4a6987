"""Decode tokens/s through Engine.submit on the engine's own thread, with and without the starting
thread's OpenMP pool, against Engine.step() driven from the calling thread (CPU).

Why: libgomp keeps a pool of worker threads per thread that ran a parallel region, and with more
pool threads than CPUs it stops spinning between regions (loraplex_kernels/openmp_pool.py). An
engine started from a thread that loaded the model and warmed it up ran on its thread ~1.8x
slower than the same steps called from the loading thread. Engine.start() now releases the
starting thread's pool. Three cases, per batch size B (B requests of --tokens greedy tokens each,
submitted together; tokens/s over the wall time until the last finishes):

- `caller steps`: a second engine, never started, stepped from this thread (Engine.step(): what
  decode_driver and the roofline time);
- `engine thread`: the started engine, this thread's pool released (what start() does);
- `engine thread, caller keeps a pool`: the same after this thread ran a parallel torch op again
  (what every in-process engine did before; a thread that keeps doing torch work still does).

The cases alternate round by round in one process.

    python benchmarks/bench_engine_thread.py          # ~1 min on 2 cores

Writes benchmarks/results/engine_thread_cpu.md (--out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "engine_thread_cpu.md"
CASES = ("caller steps", "engine thread", "engine thread, caller keeps a pool")


def run_requests(engine, batch: int, tokens: int, tag: str, step_here: bool) -> float:
    """Seconds until `batch` greedy requests of `tokens` tokens all finish."""
    from loraplex.engine.request import Request, SamplingParams

    sampling = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    left = [batch]
    done = threading.Event()

    def on_output(out):
        if out.finished:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    t0 = time.perf_counter()
    for i in range(batch):
        engine.submit(Request(f"{tag}-{i}", [100 + (7 * i + j) % 900 for j in range(24)], sampling), on_output)
    if step_here:
        while not done.is_set():
            engine.step()
    elif not done.wait(600):
        raise RuntimeError("requests did not finish")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    from machine import cpu_info
    from report import write_report

    from loraplex.config import EngineConfig
    from loraplex.engine.engine import Engine
    from loraplex.model.default_model import ensure_default_model
    from loraplex.model.loader import load_model
    from loraplex_kernels import openmp_pool

    load0 = os.getloadavg()
    batches = [int(b) for b in a.batches.split(",")]
    loaded = load_model(ensure_default_model(), torch.bfloat16, torch.device("cpu"))
    config = EngineConfig(num_kv_blocks=max(batches) * 6 + 8, max_num_seqs=max(batches))
    caller = Engine(loaded, config)
    threaded = Engine(loaded, config)
    caller.warmup()
    threaded.warmup()
    threaded.start()  # releases this thread's pool
    times: dict[tuple[int, str], list[float]] = {}
    try:
        for r in range(a.rounds + 1):  # round 0 warms every case up, untimed
            for b in batches:
                for case in CASES:
                    if case == "caller steps":
                        dt = run_requests(caller, b, a.tokens, f"c{r}-{b}", step_here=True)
                    else:
                        if case == "engine thread":
                            openmp_pool.release_thread_pool()  # the caller's steps made a pool again
                        else:
                            torch.rand(1 << 22).mul_(1.0001)  # a parallel region: this thread's pool is back
                        dt = run_requests(threaded, b, a.tokens, f"t{r}-{b}-{len(case)}", step_here=False)
                    if r > 0:
                        times.setdefault((b, case), []).append(dt)
    finally:
        threaded.shutdown()
    load1 = os.getloadavg()

    tps = {k: a.tokens * k[0] / statistics.median(v) for k, v in times.items()}
    lines = [
        "# Decode on the engine's thread: the starting thread's OpenMP pool released or kept (CPU)", "",
        f"- CPU: {cpu_info().describe()}",
        f"- torch {torch.__version__}, {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Load average at start {'/'.join(f'{x:.2f}' for x in load0)}, at end {'/'.join(f'{x:.2f}' for x in load1)}",
        f"- Default model, bfloat16; B greedy requests of {a.tokens} new tokens (24-token prompts) submitted together; "
        f"tokens/s = B x {a.tokens} / median wall time over {a.rounds} rounds; the cases alternate within each round.",
        "", "Command: `python benchmarks/bench_engine_thread.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
        "", "| B | " + " | ".join(f"{c} tok/s" for c in CASES) + " | released / kept |",
        "|---:|" + "---:|" * (len(CASES) + 1),
    ]
    for b in batches:
        cells = [f"{tps[(b, c)]:.1f}" for c in CASES]
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {tps[(b, CASES[1])] / tps[(b, CASES[2])]:.2f}x |")
    write_report(lines, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
