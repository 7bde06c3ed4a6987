"""The compiled row-wise layer ops (loraplex_kernels/rmsnorm.c, rotary.c) against the model's torch
formulations and float64: RMSNorm within one bfloat16 step of torch (its variance is summed in
another order) and as close to float64 as torch; rotary bit-identical to `_rotate`, on strided q/k
(column views of one q/k/v GEMM); the model uses them only where they apply, and a bf16 model's
logits are the same to bf16 rounding with them on or off.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.model import norm as norm_mod
from loraplex.model import rope as rope_mod
from loraplex.model.norm import RMSNorm
from loraplex.model.rope import _rotate, apply_rotary
from loraplex_kernels import layer_ops_native, native

pytestmark = pytest.mark.skipif(not native.available(), reason="compiled kernels unavailable")


@pytest.fixture(autouse=True)
def _restore_choice():
    before = norm_mod.NATIVE, rope_mod.NATIVE
    yield
    norm_mod.NATIVE, rope_mod.NATIVE = before


def _bf16_step(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 values at |x| (one step of its 8-bit significand)."""
    exp = torch.frexp(x.double().abs().clamp_min(1e-30)).exponent
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exp - 8)


def _random_norm(dim: int, eps: float, g: torch.Generator) -> RMSNorm:
    norm = RMSNorm(dim, eps, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=g))
    return norm


def _assert_like_torch_norm(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            eps: float) -> None:
    """got (our RMSNorm) vs want (torch's formulation): at most one bfloat16 step apart, nearly
    all equal, and as close to float64 as torch on average."""
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    diff = (got.double() - want.double()).abs()
    assert (diff <= _bf16_step(want)).all()  # at most one bfloat16 step apart
    assert (diff == 0).double().mean() > 0.99
    x64 = x.double()
    ref = weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    assert (got.double() - ref).abs().mean() <= 1.05 * (want.double() - ref).abs().mean() + 1e-12


@pytest.mark.parametrize("rows", [1, 5, 32, 513])
@pytest.mark.parametrize("dim", [64, 576, 577, 1000])
def test_rmsnorm_matches_torch_and_float64(rows, dim):
    g = torch.Generator().manual_seed(rows * 1000 + dim)
    wide = (torch.randn(rows, dim + 7, generator=g) * 3).to(torch.bfloat16)
    x = wide[:, 3:3 + dim]  # strided rows
    norm = _random_norm(dim, 1e-5, g)
    norm_mod.NATIVE = False
    want = norm(x)
    got = layer_ops_native.rms_norm(x, norm.weight, 1e-5)
    _assert_like_torch_norm(got, want, x, norm.weight.detach(), 1e-5)
    norm_mod.NATIVE = None
    assert torch.equal(norm(x), got)  # the module takes the compiled path


def test_rmsnorm_module_keeps_torch_for_other_operands():
    norm = RMSNorm(16, 1e-6)  # float32: torch
    x = torch.randn(3, 16)
    norm_mod.NATIVE = None
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.allclose(norm(x), ref, atol=1e-6)
    assert not layer_ops_native.supports(x)
    with pytest.raises(ValueError, match="weight"):
        layer_ops_native.rms_norm(x.to(torch.bfloat16), torch.ones(8, dtype=torch.bfloat16), 1e-6)


