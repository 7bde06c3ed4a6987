"""Unpacked sibling fusion (model/fused_linear.py): q/k/v and gate/up of plain nn.Linear bases, in
float32 and bfloat16, become one GEMM each with outputs bit-identical to the separate layers, no
weight held twice, and the engine's greedy tokens unchanged. Runs on every CPU (the packed bfloat16
variant is tests/test_packed_linear.py, where oneDNN can pack)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex.model.fused_linear import PackedGroup, PackedSlice, fuse_siblings, group_outputs
from loraplex.model.linear import project_all
from loraplex.model.loader import load_model
from loraplex.model.quantize import quantized_bytes
from tests.fixtures.engine_run import engine_greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_outputs_are_bit_identical(tiny_model_dirs, dtype):
    plain = load_model(tiny_model_dirs["qwen2"], dtype, "cpu").model  # qkv bias: the bias is fused too
    model = load_model(tiny_model_dirs["qwen2"], dtype, "cpu").model
    before = quantized_bytes(model)
    layers = len(model.model.layers)
    assert fuse_siblings(model) == 2 * layers and fuse_siblings(model) == 0
    assert quantized_bytes(model) == before  # the concatenated weight replaced the members'
    g = torch.Generator().manual_seed(11)
    for i in (0, layers - 1):
        attn, ref = model.model.layers[i].self_attn, plain.model.layers[i].self_attn
        mlp, ref_mlp = model.model.layers[i].mlp, plain.model.layers[i].mlp
        assert isinstance(attn.q_proj.base, PackedSlice) and type(attn.q_proj.base.group.linear) is nn.Linear
        assert attn.q_proj.base.group.linear.bias is not None
        for rows in (1, 7, 32, 33):
            x = torch.randn(rows, attn.q_proj.in_features, generator=g).to(dtype)
            trio, ref_trio = (attn.q_proj, attn.k_proj, attn.v_proj), (ref.q_proj, ref.k_proj, ref.v_proj)
            assert group_outputs(trio, x) is not None
            for got, want in zip(project_all(trio, x), project_all(ref_trio, x)):
                assert torch.equal(got, want)
            assert torch.equal(attn.k_proj(x), ref.k_proj(x))  # a member called alone slices the group
            pair, ref_pair = (mlp.gate_proj, mlp.up_proj), (ref_mlp.gate_proj, ref_mlp.up_proj)
            for got, want in zip(project_all(pair, x), project_all(ref_pair, x)):
                assert torch.equal(got, want)


def test_refuses_mixed_members():
    a = nn.Linear(8, 4, dtype=torch.float32)
    b = nn.Linear(8, 4, dtype=torch.bfloat16)
    c = nn.Linear(6, 4, dtype=torch.float32)
    assert "one dtype and device" in PackedGroup.refusal([a, b])
    assert "one input width" in PackedGroup.refusal([a, c])
    assert "bias" in PackedGroup.refusal([a, nn.Linear(8, 4, bias=False)])
    assert PackedGroup.refusal([a]) is not None
    assert PackedGroup.refusal([a, nn.Linear(8, 3)]) is None


def test_engine_tokens_unchanged_by_fusion(tiny_model_dir, monkeypatch):
    """float32 greedy tokens with the engine's fusion on (default) and off (LORAPLEX_PACK_WEIGHTS=0)."""
    jobs = {"a": (None, [1, 5, 9, 13, 2]), "b": (None, [3, 4]), "c": (None, [7] * 11)}
    runs = {}
    for pack in ("0", "1"):
        monkeypatch.setenv("LORAPLEX_PACK_WEIGHTS", pack)
        loaded = load_model(tiny_model_dir, torch.float32, "cpu")
        runs[pack] = engine_greedy(loaded, None, jobs, max_new_tokens=8)
        fused = any(isinstance(p.base, PackedSlice) for _, _, p in loaded.model.iter_projections())
        assert fused == (pack == "1")
    assert runs["0"] == runs["1"]
    assert all(err is None and len(toks) == 8 for toks, err in runs["1"].values())
