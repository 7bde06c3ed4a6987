"""Per-request adapter mixtures vs single adapters on the default model (SmolLM2-135M-Instruct, CPU).

A mixture of k rank-r adapters is served as one adapter of rank k*r (the `cat` combination, see
LoraManager.mixture), so a mixture request costs what a single adapter of rank k*r costs once
built, plus the build the first time its content is seen. Measured here, on one engine:

- warm: closed-loop streams where every request uses a single rank-8 adapter (A), a 2-adapter
  mixture (B, rank 16) or a 4-adapter mixture (C, rank 32), mixtures already built (the cache's
  path: a lookup by content); A, B, C interleaved round by round, median tokens/s ratio B/A, C/A.
- cold: time to build a mixture never seen before (LoraManager.mixture: read the parts, concatenate,
  write into the pool), median over fresh weight combinations, next to the time of one warm
  request of the same mixture.

The machine is shared (2 cores, other jobs running): only ratios measured side by side mean
anything, and the load average at start and end is printed with them.

    python benchmarks/bench_mixtures.py --rounds 5 --streams 8 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_lora_serving import ATTN, Job, Shapes, make_engine, make_uniform_set, run_streams  # noqa: E402
from bench_serving import machine_info  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "mixtures_cpu.md"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16, help="requests per case per round")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    load0 = os.getloadavg()

    from loraplex.config import LoraConfig
    from loraplex.lora.manager import LoraManager
    from loraplex.model.default_model import ensure_default_model
    from loraplex.model.loader import load_model

    dtype = getattr(torch, args.dtype)
    model_dir = ensure_default_model(None)
    loaded = load_model(model_dir, dtype=dtype)
    arch = loaded.arch
    root = Path(tempfile.mkdtemp(prefix="bench-mix-"))
    shapes = Shapes(arch.num_layers, {name: (p.in_features, p.out_features)
                                      for layer, name, p in loaded.model.iter_projections() if layer == 0})
    ids = make_uniform_set(root, 12, shapes, ATTN, 8, torch.float32, str(model_dir), seed=3)
    manager = LoraManager(LoraConfig(max_lora_rank=64, allowed_roots=(str(root),), adapter_memory="512MiB"),
                          loaded.model, loaded.dtype, "cpu")
    for aid in ids:
        manager.load(aid, root / aid)
    prompt_len = 24
    engine = make_engine(loaded, manager, args.streams, prompt_len, args.max_new_tokens)
    prompt = tuple(loaded.tokenizer.encode("Tell me a short story about a robot who learns to paint")[:prompt_len])

    mix2 = manager.mixture([(ids[0], 0.6), (ids[1], 0.4)])
    mix4 = manager.mixture([(ids[i], 0.25) for i in range(4)])
    cases = {"single r8 (4 adapters)": lambda i: ids[i % 4], "mixture 2 x r8": lambda i: mix2,
             "mixture 4 x r8": lambda i: mix4}
    rates: dict[str, list[float]] = {k: [] for k in cases}
    try:
        for r in range(args.rounds):
            for name, pick in cases.items():
                jobs = [Job(prompt, pick(i)) for i in range(args.requests)]
                res = run_streams(engine, manager, jobs, args.streams, args.max_new_tokens, f"{name}-{r}")
                rates[name].append(res.tok_per_s)
        # Cold: fresh weights each time (a new content key), the build alone, then one request on it.
        builds, firsts = [], []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            mix = manager.mixture([(ids[4 + r % 8], 0.5 + 0.01 * r), (ids[(5 + r) % 12], 0.5)])
            builds.append(time.perf_counter() - t0)
            res = run_streams(engine, manager, [Job(prompt, mix)], 1, args.max_new_tokens, f"cold-{r}")
            firsts.append(res.wall_s)
    finally:
        engine.shutdown(1)
        manager.close()

    base = rates["single r8 (4 adapters)"]
    lines = ["# Per-request mixtures vs single adapters (CPU)", "",
             "Machine shared with other jobs (2 cores): ratios are side by side, interleaved round by round; "
             "absolute tokens/s are not comparable across runs.", "", *machine_info(load0), "",
             f"Command: `python benchmarks/bench_mixtures.py --rounds {args.rounds} --streams {args.streams} "
             f"--requests {args.requests} --max-new-tokens {args.max_new_tokens} --dtype {args.dtype}`", "",
             "| case | tokens/s (median) | ratio to single r8 (median of per-round ratios) |", "|---|---|---|"]
    for name, xs in rates.items():
        ratio = statistics.median(x / b for x, b in zip(xs, base))
        lines.append(f"| {name} | {statistics.median(xs):.1f} | {ratio:.2f}x |")
    lines += ["", f"Cold mixture (2 x r8 on q,k,v,o, never seen): build {1e3 * statistics.median(builds):.1f} ms "
              f"(median of {len(builds)}), then one {args.max_new_tokens}-token request "
              f"{1e3 * statistics.median(firsts):.0f} ms."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
