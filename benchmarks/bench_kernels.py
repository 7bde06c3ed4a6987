"""CPU benchmark of the batched LoRA op against the alternatives, side by side in one run.

    .venv/bin/python benchmarks/bench_kernels.py [--threads N] [--repeats N] [--quick]

Methods (all add the same delta into y; correctness of each is checked against the reference first):
  ours        loraplex_kernels cpu backend (per-bucket choice of grouped / gather)
  ours (server layout)  the same on the weights as the server keeps them: B rank-major
              ([slots, R, out] memory) in loraplex_kernels.slot_weight_dtype; this is the compiled
              per-row kernel (lora_rows.c) when it is built, as in the server
  torch path (server layout)  the same layout with the compiled kernel off (the fallback when no C
              compiler is there): torch grouped/gather with float32 slot weights
  grouped     cpu backend forced to torch grouped_mm for every bucket
  gather      cpu backend forced to gather-bmm (weights gathered per token, one bmm)
  dense       dense masked matmul: every token times every active adapter, wrong blocks masked
              (breaks the "work proportional to real rank" contract; shown as the FLOP-wasteful
              but single-GEMM alternative)
  loop        Python loop over the active adapters (rows per adapter precomputed once per step,
              which flatters it: a real per-layer loop would also search for them)
  reference   float64 per-token loop (the oracle)

Shapes: SmolLM2-135M's projections (hidden 576, kv 192, intermediate 1536) and a 4096 square,
decode (T=32 tokens, 32 adapters, one token each) and prefill (T=512: 4 sequences of 128 tokens,
4 adapters), rank 16, float32 and bfloat16. Every method is timed in the same loop, round-robin,
median of the repeats. Writes benchmarks/results/kernels_cpu.md and kernels_cpu.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from loraplex_kernels import build_lora_meta, slot_weight_dtype
from loraplex_kernels.cpu import add_lora_cpu
from loraplex_kernels.reference import add_lora_reference
from loraplex_kernels.testing import TOLERANCE, compare, expected, make_case

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (d_in, d_out)
PROJECTIONS = {
    "q/o 576x576": (576, 576),
    "k/v 576x192": (576, 192),
    "gate/up 576x1536": (576, 1536),
    "down 1536x576": (1536, 576),
    "4096x4096": (4096, 4096),
}


def scenario_idx(kind: str) -> tuple[torch.Tensor, int]:
    """[T] slot per token and the number of adapters."""
    if kind == "decode":  # 32 sequences decoding one token each, 32 different adapters
        return torch.arange(32), 32
    if kind == "prefill":  # 4 prompts of 128 tokens, one adapter each
        return torch.arange(4).repeat_interleave(128), 4
    if kind == "tiny":  # one token, one adapter: the per-call floor
        return torch.zeros(1, dtype=torch.int64), 1
    raise ValueError(kind)


def make_problem(kind: str, d_in: int, d_out: int, dtype: torch.dtype, rank: int = 16):
    idx, n = scenario_idx(kind)
    case = make_case(len(idx), d_in, d_out, n, "uniform", str(rank), max_rank=rank * 2, dtype=dtype, seed=1)
    case.idx = idx
    return case


def loop_method(case):
    """Python loop over adapters; the per-adapter rows are found once, outside the timed call."""
    ranks = case.ranks.tolist()
    groups = [(s, torch.nonzero(case.idx == s).flatten(), ranks[s]) for s in sorted(set(case.idx.tolist())) if s >= 0]

    def run(y, x, A, B, scales):
        for s, rows, r in groups:
            delta = (x[rows] @ A[s, :r].T) @ B[s, :, :r].T * float(scales[s])
            y.index_add_(0, rows, delta.to(y.dtype))

    return run


def dense_method(case):
    """One GEMM against all active adapters' A stacked, mask, one GEMM against B stacked."""
    active = sorted(s for s in set(case.idx.tolist()) if s >= 0)
    r = int(case.ranks[active].max())
    act = torch.tensor(active)
    col_slot = act.repeat_interleave(r)  # [n*r], slot of each stacked rank column
    own = case.idx[:, None] == col_slot[None, :]  # [T, n*r]
    rows = torch.nonzero(case.idx >= 0).flatten()
    coef_mask = own[rows]

    def run(y, x, A, B, scales):
        a = A[:, :r].index_select(0, act).reshape(-1, A.shape[2])  # [n*r, in]
        b = B[:, :, :r].index_select(0, act).permute(1, 0, 2).reshape(B.shape[1], -1)  # [out, n*r]
        coef = (coef_mask * scales.index_select(0, col_slot)).to(x.dtype)  # [R, n*r]
        v = (x.index_select(0, rows) @ a.T) * coef
        y.index_add_(0, rows, (v @ b.T).to(y.dtype))

    return run


