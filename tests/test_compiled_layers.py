"""The compiled decoder layers (model/compiled_layers.py, loraplex_kernels/decode_layers.c) against
the model's Python layers: the same kernels in the same order, so the logits and every KV cache
entry must be bit-identical, step after step (prefill chunks, decode, a mix; GQA, q/k/v bias,
sliding windows, Qwen3's per-head q/k norms); steps or blocks it does not take (a long prefill
chunk, LoRA deltas on another route) run in Python and still come out the same; models it cannot
run (not packed for AMX, float32) are refused.
The Python path itself is checked against transformers and float64 elsewhere (test_model_*,
test_default_model); skipped where the CPU or the kernel build has no AMX-BF16."""

from __future__ import annotations

import pytest
import torch

from loraplex.model import compiled_layers as cl
from loraplex.model.kv_cache import KVCache
from loraplex_kernels import decode_layers_native as dl
from loraplex_kernels import gemm_amx_native

pytestmark = pytest.mark.skipif(not gemm_amx_native.available(),
                                reason="no AMX-BF16 on this CPU (or the kernel build lacks it)")


@pytest.fixture
def count_runs(monkeypatch):
    """How many compiled runs and blocks ran (monkeypatched decode_layers_native.run)."""
    counts = {"runs": 0, "blocks": 0}
    real = dl.run

    def run(step, layers, blocks):
        counts["runs"] += 1
        counts["blocks"] += len(blocks)
        return real(step, layers, blocks)

    monkeypatch.setattr(dl, "run", run)
    return counts


def packed_model(model_dir):
    from loraplex.engine.engine import pack_cpu_weights
    from loraplex.model.loader import load_model

    loaded = load_model(model_dir, torch.bfloat16, "cpu")
    pack_cpu_weights(loaded.model)
    return loaded


@pytest.mark.parametrize(("family", "overrides", "kv_dtype"), [
    ("llama", {}, torch.bfloat16), ("qwen2", {}, torch.bfloat16), ("qwen3", {}, torch.bfloat16),
    ("mistral", {"sliding_window": 6}, torch.bfloat16), ("llama", {"tie_word_embeddings": True}, torch.bfloat16),
    ("llama", {}, torch.int8), ("mistral", {"sliding_window": 6}, torch.int8)])
def test_compiled_layers_bit_identical_to_python(tmp_path, monkeypatch, count_runs, family, overrides, kv_dtype):
    from tests.fixtures.paged_batches import BlockPool, PagedSeq, make_step
    from tests.fixtures.tiny_models import make_tiny_model

    loaded = packed_model(make_tiny_model(tmp_path / family, family=family, **overrides))
    model, arch = loaded.model, loaded.arch
    assert model.compiled_layers is not None, cl.refusal(model)
    caches = {flag: KVCache.allocate(arch.num_layers, 64, 4, arch.num_kv_heads, arch.head_dim, kv_dtype)
              for flag in (None, False)}
    for flag in (None, False):  # random, not zero, content in every slot
        g = torch.Generator().manual_seed(3)
        for t in caches[flag].k + caches[flag].v:
            t.copy_(torch.randn(t.shape, generator=g) * (40 if kv_dtype == torch.int8 else 1))
        for t in (caches[flag].k_scale or []) + (caches[flag].v_scale or []):
            t.copy_(torch.rand(t.shape, generator=g) * 0.05 + 0.001)
    g = torch.Generator().manual_seed(5)
    seqs = [PagedSeq(torch.randint(0, arch.vocab_size, (120,), generator=g).tolist()) for _ in range(4)]
    pool = BlockPool(64, 4, seed=1)
    # (step work, whether the compiled layers take it): chunks of <= 64 tokens and decode rows do;
    # a 70-token chunk goes to SDPA, so that step runs the Python layers.
    plan = [([(seqs[0], 9), (seqs[1], 3), (seqs[2], 1)], True),
            ([(seqs[0], 1), (seqs[1], 1), (seqs[2], 1)], True),
            ([(seqs[3], 70), (seqs[0], 1)], False),
            ([(seqs[0], 1), (seqs[1], 1), (seqs[2], 5), (seqs[3], 1)], True),
            ([(s, 1) for s in seqs], True)]
    for work, compiled in plan:
        batch, _ = make_step(pool, work, logits="all")
        before = dict(count_runs)
        logits = {}
        for flag in (None, False):
            monkeypatch.setattr(cl, "COMPILED", flag)
            logits[flag] = model.forward(batch, caches[flag])
        assert count_runs["runs"] - before["runs"] == (1 if compiled else 0)
        assert count_runs["blocks"] - before["blocks"] == (2 * arch.num_layers if compiled else 0)
        assert torch.isfinite(logits[None]).all()
        assert torch.equal(logits[None], logits[False])
        for a, b in zip(caches[None].k + caches[None].v + (caches[None].k_scale or []) + (caches[None].v_scale or []),
                        caches[False].k + caches[False].v + (caches[False].k_scale or []) + (caches[False].v_scale or [])):
            assert torch.equal(a, b)


