"""Where a decode step's time goes: a torch-profiler breakdown of one B-sequence step (default 32).

The engine is driven as in roofline.py (benchmarks/decode_driver.py: B sequences all decoding,
Engine.step() from the caller's thread). For the profiled steps only, this script wraps the parts
of the step in `torch.profiler.record_function` labels -- instance attributes and module
functions patched here, nothing in the serving code -- so that the profiler's totals split the
step into disjoint parts:

  compiled layers   the decoder layers as one compiled call (model/compiled_layers.py; the
                    default where it applies: bfloat16 on AMX CPUs); its inside is timed by the
                    C code itself, phase by phase (second table). --layers python turns it off
                    and the layers' parts below are labelled instead:
  projections       the base GEMMs of q/k/v/o/gate/up/down (each Projection's `.base`)
  LoRA              the batched LoRA deltas (lora/layers.py PoolMember.apply / PoolGroup.apply)
  attention         paged_attention + the per-step AttentionPlan
  norms + rope      RMSNorm, the rotary table lookup, rotary + the KV cache write (one pass)
  vocab projection  the final norm's rows x the [vocab, hidden] matrix (output_logits; on the
                    greedy steps profiled here output_argmax, whose GEMM also picks the tokens:
                    the sampler is then skipped and shows ~0)
  embedding         the token lookup
  forward, other    the rest of the model forward: residual adds, SwiGLU's silu * up, views
  batch prep        ModelRunner.prepare: the flat batch's index tensors (+ the LoRA batch)
  sampler           Engine.sampler
  scheduler         Scheduler.schedule
  step, other       the rest of Engine.step: the postprocessing of each token (detokenizer,
                    stop checks, callbacks), block commits, Python between the parts

Two cases in one run: the base model, and the same batch with every sequence on one of 32
random rank-8 adapters on q/k/v/o (the serving benchmark's shape). The profiled steps alternate
between the cases. The top aten ops by self time are listed too.

    python benchmarks/profile_decode.py                       # bfloat16, 32 sequences, ~2-4 min
    python benchmarks/profile_decode.py --dtype float32 --steps 4

Writes benchmarks/results/profile_decode_cpu.md (--out).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "profile_decode_cpu.md"
PARTS = ("compiled layers", "projections", "LoRA", "attention", "norms + rope", "vocab projection", "embedding",
         "forward, other", "batch prep", "sampler", "scheduler", "step, other")
# Leaf labels inside the forward; "forward, other" = forward minus these.
FORWARD_LEAVES = ("compiled layers", "projections", "LoRA", "attention", "norms + rope", "vocab projection", "embedding")


def labelled(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def instrument_model(model) -> None:
    """Label the forward's parts (see the module docstring) on `model` and on the model/lora
    modules' functions, for the rest of the process. Once per model (the cases share it)."""
    from loraplex.lora import layers as lora_layers
    from loraplex.model import llama
    from loraplex.model.linear import Projection
    from loraplex.model.norm import RMSNorm

    if getattr(model, "_profile_labels", False):
        return
    model._profile_labels = True
    seen = set()
    for m in model.modules():
        if isinstance(m, Projection):
            targets = [m.base] + ([m.base.group] if hasattr(m.base, "group") else [])
            for t in targets:  # a packed group's GEMM is shared: label it once
                if id(t) not in seen:
                    seen.add(id(t))
                    t.forward = labelled("projections", t.forward)
        elif isinstance(m, RMSNorm):  # the final norm (sampled rows only) counts here too
            m.forward = labelled("norms + rope", m.forward)
    for cls in (lora_layers.PoolMember, lora_layers.PoolGroup):
        cls.apply = labelled("LoRA", cls.apply)
    llama.paged_attention = labelled("attention", llama.paged_attention)
    llama.AttentionPlan.build = classmethod(labelled("attention", llama.AttentionPlan.build.__func__))
    llama.rotate_and_write_kv = labelled("norms + rope", llama.rotate_and_write_kv)
    if model.compiled_layers is not None:  # its blocks run Python parts only where it falls back
        model.compiled_layers.forward = labelled("compiled layers", model.compiled_layers.forward)
    rotary = model.model.rotary_emb
    rotary.lookup = labelled("norms + rope", rotary.lookup)
    model.output_logits = labelled("vocab projection", model.output_logits)
    model.output_argmax = labelled("vocab projection", model.output_argmax)
    model.model.embed_tokens.forward = labelled("embedding", model.model.embed_tokens.forward)


