"""int8 vs bfloat16 KV cache (--kv-cache-dtype) on the default model: decode speed by context
length, the cache's bytes, and what the rounding does to the model's predictions.

Speed: for each context length C, two engines whose B sequences are all decoding at ~C tokens of
context (benchmarks/decode_driver.py: the real Engine.step()), one per cache dtype, stepped
alternately `--steps` times; tokens/s = B / median step, the ratio the median of the
per-alternation ratios (what survives a noisy machine).

Quality: texts the model writes itself (chat prompts, temperature 0.8, seeded), scored
teacher-forced in chunks of 256 tokens (as the engine prefills) by the bfloat16 model with each
cache and by the float32 model with a float32 cache. Per position: whether the top-1 token agrees,
KL(float32 || x) of the next-token distributions, and the perplexity of the text. The bfloat16
cache's own distance from float32 is the scale: int8 adds what it adds on top of that.

    python benchmarks/bench_kv_cache_dtype.py      # ~6 min on a 2-core CPU
Writes benchmarks/results/kv_cache_dtype_cpu.md (--out).
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
DEFAULT_OUT = REPO / "benchmarks" / "results" / "kv_cache_dtype_cpu.md"
CACHES = ("auto", "int8")  # the engine's names; auto = the model's bfloat16
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works, step by step.",
    "What are the main causes of the French Revolution?",
    "Describe a day in the life of a honeybee.",
    "Give me a recipe for a vegetable soup and explain each step.",
    "Why is the sky blue? Explain it to a curious child.",
    "Compare trains and planes for travelling across Europe.",
    "Write a letter to a friend about learning to play the piano.",
]
CHUNK = 256


def speed(loaded, batch: int, ctx: int, steps: int) -> tuple[float, float, float]:
    """(bfloat16-cache tok/s, int8-cache tok/s, median per-alternation ratio int8 / bfloat16)."""
    from decode_driver import alternate_steps, make_decode_engine

    times = alternate_steps({c: make_decode_engine(loaded, batch, ctx, steps + 1, kv_cache_dtype=c) for c in CACHES},
                            steps)
    ratio = statistics.median(b / i for b, i in zip(times["auto"], times["int8"]))
    return batch / statistics.median(times["auto"]), batch / statistics.median(times["int8"]), ratio


def sample_texts(loaded, length: int) -> list[list[int]]:
    """Each prompt (chat template) plus the model's own continuation, `length` tokens in all."""
    from loraplex.config import EngineConfig
    from loraplex.engine.engine import Engine
    from loraplex.engine.request import Request, SamplingParams

    tok = loaded.tokenizer
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)) for p in PROMPTS]
    engine = Engine(loaded, EngineConfig(num_kv_blocks=len(prompts) * (-(-length // 16) + 1) + 8,
                                         max_num_seqs=len(prompts), max_model_len=length + 16,
                                         max_new_tokens_cap=length))
    texts = [list(p) for p in prompts]
    finished = []

    def collect(out, i):
        texts[i].extend(out.new_token_ids)
        if out.finished:
            finished.append(i)

    for i, p in enumerate(prompts):
        params = SamplingParams(max_new_tokens=length - len(p), temperature=0.8, seed=i, ignore_eos=True)
        engine.submit(Request(f"text-{i}", p, params), lambda out, i=i: collect(out, i))
    while len(finished) < len(prompts):  # this thread steps the engine (no engine thread runs)
        engine.step()
    engine.shutdown(0)
    if any(len(t) != length for t in texts):
        raise RuntimeError(f"sampled texts of {[len(t) for t in texts]} tokens, expected {length}")
    return texts


def score(model, arch, tokens: list[int], cache_dtype: torch.dtype) -> torch.Tensor:
    """[L - 1, vocab] float64 log-probabilities of the next token at every position, prefilled in
    chunks of CHUNK into a fresh cache (blocks in order)."""
    from loraplex.model.forward_batch import ForwardBatch
    from loraplex.model.kv_cache import KVCache

    bs, n = 16, len(tokens)
    kv = KVCache.allocate(arch.num_layers, -(-n // bs), bs, arch.num_kv_heads, arch.head_dim, cache_dtype)
    ids = torch.tensor(tokens)
    out = []
    for start in range(0, n, CHUNK):
        end = min(n, start + CHUNK)
        pos = torch.arange(start, end)
        batch = ForwardBatch(input_ids=ids[start:end], positions=pos, slot_mapping=pos,
                             query_start_loc=torch.tensor([0, end - start]), seq_lens=torch.tensor([end]),
                             block_tables=torch.arange(-(-end // bs))[None], logits_indices=torch.arange(end - start),
                             query_lens_list=[end - start], seq_lens_list=[end])
        with torch.inference_mode():
            out.append(torch.log_softmax(model(batch, kv).double(), -1))
    return torch.cat(out)[:-1]  # row i predicts tokens[i + 1]


def compare(ref: torch.Tensor, x: torch.Tensor, tokens: list[int]) -> dict[str, float]:
    """Over every position: top-1 agreement with ref, mean KL(ref || x), and x's perplexity of
    the text."""
    nxt = torch.tensor(tokens[1:])
    return {"agree": float((ref.argmax(-1) == x.argmax(-1)).double().mean()),
            "kl": float((ref.exp() * (ref - x)).sum(-1).mean()),
            "ppl": float(torch.exp(-x[torch.arange(len(nxt)), nxt].mean()))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--contexts", default="250,1000,2000")
    p.add_argument("--steps", type=int, default=6, help="timed steps per cache and context (alternated)")
    p.add_argument("--text-len", type=int, default=1024, help="tokens per scored text (prompt included)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    load0 = os.getloadavg()
    from machine import cpu_info

    from loraplex.engine.engine import pack_cpu_weights
    from loraplex.model.default_model import ensure_default_model
    from loraplex.model.kv_cache import KVCache
    from loraplex.model.loader import load_model

    bf16 = load_model(ensure_default_model(), torch.bfloat16, torch.device("cpu"))
    arch = bf16.arch
    per_token = {c: KVCache.bytes_per_block(arch.num_layers, 1, arch.num_kv_heads, arch.head_dim, d)
                 for c, d in (("bfloat16", torch.bfloat16), ("int8", torch.int8))}
    rows = []
    for ctx in (int(c) for c in a.contexts.split(",") if c):
        b_tps, i_tps, ratio = speed(bf16, a.batch, ctx, a.steps)
        rows.append((ctx, b_tps, i_tps, ratio))
        print(f"context {ctx}: bfloat16 cache {b_tps:.1f} tok/s, int8 cache {i_tps:.1f} tok/s, x{ratio:.3f}", flush=True)

    texts = sample_texts(bf16, a.text_len)
    pack_cpu_weights(bf16.model)
    f32 = load_model(ensure_default_model(), torch.float32, torch.device("cpu"))
    quality = {"bfloat16": [], "int8": []}
    for t in texts:
        ref = score(f32.model, arch, t, torch.float32)
        for name, dt in (("bfloat16", torch.bfloat16), ("int8", torch.int8)):
            quality[name].append(compare(ref, score(bf16.model, arch, t, dt), t))
        ppl_f32 = float(torch.exp(-ref[torch.arange(len(t) - 1), torch.tensor(t[1:])].mean()))
        quality.setdefault("float32 ppl", []).append(ppl_f32)
        print(f"text of {len(t)}: f32 ppl {ppl_f32:.3f}, " + ", ".join(
            f"{n} agree {quality[n][-1]['agree']:.4f} kl {quality[n][-1]['kl']:.5f} ppl {quality[n][-1]['ppl']:.3f}"
            for n in ("bfloat16", "int8")), flush=True)
    load1 = os.getloadavg()

    def mean(name, key):
        return statistics.mean(q[key] for q in quality[name])

    lines = [
        "# int8 vs bfloat16 KV cache (CPU)", "",
        f"- CPU: {cpu_info().describe()}",
        f"- torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Load average at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, at end "
        f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}",
        "- Command: `" + " ".join(["python benchmarks/bench_kv_cache_dtype.py", *(sys.argv[1:] if argv is None else argv)])
        + "`",
        f"- Default model (SmolLM2-135M-Instruct) in bfloat16; KV bytes per token (all {arch.num_layers} layers): "
        f"bfloat16 {per_token['bfloat16']} B, int8 {per_token['int8']} B "
        f"({per_token['int8'] / per_token['bfloat16']:.3f}x: codes plus a float32 scale per token and kv head)",
        "",
        "## Decode speed",
        "",
        f"{a.batch} sequences all decoding through Engine.step() (greedy), prompts of C random tokens; the two "
        f"engines step alternately, {a.steps} steps each.",
        "",
        "| context C | bfloat16 cache tok/s | int8 cache tok/s | int8 / bfloat16 |",
        "|---:|---:|---:|---:|",
        *[f"| {c} | {b:.1f} | {i:.1f} | {r:.3f} |" for c, b, i, r in rows],
        "",
        "## Predictions",
        "",
        f"{len(texts)} texts of {a.text_len} tokens (a chat prompt and the model's own continuation at "
        "temperature 0.8), scored teacher-forced; reference: the float32 model with a float32 cache "
        f"(perplexity {statistics.mean(quality['float32 ppl']):.3f}). Means over texts.",
        "",
        "| bfloat16 model with | top-1 agrees with float32 | KL(float32 \\|\\| it), nats/token | perplexity |",
        "|---|---:|---:|---:|",
        *[f"| {n} cache | {mean(n, 'agree'):.4f} | {mean(n, 'kl'):.5f} | {mean(n, 'ppl'):.3f} |"
          for n in ("bfloat16", "int8")],
    ]
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
