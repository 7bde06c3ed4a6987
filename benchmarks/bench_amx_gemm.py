"""bfloat16 GEMMs of a decode step: our AMX kernel against oneDNN's packed GEMM and plain F.linear.

One pass = the default model's decode GEMMs for all 30 layers (q/k/v fused, o, gate/up fused,
down: 120 distinct weights, 212 MB, so every weight comes from memory as in a real step), then
the vocab projection (576 x 49152). Rows M = 1, 8, 16, 32, 64 (the running sequences). Variants,
interleaved round by round so load from other processes hits them alike:

- `F.linear`: torch's bfloat16 GEMM on the row-major weight (oneDNN, re-blocking it every call);
- `oneDNN packed`: model/packed_linear.py (what the engine ran on AMX CPUs before);
- `AMX (ours)`: model/amx_linear.py / loraplex_kernels/gemm_amx.c;
- `read only`: the same weights only read (int16 max over each matrix): what this machine's
  memory gives a simple sequential reader of these matrices, a practical floor for M = 1.

    python benchmarks/bench_amx_gemm.py            # ~1 min
Writes benchmarks/results/amx_gemm_cpu.md (--out to change). Needs a CPU with AMX-BF16.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_info  # noqa: E402
from report import write_report  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "amx_gemm_cpu.md"
HIDDEN, INTER, QKV, VOCAB, LAYERS = 576, 1536, 960, 49152, 30


def layers() -> list[nn.Linear]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(LAYERS):
        for k, n in ((HIDDEN, QKV), (HIDDEN, HIDDEN), (HIDDEN, 2 * INTER), (INTER, HIDDEN)):
            lin = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, k, generator=g))
            out.append(lin)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,16,32,64")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    from loraplex.model.amx_linear import AmxLinear, amx_wanted
    from loraplex.model.packed_linear import PackedLinear

    if not amx_wanted():
        print("no AMX-BF16 kernel on this machine (or LORAPLEX_AMX=0): nothing to compare", file=sys.stderr)
        return 2
    lins = layers()
    head = nn.Linear(HIDDEN, VOCAB, bias=False, dtype=torch.bfloat16)
    proj_bytes = sum(lin.weight.numel() * 2 for lin in lins)
    head_bytes = head.weight.numel() * 2
    variants = {
        "F.linear": ([(lambda lin: lambda x: nn.functional.linear(x, lin.weight))(lin) for lin in lins],
                     lambda x: nn.functional.linear(x, head.weight)),
        "oneDNN packed": ([PackedLinear(lin) for lin in lins], PackedLinear(head)),
        "AMX (ours)": ([AmxLinear(lin) for lin in lins], AmxLinear(head)),
    }
    ins = [lin.in_features for lin in lins]
    rows = [int(r) for r in a.rows.split(",")]
    times = {(v, m, part): [] for v in variants for m in rows for part in ("proj", "head")}
    reads = []
    for r in range(a.rounds):
        for m in rows:
            xs = {k: torch.randn(m, k).to(torch.bfloat16) for k in (HIDDEN, INTER)}
            for v, (fs, h) in (variants.items() if r % 2 == 0 else reversed(variants.items())):
                t0 = time.perf_counter()
                for f, k in zip(fs, ins):
                    f(xs[k])
                t1 = time.perf_counter()
                h(xs[HIDDEN])
                t2 = time.perf_counter()
                times[(v, m, "proj")].append(t1 - t0)
                times[(v, m, "head")].append(t2 - t1)
        t0 = time.perf_counter()
        for lin in lins:
            lin.weight.view(torch.int16).max()
        reads.append(time.perf_counter() - t0)
        print(f"round {r} done", flush=True)

    cpu = cpu_info()
    lines = [
        "# bfloat16 decode GEMMs on an AMX CPU: our kernel vs oneDNN", "",
        f"- CPU: {cpu.describe()}",
        f"- torch {torch.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `python benchmarks/bench_amx_gemm.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Projections: the default model's 120 decode GEMMs (30 layers; {proj_bytes / 1e6:.0f} MB of weights, "
        f"each read from memory once per pass); vocab projection {HIDDEN} x {VOCAB} ({head_bytes / 1e6:.0f} MB). "
        f"Median (best) ms of {a.rounds} interleaved rounds; GB/s = weight bytes / median time.",
        f"- Read only (int16 max over the same 120 weights): {statistics.median(reads) * 1e3:.2f} ms, "
        f"{proj_bytes / statistics.median(reads) / 1e9:.1f} GB/s.", "",
        "| rows | variant | projections ms | GB/s | vocab ms | projections vs oneDNN packed |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for m in rows:
        base = statistics.median(times[("oneDNN packed", m, "proj")])
        for v in variants:
            pt, ht = times[(v, m, "proj")], times[(v, m, "head")]
            lines.append(f"| {m} | {v} | {statistics.median(pt) * 1e3:.2f} ({min(pt) * 1e3:.2f}) | "
                         f"{proj_bytes / statistics.median(pt) / 1e9:.1f} | {statistics.median(ht) * 1e3:.2f} "
                         f"({min(ht) * 1e3:.2f}) | {base / statistics.median(pt):.2f}x |")
    write_report(lines, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
