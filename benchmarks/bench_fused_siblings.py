"""A/B of fused sibling projections (q/k/v and gate/up as one GEMM each, model/fused_linear.py) on
decode steps of the default model, float32 and bfloat16, batch 1/8/32/64, in one run.

Two copies of the model per dtype: one fused by the engine (the default), one built with
LORAPLEX_PACK_WEIGHTS=0 (separate GEMMs). Each case is an engine whose sequences all decode
(decode_driver.py); rounds interleave every case, reversed every other round; per case the median
and the best step. On a CPU where oneDNN packs bfloat16 the "off" side also loses the packing, so
there the A/B is packing + fusion together (the report says which).

    python benchmarks/bench_fused_siblings.py               # ~3-6 min on 2 cores
Writes benchmarks/results/fused_siblings_cpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from decode_driver import make_decode_engine  # noqa: E402
from machine import cpu_info  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fused_siblings_cpu.md")
    a = p.parse_args(argv)
    from loraplex.model.default_model import ensure_default_model
    from loraplex.model.fused_linear import PackedSlice
    from loraplex.model.loader import load_model
    from loraplex.model.packed_linear import packing_available

    load0 = os.getloadavg()
    model_dir = ensure_default_model()
    batches = [int(b) for b in a.batches.split(",")]
    engines = {}
    for d in a.dtypes.split(","):
        for fused in (True, False):
            loaded = load_model(model_dir, DTYPES[d], torch.device("cpu"))
            os.environ["LORAPLEX_PACK_WEIGHTS"] = "1" if fused else "0"
            for b in batches:
                dec = make_decode_engine(loaded, b, a.prompt_len, a.rounds * a.steps + 1)
                dec.step()
                engines[(d, fused, b)] = dec
            n = sum(isinstance(p.base, PackedSlice) for _, _, p in loaded.model.iter_projections())
            assert (n > 0) == fused, f"{d} fused={fused}: {n} projections are slices of a group"
    os.environ.pop("LORAPLEX_PACK_WEIGHTS")
    times = {k: [] for k in engines}
    keys = list(engines)
    for r in range(a.rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            for _ in range(a.steps):
                times[k].append(engines[k].step())
        print(f"round {r} done", flush=True)
    lines = ["# Fused sibling projections (q/k/v, gate/up as one GEMM each): decode-step A/B", "",
             f"- CPU: {cpu_info().describe()}; oneDNN bfloat16 packing: {packing_available()}",
             f"- torch {torch.__version__}; {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"- Load average at start {'/'.join(f'{x:.2f}' for x in load0)}, at end "
             f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}: **shared machine**, read the ratios.",
             f"- Command: `python benchmarks/bench_fused_siblings.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- {a.rounds} interleaved rounds x {a.steps} Engine.step() per case; prompts of {a.prompt_len} random tokens.",
             "", "| dtype | batch | fused median ms | separate median ms | fused / separate (median) "
             "| fused best ms | separate best ms | fused / separate (best) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for d in a.dtypes.split(","):
        for b in batches:
            f, s = times[(d, True, b)], times[(d, False, b)]
            fm, sm = statistics.median(f) * 1e3, statistics.median(s) * 1e3
            fb, sb = min(f) * 1e3, min(s) * 1e3
            lines.append(f"| {d} | {b} | {fm:.1f} | {sm:.1f} | {fm / sm:.2f}x | {fb:.1f} | {sb:.1f} | {fb / sb:.2f}x |")
    text = "\n".join(lines) + "\n"
    a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
