"""The compiled float32-math bfloat16 GEMM (loraplex_kernels/gemm_bf16.c) and WidenedLinear.

The kernel against float64 on random data: every output within one bfloat16 step of the correctly
rounded float64 product (its float32 sums run in another order than torch's, so where the exact
value sits on a rounding boundary it may land on the other side), and nearly all of them equal
to it; on ragged shapes (M, N, K not multiples of the register tile or the vector width), strided
rows, with and without bias. Then the model: widen_projections swaps the bfloat16 layers for
WidenedLinear holding the same Parameters, its logits stay within bfloat16 noise of torch's, and
float32 models are never touched.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraplex.model import widened_linear
from loraplex.model.widened_linear import WidenedLinear, widen_projections
from loraplex_kernels import gemm_native, native

pytestmark = pytest.mark.skipif(not native.available(), reason="compiled kernels unavailable")


def _bf16_step(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 values at |x| (one step of its 8-bit significand)."""
    exp = torch.frexp(x.double().abs().clamp_min(1e-30)).exponent
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exp - 8)


def _check(got: torch.Tensor, ref64: torch.Tensor) -> None:
    want = ref64.to(torch.bfloat16)  # the float64 product, rounded once
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    diff = (got.double() - want.double()).abs()
    assert (diff <= _bf16_step(ref64)).all(), diff.max()
    assert (diff == 0).double().mean() > 0.97


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 32, 64, 65, 130])
@pytest.mark.parametrize(("n", "k"), [(1, 8), (2, 13), (7, 576), (100, 1), (192, 576), (577, 1000)])
def test_gemm_matches_float64(m, n, k):
    g = torch.Generator().manual_seed(m * 10007 + n * 31 + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(torch.bfloat16)
    _check(gemm_native.gemm_bf16(x, w), x.double() @ w.double().T)


@pytest.mark.parametrize("m", [1, 6, 70])
def test_gemm_strided_rows_and_bias(m):
    g = torch.Generator().manual_seed(m)
    n, k = 50, 96
    wide_x = torch.randn(m, k + 10, generator=g).to(torch.bfloat16)
    x = wide_x[:, 5:5 + k]  # rows strided, as a column view of a fused GEMM's output is
    wide_w = torch.randn(n, k + 4, generator=g).to(torch.bfloat16)
    w = wide_w[:, :k]
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    assert x.stride(0) == k + 10 and w.stride(0) == k + 4
    got = gemm_native.gemm_bf16(x, w, bias)
    _check(got, x.double() @ w.double().T + bias.double())
    # and as close to float64 as torch's own bfloat16 F.linear is, on average
    ref = x.double() @ w.double().T + bias.double()
    torch_err = (F.linear(x, w, bias).double() - ref).abs().mean()
    assert (got.double() - ref).abs().mean() <= 1.05 * torch_err + 1e-12


def test_gemm_refuses_mismatched_operands():
    x = torch.randn(3, 8).to(torch.bfloat16)
    with pytest.raises(ValueError, match="columns"):
        gemm_native.gemm_bf16(x, torch.randn(4, 9).to(torch.bfloat16))
    with pytest.raises(ValueError, match="bias"):
        gemm_native.gemm_bf16(x, torch.randn(4, 8).to(torch.bfloat16), torch.zeros(5, dtype=torch.bfloat16))
    assert not gemm_native.supports(x.float(), torch.randn(4, 8))
    assert not gemm_native.supports(x, torch.randn(4, 8))  # mixed dtypes


@pytest.mark.parametrize(("n", "k"), [(1, 8), (17, 13), (40, 24), (192, 576)])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 33, 70])
def test_panels_match_float64_and_round_trip(m, n, k):
    """Pre-packed panels (gemm_panels.c): an exact re-layout of W, and every row count's loop
    (direct for < 8 rows, the float32 block buffer from 8) within a bfloat16 step of float64."""
    g = torch.Generator().manual_seed(m * 131 + n * 7 + k)
    w = (torch.randn(n, k + 3, generator=g) / k ** 0.5).to(torch.bfloat16)[:, :k]  # strided rows
    packed = gemm_native.pack_panels(w)
    assert tuple(packed.shape) == gemm_native.panel_shape(n, k)
    assert torch.equal(gemm_native.unpack_panels(packed, n, k), w)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    _check(gemm_native.gemm_panels(x, packed, n, k), x.double() @ w.double().T)
    _check(gemm_native.gemm_panels(x, packed, n, k, bias), x.double() @ w.double().T + bias.double())


def test_panels_refuse_mismatched_operands():
    w = torch.randn(20, 16).to(torch.bfloat16)
    packed = gemm_native.pack_panels(w)
    with pytest.raises(ValueError, match="do not fit"):
        gemm_native.gemm_panels(torch.randn(2, 24).to(torch.bfloat16), packed, 20, 24)
    with pytest.raises(ValueError, match="pack_panels takes"):
        gemm_native.pack_panels(w.float())


@pytest.mark.parametrize("pack", [True, False])
def test_widened_linear_layouts_and_fallback(pack):
    lin = nn.Linear(40, 24, bias=True, dtype=torch.bfloat16)
    wide = WidenedLinear(lin, pack=pack)
    assert wide.bias is lin.bias
    assert torch.equal(wide.unpacked_weight(), lin.weight.detach())
    assert (wide.weight is lin.weight) == (not pack)
    assert set(wide.state_dict()) == ({"bias"} if pack else {"weight", "bias"})  # panels: not persistent
    x = torch.randn(2, 3, 40).to(torch.bfloat16)  # 3-d input: flattened and restored
    got = wide(x)
    assert got.shape == (2, 3, 24)
    _check(got.reshape(6, 24), x.reshape(6, 40).double() @ lin.weight.double().T + lin.bias.double())
    x32 = torch.randn(5, 40)  # float32 input: torch's F.linear on the same weights
    want = F.linear(x32, lin.weight.float(), lin.bias.float())
    torch.testing.assert_close(wide(x32), want)
    with pytest.raises(ValueError, match="bfloat16 CPU"):
        WidenedLinear(nn.Linear(4, 4))


