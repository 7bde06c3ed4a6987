"""The compiled bfloat16 GEMM (gemm_bf16.c) as a Python call: y = x @ W.T (+ bias) in float32 math.

Used by the model's bfloat16 projections on CPUs where torch's bfloat16 matmul is emulated
(model/stream_linear.py decides where); see gemm_bf16.c for why and how.
"""

from __future__ import annotations

import ctypes

import torch

from . import native

_I64 = ctypes.c_int64
_P = ctypes.c_void_p


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bfloat16 CPU operands with contiguous rows, and the library built."""
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.dim() == 2 and weight.dim() == 2
            and x.stride(-1) == 1 and weight.stride(-1) == 1 and native.available())


def supports_input(x: torch.Tensor) -> bool:
    """x is a 2-d bfloat16 CPU tensor with contiguous rows, and the library built."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2 and x.stride(-1) == 1
            and native.available())


def _checked_bias(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """bias [n] bfloat16, contiguous (or None)."""
    if bias is None:
        return None
    if bias.shape != (n,) or bias.dtype != torch.bfloat16:
        raise ValueError(f"bias must be bfloat16 [{n}], got {bias.dtype} {tuple(bias.shape)}")
    return bias.contiguous()


def gemm_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bfloat16, weight [N, K] bfloat16, bias [N] or None -> [M, N] bfloat16."""
    m, k = x.shape
    n, k2 = weight.shape
    if k != k2:
        raise ValueError(f"x has {k} columns, weight {tuple(weight.shape)} expects {k2}")
    bias = _checked_bias(bias, n)
    y = torch.empty(m, n, dtype=torch.bfloat16)
    rc = native.function("loraplex_gemm_bf16", [_I64, _I64, _I64, _P, _I64, _P, _I64, _P, _P, _I64])(
        m, n, k, x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0),
        None if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0))
    if rc != 0:
        raise MemoryError("gemm_bf16: out of scratch memory")
    return y


PANEL = 16  # columns per panel (gemm_panels.c NR)


def panel_shape(n: int, k: int) -> tuple[int, int, int]:
    """Shape of W [n, k] packed into panels: [ceil(n / 16), k rounded up to 8, 16]."""
    return -(-n // PANEL), -(-k // 8) * 8, PANEL


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """W [n, k] bfloat16 (rows may be strided) -> bfloat16 panels [ceil(n/16), kpad, 16], the
    layout gemm_panels reads (zero-padded). Exact: a rearrangement of the same values."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"pack_panels takes a 2-d bfloat16 CPU weight with contiguous rows, got "
                         f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
    n, k = weight.shape
    out = torch.empty(panel_shape(n, k), dtype=torch.bfloat16)
    native.function("loraplex_pack_panels", [_I64, _I64, _P, _I64, _P])(
        n, k, weight.data_ptr(), weight.stride(0), out.data_ptr())
    return out


def unpack_panels(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The dense [n, k] weight back from its panels (exact)."""
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:n, :k].contiguous()


def gemm_panels(x: torch.Tensor, packed: torch.Tensor, n: int, k: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, k] bfloat16 (rows may be strided) @ W.T (+ bias) -> [M, n] bfloat16, W given as
    pack_panels(W) of shape panel_shape(n, k)."""
    m, k2 = x.shape
    if k2 != k or tuple(packed.shape) != panel_shape(n, k) or packed.dtype != torch.bfloat16 \
            or not packed.is_contiguous():
        raise ValueError(f"x {tuple(x.shape)} and panels {tuple(packed.shape)} do not fit a [{n}, {k}] weight")
    bias = _checked_bias(bias, n)
    y = torch.empty(m, n, dtype=torch.bfloat16)
    rc = native.function("loraplex_gemm_panels", [_I64, _I64, _I64, _P, _I64, _P, _P, _P, _I64])(
        m, n, k, x.data_ptr(), x.stride(0), packed.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0))
    if rc != 0:
        raise MemoryError("gemm_panels: out of scratch memory")
    return y
