"""The compiled paged decode attention (loraplex_kernels/decode_attention.c) on CPU, cold caches.

One pass = the default model's 30 layers of decode attention for B sequences (9 query heads, 3 KV
heads, head dim 64, blocks of 16 positions scattered over the cache as a long-running server
leaves them), each layer with its own K/V cache, so every block comes from memory as in a real
step. Reports us per layer and the K/V bytes read per second, bfloat16 and float32, at several
context lengths.

    python benchmarks/bench_decode_attention.py     # ~15 s
Writes benchmarks/results/decode_attention_cpu.md (--out to change; the AMX Xeon's run: decode_attention_cpu_amx.md).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_info  # noqa: E402
from report import write_report  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "decode_attention_cpu.md"
HEADS, KV_HEADS, HEAD_DIM, BLOCK, LAYERS = 9, 3, 64, 16, 30


def measure(dtype: torch.dtype, batch: int, ctx: int, rounds: int) -> float:
    """Median seconds for one pass over LAYERS layers."""
    from loraplex_kernels import attention_native

    g = torch.Generator().manual_seed(ctx)
    per_seq = -(-ctx // BLOCK)
    num_blocks = batch * per_seq + 8
    caches = [(torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g).to(dtype),
               torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g).to(dtype)) for _ in range(LAYERS)]
    table = torch.randperm(num_blocks, generator=g)[:batch * per_seq].view(batch, per_seq).to(torch.int64)
    lens = torch.full((batch,), ctx, dtype=torch.int64)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=g).to(dtype)
    times = []
    for _ in range(rounds + 1):  # the first pass untimed: first-call costs
        t0 = time.perf_counter()
        for k, v in caches:
            attention_native.decode_attention(q, slice(0, batch), k, v, table, lens, HEAD_DIM ** -0.5, None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--contexts", default="40,200,1000")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    from loraplex_kernels import native

    if not native.available():
        print(f"compiled kernels unavailable: {native.unavailable_reason()}", file=sys.stderr)
        return 2
    lines = [
        "# Paged decode attention on CPU (compiled kernel), cold K/V", "",
        f"- CPU: {cpu_info().describe()}",
        f"- torch {torch.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `python benchmarks/bench_decode_attention.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- {a.batch} sequences decoding, {HEADS} query / {KV_HEADS} KV heads of {HEAD_DIM}, blocks of {BLOCK} "
        f"positions in random order; {LAYERS} layers with their own caches per pass; median of {a.rounds} passes.",
        "", "| dtype | context | us per layer | K/V GB/s |", "|---|---:|---:|---:|",
    ]
    for dtype in (torch.bfloat16, torch.float32):
        for ctx in (int(c) for c in a.contexts.split(",")):
            sec = measure(dtype, a.batch, ctx, a.rounds)
            kv_bytes = a.batch * ctx * KV_HEADS * HEAD_DIM * 2 * dtype.itemsize * LAYERS
            lines.append(f"| {str(dtype).removeprefix('torch.')} | {ctx} | {sec / LAYERS * 1e6:.0f} | "
                         f"{kv_bytes / sec / 1e9:.1f} |")
            print(lines[-1], flush=True)
    write_report(lines, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
