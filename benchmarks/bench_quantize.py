"""Quantized base model on CPU: none / int8 / nf4 / fp4 / nf4+emb side by side on the default model.

Each method runs in its own subprocess (a clean process, so its peak RSS is its own): load the
embedded SmolLM2-135M-Instruct with `--quantize METHOD` semantics (loader.load_model + QuantSpec),
attach a LoraManager with a few random rank-16 adapters (all-linear), and run the engine with 32
concurrent streams (closed loop, greedy, EOS ignored, requests spread over the adapters and the
base model). Reported per method: resident bytes of the base weights (quantized projections +
float embeddings/norms) vs the same weights in float16, the projections alone, load time, peak
process RSS, generated tokens/s, and how many requests' greedy tokens equal the unquantized run's.
Variant "nf4+emb" is nf4 with --quantize-embeddings: the embedding table (= SmolLM2's tied lm_head)
in 4 bits too.

    .venv/bin/python benchmarks/bench_quantize.py                 # all methods that run here, ~5 min
    .venv/bin/python benchmarks/bench_quantize.py --methods none,nf4 --max-new-tokens 16

Writes benchmarks/results/quantize_cpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "quantize_cpu.md"
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Why is the sky blue?",
             "Explain photosynthesis in simple terms.", "List three uses of a paperclip.",
             "Give me a short recipe for pancakes.", "How do I reverse a list in Python?",
             "Tell me a fun fact about octopuses."]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDINGS_SUFFIX = "+emb"  # a variant: METHOD+emb = METHOD with --quantize-embeddings


def method_of(variant: str) -> str:
    return variant.removesuffix(EMBEDDINGS_SUFFIX)


def spec_of(variant: str):
    from loraplex.model.quantize import QuantSpec

    return QuantSpec(method_of(variant), embeddings=variant.endswith(EMBEDDINGS_SUFFIX))


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_anon_bytes() -> int:
    """Current anonymous (private, not file-backed) resident memory: excludes mmap'd checkpoint pages."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def make_adapters(root: Path, model_dir: Path, n: int, rank: int) -> list[str]:
    """n random all-linear adapters in PEFT's format (written without PEFT, see bench_lora_serving)."""
    from bench_lora_serving import Shapes, make_uniform_set

    from loraplex.model.llama import LlamaForCausalLM
    from loraplex.model.loader import read_arch

    meta = LlamaForCausalLM(read_arch(model_dir), device="meta")
    features = {name: (p.in_features, p.out_features) for _, name, p in meta.iter_projections()}
    return make_uniform_set(root, n, Shapes(meta.arch.num_layers, features), TARGETS, rank,
                            torch.bfloat16, str(model_dir), seed=0)


def child(args) -> None:
    """One method in this process: load, serve 32 streams, print one JSON line."""
    from bench_lora_serving import Job, make_engine, run_streams
    from transformers import AutoTokenizer

    from loraplex.config import LoraConfig
    from loraplex.lora.manager import LoraManager
    from loraplex.model.default_model import ensure_default_model
    from loraplex.model.loader import load_model
    from loraplex.model.quantize import check_available, float16_bytes, projection_bytes, quantized_bytes

    dtype = torch.bfloat16
    model_dir = ensure_default_model(args.cache_dir, progress=False)
    rss_before = _rss_peak_bytes()
    t0 = time.perf_counter()
    check_available(method_of(args.child), "cpu")
    loaded = load_model(model_dir, dtype, "cpu", spec_of(args.child))
    load_s = time.perf_counter() - t0
    rss_after_load = _rss_peak_bytes()
    anon_after_load = _rss_anon_bytes()
    adapters = sorted(p.name for p in Path(args.adapters).iterdir())
    manager = LoraManager(LoraConfig(max_loras=len(adapters), max_lora_rank=args.rank,
                                     max_cpu_loras=len(adapters), allowed_roots=(args.adapters,)),
                          loaded.model, dtype, "cpu")
    for a in adapters:
        manager.load(a, Path(args.adapters) / a)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tuple(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)) for q in QUESTIONS]
    ids = ["", *adapters]
    jobs = [Job(prompts[i % len(prompts)], ids[i % len(ids)]) for i in range(args.requests)]
    engine = make_engine(loaded, manager, args.streams, max(map(len, prompts)), args.max_new_tokens)
    try:
        result = run_streams(engine, manager, jobs, args.streams, args.max_new_tokens, args.child)
    finally:
        engine.shutdown(1)
    print("RESULT " + json.dumps(dict(
        method=args.child, base_bytes=quantized_bytes(loaded.model), fp16_bytes=float16_bytes(loaded.arch),
        proj_bytes=projection_bytes(loaded.model), proj_fp16_bytes=float16_bytes(loaded.arch, projections_only=True),
        load_s=load_s, rss_before_load=rss_before, rss_after_load=rss_after_load, rss_peak=_rss_peak_bytes(),
        anon_after_load=anon_after_load, anon_after_run=_rss_anon_bytes(),
        tokens=result.tokens, wall_s=result.wall_s, outputs=result.outputs)), flush=True)


