"""An engine holding B sequences that are all decoding: time or profile its steps one at a time.

The roofline (roofline.py) and the step breakdown (profile_decode.py) both need "one decode step
of B sequences" in isolation, driven through the real Engine.step() (scheduler -> model runner ->
sampler -> postprocess), not a synthetic forward. So: submit B greedy requests (EOS ignored, a
budget of new tokens that outlasts the measurement), step the engine until every one of them is
past its prefill, and from then on every `engine.step()` is exactly one B-row decode step.
No engine thread runs: the caller's thread calls step(), so nothing else competes for the lock.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

# What a benchmark row measures: the engine in a dtype, and for bfloat16 which GEMM runs it: our
# kernels where the engine picks them (the default: model/amx_linear.py on AMX CPUs,
# model/widened_linear.py in float32 math on AVX2-only ones) or torch's own (oneDNN, packed where
# it can; emulated on AVX2): LORAPLEX_AMX=0 and LORAPLEX_WIDEN_BF16=0, what ran before ours.
VARIANTS = {"bfloat16": (torch.bfloat16, True), "bfloat16-torch-gemm": (torch.bfloat16, False),
            "float32": (torch.float32, True)}
OUR_GEMM_SWITCHES = ("LORAPLEX_WIDEN_BF16", "LORAPLEX_AMX")


@dataclass
class DecodeEngine:
    """An Engine whose B running sequences are all in decode; `step()` times one engine step."""

    engine: Any
    batch: int
    forward_seconds: list[float] = field(default_factory=list)  # runner.run of each timed step

    @property
    def mean_context(self) -> float:
        """Mean tokens each running sequence attends over in the next step."""
        running = self.engine.scheduler.running
        return sum(s.num_tokens for s in running) / max(len(running), 1)

    def step(self) -> float:
        """One decode step through Engine.step(); returns its wall seconds."""
        t0 = time.perf_counter()
        ran = self.engine.step()
        dt = time.perf_counter() - t0
        if ran != self.batch:
            raise RuntimeError(f"the step ran {ran} sequences, expected {self.batch} (one finished?)")
        return dt


def make_decode_engine(loaded: Any, batch: int, prompt_len: int, decode_steps: int,
                       lora_manager: Any = None, adapters: list[str] | None = None,
                       seed: int = 0, widen: bool = True, sampling: dict | None = None,
                       kv_cache_dtype: str = "auto") -> DecodeEngine:
    """An engine (no thread) with `batch` sequences of `prompt_len` random prompt tokens, stepped
    until all of them decode, then good for `decode_steps` more steps of all `batch` rows.
    `adapters`: request i uses adapters[i % len] ("" = base model). `widen`: False keeps torch's
    bfloat16 GEMM (LORAPLEX_WIDEN_BF16=0 and LORAPLEX_AMX=0: no kernel of ours); the engine swaps the model's layers when it is built,
    so a model keeps the first choice made for it: give each variant its own loaded model.
    `kv_cache_dtype`: EngineConfig's (auto = the model's dtype, int8)."""
    from loraplex.config import EngineConfig
    from loraplex.engine.engine import Engine
    from loraplex.engine.request import Request, SamplingParams

    block = 16
    # Every prompt is prefilled in one step (the token budget holds them all), so each sequence
    # samples one token there and then `decode_steps` more: none finishes inside the measurement.
    max_new_tokens = decode_steps + 2
    max_len = prompt_len + max_new_tokens + 1
    blocks_per_seq = -(-max_len // block)
    config = EngineConfig(block_size=block, num_kv_blocks=batch * blocks_per_seq + 4, max_num_seqs=batch,
                          max_num_batched_tokens=max(512, batch * prompt_len), max_model_len=max_len + block,
                          max_new_tokens_cap=max_new_tokens, enable_prefix_caching=False,
                          kv_cache_dtype=kv_cache_dtype)
    before = {name: os.environ.get(name) for name in OUR_GEMM_SWITCHES}
    os.environ.update({name: "1" if widen else "0" for name in OUR_GEMM_SWITCHES})
    try:
        engine = Engine(loaded, config, lora_manager=lora_manager)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    gen = torch.Generator().manual_seed(seed)
    vocab = loaded.arch.vocab_size
    # Greedy unless `sampling` says otherwise (SamplingParams fields, e.g. temperature and top_p).
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **(sampling or {"temperature": 0.0}))
    for i in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        adapter = adapters[i % len(adapters)] if adapters else ""
        engine.submit(Request(f"decode-{i}", prompt, params, adapter_id=adapter), lambda out: None)
    while not (engine.scheduler.num_running == batch and not engine.scheduler.num_waiting
               and all(s.is_decoding for s in engine.scheduler.running)):
        if engine.step() == 0:
            raise RuntimeError("the engine scheduled nothing while filling its batch")
    return DecodeEngine(engine, batch)


def alternate_steps(cases: dict[str, DecodeEngine], steps: int) -> dict[str, list[float]]:
    """One untimed step of each engine (first-call costs), then `steps` rounds of one timed step
    each, in turn (so that a noisy machine hits every case alike); then the engines shut down.
    Returns name -> the seconds of its steps, round by round."""
    for dec in cases.values():
        dec.step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(steps):
        for name, dec in cases.items():
            times[name].append(dec.step())
    for dec in cases.values():
        dec.engine.shutdown(0)
    return times


def time_forward(dec: DecodeEngine) -> None:
    """Record runner.run's wall time inside every later step (dec.forward_seconds), so that a
    step splits into the model forward and the rest (scheduling, sampling, postprocessing)."""
    runner = dec.engine.runner
    inner = runner.run

    def timed(seqs, num_new_tokens, **kw):
        t0 = time.perf_counter()
        out = inner(seqs, num_new_tokens, **kw)
        dec.forward_seconds.append(time.perf_counter() - t0)
        return out

    runner.run = timed
