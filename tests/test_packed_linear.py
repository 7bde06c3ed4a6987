"""PackedLinear (model/packed_linear.py): bfloat16 projections pre-packed for oneDNN must give
exactly F.linear's results (the packing is a speed change only); so must q/k/v and gate/up fused
into one packed GEMM (model/fused_linear.py) and the packed vocab projection; and the engine packs a
bf16 CPU model without changing what it generates or what ModelInfo reports (a packed copy of a
tied lm_head is counted as resident, not as another weight)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraplex.model.fused_linear import PackedGroup, PackedSlice, fuse_siblings, group_outputs
from loraplex.model.packed_linear import PackedLinear, pack_lm_head, packing_available
from loraplex.model.projection_packing import pack_projections

pytestmark = pytest.mark.skipif(not packing_available(), reason="oneDNN bfloat16 weight packing unavailable on this CPU (needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)")


@pytest.fixture(autouse=True)
def _onednn_layout(monkeypatch):
    """This file tests oneDNN's layout: on an AMX CPU the engine packs with our AMX kernel instead
    (model/amx_linear.py, tested in tests/test_amx_linear.py), unless LORAPLEX_AMX=0."""
    monkeypatch.setenv("LORAPLEX_AMX", "0")


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


def _random_linear(d_in: int, d_out: int, bias: bool, g: torch.Generator) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d_out, d_in, generator=g))
        if bias:
            layer.bias.copy_(torch.randn(d_out, generator=g))
    return layer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 32, 33, 512])
@pytest.mark.parametrize(("d_in", "widths"), [(576, (576, 192, 192)), (576, (1536, 1536)), (100, (37, 13, 50))])
def test_group_bit_identical_to_separate_linears(rows, d_in, widths, bias):
    g = torch.Generator().manual_seed(rows * 7 + d_in)
    layers = [_random_linear(d_in, w, bias, g) for w in widths]
    group = PackedGroup([PackedLinear(layer) for layer in layers])
    x = torch.randn(rows, d_in, generator=g).to(torch.bfloat16)
    outs = group(x)
    assert [tuple(o.shape) for o in outs] == [(rows, w) for w in widths]
    for out, layer, i in zip(outs, layers, range(len(layers))):
        want = F.linear(x, layer.weight, layer.bias)
        assert torch.equal(out, want)
        assert torch.equal(PackedSlice(group, i)(x), want)  # a member on its own


def test_group_refuses_mixed_members():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="input width"):
        PackedGroup([PackedLinear(_random_linear(8, 4, False, g)), PackedLinear(_random_linear(9, 4, False, g))])
    with pytest.raises(ValueError, match="bias"):
        PackedGroup([PackedLinear(_random_linear(8, 4, False, g)), PackedLinear(_random_linear(8, 4, True, g))])


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    """A tiny Llama whose lm_head is its embedding table, like the default model's."""
    from tests.fixtures.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


@pytest.fixture(params=["tied", "untied"])
def model_dir(request, tied_model_dir, tiny_model_dir):
    return tied_model_dir if request.param == "tied" else tiny_model_dir


def test_fused_model_projections_and_lm_head(model_dir):
    """On a loaded bf16 model: q/k/v and gate/up of every layer become one group each; every
    projection and the vocab projection give the unpacked model's exact outputs; project_all runs
    the group's one GEMM; fusing and packing twice change nothing."""
    from loraplex.model.linear import Projection, project_all
    from loraplex.model.loader import load_model

    plain = load_model(model_dir, torch.bfloat16, "cpu").model
    model = load_model(model_dir, torch.bfloat16, "cpu").model
    num_layers = len(model.model.layers)
    assert pack_projections(model) == 7 * num_layers
    assert fuse_siblings(model) == 2 * num_layers and fuse_siblings(model) == 0
    tied = model.lm_head is None
    assert (pack_lm_head(model) > 0) == tied and pack_lm_head(model) == 0
    assert isinstance(model.packed_head if tied else model.lm_head, PackedLinear)
    g = torch.Generator().manual_seed(3)
    fused = dict(model.named_modules())
    for name, ref in plain.named_modules():
        if isinstance(ref, Projection):
            got = fused[name]
            assert isinstance(got.base, PackedSlice) != name.endswith(("o_proj", "down_proj")), name
            x = torch.randn(5, ref.in_features, generator=g).to(torch.bfloat16)
            assert torch.equal(got(x), ref(x)), name
    attn, ref_attn = model.model.layers[0].self_attn, plain.model.layers[0].self_attn
    x = torch.randn(9, attn.q_proj.in_features, generator=g).to(torch.bfloat16)
    trio = (attn.q_proj, attn.k_proj, attn.v_proj)
    assert group_outputs(trio, x) is not None and group_outputs(trio[::-1], x) is None  # order matters
    for got, want in zip(project_all(trio, x), project_all((ref_attn.q_proj, ref_attn.k_proj, ref_attn.v_proj), x)):
        assert torch.equal(got, want)
    h = torch.randn(4, x.shape[1], generator=g).to(torch.bfloat16)
    assert torch.equal(model.output_logits(h), plain.output_logits(h))