def run_method(method: str, args, adapters: Path) -> dict | str:
    cmd = [sys.executable, __file__, "--child", method, "--adapters", str(adapters),
           "--streams", str(args.streams), "--requests", str(args.requests),
           "--max-new-tokens", str(args.max_new_tokens), "--rank", str(args.rank)]
    if args.cache_dir:
        cmd += ["--cache-dir", args.cache_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.per_method_timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return f"failed (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def write_report(path: Path, results: dict, args, started: float) -> str:
    import bitsandbytes

    lines = ["# Quantized base model on CPU: none / int8 / nf4 / fp4 / nf4+emb", "",
             f"Model: SmolLM2-135M-Instruct (embedded default), dtype bfloat16 (4-bit compute dtype = bfloat16). "
             f"{args.streams} concurrent streams (closed loop), {args.requests} requests of {args.max_new_tokens} "
             f"new tokens (greedy, EOS ignored), spread over the base model and {args.adapters_n} random rank-{args.rank} "
             "all-linear adapters. Each method in its own subprocess (its own peak RSS).", "",
             "| quantize | base weights MiB | vs float16 | projections MiB | proj. vs float16 | load s | "
             "peak RSS MiB | anon RSS after load / run MiB | tokens | wall s | tokens/s | vs none | requests = none's tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    none = results.get("none") if isinstance(results.get("none"), dict) else None
    for method, r in results.items():
        if not isinstance(r, dict):
            lines.append(f"| {method} | {r} |" + " |" * 12)
            continue
        tps = r["tokens"] / r["wall_s"]
        rel = f"{tps / (none['tokens'] / none['wall_s']):.2f}x" if none else "-"
        same = (f"{sum(a == b for a, b in zip(r['outputs'], none['outputs']))}/{len(r['outputs'])}"
                if none else "-")
        lines.append(f"| {method} | {_mib(r['base_bytes'])} | {r['base_bytes'] / r['fp16_bytes']:.2f}x | "
                     f"{_mib(r['proj_bytes'])} | {r['proj_bytes'] / r['proj_fp16_bytes']:.2f}x | {r['load_s']:.1f} | "
                     f"{_mib(r['rss_peak'])} | {_mib(r['anon_after_load'])} / {_mib(r['anon_after_run'])} | {r['tokens']} | {r['wall_s']:.1f} | {tps:.1f} | {rel} | {same} |")
    any_r = next((r for r in results.values() if isinstance(r, dict)), None)
    share = (1 - any_r["proj_fp16_bytes"] / any_r["fp16_bytes"]) if any_r else float("nan")
    ckpt = sum(f.stat().st_size for f in Path(args.model_dir).glob("*.safetensors"))
    lines += ["", "## Notes", "",
              "- Base weights = everything resident in the model (quantized projections with their "
              "quant state, plus embeddings/norms kept in bfloat16; SmolLM2 ties lm_head to the embedding). "
              f"Embedding + norms are {share:.0%} of SmolLM2-135M's float16 weights and are not "
              "quantized by default (as in transformers), so whole-model savings are smaller than the projections'.",
              "- 'nf4+emb' = nf4 with `--quantize-embeddings`: the 49152x576 embedding table (SmolLM2's tied "
              "lm_head) is kept in nf4 as well (model/quantized_embedding.py): lookups dequantize only the "
              "step's rows, the tied lm_head multiplies from the same 4-bit storage (bitsandbytes' CPU path "
              "dequantizes it 4096 vocab rows at a time, every step). Only the norms stay in bfloat16.",
              "- Peak RSS includes torch, transformers, bitsandbytes (~450 MiB before loading), the KV cache, "
              f"and the pages of the memory-mapped checkpoint ({_mib(ckpt)} MiB of safetensors, float32) "
              "that were read: the file is read tensor by tensor, but its pages count in RSS until the "
              "kernel drops them, so RSS falls less than the resident weights do, and varies from run to run with the page "
              "cache. 'anon RSS' (RssAnon from /proc/self/status: private memory, no file pages) is the "
              "steadier measure of what the process itself holds. 'none' keeps bfloat16 projections.",
              "- The 2 cores are shared with other work (load average at start below): tokens/s vary by "
              "~20% between runs; nf4 and fp4 run the same kernel, so their gap is noise.",
              "- On this CPU (AVX512-BF16/AMX) bitsandbytes' 4-bit forward repacks weights and computes "
              "in bfloat16; int8 (LLM.int8(), outlier threshold 6.0) casts activations to float16 and "
              "decomposes outlier columns per call.",
              "- 'requests = none's tokens': greedy outputs identical to the unquantized run; quantization "
              "changes the model, so divergence is expected, not a bug (equivalence with transformers' "
              "bitsandbytes models is tested in tests/test_quantize.py).",
              "- 'load s' includes quantizing the float checkpoint at load time. A folder that transformers "
              "saved already quantized (BitsAndBytesConfig + save_pretrained) loads as it is, with no "
              "quantization step (model/prequantized.py, tested in tests/test_prequantized.py); not measured here.",
              "", "## Run", "",
              f"- command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
              f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, "
              f"total {time.perf_counter() - started:.0f} s",
              f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"bitsandbytes {bitsandbytes.__version__}, load average at start {os.getloadavg()[0]:.2f}", ""]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="none,int8,nf4,fp4,nf4+emb",
                   help="comma-separated: none, int8, nf4, fp4, or METHOD+emb (4-bit, with --quantize-embeddings)")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--adapters-n", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--cache-dir")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--per-method-timeout", type=int, default=150)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--adapters", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    from loraplex.model.default_model import ensure_default_model
    from loraplex.model.quantize import quantization_for

    started = time.perf_counter()
    model_dir = ensure_default_model(args.cache_dir, progress=False)
    available = quantization_for("cpu")
    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-quant-"))
    make_adapters(work, model_dir, args.adapters_n, args.rank)
    args.model_dir = str(model_dir)
    results: dict = {}
    for method in args.methods.split(","):
        if method_of(method) not in available:
            results[method] = f"not available on CPU (available: {list(available)})"
            continue
        try:
            results[method] = run_method(method, args, work)
        except subprocess.TimeoutExpired:
            results[method] = f"timed out after {args.per_method_timeout} s"
        r = results[method]
        print(method, {k: v for k, v in r.items() if k != "outputs"} if isinstance(r, dict) else r, flush=True)
    print(write_report(Path(args.out), results, args, started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
