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


def gemm_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bfloat16, weight [N, K] bfloat16, bias [N] or None -> [M, N] bfloat16."""
    m, k = x.shape
    n, k2 = weight.shape
    if k != k2:
        raise ValueError(f"x has {k} columns, weight {tuple(weight.shape)} expects {k2}")
    if bias is not None:
        if bias.shape != (n,) or bias.dtype != torch.bfloat16:
            raise ValueError(f"bias must be bfloat16 [{n}], got {bias.dtype} {tuple(bias.shape)}")
        bias = bias.contiguous()
    y = torch.empty(m, n, dtype=torch.bfloat16)
    rc = native.function("loraplex_gemm_bf16", [_I64, _I64, _I64, _P, _I64, _P, _I64, _P, _P, _I64])(
        m, n, k, x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0),
        None if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0))
    if rc != 0:
        raise MemoryError("gemm_bf16: out of scratch memory")
    return y
