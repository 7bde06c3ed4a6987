"""Prefix caching through the whole engine, float32, against transformers / PEFT.

Requests share a random "system prompt" under the base model and two PEFT adapters (random
weights). With the cache on, later requests find the shared blocks of THEIR adapter only; greedy
tokens must equal PEFT's own generate for that adapter, with and without the cache. Also: an
adapter unloaded and loaded again under the same id with other weights gets fresh KV; eviction
under memory pressure (and preemption) keeps tokens right; after everything ends and the cache
is flushed every block is free; cancellations in a soak leave no reference behind; a quantized
base gives the same tokens with and without the cache; metrics, the request log and gRPC usage
report cached prompt tokens.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from loraplex.config import EngineConfig, LoraConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import FinishReason, Request, SamplingParams
from loraplex.model.loader import load_model
from loraplex.serve import build_lora_manager
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.collector import Collector

pytestmark = pytest.mark.timeout(600)

BLOCK = 4
NEW = 8
KINDS = ("qv_r4", "all_r8_rslora")
ADAPTERS = ("",) + KINDS  # "" = base model
SYSTEM_LEN = 23  # 5 full blocks + 3 tokens: the shared prefix ends inside a block


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, torch.float32, "cpu")


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("prefix_adapters")
    dirs = {k: make_peft_adapter(tiny_model_dir, root / k, k, seed=30 + i) for i, k in enumerate(KINDS)}
    dirs["qv_r4_other"] = make_peft_adapter(tiny_model_dir, root / "qv_r4_other", "qv_r4", seed=77)
    return dirs


@pytest.fixture(scope="module")
def manager(loaded, adapter_dirs):
    root = adapter_dirs[KINDS[0]].parent
    mgr = build_lora_manager(loaded, LoraConfig(max_loras=4, max_lora_rank=8, max_cpu_loras=8,
                                                allowed_roots=(str(root),)))
    for kind in KINDS:
        mgr.load(kind, adapter_dirs[kind])
    yield mgr
    mgr.close()


@pytest.fixture(scope="module")
def prompts(loaded):
    """A shared system prompt + three suffixes that differ in their first token."""
    rng = random.Random(5)
    vocab = loaded.arch.vocab_size
    system = [rng.randrange(3, vocab) for _ in range(SYSTEM_LEN)]
    firsts = rng.sample(range(3, vocab), 3)
    return [system + [f] + [rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))] for f in firsts]


_peft_memo: dict = {}


def peft_generate(base_dir, adapter_dir, ids: list[int], new: int = NEW) -> list[int]:
    """PEFT's (or transformers' for adapter_dir None) greedy `new` tokens for `ids`, batch of one."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    key = (str(base_dir), str(adapter_dir))
    model = _peft_memo.get(key)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        model = _peft_memo[key] = model.eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, eos_token_id=None)
    return y[0, len(ids):].tolist()


def make_engine(loaded, manager=None, caching=True, **kw) -> Engine:
    cfg = dict(block_size=BLOCK, num_kv_blocks=128, max_num_seqs=8, max_num_batched_tokens=32,
               max_model_len=128, enable_prefix_caching=caching)
    cfg.update(kw)
    eng = Engine(loaded, EngineConfig(**cfg), lora_manager=manager)
    eng.start()
    return eng


def req(rid: str, ids: list[int], adapter: str = "", new: int = NEW) -> Request:
    return Request(rid, list(ids), SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True),
                   adapter_id=adapter)


def assert_no_leak(eng: Engine) -> None:
    bm = eng.block_manager
    with eng._step_lock:
        assert bm.num_used_blocks == 0 and sum(bm._ref) == 0
    eng.reset_prefix_cache()
    assert bm.num_free_blocks == bm.num_blocks == len(bm._free) and bm.num_cached_blocks == 0