def instrument(engine) -> None:
    """Label the step's parts outside the forward, on this engine only (and its model's forward)."""
    instrument_model(engine.runner.model)
    runner = engine.runner
    runner.prepare = labelled("batch prep", runner.prepare)
    runner.model = labelled("forward", runner.model)  # runner.run = prepare + this
    engine.sampler = labelled("sampler", engine.sampler)
    engine.scheduler.schedule = labelled("scheduler", engine.scheduler.schedule)


def label_totals(prof) -> dict[str, tuple[float, float, int]]:
    """key -> (total us, self us, calls) of one profiler run."""
    return {e.key: (e.cpu_time_total, e.self_cpu_time_total, e.count) for e in prof.key_averages()}


def add_totals(acc: dict, new: dict) -> None:
    for k, (t, s, c) in new.items():
        t0, s0, c0 = acc.get(k, (0.0, 0.0, 0))
        acc[k] = (t0 + t, s0 + s, c0 + c)


def breakdown(acc: dict, steps: int) -> dict[str, float]:
    """Milliseconds per step of each part, from the per-label totals summed over the steps."""
    totals = {k: t / 1e3 / steps for k, (t, _, _) in acc.items()}  # us -> ms per step
    out = {p: totals.get(p, 0.0) for p in FORWARD_LEAVES + ("batch prep", "sampler", "scheduler")}
    out["forward, other"] = totals.get("forward", 0.0) - sum(out[p] for p in FORWARD_LEAVES)
    out["step, other"] = totals.get("step", 0.0) - totals.get("forward", 0.0) - sum(
        out[p] for p in ("batch prep", "sampler", "scheduler"))
    out["step"] = totals.get("step", 0.0)
    return out


