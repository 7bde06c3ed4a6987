"""Combining adapters (lora/combine.py) against PEFT's add_weighted_adapter, float32.

Three random PEFT adapters on the tiny Llama: two of rank 4 on q/v (the same-rank methods need
the same targets and ranks) and one with rank/alpha patterns on other modules (cat and svd mix
different targets and ranks). For each method and arguments, PEFT's add_weighted_adapter runs on
a PeftModel holding the same adapters, torch seeded the same way before both sides, and every
module's combined update (scale * B @ A) must equal PEFT's; where the shapes are the same (every
method but cat, whose PEFT tensors are zero-padded to the configs' rank sum) the factors must too.
Then the combined adapter is served by our engine and its greedy tokens must equal PEFT's model
with PEFT's combined adapter active.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.lora.combine import CombineSpec, combine_adapters
from loraplex.lora.errors import AdapterCombineError
from loraplex.lora.peft_format import BaseShapes, read_adapter
from loraplex.lora.target_match import projection_key
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.tiny_models import make_tiny_model

ATOL = 1e-5
SEED = 1234

# (method, adapter names, weights, extra PEFT/our arguments)
CASES = [
    ("linear", ("qa", "qb"), (0.7, 0.4), {}),
    ("linear", ("qa", "qb"), (1.0, -0.6), {}),  # a negative weight: PEFT puts its sign on A
    ("cat", ("qa", "pat"), (0.8, 0.5), {}),
    ("svd", ("qa", "pat"), (0.8, 0.5), {}),
    ("svd", ("qa", "qb"), (1.0, 0.3), dict(svd_rank=5)),
    ("svd", ("qa", "qb"), (1.0, 0.3), dict(svd_rank=6, svd_clamp=0.9)),
    ("ties", ("qa", "qb"), (0.6, 0.9), dict(density=0.5)),
    ("ties", ("qa", "qb"), (0.6, 0.9), dict(density=0.3, majority_sign_method="frequency")),
    ("dare_linear", ("qa", "qb"), (0.6, 0.9), dict(density=0.5)),
    ("dare_ties", ("qa", "qb"), (0.6, 0.9), dict(density=0.7)),
    ("dare_ties", ("qa", "qb"), (0.6, 0.9), dict(density=0.4, majority_sign_method="frequency")),
    ("magnitude_prune", ("qa", "qb"), (0.5, 0.5), dict(density=0.6)),
    ("ties_svd", ("qa", "pat"), (0.6, 0.9), dict(density=0.5)),
    ("dare_linear_svd", ("qa", "qb"), (0.6, 0.9), dict(density=0.5, svd_rank=3)),
    ("linear", ("qa",), (0.8,), {}),  # one adapter: PEFT uses linear whatever the method
]
KINDS = {"qa": ("qv_r4", 11), "qb": ("qv_r4", 12), "pat": ("patterns_r6", 13)}


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    folders = {name: make_peft_adapter(tiny_model_dir, root / name, kind, seed=seed)
               for name, (kind, seed) in KINDS.items()}
    import json

    shapes = BaseShapes.from_hf_config(json.loads((tiny_model_dir / "config.json").read_text()))
    ours = {name: read_adapter(folder, shapes, max_rank=64) for name, folder in folders.items()}
    # An adapter for another base (other hidden and intermediate sizes), read against its own base.
    other = make_tiny_model(root / "other_base", hidden_size=32, intermediate_size=96)
    ours["other"] = read_adapter(make_peft_adapter(other, root / "other", "qv_r4", seed=14),
                                 BaseShapes.from_hf_config(json.loads((other / "config.json").read_text())), 64)
    return dict(base=tiny_model_dir, folders=folders, ours=ours, root=root)


def peft_model(env, names):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(env["base"]), dtype=torch.float32,
                                                attn_implementation="eager").eval()
    model = PeftModel.from_pretrained(base, str(env["folders"][names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(env["folders"][name]), adapter_name=name)
    return model.eval()


def peft_combined(env, method, names, weights, kw):
    """PEFT's add_weighted_adapter, torch's global generator seeded with SEED right before its first
    combination (after it created the new adapter's layers, whose init draws from the generator too)."""
    from peft.tuners.lora.model import LoraModel

    model = peft_model(env, sorted(set(names)))
    seeded = []

    def seeding(fn):
        def wrapper(*args, **kwargs):
            if not seeded:
                torch.manual_seed(SEED)
                seeded.append(True)
            return fn(*args, **kwargs)
        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        for name in ("_generalized_task_arithmetic_weighted_adapter",
                     "_svd_generalized_task_arithmetic_weighted_adapter"):
            mp.setattr(LoraModel, name, seeding(getattr(LoraModel, name)))
        model.add_weighted_adapter(list(names), list(weights), "combined", combination_type=method, **kw)
    model.set_adapter("combined")
    return model


def peft_modules(model, name="combined"):
    """(layer, short name) -> (A, B, scaling) of adapter `name` in a PeftModel."""
    out = {}
    for key, mod in model.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and name in mod.lora_A:
            parts = key.split(".")
            out[(int(parts[2]), parts[-1])] = (mod.lora_A[name].weight.detach(), mod.lora_B[name].weight.detach(),
                                               mod.scaling[name])
    return out


def our_combined(env, method, names, weights, kw):
    spec = CombineSpec(method=method, weights=weights, seed=SEED, **kw)
    return combine_adapters([env["ours"][n] for n in names], spec, max_rank=64)


@pytest.mark.parametrize("method,names,weights,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_weights_equal_peft(env, method, names, weights, kw):
    ref = peft_modules(peft_combined(env, method, names, weights, kw))
    ours = our_combined(env, method, names, weights, kw)
    # PEFT creates the new adapter on the union of targets; modules nobody adapts stay zero there.
    assert set(ours.modules) <= set(ref)
    for key, (a, b, scaling) in ref.items():
        ref_delta = (b @ a) * scaling
        if key not in ours.modules:
            assert torch.count_nonzero(ref_delta) == 0, key
            continue
        m = ours.modules[key]
        delta = (m.B @ m.A) * m.scale
        assert float(ref_delta.abs().max()) > 1e-2, f"{key}: the combined update must not be ~0"
        torch.testing.assert_close(delta, ref_delta, atol=ATOL, rtol=0, msg=f"{projection_key(*key)}")
        if method != "cat":
            assert scaling == m.scale == 1.0
            torch.testing.assert_close(m.A, a, atol=ATOL, rtol=0)
            torch.testing.assert_close(m.B, b, atol=ATOL, rtol=0)


def test_dare_is_random_but_seeded(env):
    a, b = env["ours"]["qa"], env["ours"]["qb"]
    one = combine_adapters([a, b], CombineSpec("dare_linear", (1.0, 1.0), density=0.5, seed=7), 64)
    again = combine_adapters([a, b], CombineSpec("dare_linear", (1.0, 1.0), density=0.5, seed=7), 64)
    other = combine_adapters([a, b], CombineSpec("dare_linear", (1.0, 1.0), density=0.5, seed=8), 64)
    assert one.fingerprint == again.fingerprint != other.fingerprint
    before = torch.random.get_rng_state()
    combine_adapters([a, b], CombineSpec("dare_ties", (1.0, 1.0), density=0.5, seed=7), 64)
    assert torch.equal(before, torch.random.get_rng_state()), "the global generator must stay untouched"


@pytest.mark.parametrize("method,names,weights,kw,field", [
    ("linear", ("qa", "pat"), (1.0, 1.0), {}, "adapters"),  # different targets
    ("cat", ("qa", "other"), (1.0, 1.0), {}, "adapters"),  # another base
    ("svd", ("qa", "other"), (1.0, 1.0), {}, "adapters"),
    ("ties", ("qa", "pat"), (1.0, 1.0), dict(density=0.5), "adapters"),
    ("ties", ("qa", "qb"), (1.0, -1.0), dict(density=0.5), "adapters[1].weight"),
    ("dare_ties", ("qa", "qb"), (1.0, float("nan")), dict(density=0.5), "adapters[1].weight"),
    ("cat", ("qa", "qb"), (float("inf"), 1.0), {}, "adapters[0].weight"),
    ("svd", ("qa", "qb"), (1.0, 1.0), dict(svd_rank=9), "svd_rank"),  # 4 + 4 = 8 directions at most
    ("dare_linear", ("qa", "qb"), (1.0, 1.0), {}, "density"),
    ("dare_linear", ("qa", "qb"), (1.0, 1.0), dict(density=0.0), "density"),
    ("ties", ("qa", "qb"), (1.0, 1.0), dict(density=0.5, majority_sign_method="most"), "majority_sign_method"),
    ("svd", ("qa", "qb"), (1.0, 1.0), dict(svd_clamp=1.5), "svd_clamp"),
    ("average", ("qa", "qb"), (1.0, 1.0), {}, "method"),
])
def test_bad_input_names_the_field(env, method, names, weights, kw, field):
    with pytest.raises(AdapterCombineError) as info:
        combine_adapters([env["ours"][n] for n in names], CombineSpec(method, weights, **kw), max_rank=64)
    assert info.value.field == field, str(info.value)


def test_rank_above_the_pool_is_refused(env):
    with pytest.raises(AdapterCombineError) as info:
        combine_adapters([env["ours"]["qa"], env["ours"]["pat"]], CombineSpec("cat", (1.0, 1.0)), max_rank=8)
    assert info.value.field == "adapters" and "10" in str(info.value)


def test_served_greedy_tokens_equal_peft(env, tmp_path):
    """The combined adapter served by our engine == PEFT's model with its combined adapter."""
    from loraplex.config import LoraConfig
    from loraplex.lora.manager import LoraManager
    from loraplex.model.loader import load_model
    from tests.fixtures.engine_run import engine_greedy

    loaded = load_model(env["base"], dtype=torch.float32)
    manager = LoraManager(LoraConfig(max_lora_rank=16, allowed_roots=(str(env["root"]),)), loaded.model,
                          loaded.dtype, "cpu")
    try:
        for name in ("qa", "qb", "pat"):
            manager.load(name, env["folders"][name])
        prompts = [[5, 17, 33, 101, 7], [200, 3, 9]]
        first = {}
        for c in CASES:  # one case per method
            first.setdefault(c[0], c)
        cases = [first[m] for m in ("cat", "svd", "ties", "dare_ties", "linear", "dare_linear", "magnitude_prune")]
        jobs, refs = {}, {}
        for i, (method, names, weights, kw) in enumerate(cases):
            manager.combine(f"c{i}", list(names), CombineSpec(method, weights, seed=SEED, **kw))
            model = peft_combined(env, method, names, weights, kw)
            for j, prompt in enumerate(prompts):
                jobs[(i, j)] = (f"c{i}", prompt)
                with torch.no_grad():
                    out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)
                refs[(i, j)] = out[0, len(prompt):].tolist()
        got = engine_greedy(loaded, manager, jobs, max_new_tokens=6)
        for key, ref in refs.items():
            assert got[key] == (ref, None), key
    finally:
        manager.close()


def test_mixture_is_refilled_from_memory_after_eviction(env):
    """A mixture lives in memory: evicted from a one-adapter pool by another adapter, it comes
    back (no folder to read) and still gives the tokens of the same mixture in a roomy pool."""
    from loraplex.config import LoraConfig
    from loraplex.lora.manager import LoraManager
    from loraplex.model.loader import load_model
    from tests.fixtures.engine_run import engine_greedy

    prompt = [5, 17, 33, 101, 7]
    results = {}
    for max_loras in (4, 1):
        loaded = load_model(env["base"], dtype=torch.float32)
        manager = LoraManager(LoraConfig(max_lora_rank=16, max_loras=max_loras, allowed_roots=(str(env["root"]),)),
                              loaded.model, loaded.dtype, "cpu")
        try:
            for name in ("qa", "pat"):
                manager.load(name, env["folders"][name])
            mix = manager.mixture([("qa", 0.7), ("pat", -0.4)])
            assert mix not in {a.adapter_id for a in manager.list()}
            jobs = {0: (mix, prompt), 1: ("qa", prompt), 2: ("pat", prompt), 3: (mix, prompt)}
            results[max_loras] = engine_greedy(loaded, manager, jobs, max_new_tokens=6)
            if max_loras == 1:
                assert manager.stats.device_evictions >= 2
                assert manager.mixture([("qa", 0.7), ("pat", -0.4)]) == mix  # cached by content
                assert manager.stats.loads["mixture"] == 1
        finally:
            manager.close()
    assert results[1] == results[4]
    assert results[4][0] == results[4][3] != results[4][1]
