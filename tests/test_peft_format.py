"""read_adapter against PEFT itself: folders written by PEFT's save_pretrained, loaded back by
PeftModel.from_pretrained, must give the same per-module output as base + scale * x A^T B^T.

All models are tiny random Llamas built from a config; nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key as peft_get_pattern_key
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from loraplex.lora.peft_format import (
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    AdapterFormatError,
    BaseShapes,
    read_adapter,
)
from loraplex.lora.target_match import PROJECTIONS, TargetRule, get_pattern_key, projection_key

HF_CFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=256)
BASE = BaseShapes.from_hf_config(LlamaConfig(**HF_CFG).to_dict())
MAX_RANK = 16
QA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
QB = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
V1A = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"


def base_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**HF_CFG)).eval()


def randomize_lora(model: torch.nn.Module, seed: int) -> None:
    """PEFT zero-inits lora_B (and AdaLoRA's lora_E): a zero delta would make every check vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def save_adapter(folder: Path, peft_config, prepare: Callable | None = None) -> Path:
    model = get_peft_model(base_model(), peft_config)
    randomize_lora(model, seed=1)
    if prepare is not None:
        prepare(model)
    model.save_pretrained(folder)
    return folder


def peft_modules(folder: Path) -> dict[tuple[int, str], LoraLayer]:
    """PEFT's own reading of the folder: every LoRA layer with a non-empty adapter, in float64."""
    model = PeftModel.from_pretrained(base_model(), str(folder)).double().eval()
    found = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and mod.r.get("default", 0) > 0:
            m = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)", name)
            assert m, name
            found[(int(m[1]), m[2])] = mod
    return found


def assert_matches_peft(folder: Path, weights) -> None:
    ref = peft_modules(folder)
    assert set(weights.modules) == set(ref)
    gen = torch.Generator().manual_seed(123)
    for (layer, proj), mod in sorted(ref.items()):
        w = weights.modules[(layer, proj)]
        assert w.A.dtype == w.B.dtype == torch.float32 and w.A.is_contiguous() and w.B.is_contiguous()
        x = torch.randn(5, mod.in_features, generator=gen, dtype=torch.float64)  # [T, in]
        with torch.no_grad():
            y_peft = mod(x)  # [T, out]
            y_base = mod.get_base_layer()(x)
        delta = w.scale * (x @ w.A.double().T) @ w.B.double().T  # [T, out]
        assert (y_peft - y_base).abs().max() > 1e-2, (layer, proj)  # the adapter really acts here
        torch.testing.assert_close(y_base + delta, y_peft, rtol=1e-5, atol=1e-6, msg=f"{layer}.{proj}")