def top_ops(acc: dict, steps: int, n: int = 15) -> list[tuple[str, float, int]]:
    """(aten op, self ms per step, calls per step) of the n ops with the most self CPU time."""
    ops = [(k, s, c) for k, (_, s, c) in acc.items() if k.startswith(("aten::", "mkldnn::"))]
    ops.sort(key=lambda o: o[1], reverse=True)
    return [(k, s / 1e3 / steps, c // steps) for k, s, c in ops[:n]]


def write_adapters(loaded, root: Path, n: int, rank: int) -> tuple[list[str], int, int]:
    """n random adapters under root; returns (ids, bytes of one adapter's A/B tensors, their
    elements one token multiplies: sum of rank x (in + out) over the targeted modules)."""
    from bench_lora_serving import ATTN, Shapes, random_lora_tensors, write_adapter
    from loraplex.lora.peft_format import BaseShapes

    bs = BaseShapes.from_model(loaded.model)
    shapes = Shapes(bs.num_layers, dict(bs.features))
    gen = torch.Generator().manual_seed(1)
    ids, nbytes, elems = [], 0, 0
    for i in range(n):
        aid = f"prof-{i:03d}"
        tensors = random_lora_tensors(shapes, ATTN, rank, gen, loaded.dtype)
        write_adapter(root / aid, tensors, rank, 2.0 * rank, ATTN, str(loaded.path))
        ids.append(aid)
        elems = sum(t.numel() for t in tensors.values())
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return ids, nbytes, elems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=3, help="profiled steps per case")
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--layers", choices=["compiled", "python"], default="compiled",
                   help="python: the layers' Python path (model/compiled_layers.py COMPILED = False)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    from decode_driver import make_decode_engine

    from loraplex.model import compiled_layers
    from loraplex_kernels.decode_layers_native import PHASES

    if a.layers == "python":
        compiled_layers.COMPILED = False
    from machine import cpu_info

    from loraplex.config import LoraConfig
    from loraplex.lora.manager import LoraManager
    from loraplex.model.default_model import ensure_default_model
    from loraplex.model.loader import load_model

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]
    loaded = load_model(ensure_default_model(), dtype, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="loraplex-prof-") as tmp:
        ids, adapter_bytes, adapter_elems = write_adapters(loaded, Path(tmp), a.adapters, a.rank)
        manager = LoraManager(LoraConfig(max_loras=a.adapters, max_lora_rank=max(16, a.rank),
                                         max_cpu_loras=max(64, a.adapters), adapter_root=tmp),
                              loaded.model, loaded.dtype, "cpu")
        for aid in ids:
            manager.load(aid, Path(tmp) / aid)
        decode_steps = a.steps + 1
        cases = {
            "base model": make_decode_engine(loaded, a.batch, a.prompt_len, decode_steps),
            f"{a.adapters} adapters r{a.rank} q/k/v/o": make_decode_engine(
                loaded, a.batch, a.prompt_len, decode_steps, lora_manager=manager, adapters=ids),
        }
        for dec in cases.values():
            dec.step()  # untimed: first-call costs
        # Patched after the fills: the labels cost a little, and only the profiled steps pay it.
        for dec in cases.values():
            instrument(dec.engine)
        acc: dict[str, dict] = {name: {} for name in cases}
        phases = {name: torch.zeros(len(PHASES), dtype=torch.int64) for name in cases}
        layers = loaded.model.compiled_layers
        for _ in range(a.steps):  # alternate the cases step by step, one profiler run per step
            for name, dec in cases.items():
                if layers is not None:
                    layers.phase_ns = phases[name]  # the compiled blocks time their phases into it
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    with record_function("step"):
                        dec.step()
                add_totals(acc[name], label_totals(prof))
        if layers is not None:
            layers.phase_ns = None
        results = {name: (breakdown(acc[name], a.steps), top_ops(acc[name], a.steps)) for name in cases}
    load1 = os.getloadavg()
    # What the LoRA part must cost at least: every adapter of the step read once (A and B up to its
    # rank) and 2 FLOPs per weight element per row, against this run's bandwidth and matmul peak.
    from roofline import floor_bandwidth, measure_bandwidth, measure_matmul

    # The layers' weights, each read once a step (the vocab projection left out: its own phase).
    base_bytes = (sum(p.in_features * p.out_features for _, _, p in loaded.model.iter_projections())
                  * torch.empty(0, dtype=dtype).element_size())
    # Arrays at least the size of what the adapter step re-reads (roofline.floor_bandwidth: a
    # smaller array, re-read, is partly served from a large L3).
    step_bytes = base_bytes + min(a.adapters, a.batch) * adapter_bytes
    bandwidth = floor_bandwidth(measure_bandwidth([512]), step_bytes)[0] * 1e9
    # The LoRA kernels multiply in float32 whatever the weights' dtype: float32's rate is the peak.
    peak = max(r["best"] for d in {dtype, torch.float32}
               for r in measure_matmul(d, [(512, 512, 512), (a.batch, 576, 1536)])) * 1e9
    active = min(a.adapters, a.batch)
    lora_bytes, lora_flops = active * adapter_bytes, 2 * a.batch * adapter_elems
    lora_floor_ms = max(lora_bytes / bandwidth, lora_flops / peak) * 1e3

    names = list(cases)
    lines = [
        f"# Where a {a.batch}-sequence decode step goes (torch profiler, CPU)", "",
        f"Model: {loaded.path.name} (the embedded default), {a.dtype}; {a.batch} sequences all decoding "
        f"(prompts of {a.prompt_len} random tokens), greedy; adapters: {a.adapters} random rank-{a.rank} adapters "
        f"on q/k/v/o, request i on adapter i mod {a.adapters} (every row has an adapter). "
        f"{a.steps} profiled Engine.step() calls per case, alternating between the cases.", "",
        f"- CPU: {cpu_info().describe()}",
        f"- torch {torch.__version__}; {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- Load average at start {'/'.join(f'{x:.2f}' for x in load0)}, at end {'/'.join(f'{x:.2f}' for x in load1)}. "
        "**Shared machine**: absolute ms are inflated by other jobs; read the shares and the "
        "base/adapter differences, which come from the same run.",
        f"- Command: `python benchmarks/profile_decode.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "- The profiler and the labels add their own cost (a few us per labelled call, ~700 calls per step).", "",
        "| part | " + " | ".join(f"{n} ms/step | share" for n in names) + " |",
        "|---|" + "---:|---:|" * len(names),
    ]
    for part in PARTS + ("step",):
        cells = []
        for n in names:
            b = results[n][0]
            cells.append(f"{b[part]:.1f} | {100 * b[part] / b['step']:.0f} %")
        label = "**whole step**" if part == "step" else part
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if any(int(phases[n].sum()) for n in names):
        lines += ["", "Inside the compiled layers (timed by decode_layers.c around each kernel call, ms per step):", "",
                  "| phase | " + " | ".join(f"{n} ms/step" for n in names) + " |", "|---|" + "---:|" * len(names)]
        for i, phase in enumerate(PHASES):
            lines.append(f"| {phase} | " + " | ".join(f"{int(phases[n][i]) / 1e6 / a.steps:.2f}" for n in names) + " |")
        lines.append("| **sum** | " + " | ".join(f"{int(phases[n].sum()) / 1e6 / a.steps:.2f}" for n in names) + " |")
    lora_ms = results[names[1]][0]["LoRA"] + (int(phases[names[1]][PHASES.index("LoRA deltas")]) / 1e6 / a.steps)
    lines += ["", f"LoRA's own floor in this step: {active} adapters x {adapter_bytes / 1e6:.2f} MB read once = "
              f"{lora_bytes / 1e6:.0f} MB at {bandwidth / 1e9:.1f} GB/s, {lora_flops / 1e6:.0f} MFLOP at "
              f"{peak / 1e9:.1f} GFLOP/s (the faster of {a.dtype} and float32 F.linear, best of a 512^3 and a {a.batch}x576x1536 shape, "
              f"measured in this run): **{lora_floor_ms:.1f} ms**; measured LoRA part {lora_ms:.1f} ms "
              f"= {lora_ms / lora_floor_ms:.1f}x its floor. Whole-step difference with adapters: "
              f"{results[names[1]][0]['step'] - results[names[0]][0]['step']:+.1f} ms."]
    gemm_phases = ("q/k/v GEMM", "o GEMM + residual", "gate/up GEMM + SwiGLU", "down GEMM + residual")
    gemm_ms = sum(int(phases[names[0]][PHASES.index(ph)]) for ph in gemm_phases) / 1e6 / a.steps
    if gemm_ms > 0 and lora_ms > 0:
        # The same step's base-model GEMMs as the yardstick: every layer weight read once, in the
        # same caches and with the same bandwidth as the LoRA weights, so the ratio carries less of
        # the machine's noise than the floor does.
        base_rate, lora_rate = base_bytes / (gemm_ms / 1e3), lora_bytes / (lora_ms / 1e3)
        lines += ["", f"Per byte against the base model's own weights in the same run: the layers' GEMM phases "
                      f"({', '.join(gemm_phases)}; base model case) read {base_bytes / 1e6:.0f} MB of weights in "
                      f"{gemm_ms:.1f} ms = **{base_rate / 1e9:.1f} GB/s**; the LoRA part reads {lora_bytes / 1e6:.0f} MB in "
                      f"{lora_ms:.1f} ms = **{lora_rate / 1e9:.1f} GB/s**, so a LoRA byte costs "
                      f"**{base_rate / lora_rate:.2f}x** the time of a base-weight byte."]
    for n in names:
        lines += ["", f"### Top ops by self CPU time: {n}", "", "| op | self ms/step | calls/step |", "|---|---:|---:|"]
        lines += [f"| {op} | {ms:.2f} | {calls} |" for op, ms, calls in results[n][1]]
    text = "\n".join(lines) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
