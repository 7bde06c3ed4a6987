"""Thousands of adapters at base speed: the adapter memory pool under 1000 / 5000 adapters.

Default model (SmolLM2-135M-Instruct), bfloat16, 32 concurrent streams (closed loop), greedy with
EOS ignored. Every adapter has its own weight file under --adapter-root (no hard links), written
in PEFT's format. Two adapter sets:

  qv8    rank 8 on q_proj, v_proj
  mixed  ranks 8/16/32/64 (adapter i: ranks[i % 4]) on all seven projections

For each set and popularity (uniform, zipf 1.0) one engine + manager starts from an EMPTY pool and
runs, side by side in one process: the base model (same prompts, no adapter), a cold pass (every
adapter is read from disk on first use, by the stream's own thread before submit, as a server
worker does, or by the prefetcher when the pool evicted it meanwhile), a warm pass (the same
requests again), and the base model again. Ratios are LoRA tokens/s over the mean of the two
base runs.

    .venv/bin/python benchmarks/bench_many_adapters.py                 # ~15-25 min on 2 cores
    .venv/bin/python benchmarks/bench_many_adapters.py --quick         # smoke run, ~2 min

Writes benchmarks/results/many_adapters_cpu.md and many_adapters_cpu.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_lora_serving import (ALL_LINEAR, Job, Shapes, make_engine, random_lora_tensors,  # noqa: E402
                                run_streams, write_adapter, zipf_jobs)
from bench_serving import QUESTIONS, machine_info  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "many_adapters_cpu.md"
QV = ("q_proj", "v_proj")
MIXED_RANKS = (8, 16, 32, 64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="qv8:1000,mixed:1000,qv8:5000@64MiB",
                   help="comma-separated SET:N[@ADAPTER_MEMORY][/POP+POP] (sets: qv8, mixed; the "
                        "memory overrides --adapter-memory, the popularities --popularity for that case)")
    p.add_argument("--popularity", default="uniform,zipf")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--requests", type=int, default=96, help="requests per pass")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--adapter-memory", default="2GiB")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--work-dir", help="where the adapter folders go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the adapter folders")
    p.add_argument("--quick", action="store_true", help="smoke run: qv8:200 and mixed:100, 32 requests")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quantize", default="none", help="the base model's bitsandbytes method: none, nf4, fp4, int8")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="4-bit methods: the embedding table (SmolLM2's tied lm_head) in 4 bits too")
    p.add_argument("--json", type=Path, help="also write the ratios and the base's resident bytes here "
                   "(read by scripts/gpu_check.py)")
    a = p.parse_args(argv)
    if a.quick:
        a.cases, a.requests = "qv8:200,mixed:100@64MiB", 32
    a.case_list, a.case_memory, a.case_pops = [], {}, {}
    for c in a.cases.split(","):
        c, _, pops = c.partition("/")
        spec, _, mem = c.partition("@")
        key = (spec.split(":")[0], int(spec.split(":")[1]))
        a.case_list.append(key)
        a.case_memory[key] = mem or a.adapter_memory
        a.case_pops[key] = pops.split("+") if pops else a.popularity.split(",")
    a.popularities = a.popularity.split(",")
    return a


def write_set(root: Path, kind: str, n: int, shapes: Shapes, base: str, seed: int) -> dict[str, int]:
    """n adapters with their own weights; id -> rank. Skips folders a previous run left."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        rank = 8 if kind == "qv8" else MIXED_RANKS[i % len(MIXED_RANKS)]
        targets = QV if kind == "qv8" else ALL_LINEAR
        aid = f"{kind}-{i:05d}"
        folder = root / aid
        if not (folder / "adapter_model.safetensors").exists():
            gen.manual_seed(seed * 1_000_003 + i)
            write_adapter(folder, random_lora_tensors(shapes, targets, rank, gen, torch.bfloat16),
                          rank, 2.0 * rank, targets, base)
        out[aid] = rank
    return out


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Resident memory every 0.25 s while a pass runs."""

    def __init__(self):
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.25):
            self.samples.append(rss_bytes())

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs), max(1, math.ceil(q * len(xs)))) - 1] if xs else float("nan")


def run_case(ctx, kind: str, n: int, popularity: str) -> dict:
    from loraplex.config import LoraConfig
    from loraplex.lora.manager import LoraManager

    a, loaded = ctx["args"], ctx["loaded"]
    root = ctx["roots"][(kind, n)]
    ids = sorted(ctx["sets"][(kind, n)])
    rng = random.Random(hash((kind, n, popularity, a.seed)) & 0xFFFF)
    prompts = ctx["prompts"]
    if popularity == "uniform":
        jobs = [Job(prompts[i % len(prompts)], rng.choice(ids)) for i in range(a.requests)]
    else:
        jobs = zipf_jobs(ids, a.requests, 1.0, prompts, rng)
    base_jobs = [Job(j.prompt, "") for j in jobs]
    manager = LoraManager(LoraConfig(adapter_memory=a.case_memory[(kind, n)], max_lora_rank=64, adapter_root=str(root)),
                          loaded.model, loaded.dtype, a.device)
    # Prefix caching off: the base passes send the same prompts again and again and would skip
    # their prefills from the cache, while the LoRA passes (one adapter per request) cannot; this
    # benchmark compares adapter overhead, not the prefix cache.
    engine = make_engine(loaded, manager, a.streams, max(len(p) for p in prompts), a.max_new_tokens,
                         enable_prefix_caching=False)
    name = f"{kind}{n}-{popularity}"
    out = {"kind": kind, "n": n, "popularity": popularity, "distinct": len({j.adapter for j in jobs}),
           "pool_bytes": manager.device_bytes, "memory": a.case_memory[(kind, n)]}
    try:
        rss0 = rss_bytes()
        runs = {}
        for label, js in (("base1", base_jobs), ("cold", jobs), ("warm", jobs), ("base2", base_jobs)):
            waits0 = manager.stats.wait_count
            s0 = (manager.stats.hits, manager.stats.misses, manager.stats.device_evictions,
                  dict(manager.stats.loads), manager.stats.prefetch_hits)
            with RssSampler() as rss:
                r = run_streams(engine, manager, js, a.streams, a.max_new_tokens, f"{name}-{label}",
                                on_demand=True)
            new_waits = min(manager.stats.wait_count - waits0, len(manager.stats.wait_seconds))
            waits = list(manager.stats.wait_seconds)[-new_waits:] if new_waits else []
            loads = {k: v - s0[3].get(k, 0) for k, v in manager.stats.loads.items()}
            runs[label] = dict(
                result=r, waits=waits, rss=rss.samples or [rss_bytes()],
                hits=manager.stats.hits - s0[0], misses=manager.stats.misses - s0[1],
                evictions=manager.stats.device_evictions - s0[2], disk_loads=sum(loads.values()),
                prefetch_hits=manager.stats.prefetch_hits - s0[4], pool_used=manager.pool_used_bytes)
            print(f"  {name:22} {label:5} {r.tok_per_s:7.1f} tok/s  running {r.mean_running:5.1f}  "
                  f"TTFT p50/p99 {r.ttft_ms(0.5):6.0f}/{r.ttft_ms(0.99):6.0f} ms  disk loads "
                  f"{runs[label]['disk_loads']:4}  evictions {runs[label]['evictions']:4}  "
                  f"RSS {max(runs[label]['rss']) / 2**20:.0f} MiB", flush=True)
        out["runs"] = runs
        out["rss_start"] = rss0
        # The adapters change the outputs (they are applied): compare with the base run.
        lora, base = runs["warm"]["result"].outputs, runs["base1"]["result"].outputs
        out["differ"] = sum(x != y for x, y in zip(lora, base))
        out["cold_warm_same"] = sum(x == y for x, y in zip(runs["cold"]["result"].outputs, lora))
    finally:
        engine.shutdown()
        manager.close()
    return out


def summarize(c: dict) -> dict:
    runs = c["runs"]
    base = statistics.fmean([runs["base1"]["result"].tok_per_s, runs["base2"]["result"].tok_per_s])
    base_running = statistics.fmean([runs["base1"]["result"].mean_running, runs["base2"]["result"].mean_running])
    return dict(base=base, base_running=base_running,
                cold=runs["cold"]["result"].tok_per_s / base, warm=runs["warm"]["result"].tok_per_s / base)


def write_report(ctx, cases: list[dict], path: Path, load_at_start) -> str:
    a = ctx["args"]
    from loraplex_kernels import native

    lines = ["# Thousands of adapters: the adapter memory pool on CPU", "",
             f"Model: SmolLM2-135M-Instruct (embedded default), bfloat16, CPU, compiled kernels "
             f"{'on' if native.available() else 'OFF'}; {a.streams} concurrent streams (closed loop), "
             f"{a.requests} requests per pass, {a.max_new_tokens} new tokens each, greedy with EOS "
             f"ignored. `--adapter-memory {a.adapter_memory}` unless a case names its own, no `--max-loras`. "
             "Each adapter has its own "
             "random weight file (bfloat16) under `--adapter-root`; nothing is loaded before the cold "
             "pass. Cold: each stream calls `ensure_available` before submitting (a disk read for an "
             "adapter never seen, straight into the pool), and adapters evicted meanwhile come back "
             "through the prefetcher; warm: the same requests again. Base: the same prompts without "
             "adapters on the same engine, before and after (ratios use their mean). Prefix caching "
             "is off (the base passes would otherwise skip the repeated prompts' prefills, which the "
             "one-adapter-per-request passes cannot). Command: "
             f"`.venv/bin/python benchmarks/bench_many_adapters.py {' '.join(sys.argv[1:])}`.", "",
             *machine_info(load_at_start), "", "## Summary", ""]
    for c in cases:
        s = summarize(c)
        tgt_warm = 0.9 if c["kind"] == "qv8" else 0.75
        lines.append(f"- {c['kind']} x {c['n']} (pool {c['memory']}), {c['popularity']}: warm **{s['warm']:.2f}x** of base "
                     f"(target >= {tgt_warm}x: {'met' if s['warm'] >= tgt_warm else 'MISSED'}), cold "
                     f"**{s['cold']:.2f}x** (target >= 0.6x: {'met' if s['cold'] >= 0.6 else 'MISSED'}); "
                     f"mean running {c['runs']['warm']['result'].mean_running:.1f} warm / "
                     f"{c['runs']['cold']['result'].mean_running:.1f} cold vs {s['base_running']:.1f} base")
    lines += ["", "## Passes", "",
              "| set | adapters | popularity | pass | tokens/s | x base | mean running / waiting | TTFT p50 / p99 ms "
              "| adapter wait p50 / p99 / max ms | hits / misses | disk loads | evictions | pool used MiB "
              "| RSS max MiB |",
              "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        s = summarize(c)
        for label in ("base1", "cold", "warm", "base2"):
            run = c["runs"][label]
            r = run["result"]
            w = [1e3 * x for x in run["waits"]]
            wait = (f"{pct(w, 0.5):.0f} / {pct(w, 0.99):.0f} / {max(w):.0f}" if w else "-")
            lines.append(
                f"| {c['kind']} | {c['n']} | {c['popularity']} | {label} | {r.tok_per_s:.1f} | "
                f"{r.tok_per_s / s['base']:.2f} | {r.mean_running:.1f} / {r.mean_waiting:.1f} | "
                f"{r.ttft_ms(0.5):.0f} / {r.ttft_ms(0.99):.0f} | {wait} | {run['hits']} / {run['misses']} | "
                f"{run['disk_loads']} | {run['evictions']} | {run['pool_used'] / 2**20:.0f} | "
                f"{max(run['rss']) / 2**20:.0f} |")
    lines += ["", "## Adapter wait (time in the queue until the adapter was in the pool, per request)", "",
              "| set | adapters | popularity | pass | 0 ms | <= 10 ms | <= 100 ms | <= 1 s | > 1 s |",
              "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for c in cases:
        for label in ("cold", "warm"):
            w = c["runs"][label]["waits"]
            b = [sum(x == 0 for x in w), sum(0 < x <= 0.01 for x in w), sum(0.01 < x <= 0.1 for x in w),
                 sum(0.1 < x <= 1 for x in w), sum(x > 1 for x in w)]
            lines.append(f"| {c['kind']} | {c['n']} | {c['popularity']} | {label} | " + " | ".join(map(str, b)) + " |")
    lines += ["", "## Memory", ""]
    for c in cases:
        rs = [x for label in ("base1", "cold", "warm", "base2") for x in c["runs"][label]["rss"]]
        lines.append(f"- {c['kind']} x {c['n']} {c['popularity']}: RSS {c['rss_start'] / 2**20:.0f} MiB at the "
                     f"start of the case, {min(rs) / 2**20:.0f}-{max(rs) / 2**20:.0f} MiB during it; pool "
                     f"{c['pool_bytes'] / 2**20:.0f} MiB (the adapter files of the set: "
                     f"{ctx['set_bytes'][(c['kind'], c['n'])] / 2**20:.0f} MiB on disk); {c['distinct']} distinct "
                     f"adapters requested; {c['differ']}/{a.requests} warm outputs differ from the base "
                     f"model's, {c['cold_warm_same']}/{a.requests} cold outputs equal the warm ones")
    lines += ["", f"Writing the adapter folders took {ctx['write_s']:.0f} s.", ""]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def write_plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{c['kind']}\n{c['n']}\n{c['popularity']}" for c in cases]
    cold = [summarize(c)["cold"] for c in cases]
    warm = [summarize(c)["warm"] for c in cases]
    x = range(len(cases))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    ax.bar([i - 0.2 for i in x], cold, 0.4, label="cold")
    ax.bar([i + 0.2 for i in x], warm, 0.4, label="warm")
    ax.axhline(0.9, ls="--", c="gray", lw=0.8)
    ax.axhline(0.6, ls=":", c="gray", lw=0.8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("tokens/s relative to the base model")
    ax.set_title("LoRA throughput vs base, same engine run (32 streams, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    a = parse_args(argv)
    load_at_start = os.getloadavg()
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from loraplex.lora.peft_format import BaseShapes
    from loraplex.model.default_model import ensure_default_model
    from loraplex.model.loader import load_model

    model_dir = ensure_default_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tuple(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)) for q in QUESTIONS]
    from loraplex.model.quantize import QuantSpec, check_available, float16_bytes, quantized_bytes

    if a.quantize != "none":
        check_available(a.quantize, a.device)
    loaded = load_model(model_dir, torch.bfloat16, torch.device(a.device), QuantSpec(a.quantize, embeddings=a.quantize_embeddings))
    bs = BaseShapes.from_model(loaded.model)
    shapes = Shapes(bs.num_layers, dict(bs.features))
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="loraplex-many-"))
    ctx = {"args": a, "loaded": loaded, "prompts": prompts, "sets": {}, "roots": {}, "set_bytes": {}}
    t0 = time.perf_counter()
    for kind, n in a.case_list:
        root = work / f"{kind}-{n}"
        print(f"writing {n} {kind} adapters to {root}", flush=True)
        ctx["sets"][(kind, n)] = write_set(root, kind, n, shapes, str(model_dir), a.seed)
        ctx["roots"][(kind, n)] = root
        ctx["set_bytes"][(kind, n)] = sum(f.stat().st_size for f in root.glob("*/adapter_model.safetensors"))
    ctx["write_s"] = time.perf_counter() - t0
    cases = []
    try:
        for kind, n in a.case_list:
            for pop in a.case_pops[(kind, n)]:
                cases.append(run_case(ctx, kind, n, pop))
    finally:
        if not a.keep and not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(dict(
            device=a.device, quantize=a.quantize, quantize_embeddings=a.quantize_embeddings, base_bytes=quantized_bytes(loaded.model),
            fp16_bytes=float16_bytes(loaded.arch),
            cases=[dict(kind=c["kind"], n=c["n"], popularity=c["popularity"], **summarize(c)) for c in cases]),
            indent=1))
    text = write_report(ctx, cases, a.out, load_at_start)
    write_plot(cases, a.out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
