"""argmax.c as a Python call: each row's first index of its largest value (NaN largest), as
torch.argmax answers, for the sampler's greedy pick on CPU."""

from __future__ import annotations

import ctypes

import torch

from . import native

_I64 = ctypes.c_int64
_P = ctypes.c_void_p


def supports(x: torch.Tensor) -> bool:
    """A 2-D float32 CPU tensor with contiguous rows and at least one column; library built."""
    return (x.dim() == 2 and x.dtype == torch.float32 and x.is_cpu and x.shape[1] > 0 and x.stride(1) == 1
            and native.available())


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [S, V] float32 (see supports) -> [S] int64."""
    if not supports(x):
        raise ValueError(f"argmax takes a 2-D float32 CPU tensor with contiguous rows, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    out = torch.empty(x.shape[0], dtype=torch.int64)
    native.function("loraplex_argmax_f32", [_I64, _I64, _P, _I64, _P])(
        x.shape[0], x.shape[1], x.data_ptr(), x.stride(0), out.data_ptr())
    return out