@pytest.mark.parametrize("native_lora", [None, False])
def test_lora_deltas_compiled_or_in_python_blocks(tmp_path, monkeypatch, count_runs, native_lora):
    """Adapters on q/v, on layer 1's gate/up and on layer 1's v/down, batched with base rows.
    With the compiled pooled LoRA kernel (native_lora None) every block runs compiled, deltas
    included: one call per step; with LoRA on torch's formulation (cpu.NATIVE False) the blocks
    with a due delta run in Python between compiled runs. Either way greedy tokens equal the
    Python layers' for every request (the random adapters move them: a dropped or misplaced
    delta would show)."""
    from loraplex.model.loader import load_model
    from loraplex_kernels import cpu
    from tests.fixtures.adapters import make_peft_adapter, manager_with_slots
    from tests.fixtures.engine_run import engine_greedy
    from tests.fixtures.tiny_models import make_tiny_model

    monkeypatch.setattr(cpu, "NATIVE", native_lora)
    model_dir = make_tiny_model(tmp_path / "model")
    kinds = ("qv_r4", "regex_mlp_r5", "layer1_r3")
    for i, kind in enumerate(kinds):
        make_peft_adapter(model_dir, tmp_path / "adapters" / kind, kind, seed=i)
    jobs = {"base": (None, [1, 5, 9, 13, 2]), "qv": ("qv_r4", [3, 4, 8]), "mlp1": ("regex_mlp_r5", [7] * 11),
            "down1": ("layer1_r3", [9, 1]), "base2": (None, [2, 2, 6])}
    runs, blocks_per_step = {}, None
    for flag in (None, False):
        monkeypatch.setattr(cl, "COMPILED", flag)
        loaded = load_model(model_dir, torch.bfloat16, "cpu")
        blocks_per_step = 2 * loaded.arch.num_layers
        manager, _ = manager_with_slots(loaded, tmp_path / "adapters", kinds)
        before = dict(count_runs)
        runs[flag] = engine_greedy(loaded, manager, jobs, max_new_tokens=6)
        ran = {k: count_runs[k] - before[k] for k in count_runs}
        if flag is False:
            assert ran == {"runs": 0, "blocks": 0}
        elif native_lora is None:  # whole steps compiled (6 decode steps at least)
            assert ran["runs"] >= 6 and ran["blocks"] == ran["runs"] * blocks_per_step
        else:  # the q/v adapter's attention blocks in Python: some blocks never compiled
            assert ran["runs"] >= 6 and ran["blocks"] < ran["runs"] * blocks_per_step
    assert all(err is None and len(toks) == 6 for toks, err in runs[None].values())
    assert runs[None] == runs[False]


def test_refusals(tmp_path, monkeypatch):
    from loraplex.model.loader import load_model
    from tests.fixtures.tiny_models import make_tiny_model

    plain = load_model(make_tiny_model(tmp_path / "l"), torch.bfloat16, "cpu")  # not packed
    assert "AMX panel set" in cl.refusal(plain.model)
    f32 = load_model(tmp_path / "l", torch.float32, "cpu")
    assert "bfloat16" in cl.refusal(f32.model)
    monkeypatch.setenv("LORAPLEX_COMPILED_LAYERS", "0")
    off = packed_model(tmp_path / "l")
    assert off.model.compiled_layers is None and cl.refusal(off.model) is None  # switched off, not refused
    monkeypatch.setenv("LORAPLEX_AMX", "0")
    assert "AMX" in cl.refusal(plain.model)


def test_lora_plan_follows_the_pool_tables(tmp_path):
    """The per-step LoRA plan (which deltas are due where) is kept while the step's adapters and
    the pool tables stay the same, and rebuilt when a table entry changes (an adapter entering or
    leaving a slot) or the step's adapters do."""
    from loraplex.lora.layers import PoolGroup
    from tests.fixtures.adapters import make_peft_adapter, manager_with_slots
    from tests.fixtures.tiny_models import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "model")
    kinds = ("qv_r4", "layer1_r3")
    for i, kind in enumerate(kinds):
        make_peft_adapter(model_dir, tmp_path / "adapters" / kind, kind, seed=i)
    loaded = packed_model(model_dir)
    manager, slots = manager_with_slots(loaded, tmp_path / "adapters", kinds)
    layers = loaded.model.compiled_layers

    def plan(*adapters):
        lora = manager.build_lora_batch(torch.tensor([slots[k] for k in adapters] + [-1]), None)
        return layers._lora_sites(lora)

    def due(sites) -> set[tuple[int, int]]:  # (layer, site) pairs with a delta
        return {(i // dl.SITES, i % dl.SITES) for i in range(len(sites)) if sites[i].pool}

    first = plan("qv_r4")
    assert plan("qv_r4") is first  # kept
    assert all(first[0]) and due(first[1]) == {(0, 0), (1, 0)}  # q/v in both layers: the q/k/v sites
    both = plan("qv_r4", "layer1_r3")
    assert due(both[1]) == {(0, 0), (1, 0), (1, 3)}  # + layer 1's v (q/k/v site) and down
    group = loaded.model.model.layers[1].mlp.down_proj.lora_weights.group
    assert isinstance(group, PoolGroup)
    group.table.clear(slots["layer1_r3"])  # the adapter leaves layer 1's down: rebuilt
    assert due(plan("qv_r4", "layer1_r3")[1]) == {(0, 0), (1, 0)}