def _two_steps(model) -> torch.Tensor:
    """Logits of a prefill step (two prompts, every row) then a decode step, on fresh caches."""
    import random

    from loraplex.model.kv_cache import KVCache
    from tests.fixtures.paged_batches import BlockPool, PagedSeq, make_step

    arch = model.arch
    rng = random.Random(0)
    seqs = [PagedSeq([rng.randrange(arch.vocab_size) for _ in range(n)]) for n in (10, 6)]
    kv = KVCache.allocate(arch.num_layers, 16, 4, arch.num_kv_heads, arch.head_dim, model.dtype, "cpu")
    pool = BlockPool(16, 4)
    out = []
    for work in ([(seqs[0], 9), (seqs[1], 5)], [(seqs[0], 1), (seqs[1], 1)]):
        batch, _ = make_step(pool, work)
        out.append(model(batch, kv))  # [rows, vocab] float32
    return torch.cat(out)


@pytest.fixture
def force_widening(monkeypatch):
    monkeypatch.setattr(widened_linear, "widening_wanted", lambda: True)


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    """A tiny Llama whose lm_head is its embedding table, like the default model's."""
    from tests.fixtures.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """A small random Llama with hidden 512: sums long enough that another summation order
    shows through bfloat16 rounding (at hidden 64 both paths round to the same values)."""
    from tests.fixtures.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("wide"), hidden_size=512, intermediate_size=1024,
                           num_attention_heads=8, num_key_value_heads=2, initializer_range=0.05)


@pytest.mark.parametrize("tied", [True, False])
def test_widen_projections_swaps_bf16_layers_only(tied, tied_model_dir, tiny_model_dir, force_widening):
    from loraplex.model.linear import Projection
    from loraplex.model.loader import load_model
    from loraplex.model.quantize import float16_weight_bytes, quantized_bytes

    folder = tied_model_dir if tied else tiny_model_dir
    fp32 = load_model(folder, torch.float32, "cpu")
    assert widen_projections(fp32.model) == 0
    bf16 = load_model(folder, torch.bfloat16, "cpu")
    model = bf16.model
    dense = {id(p): p.base.weight.detach().clone() for p in model.modules() if isinstance(p, Projection)}
    before = quantized_bytes(model), float16_weight_bytes(model)
    n = widen_projections(model)
    projections = [p for p in model.modules() if isinstance(p, Projection)]
    assert n == len(projections) + 1  # every projection and the vocab projection
    assert all(type(p.base) is WidenedLinear and p.base.packed is not None for p in projections)
    assert all(torch.equal(p.base.unpacked_weight(), dense[id(p)]) for p in projections)  # exact re-layout
    if tied:  # the table stays row-major for the token lookup: the head reads it in place
        assert model.lm_head is None and model.packed_head.weight is model.model.embed_tokens.weight
    else:
        assert type(model.lm_head) is WidenedLinear and model.packed_head is None
    # The tiny models' widths are whole panels: not one byte more resident, the same weights.
    assert (quantized_bytes(model), float16_weight_bytes(model)) == before
    assert widen_projections(model) == 0  # idempotent


def test_widened_model_logits_and_tokens_within_bf16_noise(wide_model_dir, monkeypatch):
    """The engine on a bf16 model with and without widening (forced on, whatever this CPU is):
    greedy runs agree except where a near-tie flips, and both decode."""
    from loraplex.model.loader import load_model
    from tests.fixtures.engine_run import engine_greedy

    jobs = {"a": (None, [1, 5, 9, 13, 2, 8, 8, 3]), "b": (None, [3, 4]), "c": (None, [7] * 11)}
    monkeypatch.setenv("LORAPLEX_PACK_WEIGHTS", "1")
    runs = []
    for wanted in (False, True):
        monkeypatch.setattr(widened_linear, "widening_wanted", lambda w=wanted: w)
        loaded = load_model(wide_model_dir, torch.bfloat16, "cpu")
        runs.append(engine_greedy(loaded, None, jobs, max_new_tokens=8))
        kinds = {type(m) for m in loaded.model.modules()}
        assert (WidenedLinear in kinds) == (wanted and not widened_linear.packing_available())
    assert all(err is None and len(toks) == 8 for toks, err in runs[1].values())
    same = sum(runs[0][k][0] == runs[1][k][0] for k in jobs)
    assert same >= 2, runs


def test_widened_forward_logits_close_to_float64_model(wide_model_dir, force_widening):
    """One forward of the widened bf16 model against the same weights in float64: no further from
    it than torch's bf16 forward is (the GEMMs are the model's bulk, so a wrong kernel shows)."""
    from loraplex.model.loader import load_model

    ref = _two_steps(load_model(wide_model_dir, torch.float64, "cpu").model)
    plain = _two_steps(load_model(wide_model_dir, torch.bfloat16, "cpu").model)
    wide_model = load_model(wide_model_dir, torch.bfloat16, "cpu").model
    assert widen_projections(wide_model) > 0
    wide = _two_steps(wide_model)
    err_plain = (plain.double() - ref).abs().mean()
    err_wide = (wide.double() - ref).abs().mean()
    assert err_wide <= 1.25 * err_plain, (err_wide, err_plain)
    assert not torch.equal(wide, plain)  # the widened path really ran
