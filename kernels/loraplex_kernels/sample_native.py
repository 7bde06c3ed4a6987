"""sample_rows.c as a Python call: one token per row drawn from softmax(logits / T) cut to top-k
and top-p, by inverse CDF from a uniform number per row (engine/sampler.py's non-greedy rows)."""

from __future__ import annotations

import ctypes

import torch

from . import native

_I64 = ctypes.c_int64
_P = ctypes.c_void_p


def supports(logits: torch.Tensor) -> bool:
    """A 2-D float32 CPU tensor with contiguous rows and at least one column; kernels built."""
    return (logits.dim() == 2 and logits.dtype == torch.float32 and logits.is_cpu and logits.shape[1] > 0
            and logits.stride(1) == 1 and native.available())


def sample(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """logits [S, V] float32 (see supports); rows [R] int64 (which rows to draw), temperature [R]
    float32 > 0, top_k [R] int64 (0 = off), top_p [R] float32 in (0, 1] (1 = off), uniform [R]
    float32 in [0, 1) -> [R] int64 tokens (sample_rows.c documents the draw)."""
    if not supports(logits):
        raise ValueError(f"sample takes a 2-D float32 CPU tensor with contiguous rows, got {logits.dtype} "
                         f"{tuple(logits.shape)} on {logits.device}")
    n = rows.shape[0]
    ops = {"rows": (rows, torch.int64), "temperature": (temperature, torch.float32), "top_k": (top_k, torch.int64),
           "top_p": (top_p, torch.float32), "uniform": (uniform, torch.float32)}
    for name, (t, dtype) in ops.items():
        if t.shape != (n,) or t.dtype != dtype or not t.is_cpu or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} CPU tensor [{n}], got {t.dtype} {tuple(t.shape)}")
    if n and (int(rows.min()) < 0 or int(rows.max()) >= logits.shape[0]):
        raise ValueError(f"rows must index the {logits.shape[0]} rows of logits")
    out = torch.empty(n, dtype=torch.int64)
    rc = native.function("loraplex_sample_rows", [_I64, _I64, _P, _I64, _P, _P, _P, _P, _P, _P])(
        n, logits.shape[1], logits.data_ptr(), logits.stride(0), rows.data_ptr(), temperature.data_ptr(),
        top_k.data_ptr(), top_p.data_ptr(), uniform.data_ptr(), out.data_ptr())
    if rc == -2:
        raise ValueError("sample: temperature must be > 0, top_p in (0, 1] and uniform in [0, 1)")
    if rc != 0:
        raise MemoryError(f"loraplex_sample_rows failed ({rc}): out of scratch memory")
    return out