def test_greedy_tokens_match_peft_with_and_without_the_cache(loaded, manager, adapter_dirs, prompts,
                                                             tiny_model_dir):
    want = {(a, i): peft_generate(tiny_model_dir, adapter_dirs.get(a), p)
            for a in ADAPTERS for i, p in enumerate(prompts)}
    # The adapters really change the continuation (else sharing KV across them could not fail).
    assert len({tuple(want[(a, 0)]) for a in ADAPTERS}) == len(ADAPTERS)
    shared = SYSTEM_LEN // BLOCK * BLOCK
    for caching in (False, True):
        eng = make_engine(loaded, manager, caching)
        col = Collector()
        try:
            # Wave 1, one at a time: the first request of each adapter computes the system prompt;
            # nothing is shared across adapters.
            for a in ADAPTERS:
                eng.submit(req(f"w1{a}", prompts[0], a), col)
                col.wait([f"w1{a}"])
                assert col.final(f"w1{a}").cached_prompt_tokens == 0
            # Wave 2, all at once: the other suffixes find their adapter's system prompt blocks.
            wave2 = [(a, i) for i in (1, 2) for a in ADAPTERS]
            for a, i in wave2:
                eng.submit(req(f"w2{a}{i}", prompts[i], a), col)
            col.wait([f"w2{a}{i}" for a, i in wave2])
            # Wave 3: the exact wave-1 prompts again, all but their last block hit.
            for a in ADAPTERS:
                eng.submit(req(f"w3{a}", prompts[0], a), col)
            col.wait([f"w3{a}" for a in ADAPTERS])
        finally:
            eng.shutdown(0)
        for a in ADAPTERS:
            for rid, i in [(f"w1{a}", 0), (f"w2{a}1", 1), (f"w2{a}2", 2), (f"w3{a}", 0)]:
                out = col.final(rid)
                assert out.finish_reason is FinishReason.LENGTH
                assert col.tokens(rid) == want[(a, i)], (caching, a or "base", rid)
            cached = {rid: col.final(rid).cached_prompt_tokens for rid in (f"w2{a}1", f"w2{a}2", f"w3{a}")}
            if caching:
                assert cached == {f"w2{a}1": shared, f"w2{a}2": shared,
                                  f"w3{a}": (len(prompts[0]) - 1) // BLOCK * BLOCK}, a
            else:
                assert set(cached.values()) == {0}
        st = eng.stats()
        if caching:
            assert st.prefix_cache_hit_tokens_total == sum(
                col.final(r).cached_prompt_tokens for r in col.events)
            assert 0 < st.prefix_cache_hit_tokens_total < st.prefix_cache_queried_tokens_total
        else:
            assert st.prefix_cache_queried_tokens_total == st.prefix_cache_blocks == 0
        assert_no_leak(eng)


def test_adapter_reloaded_with_other_weights_gets_fresh_kv(loaded, manager, adapter_dirs, prompts,
                                                           tiny_model_dir):
    old = peft_generate(tiny_model_dir, adapter_dirs["qv_r4"], prompts[0])
    new = peft_generate(tiny_model_dir, adapter_dirs["qv_r4_other"], prompts[0])
    assert old != new
    manager.load("reloaded", adapter_dirs["qv_r4"])
    eng = make_engine(loaded, manager)
    col = Collector()
    try:
        key_before = manager.content_key("reloaded")
        for rid in ("a", "b"):
            eng.submit(req(rid, prompts[0], "reloaded"), col)
            col.wait([rid])
        assert col.final("b").cached_prompt_tokens > 0 and col.tokens("b") == old
        manager.unload("reloaded")
        manager.load("reloaded", adapter_dirs["qv_r4_other"])
        assert manager.content_key("reloaded") != key_before
        for rid in ("c", "d"):
            eng.submit(req(rid, prompts[0], "reloaded"), col)
            col.wait([rid])
    finally:
        eng.shutdown(0)
        manager.unload("reloaded")
    assert col.tokens("a") == old
    assert col.final("c").cached_prompt_tokens == 0 and col.tokens("c") == new
    assert col.final("d").cached_prompt_tokens > 0 and col.tokens("d") == new
    assert_no_leak(eng)


def test_eviction_and_preemption_under_memory_pressure(loaded, tiny_model_dir):
    # 14 blocks of 4 = 56 slots; each request is a 21..23-token prompt + 8 (one at a time: up to
    # 8 blocks) or + 16 (together: up to 10 blocks each, so two running ones outgrow the cache).
    rng = random.Random(11)
    vocab = loaded.arch.vocab_size
    systems = [[rng.randrange(3, vocab) for _ in range(16)] for _ in range(3)]
    jobs = [systems[i % 3] + [rng.randrange(3, vocab) for _ in range(5 + i % 3)] for i in range(9)]
    new = [NEW] * 6 + [16] * 3
    want = [peft_generate(tiny_model_dir, None, ids, n) for ids, n in zip(jobs, new)]
    eng = make_engine(loaded, None, True, num_kv_blocks=14, max_model_len=56)
    col = Collector()
    try:
        for i, ids in enumerate(jobs[:6]):  # one at a time: each system prompt evicts another's
            eng.submit(req(f"s{i}", ids), col)
            col.wait([f"s{i}"])
        assert eng.stats().prefix_cache_evictions_total > 0
        # s3 reuses s0's system prompt only if it survived: 6 system blocks + tails do not fit.
        for i, ids in enumerate(jobs[6:], start=6):  # together: they preempt one another
            eng.submit(req(f"s{i}", ids, new=16), col)
        col.wait([f"s{i}" for i in range(6, 9)])
    finally:
        eng.shutdown(0)
    for i in range(9):
        assert col.tokens(f"s{i}") == want[i], i
    st = eng.stats()
    assert st.preemptions_total > 0 and st.prefix_cache_hit_tokens_total > 0
    assert_no_leak(eng)


def test_soak_with_cancellations_keeps_reference_counts_right(loaded, manager, prompts):
    """Requests over three keys sharing prefixes, a third cancelled at random moments, on a cache
    small enough to evict and preempt: the finished ones give the tokens of an engine without the
    cache, and nothing stays referenced."""
    rng = random.Random(3)
    jobs = []
    for i in range(24):
        a = rng.choice(ADAPTERS)
        p = rng.choice(prompts)[:rng.randint(SYSTEM_LEN - 6, SYSTEM_LEN + 4)]
        jobs.append((f"q{i}", a, p, rng.randint(2, NEW)))
    results = {}
    for caching in (False, True):
        eng = make_engine(loaded, manager, caching, num_kv_blocks=24, max_model_len=64,
                          max_num_batched_tokens=24)
        col = Collector()
        cancel = {rid for rid, *_ in jobs if rng.random() < 0.33} if caching else set()
        try:
            for rid, a, p, n in jobs:
                eng.submit(req(rid, p, a, new=n), col)
                if rid in cancel:  # at once (maybe still queued) or a little later (running)
                    threading.Timer(rng.choice([0.0, rng.uniform(0.0, 0.03)]), eng.abort,
                                    args=(rid,)).start()
                time.sleep(rng.uniform(0.0, 0.01))
            col.wait([rid for rid, *_ in jobs])
        finally:
            eng.shutdown(0)
        results[caching] = col
        assert_no_leak(eng)
        if caching:
            st = eng.stats()
            assert st.prefix_cache_hit_tokens_total > 0 and st.prefix_cache_evictions_total > 0
            assert st.finished_total["cancelled"] >= 1
    for rid, *_ in jobs:
        on = results[True].final(rid)
        assert on.finish_reason in (FinishReason.LENGTH, FinishReason.CANCELLED)
        if on.finish_reason is FinishReason.LENGTH:
            assert results[True].tokens(rid) == results[False].tokens(rid), rid


def test_quantized_base_same_tokens_with_and_without_cache(tiny_model_dir, prompts):
    from loraplex.model.quantize import QuantSpec, check_available

    try:
        check_available("int8", "cpu")
    except Exception as exc:  # bitsandbytes missing or without a CPU backend here
        pytest.skip(f"int8 quantization unavailable: {exc}")
    qloaded = load_model(tiny_model_dir, torch.float32, "cpu", QuantSpec("int8"))
    got = {}
    for caching in (False, True):
        eng = make_engine(qloaded, None, caching)
        col = Collector()
        try:
            for i, p in enumerate(prompts + prompts):
                eng.submit(req(f"q{i}", p), col)
                col.wait([f"q{i}"])
        finally:
            eng.shutdown(0)
        got[caching] = [col.tokens(f"q{i}") for i in range(6)]
        if caching:
            assert col.final("q3").cached_prompt_tokens > 0
    assert got[True] == got[False]


def test_metrics_request_log_and_grpc_usage_report_cached_tokens(loaded, prompts):
    from prometheus_client import CollectorRegistry

    from loraplex.api.convert import usage_to_proto
    from loraplex.api.metrics import LoraplexMetrics
    from loraplex.api.request_log import request_fields

    class Finished:
        def __init__(self):
            self.seen = []

        def on_step(self, *a):
            pass

        def on_finish(self, r):
            self.seen.append(r)

    metrics, log = LoraplexMetrics(CollectorRegistry()), Finished()
    eng = Engine(loaded, EngineConfig(block_size=BLOCK, num_kv_blocks=64, max_model_len=128),
                 observers=[metrics, log])
    metrics.bind(eng)
    eng.start()
    col = Collector()
    try:
        for rid, p in (("m0", prompts[0]), ("m1", prompts[1])):
            eng.submit(req(rid, p, new=2), col)
            col.wait([rid])
    finally:
        eng.shutdown(0)
    shared = SYSTEM_LEN // BLOCK * BLOCK
    out = col.final("m1")
    assert out.cached_prompt_tokens == shared
    assert usage_to_proto(out).cached_prompt_tokens == shared
    fields = request_fields(next(r for r in log.seen if r.request_id == "m1"))
    assert fields["cached_prompt_tokens"] == shared
    value = metrics.registry.get_sample_value
    assert value("loraplex_prefix_cache_hit_tokens_total") == shared
    assert value("loraplex_prefix_cache_queried_tokens_total") == len(prompts[0]) + len(prompts[1])
    assert value("loraplex_prefix_cache_blocks") >= (len(prompts[0]) + 2) // BLOCK
    assert value("loraplex_prefix_cache_evictions_total") == 0