def test_engine_packs_bf16_model_and_generates_the_same(tied_model_dir, monkeypatch):
    """Same greedy tokens with and without packing; ModelInfo's float16 weight count unchanged;
    resident bytes grow by exactly the packed copy of the tied lm_head, and not at all with
    LORAPLEX_PACK_TIED_HEAD=0."""
    from loraplex.model.linear import Projection
    from loraplex.model.loader import load_model
    from loraplex.model.quantize import float16_weight_bytes, quantized_bytes
    from tests.fixtures.engine_run import engine_greedy

    jobs = {"a": (None, [1, 5, 9, 13, 2]), "b": (None, [3, 4]), "c": (None, [7] * 11)}
    runs = {}
    for pack, tied in (("0", "1"), ("1", "1"), ("1", "0")):
        monkeypatch.setenv("LORAPLEX_PACK_WEIGHTS", pack)
        monkeypatch.setenv("LORAPLEX_PACK_TIED_HEAD", tied)
        loaded = load_model(tied_model_dir, torch.bfloat16, "cpu")
        before = (quantized_bytes(loaded.model), float16_weight_bytes(loaded.model))
        tokens = engine_greedy(loaded, None, jobs, max_new_tokens=6)
        kinds = {type(p.base) for p in loaded.model.modules() if isinstance(p, Projection)}
        after = (quantized_bytes(loaded.model), float16_weight_bytes(loaded.model))
        head = loaded.model.packed_head
        runs[pack + tied] = (tokens, kinds, before, after, 0 if head is None else head.nbytes)
    assert loaded.arch.tie_word_embeddings  # the tiny model ties its embeddings like the default one
    assert runs["11"][1] == runs["10"][1] == {PackedLinear, PackedSlice} and runs["01"][1] == {nn.Linear}
    assert runs["01"][0] == runs["11"][0] == runs["10"][0]
    assert all(err is None and len(toks) == 6 for toks, err in runs["11"][0].values())
    # What ModelInfo reports: float16 weight bytes the same; resident + the tied head's copy.
    assert runs["01"][2] == runs["01"][3] == runs["11"][2] == runs["10"][3]
    vocab, hidden = loaded.arch.vocab_size, loaded.arch.hidden_size
    assert runs["11"][4] == vocab * hidden * 2 and runs["10"][4] == runs["01"][4] == 0
    assert runs["11"][3] == (runs["01"][3][0] + runs["11"][4], runs["01"][3][1])


def test_pack_projections_is_idempotent_and_skips_float32(tiny_model_dir):
    from loraplex.model.loader import load_model

    bf16 = load_model(tiny_model_dir, torch.bfloat16, "cpu")
    assert pack_projections(bf16.model) > 0
    assert pack_projections(bf16.model) == 0
    assert fuse_siblings(bf16.model) > 0 and pack_projections(bf16.model) == 0  # slices stay
    fp32 = load_model(tiny_model_dir, torch.float32, "cpu")
    assert pack_projections(fp32.model) == 0
    assert fuse_siblings(fp32.model) == 0 and pack_lm_head(fp32.model) == 0
