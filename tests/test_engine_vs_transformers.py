"""Greedy generation through the whole engine == transformers generate(do_sample=False), float32.

Checked one request at a time, and with all requests in one continuous batch whose small token
budget makes prefill chunks share steps with other sequences' decodes, over KV blocks of 4 tokens
(and once more with a cache small enough to force recompute preemption).
"""

from __future__ import annotations

import pytest
import torch

from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import Request, SamplingParams
from loraplex.model.loader import load_model
from tests.fixtures.collector import Collector

PROMPTS = [
    "Once",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is",
    "def main(): print(\"hello, world\")\nfor i in range(10): total = total + i",
    "Numbers matter too: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.14 2.718 42 and 2024. "
    "The weather today is sunny with a light wind from the west.",
]
MAX_NEW = 16


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family_dir(request, tiny_model_dirs):
    return tiny_model_dirs[request.param]


@pytest.fixture(scope="module")
def loaded(family_dir):
    return load_model(family_dir, torch.float32, "cpu")


@pytest.fixture(scope="module")
def hf_reference(family_dir, loaded):
    """Greedy continuation of each prompt by transformers, stopping at EOS like generate does."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32).eval()
    refs = []
    for text in PROMPTS:
        ids = loaded.tokenizer.encode(text)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=MAX_NEW)
        refs.append((ids, out[0, len(ids):].tolist()))
    assert len({len(ids) for ids, _ in refs}) == len(PROMPTS)  # prompts of distinct lengths
    return refs


def engine(loaded, **kw) -> Engine:
    cfg = dict(block_size=4, num_kv_blocks=128, max_num_seqs=8, max_num_batched_tokens=64,
               max_model_len=256)
    cfg.update(kw)
    return Engine(loaded, EngineConfig(**cfg))


def request(i: int, ids: list[int]) -> Request:
    return Request(f"p{i}", ids, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))


def test_one_request_at_a_time(loaded, hf_reference):
    eng = engine(loaded)
    eng.start()
    try:
        col = Collector()
        for i, (ids, ref) in enumerate(hf_reference):
            eng.submit(request(i, ids), col)
            col.wait([f"p{i}"])
            assert col.tokens(f"p{i}") == ref, f"prompt {i}"
    finally:
        eng.shutdown(0)


@pytest.mark.parametrize("budget,num_blocks", [(7, 128), (5, 128), (9, 24)])
def test_mixed_continuous_batch(loaded, hf_reference, budget, num_blocks):
    eng = engine(loaded, max_num_batched_tokens=budget, num_kv_blocks=num_blocks)
    steps = []  # (computed, new) per sequence, per step
    real_run = eng.runner.run

    def spy(seqs, nums, **kw):
        steps.append([(s.num_computed_tokens, s.num_uncomputed_tokens, n) for s, n in zip(seqs, nums)])
        return real_run(seqs, nums, **kw)

    eng.runner.run = spy
    col = Collector()
    for i, (ids, _) in enumerate(hf_reference):
        eng.submit(request(i, ids), col)
    eng.start()  # all requests are queued before the first step: deterministic batches
    try:
        col.wait([f"p{i}" for i in range(len(PROMPTS))])
    finally:
        eng.shutdown(0)
    for i, (_, ref) in enumerate(hf_reference):
        assert col.tokens(f"p{i}") == ref, f"prompt {i}"
    # The batches really mixed a decode with a partial prefill chunk in one step.
    mixed = [s for s in steps
             if any(c > 0 and left == 1 for c, left, n in s) and any(n < left for c, left, n in s)]
    assert mixed, "no step mixed decodes with a chunked prefill"
    if num_blocks < 32:
        assert eng.stats().preemptions_total > 0
    assert eng.stats().kv_blocks_used == 0
