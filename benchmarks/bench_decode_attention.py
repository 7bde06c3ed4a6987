"""The compiled paged decode attention (loraplex_kernels/decode_attention.c) on CPU, cold caches.

One pass = the default model's 30 layers of decode attention for B sequences (9 query heads, 3 KV
heads, head dim 64, blocks of 16 positions scattered over the cache as a long-running server
leaves them), each layer with its own K/V cache, so every block comes from memory as in a real
step. Reports us per layer and the K/V bytes read per second (an int8 cache's scales counted),
for caches in bfloat16, int8 (--kv-cache-dtype int8, q bfloat16) and float32, at several context
lengths; the caches of one context are timed pass by pass in turn, and the time relative to
bfloat16's is the median of the per-round ratios.

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


CACHES = {"bfloat16": (torch.bfloat16, torch.bfloat16), "int8": (torch.bfloat16, torch.int8),
          "float32": (torch.float32, torch.float32)}  # name: (q dtype, cache dtype)


def setup(name: str, batch: int, ctx: int):
    """A pass over LAYERS layers for one cache kind: () -> seconds; and its K/V bytes."""
    from loraplex_kernels import attention_native

    q_dtype, dtype = CACHES[name]
    g = torch.Generator().manual_seed(ctx)
    per_seq = -(-ctx // BLOCK)
    num_blocks = batch * per_seq + 8
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    layers = []
    for _ in range(LAYERS):
        if dtype == torch.int8:
            k, v = (torch.randint(-127, 128, shape, generator=g, dtype=torch.int8) for _ in range(2))
            ks, vs = (torch.rand(shape[:3], generator=g) * 0.05 for _ in range(2))
        else:
            k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
            ks = vs = None
        layers.append((k, v, ks, vs))
    table = torch.randperm(num_blocks, generator=g)[:batch * per_seq].view(batch, per_seq).to(torch.int64)
    lens = torch.full((batch,), ctx, dtype=torch.int64)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=g).to(q_dtype)

    def one_pass() -> float:
        t0 = time.perf_counter()
        for k, v, ks, vs in layers:
            attention_native.decode_attention(q, slice(0, batch), k, v, table, lens, HEAD_DIM ** -0.5, None, ks, vs)
        return time.perf_counter() - t0

    per_position = KV_HEADS * (HEAD_DIM * dtype.itemsize + (4 if dtype == torch.int8 else 0))
    return one_pass, batch * ctx * per_position * 2 * LAYERS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--contexts", default="40,200,1000")
    p.add_argument("--caches", default=",".join(CACHES), help=f"of {', '.join(CACHES)}")
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
        "", "| cache | context | us per layer | K/V GB/s | time / bfloat16's |", "|---|---:|---:|---:|---:|",
    ]
    names = a.caches.split(",")
    for ctx in (int(c) for c in a.contexts.split(",")):
        cases = {name: setup(name, a.batch, ctx) for name in names}
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(a.rounds + 1):  # the first round untimed: first-call costs
            for name, (one_pass, _) in cases.items():
                sec = one_pass()
                if r:
                    times[name].append(sec)
        for name in names:
            sec = statistics.median(times[name])
            rel = (f"{statistics.median(x / b for x, b in zip(times[name], times['bfloat16'])):.3f}"
                   if "bfloat16" in times else "")
            lines.append(f"| {name} | {ctx} | {sec / LAYERS * 1e6:.0f} | {cases[name][1] / sec / 1e9:.1f} | {rel} |")
            print(lines[-1], flush=True)
        del cases
    write_report(lines, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
