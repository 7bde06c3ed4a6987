"""Decode tokens/s at 1, 8, 32 and 64 streams, base model vs 100 adapters, in one run (issue 19's
benchmark table), for bfloat16 and float32.

Each case is an engine whose B sequences are all decoding (benchmarks/decode_driver.py: the real
Engine.step(), scheduler -> runner -> sampler -> postprocessing, from this thread). With adapters,
sequence i runs on adapter i mod 100 (100 random rank-8 adapters on q/k/v/o, all in the pool), so a
step holds min(B, 100) distinct adapters. The base and adapter engines of one (dtype, B) are
stepped alternately, one step each, `--steps` times; a case's figure is the median step. Ratios
(adapters / base) come from the same alternation, which is what survives a noisy machine.

    python benchmarks/bench_decode_streams.py                 # ~5 min on a 2-core CPU
    python benchmarks/bench_decode_streams.py --dtypes float32 --steps 4

Writes benchmarks/results/decode_streams_cpu.md (--out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from decode_driver import VARIANTS  # noqa: E402
DEFAULT_OUT = REPO / "benchmarks" / "results" / "decode_streams_cpu.md"


def measure(loaded, manager, ids: list[str], batch: int, steps: int, prompt_len: int,
            widen: bool, sampling: dict | None = None) -> dict[str, list[float]]:
    """Seconds of each alternated decode step: {"base": [...], "adapters": [...]}."""
    from decode_driver import alternate_steps, make_decode_engine

    cases = {"base": make_decode_engine(loaded, batch, prompt_len, steps + 1, widen=widen, sampling=sampling),
             "adapters": make_decode_engine(loaded, batch, prompt_len, steps + 1, lora_manager=manager,
                                            adapters=ids, widen=widen, sampling=sampling)}
    return alternate_steps(cases, steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per case (alternated)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--sampling", default="greedy",
                   help="greedy, or TEMPERATURE,TOP_P: every request samples so (e.g. 0.8,0.95)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    sampling = None
    if a.sampling != "greedy":
        temperature, top_p = (float(v) for v in a.sampling.split(","))
        sampling = {"temperature": temperature, "top_p": top_p}
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    from machine import cpu_info
    from profile_decode import write_adapters

    from loraplex.config import LoraConfig
    from loraplex.lora.manager import LoraManager
    from loraplex.model.default_model import ensure_default_model
    from loraplex.model.loader import load_model

    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    for dtype_name in a.variants.split(","):
        dtype, widen = VARIANTS[dtype_name]
        loaded = load_model(ensure_default_model(), dtype, torch.device("cpu"))
        with tempfile.TemporaryDirectory(prefix="loraplex-streams-") as tmp:
            ids, _, _ = write_adapters(loaded, Path(tmp), a.adapters, a.rank)
            manager = LoraManager(LoraConfig(max_lora_rank=max(16, a.rank), max_cpu_loras=max(128, a.adapters),
                                             adapter_root=tmp), loaded.model, loaded.dtype, "cpu")
            for aid in ids:
                manager.load(aid, Path(tmp) / aid)
            for batch in batches:
                t = measure(loaded, manager, ids, batch, a.steps, a.prompt_len, widen, sampling)
                base, lora = statistics.median(t["base"]), statistics.median(t["adapters"])
                ratios = [b / l for b, l in zip(t["base"], t["adapters"])]  # per alternation
                rows.append((dtype_name, batch, min(batch, a.adapters), batch / base, batch / lora,
                             statistics.median(ratios)))
                print(f"{dtype_name} B={batch}: base {batch / base:.1f} tok/s, {a.adapters} adapters "
                      f"{batch / lora:.1f} tok/s, ratio {statistics.median(ratios):.3f}", flush=True)
        del loaded
    load1 = os.getloadavg()
    how = "greedy" if sampling is None else f"sampled: temperature {sampling['temperature']:g}, top-p {sampling['top_p']:g}"
    lines = [
        "# Decode tokens/s by stream count: base model vs 100 adapters (CPU)", "",
        f"- CPU: {cpu_info().describe()}",
        f"- torch {torch.__version__}, torch threads {a.threads}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Load average at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, at end "
        f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}",
        f"- Default model (SmolLM2-135M-Instruct); B sequences all decoding (prompts of {a.prompt_len} random "
        f"tokens, {how}) through Engine.step(); adapters: {a.adapters} random rank-{a.rank} adapters on q/k/v/o, "
        f"sequence i on adapter i mod {a.adapters}, all resident in the adapter pool. Base and adapter steps "
        f"alternate, {a.steps} each; tokens/s = B / median step; the ratio is the median of the per-alternation "
        "ratios.", "",
        "Command: `" + " ".join(["python benchmarks/bench_decode_streams.py", *(sys.argv[1:] if argv is None else argv)])
        + "`",
        "",
        "| dtype | streams | distinct adapters per step | base tok/s | adapters tok/s | adapters / base |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {d} | {b} | {n} | {bt:.1f} | {lt:.1f} | {r:.3f} |" for d, b, n, bt, lt, r in rows]
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
