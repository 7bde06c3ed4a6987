"""What the sampler costs per decode step on CPU: compiled draw (sample_rows.c) vs torch's.

Sampler()(logits, params, ...) on [S, vocab] float32 logits, S = 32 and 64, vocab = the default
model's 49152, for greedy rows and for sampled rows (temperature alone, with top-p, with top-k,
seeded). The logits are the default model's own: a forward over random prompts gives realistic
peaked distributions (a nucleus of a few to a few hundred tokens), not random noise. The two
formulations (engine/sampler.py NATIVE_DRAW on / off) are timed alternately, call by call.

    python benchmarks/bench_sampler.py            # ~1 min -> results/sampler_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "sampler_cpu.md"


def model_logits(rows: int) -> torch.Tensor:
    """[rows, vocab] float32 logits of the default model at the last token of random prompts."""
    from loraplex.model.default_model import ensure_default_model
    from loraplex.model.loader import load_model
    from transformers import AutoModelForCausalLM

    path = ensure_default_model()
    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    vocab = load_model(path, torch.float32, torch.device("cpu")).arch.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, 24), generator=gen)
    with torch.inference_mode():
        return model(ids).logits[:, -1, :].float().contiguous()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="32,64")
    p.add_argument("--calls", type=int, default=9, help="timed calls per case and formulation (alternated)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    from machine import cpu_info

    from loraplex.engine import sampler as sampler_mod
    from loraplex.engine.request import SamplingParams

    cases = {"greedy": dict(temperature=0.0), "T 0.8": dict(temperature=0.8),
             "T 0.8, top-p 0.95": dict(temperature=0.8, top_p=0.95), "T 0.7, top-k 50": dict(temperature=0.7, top_k=50),
             "T 0.8, top-k 50, top-p 0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
             "T 0.8, seeded": dict(temperature=0.8, seed=1)}
    sampler = sampler_mod.Sampler()
    results = []
    for rows in (int(r) for r in a.rows.split(",")):
        logits = model_logits(rows)
        for name, kw in cases.items():
            params = [SamplingParams(**kw)] * rows
            times = {True: [], False: []}
            for _ in range(a.calls + 1):
                for native in (True, False):
                    sampler_mod.NATIVE_DRAW = native
                    gens = [torch.Generator().manual_seed(i) if kw.get("seed") is not None else None for i in range(rows)]
                    t0 = time.perf_counter()
                    sampler(logits, params, [[1, 2]] * rows, gens)
                    times[native].append(time.perf_counter() - t0)
            sampler_mod.NATIVE_DRAW = True
            ours, torchs = (statistics.median(times[n][1:]) * 1e3 for n in (True, False))
            results.append((rows, name, ours, torchs))
            print(f"{rows} rows, {name}: compiled {ours:.2f} ms, torch {torchs:.2f} ms", flush=True)
    lines = [
        "# Sampler cost per decode step (CPU): compiled draw vs torch", "",
        f"- CPU: {cpu_info().describe()}",
        f"- torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "- Sampler()(logits, ...) on the default model's own last-token logits (49152-token vocabulary) of "
        "random 24-token prompts; every row with the same parameters; `compiled` = sample_rows.c "
        "(NATIVE_DRAW, the default on CPU), `torch` = the exponential race and full sort it replaced; the "
        f"two alternate call by call, median of {a.calls}.", "",
        "Command: `" + " ".join(["python benchmarks/bench_sampler.py", *(sys.argv[1:] if argv is None else argv)]) + "`",
        "", "| rows | sampling | compiled ms | torch ms | speed-up |", "|---:|---|---:|---:|---:|",
    ]
    lines += [f"| {r} | {n} | {o:.2f} | {t:.2f} | {t / o:.1f}x |" for r, n, o, t in results]
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
