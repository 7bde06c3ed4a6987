"""Where the LoRA part of a decode step goes: memory, compute, or Python.

The step profile (profile_decode.py) gives LoRA's total; this splits it. 32 sequences decode on 32
random rank-8 adapters (q/k/v/o), and every LoRA call of the step (PoolGroup / PoolMember.apply:
q/k/v as one call, o as one, per layer) is timed in place, then replayed:

- in the step: the calls as the engine makes them (the adapters' weights are cold: the base
  model's ~270 MB streamed through the caches since the last call of the same layer);
- replayed in order: the same calls back to back (59 MB of adapters, more than the L3);
- hot: each call repeated right after itself (its ~0.5 MB of weights cached): compute only;
- Python side: the calls with the compiled kernel replaced by a no-op.

    python benchmarks/profile_lora_calls.py     # ~1 min -> results/profile_lora_calls_cpu.md

The calls are the Python layers' (lora/layers.py): the compiled decoder layers
(model/compiled_layers.py, bfloat16 on AMX CPUs) make the same kernel calls from C, so this script
turns them off. Their in-step LoRA time is profile_decode.py's "LoRA deltas" phase.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "profile_lora_calls_cpu.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    from decode_driver import make_decode_engine
    from machine import cpu_info
    from profile_decode import write_adapters

    from loraplex.config import LoraConfig
    from loraplex.lora import layers
    from loraplex.lora.manager import LoraManager
    from loraplex.model.default_model import ensure_default_model
    from loraplex.model.loader import load_model
    from loraplex_kernels import native

    from loraplex.model import compiled_layers

    compiled_layers.COMPILED = False  # the Python layers, whose LoRA calls are timed here (see the top)
    load0 = os.getloadavg()
    loaded = load_model(ensure_default_model(), getattr(torch, a.dtype), torch.device("cpu"))
    tmp = tempfile.TemporaryDirectory(prefix="loraplex-lora-calls-")
    ids, nbytes, _ = write_adapters(loaded, Path(tmp.name), a.batch, 8)
    manager = LoraManager(LoraConfig(max_loras=a.batch, max_lora_rank=16, max_cpu_loras=max(64, a.batch),
                                     adapter_root=tmp.name), loaded.model, loaded.dtype, "cpu")
    for aid in ids:
        manager.load(aid, Path(tmp.name) / aid)
    dec = make_decode_engine(loaded, a.batch, 32, a.steps + 2, lora_manager=manager, adapters=ids)

    calls: list = []  # (function, self, ys, x, lora) of every LoRA call, in order
    spent = [0.0]
    group_apply, member_apply = layers.PoolGroup.apply, layers.PoolMember.apply

    def timed(fn):
        def wrapper(self, ys, x, lora):
            t0 = time.perf_counter()
            fn(self, ys, x, lora)
            spent[0] += time.perf_counter() - t0
            calls.append((fn, self, ys, x, lora))
        return wrapper

    layers.PoolGroup.apply, layers.PoolMember.apply = timed(group_apply), timed(member_apply)
    try:
        dec.step()  # first-call costs
        calls.clear()
        spent[0] = 0.0
        steps = [dec.step() for _ in range(a.steps)]
    finally:
        layers.PoolGroup.apply, layers.PoolMember.apply = group_apply, member_apply
    per_step = len(calls) // a.steps
    one = calls[-per_step:]

    def replay(rounds: int = 3) -> float:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for fn, s, ys, x, lora in one:
                fn(s, ys, x, lora)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def hot() -> float:
        total = 0.0
        for fn, s, ys, x, lora in one:
            fn(s, ys, x, lora)
            t0 = time.perf_counter()
            for _ in range(5):
                fn(s, ys, x, lora)
            total += (time.perf_counter() - t0) / 5
        return total

    in_step = spent[0] / a.steps
    in_order, hot_s = replay(), hot()
    kernel = native._functions["loraplex_lora_pooled"]
    native._functions["loraplex_lora_pooled"] = lambda *args: 0
    try:
        python_side = replay()
    finally:
        native._functions["loraplex_lora_pooled"] = kernel
    tmp.cleanup()
    load1 = os.getloadavg()
    adapter_mb = a.batch * nbytes / 1e6
    rows = [("in the step", in_step), ("replayed in order (cold)", in_order), ("hot (cached weights)", hot_s),
            ("Python side only", python_side)]
    lines = [
        f"# The LoRA calls of a {a.batch}-sequence decode step: memory, compute, Python (CPU)", "",
        f"- CPU: {cpu_info().describe()}",
        f"- torch {torch.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load average "
        f"at start {load0[0]:.2f}, at end {load1[0]:.2f}",
        f"- Default model, {a.dtype}; {a.batch} random rank-8 adapters on q/k/v/o, sequence i on adapter i; "
        f"{per_step} LoRA calls per step; {adapter_mb:.0f} MB of adapter weights read per step; "
        f"median step {statistics.median(steps) * 1e3:.1f} ms.",
        "- Command: `" + " ".join(["python benchmarks/profile_lora_calls.py", *(sys.argv[1:] if argv is None else argv)]) + "`",
        "", "| LoRA calls of one step | ms | GB/s of adapter weights |", "|---|---:|---:|",
    ]
    lines += [f"| {name} | {s * 1e3:.2f} | {adapter_mb / 1e3 / s:.1f} |" for name, s in rows]
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
