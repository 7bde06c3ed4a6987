"""argmax.c as a Python call: each row's first index of its largest value (NaN largest), as
torch.argmax answers, for the sampler's greedy pick on CPU."""

from __future__ import annotations

import ctypes
import functools

import torch

from . import native

_I64 = ctypes.c_int64
_P = ctypes.c_void_p


@functools.cache
def available() -> bool:
    """The library is built with the kernel (AVX-512; elsewhere torch.max is as fast)."""
    return native.available() and native.function("loraplex_argmax_available", [])() == 1


def supports(x: torch.Tensor) -> bool:
    """A 2-D float32 CPU tensor with contiguous rows and at least one column; kernel built."""
    return (x.dim() == 2 and x.dtype == torch.float32 and x.is_cpu and x.shape[1] > 0 and x.stride(1) == 1
            and available())


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [S, V] float32 (see supports) -> [S] int64."""
    if not supports(x):
        raise ValueError(f"argmax takes a 2-D float32 CPU tensor with contiguous rows, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    out = torch.empty(x.shape[0], dtype=torch.int64)
    native.function("loraplex_argmax_f32", [_I64, _I64, _P, _I64, _P])(
        x.shape[0], x.shape[1], x.data_ptr(), x.stride(0), out.data_ptr())
    return out


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """[S, V] -> [S] int64: each row's index of its largest value, the first one on ties (NaN
    counts as largest), exactly torch.argmax's answer: the sampler's greedy pick and the model's
    token when it cannot fuse one (llama.output_argmax). On CPU float32 rows through our compiled
    kernel (argmax.c), else torch.max's indices (vectorised on CPU where
    argmax's reduction is not): on a 2-core Xeon (AMX) [32, 49152] float32 takes ~0.45-0.9 ms
    with torch.max, a few percent of a 32-sequence decode step."""
    if supports(x):
        return argmax(x)
    return torch.max(x, dim=-1).indices