@pytest.mark.parametrize("tokens", [1, 7, 32, 300])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 16), (8, 8, 128), (2, 1, 80)])
def test_rotary_bit_identical_on_strided_views(tokens, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(tokens * 31 + dim)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g) * 2).to(torch.bfloat16)
    q = qkv[:, :heads * dim].view(tokens, heads, dim)  # column views, as the fused GEMM gives
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    pos = torch.randint(0, 4096, (tokens,), generator=g)
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = pos[:, None].float() * inv[None]
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos().to(torch.bfloat16)[:, None], emb.sin().to(torch.bfloat16)[:, None]  # [T, 1, D]
    rope_mod.NATIVE = False
    want_q, want_k = apply_rotary(q, k, (cos, sin))
    rope_mod.NATIVE = None
    got_q, got_k = apply_rotary(q, k, (cos, sin))
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(layer_ops_native.rotary(q, cos, sin), _rotate(q, cos, sin))
    # and torch's bf16 formulation is itself within bf16 rounding of float64
    ref = q.double() * cos.double() + torch.cat((-q[..., dim // 2:], q[..., :dim // 2]), -1).double() * sin.double()
    assert (got_q.double() - ref).abs().max() <= 3 * _bf16_step(ref).max()


def test_bf16_model_logits_same_with_and_without_compiled_ops(tiny_model_dir):
    """A bf16 model step with the compiled norm/rotary against the torch ops: within bf16 noise."""
    from loraplex.model.loader import load_model
    from tests.fixtures.engine_run import engine_greedy

    loaded = load_model(tiny_model_dir, torch.bfloat16, "cpu")
    jobs = {"a": (None, [1, 5, 9, 13, 2, 8, 8, 3]), "b": (None, [3, 4]), "c": (None, [7] * 11)}
    runs = []
    for flag in (False, None):
        norm_mod.NATIVE = rope_mod.NATIVE = flag
        runs.append(engine_greedy(loaded, None, jobs, max_new_tokens=8))
    assert all(err is None and len(toks) == 8 for toks, err in runs[1].values())
    same = sum(runs[0][k][0] == runs[1][k][0] for k in jobs)
    assert same >= 2, runs  # one bf16 step in a norm may flip a near-tie, not whole runs


@pytest.mark.parametrize("tokens", [1, 9, 40])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 16), (2, 1, 80)])
def test_rotary_and_cache_write_in_one_pass(tokens, heads, kv_heads, dim):
    """attention.rotate_and_write_kv through rotary.c's one pass == apply_rotary + write_kv, bit
    for bit: the rotated q and k it returns and both caches (every slot, not only the written
    ones); q/k/v column views of one GEMM's output, slots scattered over the blocks."""
    from loraplex.model import attention as attn

    g = torch.Generator().manual_seed(tokens * 13 + dim)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g) * 2).to(torch.bfloat16)
    q = qkv[:, :heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim:].view(tokens, kv_heads, dim)
    ang = torch.rand(tokens, dim, generator=g) * 500
    cos_sin = (ang.cos().to(torch.bfloat16)[:, None], ang.sin().to(torch.bfloat16)[:, None])
    slots = torch.randperm(8 * 16, generator=g)[:tokens]
    caches = [torch.randn(8, 16, kv_heads, dim, generator=g).to(torch.bfloat16) for _ in range(2)]
    results = []
    before = attn.NATIVE_ROTARY_KV
    try:
        for flag in (False, None):
            attn.NATIVE_ROTARY_KV = flag
            kc, vc = (c.clone() for c in caches)
            results.append((*attn.rotate_and_write_kv(q, k, v, cos_sin, kc, vc, slots), kc, vc))
    finally:
        attn.NATIVE_ROTARY_KV = before
    for want, got in zip(*results):
        assert torch.equal(want, got)
    assert not torch.equal(results[1][2], caches[0])  # the slots were written


def test_rotary_and_cache_write_refuses_a_bad_slot():
    """A slot outside the cache raises and writes nothing (as index_copy_ would refuse)."""
    q, k, v = (torch.randn(2, h, 16).to(torch.bfloat16) for h in (2, 1, 1))
    cos = sin = torch.ones(2, 1, 16, dtype=torch.bfloat16)
    kc, vc = torch.zeros(2, 4, 1, 16, dtype=torch.bfloat16), torch.zeros(2, 4, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(IndexError, match="slot"):
        layer_ops_native.rotary_kv(q, k, v, cos, sin, kc, vc, torch.tensor([3, 8]))
    assert not kc.any() and not vc.any()


@pytest.mark.parametrize(("tokens", "heads", "dim"), [(1, 4, 16), (7, 16, 128), (33, 8, 64)])
def test_rmsnorm_per_head_matches_torch_and_float64(tokens, heads, dim):
    """Qwen3's per-head q/k norms ([T, H, D] views of the fused q/k/v output, token stride wider
    than H * D) through rmsnorm.c: as close to torch and float64 as the 2-D rows (one bfloat16
    step at most), the same bits as rms_norm on the heads laid out as rows, and the module takes
    that path for bfloat16 3-D input."""
    g = torch.Generator().manual_seed(tokens * 7 + dim)
    wide = (torch.randn(tokens, heads * dim + 32, generator=g) * 3).to(torch.bfloat16)
    x = wide[:, 16:16 + heads * dim].view(tokens, heads, dim)
    norm = _random_norm(dim, 1e-6, g)
    norm_mod.NATIVE = False
    want = norm(x)
    got = layer_ops_native.rms_norm_heads(x, norm.weight, 1e-6)
    assert got.is_contiguous()
    _assert_like_torch_norm(got, want, x, norm.weight.detach(), 1e-6)
    rows = layer_ops_native.rms_norm(x.reshape(-1, dim), norm.weight, 1e-6)
    assert torch.equal(got.view(-1, dim), rows)
    norm_mod.NATIVE = None
    assert torch.equal(norm(x), got)