def methods_for(case, include_reference: bool):
    meta = build_lora_meta(case.idx, case.ranks)
    # The slot layout the server keeps (lora/layers.py): B rank-major, in slot_weight_dtype
    # (float32 on CPU). Converted once here, as the server does at slot-write time.
    A_srv = case.A.to(slot_weight_dtype(case.A.dtype, "cpu"))
    B_srv = case.B.transpose(1, 2).contiguous().to(A_srv.dtype).transpose(1, 2)
    A_fb, B_fb = A_srv.float(), B_srv.float()  # the torch fallback keeps float32 slots
    m = {
        "ours": lambda y, x, A, B, s: add_lora_cpu(y, x, A, B, s, meta),
        "ours (server layout)": lambda y, x, A, B, s: add_lora_cpu(y, x, A_srv, B_srv, s, meta),
        "torch path (server layout)": lambda y, x, A, B, s: add_lora_cpu(y, x, A_fb, B_fb, s, meta, native=False),
        "grouped": lambda y, x, A, B, s: add_lora_cpu(y, x, A, B, s, meta, grouped=True),
        "gather": lambda y, x, A, B, s: add_lora_cpu(y, x, A, B, s, meta, grouped=False),
        "dense": dense_method(case),
        "loop": loop_method(case),
    }
    if include_reference:
        m["reference"] = lambda y, x, A, B, s: add_lora_reference(y, x, A, B, s, meta)
    return m


