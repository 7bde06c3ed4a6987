"""The engine on the tiny random Llama: concurrency, abort, shutdown, step failures, validation,
stop/EOS/length, preemption, the adapter-slot hook and the idle loop."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest
import torch

from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.errors import AdapterNotFoundError, EngineStoppedError, QueueFullError
from loraplex.engine.request import FinishReason, InvalidRequestError, Request, SamplingParams
from loraplex.model.loader import load_model
from tests.fixtures.collector import Collector

WAIT = 60.0  # generous: CI machines are slow and shared


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, torch.float32, "cpu")


def config(**kw) -> EngineConfig:
    base = dict(block_size=4, num_kv_blocks=256, max_num_seqs=16, max_num_batched_tokens=32,
                max_model_len=256, max_new_tokens_cap=512, max_waiting=64)
    base.update(kw)
    return EngineConfig(**base)


@pytest.fixture
def make_engine(loaded):
    engines = []

    def make(lora_manager=None, start=True, **kw):
        eng = Engine(loaded, config(**kw), lora_manager=lora_manager)
        if start:
            eng.start()
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.shutdown(0)


def prompt(loaded, text="The quick brown fox jumps over the lazy dog."):
    return loaded.tokenizer.encode(text)


def wait_until(pred, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_many_concurrent_requests(loaded, make_engine):
    eng = make_engine(max_num_batched_tokens=24)
    col = Collector()
    texts = ["Once upon a time", "What is the capital of France?", "def main():",
             "The weather today is sunny", "Numbers matter too: 0 1 2"]
    specs = {}
    for i in range(20):
        sp = [SamplingParams(temperature=0.0, max_new_tokens=6 + i % 5, ignore_eos=True),
              SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_new_tokens=8, seed=7),
              SamplingParams(temperature=1.0, max_new_tokens=5, repetition_penalty=1.3)][i % 3]
        specs[f"r{i}"] = (prompt(loaded, texts[i % 5]), sp)

    def submitter(ids):
        for rid in ids:
            eng.submit(Request(rid, specs[rid][0], specs[rid][1]), col)

    threads = [threading.Thread(target=submitter, args=(list(specs)[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    col.wait(list(specs))
    for rid, (ids, sp) in specs.items():
        fin = col.final(rid)
        toks = col.tokens(rid)
        assert fin.completion_tokens == len(toks) >= 1 and fin.prompt_tokens == len(ids)
        assert fin.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
        if fin.finish_reason is FinishReason.LENGTH:
            assert len(toks) == sp.max_new_tokens
        else:
            assert toks[-1] in eng.eos_token_ids
        gen_text = loaded.tokenizer.decode(toks, skip_special_tokens=True)
        assert col.text(rid) == gen_text
        tm = fin.timings
        assert 0 <= tm.queue_seconds <= tm.ttft_seconds <= tm.total_seconds
    # Same prompt + greedy -> same tokens; same prompt + same seed -> same tokens.
    by_key = defaultdict(set)
    for rid, (ids, sp) in specs.items():
        if sp.greedy or sp.seed is not None:
            by_key[(tuple(ids), sp)].add(tuple(col.tokens(rid)))
    assert by_key and all(len(v) == 1 for v in by_key.values())
    wait_until(lambda: eng.stats().kv_blocks_used == 0)
    st = eng.stats()
    assert st.num_running == st.num_waiting == 0 and st.kv_blocks_total == 256
    assert sum(st.finished_total.values()) == 20
    assert st.generation_tokens_total == sum(len(col.tokens(r)) for r in specs)


def test_abort_mid_generation_frees_kv(loaded, make_engine):
    eng = make_engine()
    col = Collector()
    eng.submit(Request("long", prompt(loaded), SamplingParams(max_new_tokens=500, ignore_eos=True)), col)
    col.wait_tokens("long", 3)
    assert eng.stats().kv_blocks_used > 0
    eng.abort("long")
    col.wait(["long"])
    fin = col.final("long")
    assert fin.finish_reason is FinishReason.CANCELLED and fin.error is None
    assert 3 <= fin.completion_tokens < 500
    wait_until(lambda: eng.stats().kv_blocks_used == 0)
    eng.abort("long")  # already finished: ignored
    eng.abort("never-submitted")
    # The engine still serves.
    eng.submit(Request("after", prompt(loaded), SamplingParams(max_new_tokens=3)), col)
    col.wait(["after"])
    assert col.final("after").finish_reason in (FinishReason.LENGTH, FinishReason.EOS)


def test_abort_waiting_request(loaded, make_engine):
    eng = make_engine(max_num_seqs=1)
    col = Collector()
    sp = SamplingParams(max_new_tokens=400, ignore_eos=True)
    eng.submit(Request("first", prompt(loaded), sp), col)
    eng.submit(Request("queued", prompt(loaded), sp), col)
    col.wait_tokens("first", 2)
    eng.abort("queued")
    col.wait(["queued"])
    fin = col.final("queued")
    assert fin.finish_reason is FinishReason.CANCELLED and fin.completion_tokens == 0
    eng.abort("first")
    col.wait(["first"])
    wait_until(lambda: eng.stats().kv_blocks_used == 0)


def test_shutdown_reports_every_request(loaded, make_engine):
    eng = make_engine(max_num_seqs=4)
    col = Collector()
    rids = [f"s{i}" for i in range(10)]
    for rid in rids:
        eng.submit(Request(rid, prompt(loaded), SamplingParams(max_new_tokens=500, ignore_eos=True)), col)
    col.wait_tokens("s0", 1)
    eng.shutdown(grace_seconds=0.05)
    for rid in rids:  # every request got exactly one finished event before shutdown returned
        assert col.final(rid).finish_reason is FinishReason.CANCELLED
    assert eng.stats().kv_blocks_used == 0
    with pytest.raises(EngineStoppedError):
        eng.submit(Request("late", prompt(loaded), SamplingParams()), col)


def test_shutdown_grace_lets_short_requests_finish(loaded, make_engine):
    eng = make_engine()
    col = Collector()
    for i in range(3):
        eng.submit(Request(f"q{i}", prompt(loaded), SamplingParams(max_new_tokens=4, ignore_eos=True)), col)
    eng.shutdown(grace_seconds=WAIT)
    for i in range(3):
        assert col.final(f"q{i}").finish_reason is FinishReason.LENGTH


def test_shutdown_without_start_cancels_queued(loaded, make_engine):
    eng = make_engine(start=False)
    col = Collector()
    eng.submit(Request("q", prompt(loaded), SamplingParams()), col)
    eng.shutdown(1.0)
    assert col.final("q").finish_reason is FinishReason.CANCELLED


def test_exception_in_a_step_fails_only_its_requests(loaded, make_engine):
    eng = make_engine(start=False)
    col = Collector()
    real_run = eng.runner.run

    def flaky_run(seqs, nums, **kw):
        if any(s.request_id.startswith("boom") for s in seqs):
            raise RuntimeError("injected failure")
        return real_run(seqs, nums, **kw)

    eng.runner.run = flaky_run
    sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
    eng.submit(Request("ok-before", prompt(loaded), sp), col)
    eng.step()  # ok-before prefilled alone
    eng.submit(Request("boom", prompt(loaded), sp), col)
    eng.step()  # ok-before decodes in the same step as boom's prefill: both fail
    for rid in ("boom", "ok-before"):
        fin = col.final(rid)
        assert fin.finish_reason is FinishReason.ERROR and "injected failure" in fin.error
    assert eng.stats().kv_blocks_used == 0 and eng.stats().num_running == 0
    eng.start()  # the loop thread survives a failing step too
    eng.submit(Request("boom-2", prompt(loaded, "Once upon a time"), sp), col)
    col.wait(["boom-2"])
    assert col.final("boom-2").finish_reason is FinishReason.ERROR
    eng.submit(Request("ok-last", prompt(loaded), sp), col)
    col.wait(["ok-last"])
    assert col.final("ok-last").finish_reason is FinishReason.LENGTH
    assert len(col.tokens("ok-last")) == 5
    wait_until(lambda: eng.stats().kv_blocks_used == 0)


def test_callback_exception_does_not_stop_the_engine(loaded, make_engine):
    eng = make_engine()
    col = Collector()

    def bad(out):
        raise ValueError("consumer bug")

    eng.submit(Request("bad", prompt(loaded), SamplingParams(max_new_tokens=3)), bad)
    eng.submit(Request("good", prompt(loaded), SamplingParams(max_new_tokens=3)), col)
    col.wait(["good"])
    wait_until(lambda: eng.stats().num_running == 0 and eng.stats().kv_blocks_used == 0)


def test_validation(loaded, make_engine):
    eng = make_engine(start=False, max_model_len=32, max_new_tokens_cap=10, max_waiting=2)
    col = Collector()
    with pytest.raises(InvalidRequestError) as e:
        eng.submit(Request("a", [], SamplingParams()), col)
    assert e.value.field == "prompt"
    with pytest.raises(InvalidRequestError, match="longer than the context") as e:
        eng.submit(Request("b", [5] * 32, SamplingParams(max_new_tokens=2)), col)
    assert e.value.field == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        eng.submit(Request("c", [5, loaded.arch.vocab_size], SamplingParams()), col)
    assert e.value.field == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        eng.submit(Request("d", [5] * 3, SamplingParams(max_new_tokens=11)), col)
    assert e.value.field == "max_new_tokens"
    with pytest.raises(AdapterNotFoundError):
        eng.submit(Request("e", [5] * 3, SamplingParams(max_new_tokens=2), adapter_id="nope"), col)
    eng.submit(Request("f", [5] * 31, SamplingParams(max_new_tokens=10)), col)  # 31 < 32 fits
    with pytest.raises(InvalidRequestError) as e:
        eng.submit(Request("f", [5] * 3, SamplingParams(max_new_tokens=2)), col)
    assert e.value.field == "request_id"
    eng.submit(Request("g", [5] * 3, SamplingParams(max_new_tokens=2)), col)
    with pytest.raises(QueueFullError):
        eng.submit(Request("h", [5] * 3, SamplingParams(max_new_tokens=2)), col)
    while eng.scheduler.has_work() or eng.stats().num_waiting:
        eng.step()
    # max_model_len ends "f" after one token (31 prompt + 1 = 32) even though it asked for 10.
    assert col.final("f").finish_reason is FinishReason.LENGTH and col.final("f").completion_tokens == 1
    assert not col.events.get("h")


def greedy_run(eng, col, rid, ids, **kw):
    eng.submit(Request(rid, ids, SamplingParams(temperature=0.0, **kw)), col)
    col.wait([rid])
    return col.final(rid)


def test_stop_string_eos_and_max_new_tokens(loaded, make_engine):
    eng = make_engine()
    col = Collector()
    ids = prompt(loaded, "Once upon a time there was")
    base = greedy_run(eng, col, "base", ids, max_new_tokens=30, ignore_eos=True)
    toks, text = col.tokens("base"), col.text("base")
    assert base.finish_reason is FinishReason.LENGTH and len(toks) == 30
    # A stop string taken from the middle of the greedy text: output is cut right before it.
    clean = [i for i in range(4, len(text) - 3) if "\ufffd" not in text[i:i + 3] and text[i:i + 3].strip()]
    assert clean, f"no usable substring in {text!r}"
    stop = text[clean[0]:clean[0] + 3]
    fin = greedy_run(eng, col, "stop", ids, max_new_tokens=30, ignore_eos=True, stop=(stop,))
    assert fin.finish_reason is FinishReason.STOP
    assert col.text("stop") == text[:text.index(stop)]
    assert col.tokens("stop") == toks[:len(col.tokens("stop"))] and len(col.tokens("stop")) < 30
    # EOS: pretend the 4th greedy token is the end of sequence (it is no special token).
    eng.eos_token_ids = frozenset({toks[3]})
    fin = greedy_run(eng, col, "eos", ids, max_new_tokens=30)
    assert fin.finish_reason is FinishReason.EOS and col.tokens("eos") == toks[:4]
    first3 = loaded.tokenizer.decode(toks[:3])
    assert col.text("eos") == first3  # the EOS token's text is not emitted
    fin = greedy_run(eng, col, "ign", ids, max_new_tokens=6, ignore_eos=True)
    assert fin.finish_reason is FinishReason.LENGTH and col.tokens("ign") == toks[:6]


def test_preemption_keeps_greedy_outputs(loaded, make_engine):
    """A cache too small for all sequences forces recompute preemption; outputs do not change."""
    sp = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    texts = ["Once upon a time", "The quick brown fox", "What is two plus two?", "Mix flour, water"]
    ref_eng = make_engine()
    ref = Collector()
    for i, t in enumerate(texts):
        ref_eng.submit(Request(f"p{i}", prompt(loaded, t), sp), ref)
    ref.wait([f"p{i}" for i in range(4)])
    small = make_engine(start=False, num_kv_blocks=16, max_model_len=64)
    col = Collector()
    for i, t in enumerate(texts):
        small.submit(Request(f"p{i}", prompt(loaded, t), sp), col)
    small.start()
    col.wait([f"p{i}" for i in range(4)])
    assert small.stats().preemptions_total > 0
    for i in range(4):
        assert col.tokens(f"p{i}") == ref.tokens(f"p{i}")
    assert small.stats().kv_blocks_used == 0


def test_seeded_sampling_independent_of_batch(loaded, make_engine):
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=1234, ignore_eos=True)
    ids = prompt(loaded, "Questions and answers")
    eng = make_engine()
    col = Collector()
    eng.submit(Request("alone", ids, sp), col)
    col.wait(["alone"])
    for i in range(5):
        eng.submit(Request(f"other{i}", prompt(loaded, "Numbers matter"),
                           SamplingParams(temperature=1.0, max_new_tokens=12)), col)
    eng.submit(Request("crowd", ids, sp), col)
    col.wait(["crowd"] + [f"other{i}" for i in range(5)])
    assert col.tokens("crowd") == col.tokens("alone")
    assert len(set(col.tokens("alone"))) > 2


class FakeLoraManager:
    """Two slots; records the per-token slot indices the runner builds for each step."""

    def __init__(self):
        self.slots = {"ad-a": 0, "ad-b": 1}
        self.calls = []
        self.batches = []

    def exists(self, adapter_id):
        return adapter_id in self.slots

    def reserve(self, adapter_id):
        self.calls.append(("reserve", adapter_id))

    def finish(self, adapter_id):
        self.calls.append(("finish", adapter_id))

    def acquire(self, adapter_id):
        self.calls.append(("acquire", adapter_id))
        return self.slots[adapter_id]

    def release(self, adapter_id):
        self.calls.append(("release", adapter_id))

    def observe_wait(self, seconds):
        self.calls.append(("wait", seconds))

    def build_lora_batch(self, token_slots, row_slots):
        self.batches.append((token_slots.tolist(), row_slots.tolist()))
        return None  # no LoRA weights installed: the model runs the base path


def test_adapter_slot_seam(loaded, make_engine):
    mgr = FakeLoraManager()
    eng = make_engine(lora_manager=mgr, start=False)
    col = Collector()
    ids = prompt(loaded, "Once upon")
    sp = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    eng.submit(Request("a", ids, sp, adapter_id="ad-a"), col)
    eng.submit(Request("base", ids, sp), col)
    eng.submit(Request("b", ids, sp, adapter_id="ad-b"), col)
    while eng.scheduler.has_work() or eng.stats().num_waiting:
        eng.step()
    n = len(ids)
    assert mgr.batches[0] == ([0] * n + [-1] * n + [1] * n, [0, -1, 1])
    assert mgr.batches[1] == ([0, -1, 1], [0, -1, 1])
    assert sorted(c for c in mgr.calls if c[0] != "wait") == sorted([("reserve", "ad-a"), ("reserve", "ad-b"),
                                        ("acquire", "ad-a"), ("acquire", "ad-b"),
                                        ("release", "ad-a"), ("release", "ad-b"),
                                        ("finish", "ad-a"), ("finish", "ad-b")])
    assert col.tokens("a") == col.tokens("base") == col.tokens("b")  # no weights: same as base
    assert [c for c in mgr.calls if c[0] == "wait"] == [("wait", 0.0)] * 2  # both admitted at once


def test_idle_engine_does_not_spin(loaded, make_engine):
    eng = make_engine()
    col = Collector()
    eng.submit(Request("x", prompt(loaded), SamplingParams(max_new_tokens=2)), col)
    col.wait(["x"])
    time.sleep(0.05)
    steps = eng.stats().steps_total
    time.sleep(0.3)
    assert eng.stats().steps_total == steps


def test_warmup(loaded, make_engine):
    eng = make_engine(start=False)
    eng.warmup()
    assert eng.stats().kv_blocks_used == 0
