"""Prefix caching on the default model (SmolLM2-135M-Instruct, CPU): a shared system prompt
computed once per adapter, and what the cache costs when nothing is shared.

Two workloads, each run in the same process with the cache on and off (a fresh engine per run,
so every cached run starts cold; on/off interleaved round by round, the order alternating, so
that other load on the shared 2-core machine hits both alike; medians over rounds):

shared   --requests chat requests (default 32) whose system prompt is the same ~--system-tokens
         tokens (default 1,000), each with a user question, spread over --adapters random rank-8
         q,k,v,o adapters and the base model (each key equally often, in a shuffled order).
         --streams closed-loop streams. With the cache, the first request of each adapter (and of
         the base) computes the system prompt and later ones find it: "hits" are the requests
         that reported cached_prompt_tokens > 0. Compared: TTFT p50 of the hits against the
         same requests without the cache (target >= 5x lower) and tokens/s (target >= 2x).
unique   the same requests, each with a system prompt of its own (no block shared): the cost of
         hashing and bookkeeping (target: tokens/s at most 2% lower).

Every request is greedy with EOS ignored, so each generates exactly --max-new-tokens tokens;
tokens/s = generated tokens / wall time (prefill included).

    .venv/bin/python benchmarks/bench_prefix_cache.py            # 3 rounds x 4 runs
    .venv/bin/python benchmarks/bench_prefix_cache.py --dtype float32 --threads 1 --rounds 2
    .venv/bin/python benchmarks/bench_prefix_cache.py --quick    # smoke run

One round took ~13 min in float32 on a 2-core AMD EPYC without bfloat16 matmul support, shared
with other jobs (bfloat16 there: a 512-token prefill 20 s against 2.4 s in float32).

Writes benchmarks/results/prefix_cache_cpu.md and prefix_cache_cpu.png.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_lora_serving import (ATTN, Job, Shapes, _cpu_kernels_line, make_uniform_set,  # noqa: E402
                                run_streams)
from bench_serving import QUESTIONS, _fmt_load, machine_info  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "prefix_cache_cpu.md"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

WORDS = ("the customer support policy applies to every order shipped from our warehouses and "
         "refunds are issued within fourteen days when the item is returned unused in its original "
         "packaging agents must verify the account holder before discussing billing details never "
         "share internal notes escalate safety issues immediately answer politely concisely and in "
         "the language of the customer premium members receive free express shipping on orders above "
         "fifty euros gift cards cannot be exchanged for cash warranty claims require the serial "
         "number and proof of purchase").split()


def system_text(rng: random.Random, tok, target_tokens: int, tag: str = "") -> str:
    """A pseudo-policy of about `target_tokens` tokens (sentences of random policy words)."""
    words: list[str] = [tag] if tag else []
    while len(tok.encode(" ".join(words))) < target_tokens:
        sentence = [rng.choice(WORDS) for _ in range(rng.randint(8, 16))]
        words += sentence[:-1] + [sentence[-1] + "."]
    return " ".join(words)


def chat(tok, system: str, question: str) -> tuple[int, ...]:
    return tuple(tok.apply_chat_template([{"role": "system", "content": system},
                                          {"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=True, return_dict=False))


class CachedTokens:
    """Engine observer: request id -> cached prompt tokens, from the finished event."""

    def __init__(self):
        self.by_id: dict[str, int] = {}

    def on_step(self, *args) -> None:
        pass

    def on_finish(self, req) -> None:
        self.by_id[req.request_id] = req.cached_prompt_tokens


def run_case(loaded, manager, jobs: list[Job], args, caching: bool, name: str) -> dict:
    from loraplex.config import EngineConfig
    from loraplex.engine.engine import Engine

    longest = max(len(j.prompt) for j in jobs) + args.max_new_tokens
    config = EngineConfig(block_size=16, num_kv_blocks=args.kv_blocks, max_num_seqs=args.streams,
                          max_model_len=longest + 16, max_new_tokens_cap=max(args.max_new_tokens, 16),
                          enable_prefix_caching=caching)
    rec = CachedTokens()
    engine = Engine(loaded, config, lora_manager=manager, observers=[rec])
    engine.warmup()
    engine.start()
    try:
        res = run_streams(engine, manager, jobs, args.streams, args.max_new_tokens, name)
    finally:
        engine.shutdown(0)
    st = engine.stats()
    cached = [rec.by_id[f"{name}-{i}"] for i in range(len(jobs))]
    del engine
    gc.collect()
    return dict(res=res, cached=cached, prefill_tokens=st.prompt_tokens_total,
                hit=st.prefix_cache_hit_tokens_total, queried=st.prefix_cache_queried_tokens_total)


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from loraplex.config import LoraConfig
    from loraplex.lora.peft_format import BaseShapes
    from loraplex.model.default_model import ensure_default_model
    from loraplex.model.loader import load_model
    from loraplex.serve import build_lora_manager

    model_dir = ensure_default_model(args.cache_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    loaded = load_model(model_dir, DTYPES[args.dtype], torch.device("cpu"))
    bs = BaseShapes.from_model(loaded.model)
    shapes = Shapes(bs.num_layers, dict(bs.features))
    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-prefix-"))
    try:
        ids = make_uniform_set(work, args.adapters, shapes, ATTN, 8, torch.bfloat16, str(model_dir),
                               seed=args.seed)
        manager = build_lora_manager(loaded, LoraConfig(max_lora_rank=8, max_cpu_loras=64,
                                                        allowed_roots=(str(work),)))
        for aid in ids:
            manager.load(aid, work / aid)
        rng = random.Random(args.seed)
        keys = [""] + ids
        order = [keys[i % len(keys)] for i in range(args.requests)]
        rng.shuffle(order)
        system = system_text(rng, tok, args.system_tokens)
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
        shared = [Job(chat(tok, system, q), a) for q, a in zip(questions, order)]
        unique = [Job(chat(tok, system_text(rng, tok, args.system_tokens, tag=f"Desk {i}:"), q), a)
                  for i, (q, a) in enumerate(zip(questions, order))]
        system_len = len(chat(tok, system, "")) - len(chat(tok, "", ""))  # tokens of the system text
        print(f"model {model_dir}, {len(ids)} adapters + base, {args.requests} requests, system prompt "
              f"{system_len} tokens, prompts {min(len(j.prompt) for j in shared)}-"
              f"{max(len(j.prompt) for j in shared)} tokens, load average {_fmt_load(load_at_start)}",
              flush=True)
        rounds: list[dict] = []
        for r in range(args.rounds):
            row = {}
            modes = (True, False) if r % 2 == 0 else (False, True)
            for wl_name, jobs in (("shared", shared), ("unique", unique)):
                for caching in modes:
                    key = f"{wl_name}_{'on' if caching else 'off'}"
                    t0 = time.perf_counter()
                    row[key] = run_case(loaded, manager, jobs, args, caching, f"r{r}{key}")
                    res = row[key]["res"]
                    print(f"round {r} {key}: {res.tok_per_s:.1f} tok/s, TTFT p50 "
                          f"{1e3 * p50(res.ttfts):.0f} ms, cached {sum(row[key]['cached'])} tokens, "
                          f"{time.perf_counter() - t0:.1f} s, load {_fmt_load(os.getloadavg())}", flush=True)
            rounds.append(row)
            # A report after every round: an interrupted run still leaves its finished rounds.
            summary = summarize(rounds)
            write_report(args, rounds, summary, system_len, shared, load_at_start, loaded)
            write_plot(args, rounds, summary, args.out.with_suffix(".png"))
        manager.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(rounds)
    text = write_report(args, rounds, summary, system_len, shared, load_at_start, loaded)
    png = args.out.with_suffix(".png")
    write_plot(args, rounds, summary, png)
    print(f"\nwrote {args.out} and {png}\n")
    print(text)
    return 0


def summarize(rounds: list[dict]) -> dict:
    per_round = []
    for row in rounds:
        on, off = row["shared_on"], row["shared_off"]
        hits = [i for i, c in enumerate(on["cached"]) if c > 0]
        ttft_hit_on = p50([on["res"].ttfts[i] for i in hits])
        ttft_hit_off = p50([off["res"].ttfts[i] for i in hits])  # the same requests, no cache
        per_round.append(dict(
            hits=len(hits), ttft_hit_on=ttft_hit_on, ttft_hit_off=ttft_hit_off,
            ttft_all_on=p50(on["res"].ttfts), ttft_all_off=p50(off["res"].ttfts),
            ttft_ratio=ttft_hit_off / ttft_hit_on,
            tps_on=on["res"].tok_per_s, tps_off=off["res"].tok_per_s,
            tps_ratio=on["res"].tok_per_s / off["res"].tok_per_s,
            hit_ratio=on["hit"] / max(1, on["queried"]),
            prefill_on=on["prefill_tokens"], prefill_off=off["prefill_tokens"],
            u_on=row["unique_on"]["res"].tok_per_s, u_off=row["unique_off"]["res"].tok_per_s,
            u_cost=1.0 - row["unique_on"]["res"].tok_per_s / row["unique_off"]["res"].tok_per_s,
            u_cached=sum(row["unique_on"]["cached"]),
            same=sum(a == b for a, b in zip(on["res"].outputs, off["res"].outputs)),
        ))
    med = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
    return dict(per_round=per_round, median=med)


def write_report(args, rounds, summary, system_len, shared, load_at_start, loaded) -> str:
    m = summary["median"]
    n = args.requests
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines = [
        "# Prefix caching on CPU", "",
        f"Model: SmolLM2-135M-Instruct (embedded default), {str(loaded.dtype).removeprefix('torch.')}, "
        f"CPU, {_cpu_kernels_line()}; torch threads {args.threads}. Each run is a fresh engine in the "
        "same process (block size 16, "
        f"{args.kv_blocks} KV blocks, max_num_batched_tokens 512, max_num_seqs = streams), cache on "
        "and off interleaved round by round; medians over "
        f"{len(rounds)} of {args.rounds} rounds. {n} chat requests, {args.streams} closed-loop streams, "
        f"{args.max_new_tokens} new tokens each (greedy, EOS ignored); {args.adapters} random rank-8 "
        "q,k,v,o adapters and the base model, each used by "
        f"{n // (args.adapters + 1)}-{-(-n // (args.adapters + 1))} requests, in a shuffled order.", "",
        f"**shared**: one system prompt of {system_len} tokens (chat template: prompts "
        f"{min(len(j.prompt) for j in shared)}-{max(len(j.prompt) for j in shared)} tokens) for all "
        "requests, a user question each. A *hit* is a request that reported cached prompt tokens "
        "(the first request of each adapter / the base computes the prefix; KV is never shared "
        "across adapters). **unique**: the same requests, each with its own system prompt of the "
        "same length (nothing to share): the cache's bookkeeping cost.", "",
        "| | cache off | cache on | ratio | target |",
        "|---|---:|---:|---:|---|",
        f"| shared: TTFT p50 of the hits ({m['hits']:.0f} of {n}) | {1e3 * m['ttft_hit_off']:.0f} ms | "
        f"{1e3 * m['ttft_hit_on']:.0f} ms | {m['ttft_ratio']:.1f}x lower | >= 5x: "
        f"{verdict(m['ttft_ratio'] >= 5)} |",
        f"| shared: TTFT p50, all requests | {1e3 * m['ttft_all_off']:.0f} ms | "
        f"{1e3 * m['ttft_all_on']:.0f} ms | {m['ttft_all_off'] / m['ttft_all_on']:.1f}x lower | |",
        f"| shared: generated tokens/s | {m['tps_off']:.1f} | {m['tps_on']:.1f} | "
        f"{m['tps_ratio']:.2f}x | >= 2x: {verdict(m['tps_ratio'] >= 2)} |",
        f"| shared: prompt tokens computed | {m['prefill_off']:.0f} | {m['prefill_on']:.0f} | "
        f"hit ratio {m['hit_ratio']:.2f} (tokens) | |",
        f"| unique: generated tokens/s | {m['u_off']:.1f} | {m['u_on']:.1f} | "
        f"{100 * m['u_cost']:+.1f}% cost | <= 2%: {verdict(m['u_cost'] <= 0.02)} |",
        "",
        "Per round (ratios are within a round):", "",
        "| round | hits | TTFT hits off / on (ms) | tok/s off / on | unique tok/s off / on (cost) | "
        "greedy outputs equal on/off |",
        "|---:|---:|---|---|---|---:|",
    ]
    for i, r in enumerate(summary["per_round"]):
        lines.append(f"| {i} | {r['hits']} | {1e3 * r['ttft_hit_off']:.0f} / {1e3 * r['ttft_hit_on']:.0f} "
                     f"({r['ttft_ratio']:.1f}x) | {r['tps_off']:.1f} / {r['tps_on']:.1f} "
                     f"({r['tps_ratio']:.2f}x) | {r['u_off']:.1f} / {r['u_on']:.1f} "
                     f"({100 * r['u_cost']:+.1f}%) | {r['same']}/{n} |")
    lines += [
        "",
        "Greedy outputs may differ between the runs by rounding (a prefix computed in another batch "
        "composition, so other GEMM shapes); the float32 token equality with transformers/PEFT, "
        "cache on and off, is tests/test_prefix_cache.py. The unique workload reported "
        f"{summary['median']['u_cached']:.0f} cached tokens (median): it shares nothing.", "",
        "## Machine", "", *machine_info(load_at_start), "",
        "Command: `.venv/bin/python benchmarks/bench_prefix_cache.py "
        + " ".join(shlex.quote(a) for a in (args.argv or [])) + "`", "",
    ]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return text


def write_plot(args, rounds, summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = summary["median"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    panels = (
        (axes[0], "TTFT p50 of cache hits (ms)", 1e3 * m["ttft_hit_off"], 1e3 * m["ttft_hit_on"], "%.0f"),
        (axes[1], "shared prefix: generated tokens/s", m["tps_off"], m["tps_on"], "%.1f"),
        (axes[2], "no shared prefix: generated tokens/s", m["u_off"], m["u_on"], "%.1f"),
    )
    for ax, title, off, on, fmt in panels:
        bars = ax.bar(["cache off", "cache on"], [off, on], color=["#888", "#1f77b4"])
        ax.bar_label(bars, fmt=fmt)
        ax.margins(y=0.12)
        ax.set_title(title)
    fig.suptitle(f"loraplex prefix caching, SmolLM2-135M {args.dtype} CPU, {args.requests} requests, "
                 f"{args.streams} streams, {args.adapters} adapters + base, medians of {len(rounds)} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--streams", type=int, default=8, help="concurrent closed-loop streams")
    p.add_argument("--adapters", type=int, default=8, help="random rank-8 adapters (plus the base)")
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kv-blocks", type=int, default=2048)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="float32 where the CPU has no bfloat16 matmul support (no AVX-512 BF16 / AMX)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="12 requests, 300-token system prompt, 1 round")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.requests, args.system_tokens, args.rounds, args.max_new_tokens = 12, 300, 1, 8
        if args.out == DEFAULT_OUT:
            args.out = Path(tempfile.gettempdir()) / "prefix_cache_quick.md"
    return args


if __name__ == "__main__":
    sys.exit(main())