def allocate_adalora_ranks(model) -> None:
    """A few AdaLoRA budget steps on random tokens so the saved config carries a real rank_pattern."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, HF_CFG["vocab_size"], (2, 8), generator=gen)
    model.train()
    for step in range(model.peft_config["default"].total_step):
        model(input_ids=ids, labels=ids).loss.backward()
        model.base_model.update_and_allocate(step)
        model.zero_grad()


ALL = {(i, p) for i in range(2) for p in PROJECTIONS}

# id -> (peft config, expected modules or None to trust PEFT's set only, prepare hook)
EQUIVALENCE_CASES = {
    "lora_q_v": (lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                 {(i, p) for i in range(2) for p in ("q_proj", "v_proj")}, None),
    "all_linear_rslora": (lambda: LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
                          ALL, None),
    "rank_alpha_pattern": (lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "q_proj": 5, "down_proj": 6},
        alpha_pattern={"v_proj": 3, "model.layers.0.mlp.down_proj": 20}), None, None),
    "regex": (lambda: LoraConfig(r=3, lora_alpha=6,
                                 target_modules=r".*\.layers\.1\.(self_attn\.(q|o)_proj|mlp\.up_proj)"),
              {(1, "q_proj"), (1, "o_proj"), (1, "up_proj")}, None),
    "layers_to_transform_pattern": (lambda: LoraConfig(r=4, target_modules=["q_proj", "gate_proj"],
                                                       layers_to_transform=[1], layers_pattern="layers"),
                                    {(1, "q_proj"), (1, "gate_proj")}, None),
    "layers_to_transform_int": (lambda: LoraConfig(r=2, lora_alpha=5, target_modules=["v_proj", "down_proj"],
                                                   layers_to_transform=0),
                                {(0, "v_proj"), (0, "down_proj")}, None),
    "exclude_modules": (lambda: LoraConfig(r=4, target_modules="all-linear",
                                           exclude_modules=["down_proj", "model.layers.0.self_attn.k_proj"]),
                        ALL - {(0, "down_proj"), (1, "down_proj"), (0, "k_proj")}, None),
    "adalora": (lambda: AdaLoraConfig(init_r=6, target_r=3, total_step=10, lora_alpha=12,
                                      target_modules=["q_proj", "v_proj", "down_proj"]),
                {(i, p) for i in range(2) for p in ("q_proj", "v_proj", "down_proj")}, None),
    "adalora_rank_pattern": (lambda: AdaLoraConfig(init_r=6, target_r=2, tinit=0, tfinal=1, total_step=4,
                                                   lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"]),
                             None, allocate_adalora_ranks),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_adapter(root / name, make(), prepare)
            for name, (make, _, prepare) in EQUIVALENCE_CASES.items()}


@pytest.mark.parametrize("case", list(EQUIVALENCE_CASES))
def test_matches_peft(case, adapters):
    folder = adapters[case]
    weights = read_adapter(folder, BASE, MAX_RANK, max_bytes=10 << 20)
    expected = EQUIVALENCE_CASES[case][1]
    if expected is not None:
        assert set(weights.modules) == expected
    assert_matches_peft(folder, weights)
    assert weights.source_path == str(folder.resolve())
    assert weights.weights_file == SAFETENSORS_NAME
    assert weights.file_bytes == (folder / SAFETENSORS_NAME).stat().st_size
    assert weights.nbytes == sum(m.A.nbytes + m.B.nbytes for m in weights.modules.values())
    ranks = [m.rank for m in weights.modules.values()]
    assert (weights.min_rank, weights.max_rank) == (min(ranks), max(ranks))
    assert weights.target_modules == tuple(p for p in PROJECTIONS if any(n == p for _, n in weights.modules))


def test_scales_follow_patterns(adapters):
    w = read_adapter(adapters["rank_alpha_pattern"], BASE, MAX_RANK, None)
    # first matching rank_pattern key wins: layer 1 q -> 2, layer 0 q -> 5; alpha 8 unless overridden
    expected = {(1, "q_proj"): (2, 8 / 2), (0, "q_proj"): (5, 8 / 5), (0, "k_proj"): (4, 8 / 4),
                (0, "v_proj"): (4, 3 / 4), (0, "down_proj"): (6, 20 / 6), (1, "down_proj"): (6, 8 / 6)}
    for key, (rank, scale) in expected.items():
        assert (w.modules[key].rank, w.modules[key].scale) == (rank, pytest.approx(scale, rel=1e-12))
    rs = read_adapter(adapters["all_linear_rslora"], BASE, MAX_RANK, None)
    assert rs.modules[(0, "q_proj")].scale == pytest.approx(16 / math.sqrt(4), rel=1e-12)


def test_adalora_folds_E_and_keeps_ranknum_at_init_r(adapters):
    folder = adapters["adalora_rank_pattern"]
    w = read_adapter(folder, BASE, MAX_RANK, None)
    ranks = {k: m.rank for k, m in w.modules.items()}
    assert any(r < 6 for r in ranks.values())  # the allocation really shrank something
    sd = load_file(folder / SAFETENSORS_NAME)
    for (layer, proj), m in w.modules.items():
        prefix = f"base_model.model.{projection_key(layer, proj)}"
        a, e = sd[f"{prefix}.lora_A"].double(), sd[f"{prefix}.lora_E"].double()
        torch.testing.assert_close(m.A.double(), a * e, rtol=1e-6, atol=0)
        # PEFT restores ranknum = init_r after the resize, whatever the module's current rank
        assert m.scale == pytest.approx(12 / (6 + 1e-5), rel=1e-12)


def copy_adapter(src: Path, dst: Path, config: Callable | None = None, tensors: Callable | None = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / CONFIG_NAME).read_text())
        config(cfg)
        (dst / CONFIG_NAME).write_text(json.dumps(cfg))
    if tensors is not None:
        sd = load_file(dst / SAFETENSORS_NAME)
        tensors(sd)
        save_file(sd, dst / SAFETENSORS_NAME)
    return dst


def same_weights(a, b) -> None:
    assert set(a.modules) == set(b.modules)
    for k in a.modules:
        assert torch.equal(a.modules[k].A, b.modules[k].A) and torch.equal(a.modules[k].B, b.modules[k].B)
        assert a.modules[k].scale == b.modules[k].scale


def test_to_dtype_keeps_everything_else(adapters):
    w = read_adapter(adapters["lora_q_v"], BASE, MAX_RANK, None)
    half = w.to(dtype=torch.bfloat16)
    assert half.nbytes * 2 == w.nbytes and half.fingerprint == w.fingerprint
    for k, m in w.modules.items():
        h = half.modules[k]
        assert h.A.dtype == h.B.dtype == torch.bfloat16 and (h.scale, h.rank) == (m.scale, m.rank)
        assert torch.equal(h.A, m.A.to(torch.bfloat16)) and torch.equal(h.B, m.B.to(torch.bfloat16))
    assert w.modules[(0, "q_proj")].A.dtype == torch.float32  # the original is untouched


def test_default_adapter_segment_tolerated(adapters, tmp_path):
    def insert_default(sd):
        for k in list(sd):
            sd[k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")] = sd.pop(k)
    folder = copy_adapter(adapters["lora_q_v"], tmp_path / "d", tensors=insert_default)
    same_weights(read_adapter(folder, BASE, MAX_RANK, None), read_adapter(adapters["lora_q_v"], BASE, MAX_RANK, None))


def test_literal_all_linear_string(adapters, tmp_path):
    def literal(cfg):
        cfg["target_modules"] = "ALL-LINEAR"  # PEFT compares case-insensitively
    folder = copy_adapter(adapters["all_linear_rslora"], tmp_path / "a", config=literal)
    same_weights(read_adapter(folder, BASE, MAX_RANK, None),
                 read_adapter(adapters["all_linear_rslora"], BASE, MAX_RANK, None))


def test_legacy_bin_and_bf16(adapters, tmp_path):
    src = adapters["lora_q_v"]
    ref = read_adapter(src, BASE, MAX_RANK, None)
    folder = copy_adapter(src, tmp_path / "bin")
    torch.save(load_file(folder / SAFETENSORS_NAME), folder / BIN_NAME)
    (folder / SAFETENSORS_NAME).unlink()
    got = read_adapter(folder, BASE, MAX_RANK, None)
    assert got.weights_file == BIN_NAME
    same_weights(got, ref)

    def to_bf16(sd):
        for k in sd:
            sd[k] = sd[k].to(torch.bfloat16)
    bf = read_adapter(copy_adapter(src, tmp_path / "bf16", tensors=to_bf16), BASE, MAX_RANK, None)
    assert torch.equal(bf.modules[(0, "q_proj")].A, ref.modules[(0, "q_proj")].A.to(torch.bfloat16).float())


def test_fingerprint_tracks_content(adapters, tmp_path):
    src = adapters["lora_q_v"]
    a, b = read_adapter(src, BASE, MAX_RANK, None), read_adapter(src, BASE, MAX_RANK, None)
    assert a.fingerprint == b.fingerprint and a.config_sha256 == b.config_sha256

    def bump(sd):
        sd[QA] = sd[QA] + 1.0
    changed = read_adapter(copy_adapter(src, tmp_path / "t", tensors=bump), BASE, MAX_RANK, None)
    assert changed.fingerprint != a.fingerprint and changed.config_sha256 == a.config_sha256

    def alpha(cfg):
        cfg["lora_alpha"] = 9
    recfg = read_adapter(copy_adapter(src, tmp_path / "c", config=alpha), BASE, MAX_RANK, None)
    assert recfg.config_sha256 != a.config_sha256 and recfg.fingerprint != a.fingerprint


def test_symlink_inside_folder_is_fine(adapters, tmp_path):
    folder = copy_adapter(adapters["lora_q_v"], tmp_path / "s")
    (folder / SAFETENSORS_NAME).rename(folder / "real.safetensors")
    (folder / SAFETENSORS_NAME).symlink_to("real.safetensors")
    same_weights(read_adapter(folder, BASE, MAX_RANK, None), read_adapter(adapters["lora_q_v"], BASE, MAX_RANK, None))


# --------------------------------------------------------------------------------------------
# Matching rules against PEFT's own functions
# --------------------------------------------------------------------------------------------

RULE_CASES = [
    dict(target_modules=["q_proj", "down_proj"]),
    dict(target_modules=["model.layers.1.self_attn.q_proj", "v_proj"], layers_to_transform=[0]),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=1, layers_pattern=["h", "layers"]),
    dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="h"),
    dict(target_modules=r"model\.layers\.\d\.mlp\..*", exclude_modules=r".*\.1\..*"),
    dict(target_modules=["self_attn.k_proj", "o_proj"], exclude_modules=["layers.0.self_attn.o_proj"]),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[]),
]


@pytest.mark.parametrize("kwargs", RULE_CASES, ids=[str(i) for i in range(len(RULE_CASES))])
def test_target_rule_matches_peft(kwargs):
    peft_cfg = LoraConfig(**kwargs)
    raw = json.loads(json.dumps(peft_cfg.to_dict(), default=sorted))  # as it is written to disk
    rule = TargetRule.from_config(raw["target_modules"], raw["exclude_modules"], raw["layers_to_transform"],
                                  raw["layers_pattern"])
    for name, _ in base_model().named_modules():
        if not name or not re.search(r"_proj$", name):
            continue
        peft_says = check_target_module_exists(peft_cfg, name)
        peft_says = bool(peft_says) and type(peft_says).__name__ != "_ExcludedModule"
        assert rule.matches(name) == peft_says, name


def test_get_pattern_key_matches_peft():
    keys = ["layers.1.self_attn.q_proj", "q_proj", r"model\.layers\.0\..*", "down_proj", "j_proj"]
    for name in [projection_key(i, p) for i in range(2) for p in PROJECTIONS] + ["model.layers.0.self_attn.qq_proj"]:
        assert get_pattern_key(keys, name) == peft_get_pattern_key(keys, name)


def test_base_shapes_from_hf_config_and_projections():
    model = base_model()
    projections = [(i, p, getattr(getattr(layer, "self_attn" if p in PROJECTIONS[:4] else "mlp"), p))
                   for i, layer in enumerate(model.model.layers) for p in PROJECTIONS]
    from_model = BaseShapes.from_projections(projections)
    assert from_model == BASE and hash(from_model) == hash(BASE)

    class FakeModel:  # BaseShapes.from_model only needs iter_projections()
        def iter_projections(self):
            return iter(projections)
    assert BaseShapes.from_model(FakeModel()) == BASE
    assert BASE.features["k_proj"] == (64, 32) and BASE.features["down_proj"] == (128, 64)
    with pytest.raises(ValueError, match="features"):
        BaseShapes(2, {"q_proj": (4, 4)})
    with pytest.raises(ValueError, match="num_layers"):
        BaseShapes(0, dict(BASE.features))
    with pytest.raises(ValueError, match="projections"):
        BaseShapes.from_projections(projections[:-1])


# --------------------------------------------------------------------------------------------
# Refusals: each names the field, file or tensor at fault
# --------------------------------------------------------------------------------------------

def set_cfg(**updates) -> Callable:
    def apply(cfg):
        for k, v in updates.items():
            if v is _DELETE:
                cfg.pop(k, None)
            else:
                cfg[k] = v
    return apply


_DELETE = object()
K1A = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"


def add_tensor(key: str, shape=(4, 64)) -> Callable:
    def apply(sd):
        sd[key] = torch.randn(shape)
    return apply


def replace(key: str, fn: Callable) -> Callable:
    def apply(sd):
        sd[key] = fn(sd[key])
    return apply


def drop(*keys: str) -> Callable:
    def apply(sd):
        for k in keys:
            del sd[k]
    return apply


def nan_at(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def inf_at(t):
    t = t.clone()
    t.view(-1)[0] = float("inf")
    return t


def layer2(sd):
    sd[QA.replace("layers.0", "layers.2")] = sd[QA].clone()
    sd[QB.replace("layers.0", "layers.2")] = sd[QB].clone()


def dup_default(sd):
    sd[QA.replace(".lora_A.", ".lora_A.default.")] = sd[QA].clone()


# id -> (config mutation, tensor mutation, strings the message must contain)
REFUSALS = {
    "peft_type": (set_cfg(peft_type="IA3"), None, ["peft_type", "IA3"]),
    "peft_type_missing": (set_cfg(peft_type=_DELETE), None, ["peft_type"]),
    "use_dora": (set_cfg(use_dora=True), None, ["use_dora"]),
    "modules_to_save": (set_cfg(modules_to_save=["lm_head"]), None, ["modules_to_save"]),
    "lora_bias": (set_cfg(lora_bias=True), None, ["lora_bias"]),
    "trainable_token_indices": (set_cfg(trainable_token_indices=[1, 2]), None, ["trainable_token_indices"]),
    "layer_replication": (set_cfg(layer_replication=[[0, 1]]), None, ["layer_replication"]),
    "alora": (set_cfg(alora_invocation_tokens=[5]), None, ["alora_invocation_tokens"]),
    "qalora": (set_cfg(use_qalora=True), None, ["use_qalora"]),
    "target_parameters": (set_cfg(target_parameters=["mlp.experts.gate_up_proj"]), None, ["target_parameters"]),
    "megatron": (set_cfg(megatron_config={"tensor_model_parallel_size": 2}), None, ["megatron_config"]),
    "pissa": (set_cfg(init_lora_weights="pissa_niter_4"), None, ["init_lora_weights", "pissa"]),
    "loftq": (set_cfg(init_lora_weights="loftq"), None, ["init_lora_weights"]),
    "unknown_init": (set_cfg(init_lora_weights="sparkly"), None, ["init_lora_weights"]),
    "unknown_field": (set_cfg(future_feature={"x": 1}), None, ["future_feature"]),
    "bias_value": (set_cfg(bias="bogus"), None, ["bias"]),
    "embed_tokens": (set_cfg(target_modules=["q_proj", "v_proj", "embed_tokens"]), None, ["embed_tokens"]),
    "lm_head": (set_cfg(target_modules=["q_proj", "v_proj", "lm_head"]), None, ["lm_head"]),
    "norm": (set_cfg(target_modules=["q_proj", "v_proj", "input_layernorm"]), None, ["input_layernorm"]),
    "unknown_module": (set_cfg(target_modules=["q_proj", "v_proj", "c_attn"]), None, ["c_attn"]),
    "regex_lm_head": (set_cfg(target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj|lm_head"), None,
                      ["lm_head"]),
    "bad_regex": (set_cfg(target_modules="q_proj("), None, ["target_modules"]),
    "no_targets": (set_cfg(target_modules=_DELETE), None, ["target_modules"]),
    "matches_nothing": (set_cfg(target_modules=r"nothing\.here"), None, ["target_modules"]),
    "regex_with_layers": (set_cfg(target_modules=".*q_proj", layers_to_transform=[0]), None,
                          ["layers_to_transform"]),
    "pattern_without_layers": (set_cfg(layers_pattern="layers"), None, ["layers_pattern"]),
    "alpha_type": (set_cfg(lora_alpha="eight"), None, ["lora_alpha"]),
    "rank_vs_r": (set_cfg(r=8), None, [QA, "rank 4", "8"]),
    "rank_vs_rank_pattern": (set_cfg(rank_pattern={"model.layers.0.self_attn.q_proj": 2}), None,
                             [QA, "rank_pattern"]),
    "rank_pattern_bad_value": (set_cfg(rank_pattern={"q_proj": 0}), None, ["rank_pattern"]),
    "untargeted_by_list": (set_cfg(target_modules=["q_proj"]), None, [V1A.replace("layers.1", "layers.0")]),
    "untargeted_by_layers": (set_cfg(layers_to_transform=[0]), None, ["layers.1.self_attn"]),
    "layer_out_of_range": (None, layer2, [QA.replace("layers.0", "layers.2"), "layer 2"]),
    "shape_in": (None, replace(QA, lambda t: torch.randn(4, 65)), [QA, "64"]),
    "shape_out": (None, replace(QB, lambda t: torch.randn(63, 4)), [QB, "64"]),
    "rank_a_vs_b": (None, replace(QB, lambda t: torch.randn(64, 3)), [QB, "rank 3"]),
    "nan": (None, replace(QB, nan_at), [QB, "non-finite"]),
    "inf": (None, replace(QA, inf_at), [QA, "non-finite"]),
    # Checked per dtype over the whole file first: a bad bfloat16 tensor among float32 ones is
    # still found and named; a float64 value float32 cannot hold is refused after the cast.
    "nan_bfloat16": (None, replace(QB, lambda t: nan_at(t).to(torch.bfloat16)), [QB, "non-finite"]),
    "float64_beyond_float32": (None, replace(QA, lambda t: t.double().index_fill(1, torch.tensor([2]), 1e300)),
                               [QA, "non-finite"]),
    "missing_b": (None, drop(QB), [QB, "missing"]),
    "missing_pair": (None, drop(QA, QB), [QA, "missing"]),
    "unexpected_norm": (None, add_tensor("base_model.model.model.norm.weight", (64,)),
                        ["base_model.model.model.norm.weight"]),
    "dora_magnitude": (None, add_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                                        (64,)), ["lora_magnitude_vector", "DoRA"]),
    "lm_head_tensor": (None, add_tensor("base_model.model.lm_head.lora_A.weight"), ["lm_head.lora_A"]),
    "untargeted_tensor": (None, add_tensor(K1A), [K1A, "not targeted"]),
    "lora_E_in_lora": (None, add_tensor(QA.replace("lora_A.weight", "lora_E"), (4, 1)), ["lora_E"]),
    "int_dtype": (None, replace(QA, lambda t: torch.ones(4, 64, dtype=torch.int32)), [QA, "int32"]),
    "duplicate": (None, dup_default, ["duplicates", QA]),
    "no_tensors": (None, lambda sd: sd.clear(), [SAFETENSORS_NAME, "no tensors"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case, adapters, tmp_path):
    config, tensors, needles = REFUSALS[case]
    folder = copy_adapter(adapters["lora_q_v"], tmp_path / case, config=config, tensors=tensors)
    with pytest.raises(AdapterFormatError) as info:
        read_adapter(folder, BASE, MAX_RANK, None)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


ADA_QA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A"
ADA_QE = "base_model.model.model.layers.0.self_attn.q_proj.lora_E"

ADA_REFUSALS = {
    "mask_length": (set_cfg(rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True, False]}), None,
                    ["rank_pattern", "init_r"]),
    "mask_untargeted": (set_cfg(rank_pattern={"model.layers.0.self_attn.k_proj.lora_E": [True] * 6}), None,
                        ["rank_pattern", "k_proj"]),
    "mask_vs_tensor": (set_cfg(rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True] * 5 + [False]}),
                       None, [ADA_QA, "rank 6", "5"]),
    "alpha_pattern": (set_cfg(alpha_pattern={"q_proj": 3}), None, ["alpha_pattern"]),
    "missing_E": (None, drop(ADA_QE), [ADA_QE, "missing"]),
    "E_shape": (None, replace(ADA_QE, lambda t: torch.randn(6)), [ADA_QE, "shape"]),
    "weight_suffix": (None, lambda sd: sd.__setitem__(ADA_QA + ".weight", sd.pop(ADA_QA)), [ADA_QA + ".weight"]),
    "nan_E": (None, replace(ADA_QE, nan_at), [ADA_QE, "non-finite"]),
}


@pytest.mark.parametrize("case", list(ADA_REFUSALS))
def test_adalora_refusals(case, adapters, tmp_path):
    config, tensors, needles = ADA_REFUSALS[case]
    folder = copy_adapter(adapters["adalora"], tmp_path / case, config=config, tensors=tensors)
    with pytest.raises(AdapterFormatError) as info:
        read_adapter(folder, BASE, MAX_RANK, None)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def refused(folder, *needles, base=BASE, max_rank=MAX_RANK, max_bytes=None) -> None:
    with pytest.raises(AdapterFormatError) as info:
        read_adapter(folder, base, max_rank, max_bytes)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_rank_above_max_rank(adapters):
    refused(adapters["lora_q_v"], QA, "max_rank=3", max_rank=3)


def test_file_larger_than_max_bytes(adapters):
    size = (adapters["lora_q_v"] / SAFETENSORS_NAME).stat().st_size
    refused(adapters["lora_q_v"], SAFETENSORS_NAME, "max_adapter_bytes", max_bytes=size - 1)
    assert read_adapter(adapters["lora_q_v"], BASE, MAX_RANK, max_bytes=size).file_bytes == size


def test_shape_mismatch_against_base(adapters):
    wider = BaseShapes.from_hf_config({**HF_CFG, "hidden_size": 96, "head_dim": 24})
    refused(adapters["lora_q_v"], QA, "[r, 96]", base=wider)


def test_adapter_for_deeper_model(adapters):
    refused(adapters["lora_q_v"], "layer 1", "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
            base=BaseShapes(1, dict(BASE.features)))
    # a saved all-linear list names layer-1 modules explicitly: the config itself is refused
    refused(adapters["all_linear_rslora"], "target_modules", "model.layers.1", base=BaseShapes(1, dict(BASE.features)))


def test_truncated_and_corrupt_safetensors(adapters, tmp_path):
    folder = copy_adapter(adapters["lora_q_v"], tmp_path / "t")
    data = (folder / SAFETENSORS_NAME).read_bytes()
    (folder / SAFETENSORS_NAME).write_bytes(data[:-16])
    refused(folder, SAFETENSORS_NAME, "truncated or corrupt")
    (folder / SAFETENSORS_NAME).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    refused(folder, SAFETENSORS_NAME)


def test_config_file_problems(adapters, tmp_path):
    folder = copy_adapter(adapters["lora_q_v"], tmp_path / "c")
    (folder / CONFIG_NAME).write_text("{not json")
    refused(folder, CONFIG_NAME, "JSON")
    (folder / CONFIG_NAME).write_text("[1, 2]")
    refused(folder, CONFIG_NAME, "object")
    (folder / CONFIG_NAME).unlink()
    refused(folder, CONFIG_NAME, "missing")


def test_missing_weights_file(adapters, tmp_path):
    folder = copy_adapter(adapters["lora_q_v"], tmp_path / "w")
    (folder / SAFETENSORS_NAME).unlink()
    refused(folder, SAFETENSORS_NAME, "missing")


def test_not_a_directory(tmp_path):
    refused(tmp_path / "nope", "path")


def test_symlinks_out_of_the_folder(adapters, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = copy_adapter(adapters["lora_q_v"], tmp_path / "l")
    (folder / SAFETENSORS_NAME).rename(outside / SAFETENSORS_NAME)
    (folder / SAFETENSORS_NAME).symlink_to(outside / SAFETENSORS_NAME)
    refused(folder, SAFETENSORS_NAME, "outside")
    (folder / SAFETENSORS_NAME).unlink()
    (folder / SAFETENSORS_NAME).symlink_to(folder / "gone.safetensors")
    refused(folder, SAFETENSORS_NAME, "dangling")
    (folder / SAFETENSORS_NAME).unlink()
    shutil.copy(outside / SAFETENSORS_NAME, folder / SAFETENSORS_NAME)
    (folder / CONFIG_NAME).rename(outside / CONFIG_NAME)
    (folder / CONFIG_NAME).symlink_to(outside / CONFIG_NAME)
    refused(folder, CONFIG_NAME, "outside")


class NotATensor:
    pass


def test_legacy_bin_refuses_pickled_objects(adapters, tmp_path):
    folder = copy_adapter(adapters["lora_q_v"], tmp_path / "p")
    (folder / SAFETENSORS_NAME).unlink()
    torch.save({QA: NotATensor()}, folder / BIN_NAME)
    refused(folder, BIN_NAME, "weights_only")
    torch.save(torch.randn(3), folder / BIN_NAME)
    refused(folder, BIN_NAME, "dict")


def test_bad_arguments(adapters):
    with pytest.raises(ValueError, match="max_rank"):
        read_adapter(adapters["lora_q_v"], BASE, 0, None)
    with pytest.raises(ValueError, match="max_bytes"):
        read_adapter(adapters["lora_q_v"], BASE, 8, 0)
