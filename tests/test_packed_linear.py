"""PackedLinear (model/packed_linear.py): bfloat16 projections pre-packed for oneDNN must give
exactly F.linear's results (the packing is a speed change only), and the engine packs a bf16 CPU
model's projections without changing what it generates or what ModelInfo reports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraplex.model.packed_linear import PackedLinear, pack_projections, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 32, 33, 257, 1024])
@pytest.mark.parametrize(("d_in", "d_out"), [(576, 1536), (1536, 576), (129, 70)])
def test_bit_identical_to_linear(rows, d_in, d_out, bias):
    g = torch.Generator().manual_seed(rows + d_in)
    layer = nn.Linear(d_in, d_out, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d_out, d_in, generator=g))
        if bias:
            layer.bias.copy_(torch.randn(d_out, generator=g))
    x = torch.randn(rows, d_in, generator=g).to(torch.bfloat16)
    want = F.linear(x, layer.weight, layer.bias)
    packed = PackedLinear(layer)
    assert torch.equal(packed(x), want)
    assert torch.equal(packed(x.view(1, rows, d_in)), want.view(1, rows, d_out))  # leading dims
    assert torch.equal(packed.unpacked_weight(), layer.weight)
    assert torch.equal(F.linear(x, packed.unpacked_weight(), packed.bias), want)
    strided = torch.randn(rows, 2 * d_in, generator=g).to(torch.bfloat16)[:, ::2]
    assert torch.equal(packed(strided), F.linear(strided, layer.weight, layer.bias))


def test_refuses_other_dtypes():
    with pytest.raises(ValueError, match="bfloat16"):
        PackedLinear(nn.Linear(8, 8))
    packed = PackedLinear(nn.Linear(8, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bfloat16"):
        packed(torch.randn(2, 8))


def test_engine_packs_bf16_model_and_generates_the_same(tiny_model_dir, monkeypatch):
    """Same greedy tokens and ModelInfo byte counts with and without packing."""
    from loraplex.model.linear import Projection
    from loraplex.model.loader import load_model
    from loraplex.model.quantize import float16_weight_bytes, quantized_bytes
    from tests.fixtures.engine_run import engine_greedy

    jobs = {"a": (None, [1, 5, 9, 13, 2]), "b": (None, [3, 4]), "c": (None, [7] * 11)}
    runs = {}
    for pack in ("0", "1"):
        monkeypatch.setenv("LORAPLEX_PACK_WEIGHTS", pack)
        loaded = load_model(tiny_model_dir, torch.bfloat16, "cpu")
        before = (quantized_bytes(loaded.model), float16_weight_bytes(loaded.model))
        tokens = engine_greedy(loaded, None, jobs, max_new_tokens=6)
        kinds = {type(p.base) for p in loaded.model.modules() if isinstance(p, Projection)}
        after = (quantized_bytes(loaded.model), float16_weight_bytes(loaded.model))
        runs[pack] = (tokens, kinds, before, after)
    assert runs["1"][1] == {PackedLinear} and runs["0"][1] == {nn.Linear}
    assert runs["0"][0] == runs["1"][0]
    assert all(err is None and len(toks) == 6 for toks, err in runs["1"][0].values())
    # What ModelInfo reports: the same bytes packed or not.
    assert runs["1"][3] == runs["1"][2] == runs["0"][3]


def test_pack_projections_is_idempotent_and_skips_float32(tiny_model_dir):
    from loraplex.model.loader import load_model

    bf16 = load_model(tiny_model_dir, torch.bfloat16, "cpu")
    assert pack_projections(bf16.model) > 0
    assert pack_projections(bf16.model) == 0
    fp32 = load_model(tiny_model_dir, torch.float32, "cpu")
    assert pack_projections(fp32.model) == 0
