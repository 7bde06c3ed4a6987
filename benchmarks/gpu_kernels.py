"""GPU check + benchmark of the Triton LoRA kernels. Self-contained: run from the repository root.

    python benchmarks/gpu_kernels.py            # on a CUDA machine; writes $OUT/kernels_gpu.md (+ .json) if OUT is set
    python benchmarks/gpu_kernels.py --smoke    # anywhere: tiny shapes under TRITON_INTERPRET=1 (CPU)

1. Correctness: triton add_lora vs the float64 reference on random data at realistic shapes
   (relative error = max |y - want| / max |delta|, rows with idx = -1 bit-identical), bfloat16 and
   float32, mixed ranks, garbage beyond each rank; and no device->host sync inside add_lora
   (torch.cuda.set_sync_debug_mode("error") around the call).
2. Timing (CUDA events, median): triton vs a Python loop over adapters vs torch gather-bmm
   (weights gathered per token, punica's naive baseline) vs torch grouped_mm (CUTLASS on sm90,
   weights copied per active slot), decode and prefill.
Needs only torch + triton (+ this repository's kernels/ folder, put on sys.path here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "kernels"))

# name -> (d_in, d_out)
SHAPES = {
    "SmolLM2 q 576x576": (576, 576),
    "SmolLM2 up 576x1536": (576, 1536),
    "Llama-8B q 4096x4096": (4096, 4096),
    "Llama-8B kv 4096x1024": (4096, 1024),
    "Llama-8B up 4096x14336": (4096, 14336),
    "Llama-8B down 14336x4096": (14336, 4096),
}
# name -> (tokens, adapters, prefill layout, rank)
SCENARIOS = {
    "decode 32 tok / 32 adapters r16": (32, 32, False, "16"),
    "decode 256 tok / 64 adapters mixed r": (256, 64, False, "mixed"),
    "prefill 2048 tok / 4 adapters r16": (2048, 4, True, "16"),
    "prefill 1024 tok / 16 adapters r64": (1024, 16, True, "64"),
}


def build_methods(case, meta):
    import torch
    import torch.nn.functional as F

    from loraplex_kernels.triton_shrink_expand import add_lora_triton

    ranks = case.ranks.tolist()
    idx_h = case.idx.tolist()
    active = sorted({s for s in idx_h if s >= 0})
    groups = [(s, torch.nonzero(case.idx == s).flatten(), ranks[s]) for s in active]  # once per step
    rows = torch.nonzero(case.idx >= 0).flatten()
    row_slot = case.idx[rows]
    r_max = max(ranks[s] for s in active)

    def loop(y, x, A, B, sc):
        for s, rws, r in groups:
            y.index_add_(0, rws, ((x[rws] @ A[s, :r].T) @ B[s, :, :r].T * sc[s]).to(y.dtype))

    def gather_bmm(y, x, A, B, sc):
        # Pads every slot to the largest active rank (no per-row rank without a mask); the
        # padded columns are zeroed via the scale-times-mask so garbage does not leak in.
        a = A[:, :r_max].index_select(0, row_slot)  # [R, r, in]
        b = B[:, :, :r_max].index_select(0, row_slot)  # [R, out, r]
        mask = (torch.arange(r_max, device=x.device)[None, :] < case.ranks[row_slot][:, None]).to(torch.float32)
        v = torch.bmm(x[rows].unsqueeze(1), a.transpose(1, 2)) * (mask * sc[row_slot][:, None]).unsqueeze(1).to(x.dtype)
        y.index_add_(0, rows, torch.bmm(v, b.transpose(1, 2)).squeeze(1).to(y.dtype))

    device = case.x.device
    order = torch.cat([rws for _, rws, _ in groups])  # [R] batch rows grouped by slot
    offs = torch.tensor([len(rws) for _, rws, _ in groups], device=device).cumsum(0).to(torch.int32)
    act = torch.tensor(active, device=device)

    r_g = min(case.A.shape[1], -(-r_max // 8) * 8)  # grouped_mm wants 16-byte rows

    def grouped(y, x, A, B, sc):
        a = A[:, :r_g].index_select(0, act)  # [n, r, in]
        b = B[:, :, :r_g].index_select(0, act)
        v = F.grouped_mm(x[order], a.transpose(1, 2), offs=offs)  # [R, r]
        mask = torch.arange(r_g, device=x.device)[None, :] < case.ranks[case.idx[order]][:, None]
        v = (v.float() * mask * sc[case.idx[order]][:, None]).to(x.dtype)
        y.index_add_(0, order, F.grouped_mm(v, b.transpose(1, 2), offs=offs).to(y.dtype))

    return {
        "triton": lambda y, x, A, B, sc: add_lora_triton(y, x, A, B, sc, meta),
        "loop": loop,
        "gather-bmm": gather_bmm,
        "grouped_mm": grouped,
    }


def cuda_time(fn, reps: int = 50) -> float:
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)  # us
    return statistics.median(times)


def check(case, fn, device) -> dict:
    import torch

    from loraplex_kernels.testing import compare, expected

    want = expected(case)
    dev = case.to(device)
    meta = dev.meta()
    y = dev.y0.clone()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any device->host sync inside raises
        try:
            fn(y, dev.x, dev.A, dev.B, dev.scales, meta)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    else:
        fn(y, dev.x, dev.A, dev.B, dev.scales, meta)
    return compare(y, case, want)


def run_checks(device: str, small: bool) -> list[str]:
    import torch

    from loraplex_kernels.testing import TOLERANCE, make_case
    from loraplex_kernels.triton_shrink_expand import add_lora_triton

    fn = lambda y, x, A, B, sc, meta: add_lora_triton(y, x, A, B, sc, meta)  # noqa: E731
    shapes = [(64, 96), (129, 33)] if small else [(576, 576), (576, 1536), (4096, 4096), (4096, 1024), (14336, 4096)]
    lines = ["| check | dtype | rel err | tol | idx=-1 rows untouched | ok |", "|---|---|---:|---:|---|---|"]
    failures = 0
    for d_in, d_out in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            for T, n, prefill, pop in ((7, 3, False, "distinct"), (33, 5, True, "zipf"), (257, 64, True, "uniform")):
                if small and T > 33:
                    continue
                case = make_case(T, d_in, d_out, n, pop, "mixed", dtype=dtype, prefill=prefill, seed=T + n)
                res = check(case, fn, device)
                tol = TOLERANCE[dtype]
                ok = res["untouched"] and res["err"] <= tol
                failures += not ok
                lines.append(f"| {d_in}x{d_out} T={T} adapters={n} {pop}{' prefill' if prefill else ''} | "
                             f"{str(dtype)[6:]} | {res['err']:.2e} | {tol:.0e} | {res['untouched']} | {'yes' if ok else 'NO'} |")
                print(lines[-1], flush=True)
    lines.append("")
    lines.append(f"**{'all checks passed' if failures == 0 else f'{failures} CHECKS FAILED'}**")
    return lines


def check_baselines(device: str) -> list[str]:
    """The timed alternatives must compute the same thing, or their timings mean nothing."""
    import torch

    from loraplex_kernels.testing import TOLERANCE, compare, expected, make_case

    lines = ["", "| baseline sanity (64x96, T=33, 5 adapters, mixed ranks) | dtype | rel err | ok |", "|---|---|---:|---|"]
    bad = 0
    for dtype in (torch.float32, torch.bfloat16):
        case = make_case(33, 64, 96, 5, "zipf", "mixed", dtype=dtype, prefill=True, seed=3)
        want = expected(case)
        dev = case.to(device)
        for name, fn in build_methods(dev, dev.meta()).items():
            y = dev.y0.clone()
            fn(y, dev.x, dev.A, dev.B, dev.scales)
            res = compare(y, case, want)
            ok = res["untouched"] and res["err"] <= TOLERANCE[dtype]
            bad += not ok
            lines.append(f"| {name} | {str(dtype)[6:]} | {res['err']:.2e} | {'yes' if ok else 'NO'} |")
    if bad:
        lines.append(f"**{bad} CHECKS FAILED**")
    return lines


def lora_bytes(case) -> int:
    """The least one add_lora call must move: each active slot's A and B rows up to its rank, x of
    the rows with an adapter, and y of those rows read and written (rows with idx = -1 untouched)."""
    idx = case.idx.tolist()
    active = {s for s in idx if s >= 0}
    rows = sum(s >= 0 for s in idx)
    d_in, d_out = case.x.shape[1], case.y0.shape[1]
    w = case.A.element_size()
    weights = sum(int(case.ranks[s]) * (d_in + d_out) for s in active) * w
    return weights + rows * d_in * case.x.element_size() + 2 * rows * d_out * case.y0.element_size()


def hbm_bandwidth(timer=cuda_time, mib: int = 1024) -> float:
    """GB/s (1e9 bytes) of a device-to-device copy of `mib` MiB (read + write counted)."""
    import torch

    src = torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6) / 1e9


def run_timing(device: str = "cuda", timer=cuda_time, shapes=SHAPES, scenarios=SCENARIOS,
               hbm_gbps: float | None = None, records: list | None = None) -> list[str]:
    """Markdown rows of the timing table; `records` (if given) gets one dict per row for the
    machine-readable output (scripts/gpu_check.py reads it)."""
    import torch

    from loraplex_kernels.testing import make_case

    methods = ["triton", "loop", "gather-bmm", "grouped_mm"]
    lines = ["| scenario | projection | meta build (us, once per step) | " + " | ".join(methods)
             + " | loop / triton | triton GB/s | % of HBM |",
             "|---|---|---:|" + "---:|" * (len(methods) + 3)]
    for sname, (T, n, prefill, rank_mode) in scenarios.items():
        for pname, (d_in, d_out) in shapes.items():
            case = make_case(T, d_in, d_out, n, "uniform", rank_mode, max_rank=64, dtype=torch.bfloat16,
                             prefill=prefill, none_frac=0.1, seed=1).to(device)
            meta_t = []
            for _ in range(20):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                meta = case.meta()
                meta_t.append((time.perf_counter() - t0) * 1e6)
            fns = build_methods(case, meta)
            y = case.y0.clone()
            t = {}
            for m in methods:
                try:
                    t[m] = timer(lambda: fns[m](y, case.x, case.A, case.B, case.scales))
                except Exception as e:  # e.g. grouped_mm without its CUTLASS path on this GPU
                    print(f"{m} failed on {sname} {pname}: {e}", flush=True)
                    t[m] = float("nan")
            cells = " | ".join(f"{t[m]:.1f}" for m in methods)
            nbytes = lora_bytes(case)
            gbps = nbytes / (t["triton"] * 1e-6) / 1e9
            share = f"{100 * gbps / hbm_gbps:.0f} %" if hbm_gbps else "-"
            lines.append(f"| {sname} | {pname} | {statistics.median(meta_t):.0f} | {cells} | "
                         f"{t['loop'] / t['triton']:.1f}x | {gbps:.0f} | {share} |")
            if records is not None:
                records.append(dict(scenario=sname, projection=pname, decode=not prefill, bytes=nbytes,
                                    triton_us=t["triton"], loop_us=t["loop"], triton_gbps=gbps))
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes under TRITON_INTERPRET=1 on CPU")
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        sys.exit("no CUDA device: run with --smoke for the interpreter check on CPU")
    header = [f"# Triton LoRA kernels ({'interpreter smoke run, CPU' if not cuda else torch.cuda.get_device_name()})", "",
              f"torch {torch.__version__}, triton {__import__('triton').__version__}", "", "## Correctness vs float64 reference", ""]
    lines = header + run_checks("cuda" if cuda else "cpu", small=not cuda) + check_baselines("cuda" if cuda else "cpu")
    records: list[dict] = []
    hbm = None
    if cuda and not args.no_timing:
        hbm = hbm_bandwidth()
        lines += ["", f"Device-to-device copy of 1 GiB: **{hbm:.0f} GB/s** (the HBM bandwidth the kernel is compared with).",
                  "", "## Time per call (us, CUDA events, median of 50; bfloat16; triton excludes the meta build)", "",
                  "triton GB/s = the least bytes the call must move (active slots' A/B up to their rank, x and "
                  "y of the rows with an adapter) / its time.", ""]
        lines += run_timing(hbm_gbps=hbm, records=records)
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "kernels_gpu.md").write_text(text)
        (Path(out) / "kernels_gpu.json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name() if cuda else "cpu", hbm_gbps=hbm, rows=records,
                 checks_failed="CHECKS FAILED" in text), indent=1))
        print(f"wrote {Path(out) / 'kernels_gpu.md'} and kernels_gpu.json")
    if "CHECKS FAILED" in text:
        sys.exit(1)


if __name__ == "__main__":
    main()
