"""The pooled LoRA op (add_lora_pooled, weights in one flat memory pool found through a PoolTable)
against the dense slot-tensor op (BoundLora), side by side in one run, on the CPU backend.

    .venv/bin/python benchmarks/bench_pooled_kernel.py [--threads N] [--repeats N] [--warm-cache]

Shapes: the default model's (SmolLM2-135M) projection groups: q/k/v (576 -> 576, 192, 192), gate/up
(576 -> 1536, 1536), o (576 -> 576), down (1536 -> 576). A decode step: 32 rows, 32 distinct
adapters of rank 8 or 16 on every projection, bfloat16 activations and weights (the compiled
kernel's dtype). Methods, each a bound op as the server calls it:

  dense          BoundLora on slot tensors A [64 slots, 64 (max_lora_rank), M, in], Bt rank-major
  pooled         BoundPooled: 4096-slot table (the adapters in random slots), each adapter's blocks
                 packed one after another with its A blocks adjacent (the fused shrink)
  pooled, scattered  the same adapters with every block at a random place of a larger pool (no
                 fused shrink, no locality between an adapter's blocks)

Caches are evicted before every timed call (as in a served model, where a projection's weights
were last touched a whole forward pass earlier; benchmarks/bench_kernels.py's CacheFlusher) unless
--warm-cache. Methods are interleaved, median of the repeats. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import CacheFlusher  # noqa: E402
from bench_serving import machine_info  # noqa: E402

from loraplex_kernels import BoundLora, BoundPooled, PoolTable, build_lora_meta, native, set_backend  # noqa: E402

GROUPS = {  # name -> (d_in, d_outs)
    "q/k/v": (576, (576, 192, 192)),
    "gate/up": (576, (1536, 1536)),
    "o": (576, (576,)),
    "down": (1536, (576,)),
}
ROWS = ADAPTERS = 32
DENSE_SLOTS, DENSE_MAX_RANK = 64, 64
POOL_SLOTS = 4096


def build(d_in: int, d_outs: tuple[int, ...], rank: int, seed: int = 0):
    """The same 32 adapters as dense slot tensors, a packed pool and a scattered pool."""
    g = torch.Generator().manual_seed(seed)
    M, dt = len(d_outs), torch.bfloat16
    A = [[torch.randn(rank, d_in, generator=g) / d_in ** 0.5 for _ in range(M)] for _ in range(ADAPTERS)]
    Bt = [[torch.randn(rank, d, generator=g) / rank ** 0.5 for d in d_outs] for _ in range(ADAPTERS)]
    scales = torch.rand(ADAPTERS, M, generator=g) + 0.5

    # dense: slots 0..31 of a 64-slot tensor, the server's layout (B rank-major)
    A_d = torch.randn(DENSE_SLOTS, DENSE_MAX_RANK, M, d_in, generator=g).to(dt)
    Bt_d = [torch.randn(DENSE_SLOTS, DENSE_MAX_RANK, d, generator=g).to(dt) for d in d_outs]
    sc_d = torch.zeros(DENSE_SLOTS, M)
    for s in range(ADAPTERS):
        for m in range(M):
            A_d[s, :rank, m] = A[s][m].to(dt)
            Bt_d[m][s, :rank] = Bt[s][m].to(dt)
        sc_d[s] = scales[s]
    dense = BoundLora(A_d, [bt.transpose(1, 2) for bt in Bt_d], sc_d)
    dense_ranks = torch.zeros(DENSE_SLOTS, dtype=torch.int32)
    dense_ranks[:ADAPTERS] = rank

    # pooled: the adapters in random slots of a 4096-slot table
    pool_slots = torch.randperm(POOL_SLOTS, generator=g)[:ADAPTERS].tolist()
    per_adapter = rank * (M * d_in + sum(d_outs))
    pools = {}
    for layout in ("packed", "scattered"):
        size = per_adapter * ADAPTERS * (1 if layout == "packed" else 4)
        pool = torch.randn(size, generator=g).to(dt)  # garbage around the blocks
        table = PoolTable(M, POOL_SLOTS, d_in, d_outs)
        if layout == "scattered":  # every block in its own region, regions shuffled
            n_blocks = ADAPTERS * M * 2
            region = size // n_blocks
            order = torch.randperm(n_blocks, generator=g).tolist()
        cursor, b = 0, 0
        for s, slot in enumerate(pool_slots):
            offs = []
            for kind, blocks in (("A", A[s]), ("Bt", Bt[s])):
                for w in blocks:
                    if layout == "packed":
                        at, cursor = cursor, cursor + w.numel()
                    else:
                        at = order[b] * region + int(torch.randint(region - w.numel() + 1, (1,), generator=g))
                        b += 1
                    pool[at:at + w.numel()] = w.flatten().to(dt)
                    offs.append(at)
            for m in range(M):
                table.set(m, slot, offs[m], offs[M + m], rank, float(scales[s, m]))
        pools[layout] = BoundPooled(pool, table)
    pool_ranks = torch.zeros(POOL_SLOTS, dtype=torch.int32)
    pool_ranks[pool_slots] = rank
    return dense, dense_ranks, pools, pool_ranks, pool_slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--warm-cache", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    set_backend("cpu")
    if not native.available():
        raise SystemExit(f"the compiled CPU kernels are not available here: {native.unavailable_reason()}")
    flush = CacheFlusher(not args.warm_cache)
    load = os.getloadavg()
    rows = []
    for rank in (8, 16):
        for name, (d_in, d_outs) in GROUPS.items():
            dense, dense_ranks, pools, pool_ranks, pool_slots = build(d_in, d_outs, rank)
            order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(1))
            meta_d = build_lora_meta(order, dense_ranks)  # row t -> adapter order[t]
            meta_p = build_lora_meta(torch.tensor(pool_slots)[order], pool_ranks)
            x = torch.randn(ROWS, d_in, dtype=torch.bfloat16)
            members = tuple(range(len(d_outs)))
            y0s = [torch.randn(ROWS, d, dtype=torch.bfloat16) for d in d_outs]
            methods = {
                "dense": lambda ys: dense(ys, x, meta_d, members),
                "pooled": lambda ys: pools["packed"](ys, x, meta_p, members),
                "pooled, scattered": lambda ys: pools["scattered"](ys, x, meta_p, members),
            }
            outs = {}
            for k, fn in methods.items():  # same answer (same weights), and warm-up
                ys = [y.clone() for y in y0s]
                fn(ys)
                outs[k] = ys
            for k in ("pooled", "pooled, scattered"):
                for a, b in zip(outs["dense"], outs[k]):
                    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.05)
            samples = {k: [] for k in methods}
            ys = [y.clone() for y in y0s]
            for _ in range(args.repeats):
                for k, fn in methods.items():
                    flush()
                    t0 = time.perf_counter()
                    fn(ys)
                    samples[k].append(time.perf_counter() - t0)
            t = {k: statistics.median(v) for k, v in samples.items()}
            rows.append((name, rank, t))
            print(name, rank, {k: f"{v * 1e6:.0f}us" for k, v in t.items()}, file=sys.stderr, flush=True)

    cache = "warm caches" if args.warm_cache else "caches evicted before every call"
    print(f"## Pooled vs dense LoRA op, CPU, decode: {ROWS} rows, {ADAPTERS} distinct adapters, bfloat16\n")
    print("\n".join(machine_info(load)))
    print(f"- {args.threads} torch thread(s), median of {args.repeats} interleaved repeats, {cache}; "
          f"{native.describe()}\n")
    print("| group (in -> outs) | rank | dense BoundLora (us) | pooled (us) | pooled, scattered (us) "
          "| pooled / dense |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rank, t in rows:
        d_in, d_outs = GROUPS[name]
        print(f"| {name} ({d_in} -> {'/'.join(map(str, d_outs))}) | {rank} | {t['dense'] * 1e6:.1f} | "
              f"{t['pooled'] * 1e6:.1f} | {t['pooled, scattered'] * 1e6:.1f} | {t['pooled'] / t['dense']:.2f} |")


if __name__ == "__main__":
    main()