class CacheFlusher:
    """Evicts the CPU caches before each timed call. In a served model a projection's LoRA weights
    were last touched a whole forward pass earlier (hundreds of MB of other weights since), so
    they are cold; without this the method timed right after another one on the same weights
    would look up to 1.5x faster than it is."""

    def __init__(self, enabled: bool, megabytes: int = 96):
        self.buf = torch.ones(megabytes * 2**20 // 4) if enabled else None

    def __call__(self) -> None:
        if self.buf is not None:
            # Read (not write) 3x the L3: the caches end up full of clean lines, so the timed call
            # pays for its own misses but not for writing someone else's dirty lines back.
            self.buf.sum()


FLUSH = CacheFlusher(False)


def time_side_by_side(methods: dict, case, repeats: int) -> dict[str, float]:
    """Median seconds per call; methods interleaved so drifting machine load hits all alike."""
    samples = {k: [] for k in methods}
    y = case.y0.clone()
    for k, fn in methods.items():  # warm up (first-call allocations, oneDNN primitive caches)
        fn(y, case.x, case.A, case.B, case.scales)
    for i in range(repeats):
        for k, fn in methods.items():
            if k == "reference" and i >= max(3, repeats // 10):
                continue  # the oracle is slow; a few samples suffice
            FLUSH()
            t0 = time.perf_counter()
            fn(y, case.x, case.A, case.B, case.scales)
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def check_all(methods: dict, case) -> None:
    want = expected(case)
    for k, fn in methods.items():
        y = case.y0.clone()
        fn(y, case.x, case.A, case.B, case.scales)
        res = compare(y, case, want)
        tol = TOLERANCE[case.x.dtype]
        assert res["untouched"] and res["err"] <= tol, (k, res)


def tune_table(dtype: torch.dtype, repeats: int) -> list[str]:
    """grouped vs gather as rows per slot grow: where the cpu backend's threshold comes from."""
    lines = [f"| {dtype} | slots | " + " | ".join(f"{p} rows/slot" for p in (1, 2, 4, 8)) + " |",
             "|---|---|" + "---|" * 4]
    for d in (576, 4096):
        for n in (4, 32):
            cells = []
            for per in (1, 2, 4, 8):
                idx = torch.arange(n * per) % n
                case = make_case(len(idx), d, d, n, "uniform", "16", max_rank=32, dtype=dtype, seed=2)
                case.idx = idx
                meta = build_lora_meta(idx, case.ranks)
                t = time_side_by_side({
                    "grouped": lambda y, x, A, B, s: add_lora_cpu(y, x, A, B, s, meta, grouped=True),
                    "gather": lambda y, x, A, B, s: add_lora_cpu(y, x, A, B, s, meta, grouped=False),
                }, case, repeats)
                cells.append(f"{t['grouped'] * 1e6:.0f} / {t['gather'] * 1e6:.0f}")
            lines.append(f"| {d}x{d} | {n} | " + " | ".join(cells) + " |")
    return lines


def fused_table(repeats: int) -> list[str]:
    """q/k/v of SmolLM2 (576 -> 576, 192, 192) in one add_lora_multi call vs three add_lora calls,
    bfloat16 activations on the server's slot layout (slot_weight_dtype, rank-major B), cold caches."""
    from loraplex_kernels.cpu import add_lora_multi_cpu

    lines = ["## q/k/v fused (add_lora_multi) vs three add_lora calls, server slot layout, rank 16",
             "", "| scenario | three calls (us) | fused (us) | fused / three |", "|---|---:|---:|---:|"]
    for kind in ("decode", "prefill"):
        cases = [make_problem(kind, 576, out, torch.bfloat16) for out in (576, 192, 192)]
        meta = build_lora_meta(cases[0].idx, cases[0].ranks)
        x = cases[0].x
        wdt = slot_weight_dtype(torch.bfloat16, "cpu")
        A_g = torch.stack([c.A for c in cases], dim=2).to(wdt)  # [slots, R, 3, in]
        Bs = [c.B.transpose(1, 2).contiguous().to(wdt).transpose(1, 2) for c in cases]
        scales = torch.stack([c.scales for c in cases], dim=1)  # [slots, 3]
        ys = [c.y0.clone() for c in cases]

        def three(*_):
            for m in range(3):
                add_lora_cpu(ys[m], x, A_g[:, :, m], Bs[m], scales[:, m], meta)

        def one(*_):
            add_lora_multi_cpu(ys, x, A_g, Bs, scales, meta)

        t = time_side_by_side({"three": three, "fused": one}, cases[0], repeats)
        lines.append(f"| {kind} | {t['three'] * 1e6:,.0f} | {t['fused'] * 1e6:,.0f} | {t['fused'] / t['three']:.2f} |")
        print(kind, "qkv", {k: f"{v * 1e6:.0f}us" for k, v in t.items()}, flush=True)
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="few shapes and repeats (smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--warm-cache", action="store_true", help="do not evict caches between calls")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global FLUSH
    FLUSH = CacheFlusher(not args.warm_cache)
    repeats = 5 if args.quick else args.repeats
    projections = dict(list(PROJECTIONS.items())[:1]) if args.quick else PROJECTIONS
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []  # (scenario, projection, dtype, {method: seconds})
    for dtype in (torch.float32, torch.bfloat16):
        for kind in ("decode", "prefill"):
            for pname, (d_in, d_out) in projections.items():
                case = make_problem(kind, d_in, d_out, dtype)
                methods = methods_for(case, include_reference=True)
                check_all(methods, case)
                t = time_side_by_side(methods, case, repeats)
                rows.append((kind, pname, str(dtype).replace("torch.", ""), t))
                print(kind, pname, dtype, {k: f"{v * 1e6:.0f}us" for k, v in t.items()}, flush=True)

    # Per-call floors: the smallest real call, the no-adapter fast path, the once-per-step meta.
    # Warm caches here: these measure Python/dispatch overhead, not memory.
    flush, FLUSH = FLUSH, CacheFlusher(False)
    floors = []
    for dtype in (torch.float32, torch.bfloat16):
        case = make_problem("tiny", 576, 576, dtype)
        t = time_side_by_side({k: v for k, v in methods_for(case, False).items() if k in ("ours", "loop")}, case, repeats * 3)
        floors.append((f"T=1, 1 adapter, 576x576, {str(dtype).replace('torch.', '')}", t["ours"], t["loop"]))
    empty = build_lora_meta(torch.full((32,), -1), torch.full((32,), 16, dtype=torch.int32))
    from loraplex_kernels import add_lora

    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        add_lora(None, None, None, None, None, empty)
    fast = (time.perf_counter() - t0) / n
    meta_times = {}
    for kind in ("decode", "prefill"):
        idx, n_ad = scenario_idx(kind)
        ranks = torch.full((n_ad,), 16, dtype=torch.int32)
        ts = []
        for _ in range(repeats * 3):
            t0 = time.perf_counter()
            build_lora_meta(idx, ranks)
            ts.append(time.perf_counter() - t0)
        meta_times[kind] = statistics.median(ts)

    FLUSH = flush
    fused = [] if args.quick else fused_table(repeats)
    tune = [] if args.quick else tune_table(torch.float32, repeats) + [""] + tune_table(torch.bfloat16, repeats)
    write_markdown(args.out / "kernels_cpu.md", rows, floors, fast, meta_times, tune, args.threads,
                   repeats, cold=not args.warm_cache, fused=fused)
    plot(args.out / "kernels_cpu.png", rows)
    print(f"wrote {args.out / 'kernels_cpu.md'} and {args.out / 'kernels_cpu.png'}")


def write_markdown(path, rows, floors, fast, meta_times, tune, threads, repeats, cold, fused=()) -> None:
    methods = list(rows[0][3])
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"
    lines = [
        "# Batched LoRA op on CPU",
        "",
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{threads} torch thread(s), median of {repeats} interleaved repeats (reference: a few), "
        f"1-min load average at the end {load} (other jobs share this box). "
        + ("Caches evicted before every timed call (cold weights, as in a served model)." if cold
           else "Warm caches (no eviction between calls)."),
        "",
        "Microseconds per call (one projection, y += LoRA delta). Rank 16. decode: T=32, 32 adapters,",
        "one token each; prefill: T=512, 4 adapters x 128 tokens. `speedup` = loop / ours (server layout),",
        "the layout the server runs (the compiled kernel, weights in " + str(slot_weight_dtype(torch.bfloat16, "cpu")).replace("torch.", "")
        + " for a bfloat16 model); `ours` is the same op on the test's out-major B in the activations' dtype (torch path);",
        "`torch path (server layout)` is what runs where the kernel cannot be compiled.",
        "",
        "| scenario | projection | dtype | " + " | ".join(methods) + " | speedup |",
        "|---|---|---|" + "---:|" * (len(methods) + 1),
    ]
    for kind, pname, dt, t in rows:
        cells = " | ".join(f"{t[m] * 1e6:,.0f}" for m in methods)
        served = t.get("ours (server layout)", t["ours"])
        lines.append(f"| {kind} | {pname} | {dt} | {cells} | {t['loop'] / served:.1f}x |")
    lines += ["", "## Per-call floors (warm caches: Python + dispatch overhead)", "", "| call | ours (us) | loop (us) |", "|---|---:|---:|"]
    for name, ours, loop in floors:
        lines.append(f"| {name} | {ours * 1e6:.1f} | {loop * 1e6:.1f} |")
    lines.append(f"| no adapter in the batch (fast path) | {fast * 1e6:.2f} | - |")
    for kind, t in meta_times.items():
        lines.append(f"| build_lora_meta, {kind} (once per step, not per layer) | {t * 1e6:.1f} | - |")
    if fused:
        lines += [""] + list(fused)
    if tune:
        lines += ["", "## grouped vs gather (us, `grouped / gather`), square projection, rank 16", ""] + tune
    path.write_text("\n".join(lines) + "\n")


def plot(path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(rows[0][3])
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), sharey=True)
    for ax, dt in zip(axes, ("float32", "bfloat16")):
        sel = [r for r in rows if r[2] == dt]
        labels = [f"{k}\n{p}" for k, p, _, _ in sel]
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            ax.bar([j + i * width for j in range(len(sel))], [r[3][m] * 1e6 for r in sel], width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sel))], labels, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{dt}: us per call (log), lower is better")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
