"""The compiled row-wise layer ops (rmsnorm.c, rotary.c) as Python calls.

On a CPU decode step the model's small elementwise ops -- RMSNorm's ~8 torch ops, rotary's ~6 per
tensor -- are ~600 torch calls whose fixed cost is a visible share of the step (the GEMMs are
what is left). Each op here is one C pass over the rows. The model (model/norm.py, model/rope.py)
uses them for bfloat16 CPU tensors when the library is built (`supports`), else its torch
formulation. Rotary is bit-identical to torch's (but for float32 denormals, flushed to zero on
AVX-512 BF16 CPUs); RMSNorm's variance is summed in another order
(a result can differ by one bfloat16 step), checked against float64.

(SwiGLU's silu * up was tried as a C pass too: no faster than torch's vectorised ops, so not kept.)
"""

from __future__ import annotations

import ctypes

import torch

from . import native

_I64 = ctypes.c_int64
_P = ctypes.c_void_p

def supports(*tensors: torch.Tensor) -> bool:
    """bfloat16 CPU tensors with contiguous last dims, and the library built."""
    for t in tensors:  # a loop, not all(<genexpr>): asked ~120 times a decode step
        if t.dtype != torch.bfloat16 or not t.is_cpu or t.stride(-1) != 1:
            return False
    return native.available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, dim] (rows may be strided), weight [dim] -> [T, dim] contiguous."""
    rows, dim = x.shape
    w = weight.contiguous()
    if w.shape != (dim,):
        raise ValueError(f"weight {tuple(w.shape)} for rows of {dim}")
    out = torch.empty(rows, dim, dtype=x.dtype)
    native.function("loraplex_rmsnorm_bf16", [_I64, _I64, _P, _I64, _P, ctypes.c_float, _P, _I64])(
        rows, dim, x.data_ptr(), x.stride(0), w.data_ptr(), eps, out.data_ptr(), out.stride(0))
    return out


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H, dim] (token and head strides any, dim contiguous), weight [dim] -> [T, H, dim]
    contiguous: every head of every token normalised on its own (Qwen3's q/k norms), the same
    per-row arithmetic as rms_norm."""
    tokens, heads, dim = x.shape
    w = weight.contiguous()
    if w.shape != (dim,):
        raise ValueError(f"weight {tuple(w.shape)} for heads of {dim}")
    out = torch.empty(tokens, heads, dim, dtype=x.dtype)
    native.function("loraplex_rmsnorm_heads_bf16",
                    [_I64, _I64, _I64, _P, _I64, _I64, _P, ctypes.c_float, _P, _I64, _I64])(
        tokens, heads, dim, x.data_ptr(), x.stride(0), x.stride(1), w.data_ptr(), eps, out.data_ptr(),
        heads * dim, dim)
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] (head dim contiguous), cos/sin [T, 1, D] or [T, D] -> rotated [T, H, D]."""
    tokens, heads, dim = x.shape
    cos2, sin2 = cos.reshape(tokens, dim), sin.reshape(tokens, dim)
    if dim % 2 or cos2.stride() != sin2.stride() or cos2.stride(1) != 1:
        raise ValueError("rotary needs an even head dim and cos/sin rows of one contiguous layout")
    out = torch.empty(tokens, heads, dim, dtype=x.dtype)
    native.function("loraplex_rotary_bf16", [_I64, _I64, _I64, _P, _I64, _I64, _P, _P, _I64, _P])(
        tokens, heads, dim, x.data_ptr(), x.stride(0), x.stride(1), cos2.data_ptr(), sin2.data_ptr(),
        cos2.stride(0), out.data_ptr())
    return out


def rotary_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
              k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k / v [T, Hkv, D] (head dims contiguous), cos/sin [T, 1, D] or [T, D], caches
    [num_blocks, block_size, Hkv, D] contiguous, slots [T] int64 flat cache slots ->
    (rotary(q), rotary(k)); the caches' slots get rotary(k) and v -- bfloat16 caches as they are,
    int8 caches quantized per head with their scales in k_scale / v_scale [num_blocks, block_size,
    Hkv] float32 contiguous (model/kv_quant.py's bits). One C pass (rotary.c)."""
    tokens, hq, dim = q.shape
    hkv = k.shape[1]
    cos2, sin2 = cos.reshape(tokens, dim), sin.reshape(tokens, dim)
    if dim % 2 or cos2.stride() != sin2.stride() or cos2.stride(1) != 1:
        raise ValueError("rotary needs an even head dim and cos/sin rows of one contiguous layout")
    if (k.shape != (tokens, hkv, dim) or v.shape != k.shape or k_cache.shape[-2:] != (hkv, dim)
            or v_cache.shape != k_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous())
            or k_cache.dtype not in (q.dtype, torch.int8) or v_cache.dtype != k_cache.dtype):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit the caches "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)} ({k_cache.dtype})")
    if slots.shape != (tokens,) or slots.dtype != torch.int64 or not slots.is_contiguous():
        raise ValueError(f"slots must be contiguous int64 [{tokens}], got {slots.dtype} {tuple(slots.shape)}")
    q_out = torch.empty(tokens, hq, dim, dtype=q.dtype)
    k_out = torch.empty(tokens, hkv, dim, dtype=q.dtype)
    num_slots = k_cache.numel() // (hkv * dim)
    kv_code, ks_ptr, vs_ptr = native.kv_operands(k_cache, v_cache, k_scale, v_scale)
    rc = native.function("loraplex_rotary_kv_bf16", [_I64] * 4 + [_P, _I64, _I64] * 3 + [_P, _P, _I64] + [_P] * 4
                         + [ctypes.c_int, _P, _P, _I64, _P])(
        tokens, hq, hkv, dim, q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
        v.data_ptr(), v.stride(0), v.stride(1), cos2.data_ptr(), sin2.data_ptr(), cos2.stride(0),
        q_out.data_ptr(), k_out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        kv_code, ks_ptr, vs_ptr,
        num_slots, slots.data_ptr())
    if rc != 0:
        raise IndexError(f"a KV slot is outside the cache's {num_slots} slots")
    return q_out, k_out
