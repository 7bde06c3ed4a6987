"""Peer equivalence through the gRPC API: one concurrent batch mixing base-model requests and six
PEFT adapters (plain LoRA, rsLoRA, rank/alpha patterns, AdaLoRA, regex targets, layers_to_transform)
gives, row for row, the greedy tokens of PEFT's own generate on the HF model.

Reference: transformers AutoModelForCausalLM + PeftModel.from_pretrained in float32, one PeftModel
per adapter (PEFT cannot mix LORA and ADALORA in one model) and one generate call per prompt, so no
padding can make the reference differ; eos_token_id=None and min_new_tokens=max_new_tokens so both
sides produce exactly N tokens.

The requests are sent together while the engine is slowed a little per step, and a hook on the
engine's per-step LoRA batch builder records which adapter slots each step's tokens used: the test
asserts that steps really mixed several adapters and base rows (not just that results are right).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from loraplex.api.pb.loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.config import EngineConfig, LoraConfig
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, build_lora_manager, start_engine
from tests.fixtures.adapters import make_peft_adapter

pytestmark = pytest.mark.timeout(300)

KINDS = ("qv_r4", "all_r8_rslora", "patterns_r6", "adalora", "regex_mlp_r5", "layer1_r3")
PROMPTS = ("The quick brown fox jumps", "Once upon a time there was a", "What is the capital of France?")
NEW_TOKENS = 10
ENGINE = EngineConfig(block_size=8, num_kv_blocks=256, max_num_seqs=32, max_num_batched_tokens=512,
                      max_model_len=128, max_new_tokens_cap=64)
STEP_DELAY = 0.03  # seconds per engine step: every request arrives before the first ones finish


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("peer_adapters")
    return {k: make_peft_adapter(tiny_model_dir, root / k, k, seed=10 + i) for i, k in enumerate(KINDS)}


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_dirs):
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    root = next(iter(adapter_dirs.values())).parent
    manager = build_lora_manager(loaded, LoraConfig(max_loras=len(KINDS), max_lora_rank=8, max_cpu_loras=8,
                                                    allowed_roots=(str(root),)))
    srv = ServerThread(start_engine(loaded, ENGINE, manager)).start()
    yield srv
    srv.stop()


def peft_generate(base_dir, adapter_dir, prompts: list[list[int]]) -> list[list[int]]:
    """PEFT's greedy tokens for each prompt alone (batch of one: no padding anywhere)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        out.append(y[0, len(ids):].tolist())
    return out


def test_mixed_batch_matches_peft_row_by_row(server, adapter_dirs, tiny_model_dir, monkeypatch):
    runtime = server.server.runtime
    engine, manager, tokenizer = runtime.engine, runtime.lora_manager, runtime.loaded.tokenizer
    with grpc.insecure_channel(server.address) as ch:
        adapters = adapters_pb2_grpc.AdaptersStub(ch)
        gen = generation_pb2_grpc.GenerationStub(ch)
        for kind, folder in adapter_dirs.items():
            adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id=kind, path=str(folder)))

        # Record the device slots each LoRA step's tokens use (-1 = base model). max_loras equals
        # the number of adapters, so nothing is evicted: distinct slots are distinct adapters.
        steps: list[set[int]] = []
        build = engine.runner.lora_batch_builder

        def recording_build(token_slots, row_slots):
            steps.append(set(token_slots.tolist()))
            return build(token_slots, row_slots)

        monkeypatch.setattr(engine.runner, "lora_batch_builder", recording_build)
        run = engine.runner.run

        def slow_run(*args, **kwargs):
            time.sleep(STEP_DELAY)
            return run(*args, **kwargs)

        monkeypatch.setattr(engine.runner, "run", slow_run)

        jobs = [(adapter_id, prompt) for adapter_id in ("",) + KINDS for prompt in PROMPTS]

        def call(job):
            adapter_id, prompt = job
            return gen.Generate(pb.GenerateRequest(
                adapter_id=adapter_id, prompt=prompt,
                sampling=pb.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)))

        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(call, jobs))

    assert manager.stats.device_evictions == 0
    # Some forward ran all six adapters and base rows together, and most steps mixed adapters.
    assert max(steps, key=len) == set(range(len(KINDS))) | {-1}, steps
    assert sum(len(s - {-1}) >= 2 for s in steps) >= NEW_TOKENS // 2, steps

    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    got = dict(zip(jobs, responses))
    for adapter_id in ("",) + KINDS:
        expected = peft_generate(tiny_model_dir, adapter_dirs.get(adapter_id), prompt_ids)
        for prompt, ids, want in zip(PROMPTS, prompt_ids, expected):
            resp = got[(adapter_id, prompt)]
            assert resp.finish_reason == pb.FINISH_REASON_LENGTH
            assert resp.usage.prompt_tokens == len(ids)
            assert list(resp.token_ids) == want, (adapter_id or "base", prompt)
    # Distinct adapters really produced distinct continuations (the comparison could fail).
    per_adapter = {a: tuple(r.token_ids) for (a, p), r in zip(jobs, responses) if p == PROMPTS[0]}
    assert len(set(per_adapter.values())) == len(per_adapter)
