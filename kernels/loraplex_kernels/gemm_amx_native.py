"""The AMX bfloat16 GEMM (gemm_amx.c) as Python calls: the K-pair panel layout and y = x @ W.T.

Used by model/amx_linear.py for bfloat16 projections on CPUs with AMX-BF16; see gemm_amx.c for
why and for the layout.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import native

_I64 = ctypes.c_int64
_P = ctypes.c_void_p
PANEL = 16  # output columns per panel
DEPTH = 32  # K per AMX tile slice


@functools.cache
def available() -> bool:
    """The library is built with AMX (a CPU with AMX-BF16 and a compiler that knows it) and the
    kernel gave this process the tiles (Linux >= 5.16 asks for that)."""
    if not native.available():
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    if "amx_bf16" not in flags or "amx_tile" not in flags:
        return False
    return native.function("loraplex_amx_enable", [])() == 0


def supports_shape(n: int, k: int) -> bool:
    """Whole panels and whole tile slices: N a multiple of 16, K of 32."""
    return n > 0 and k > 0 and n % PANEL == 0 and k % DEPTH == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] bfloat16 -> K-pair panels [N / 16, K / 2, 16, 2]: [nb, kp, c, j] = W[16 nb + c, 2 kp + j]."""
    n, k = weight.shape
    if weight.dtype != torch.bfloat16 or not supports_shape(n, k):
        raise ValueError(f"AMX panels take a bfloat16 [N, K] weight with N % 16 == 0 and K % 32 == 0, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    return weight.reshape(n // PANEL, PANEL, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def unpack(panels: torch.Tensor) -> torch.Tensor:
    """The inverse of pack: [N / 16, K / 2, 16, 2] -> W [N, K] (exact)."""
    nb, kp, c, two = panels.shape
    return panels.permute(0, 2, 1, 3).reshape(nb * c, kp * two)


# gemm_amx.c's epilogues (what a call writes from its float32 sums)
PLAIN, RESIDUAL, SWIGLU, FLOAT, ARGMAX = 0, 1, 2, 3, 4


def _check(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, int]:
    """(m, n, k) of y = x @ W.T for operands the kernel takes; ValueError otherwise."""
    if not available():  # also what enables the tiles for this process: never run them before
        raise RuntimeError("the AMX GEMM is unavailable on this machine (gemm_amx_native.available())")
    m, k = x.shape
    nb, kp, c, two = panels.shape
    n = nb * c
    if (c, two) != (PANEL, 2) or kp * 2 != k or panels.dtype != torch.bfloat16 or not panels.is_contiguous():
        raise ValueError(f"x {tuple(x.shape)} and panels {tuple(panels.shape)} do not fit")
    if x.dtype != torch.bfloat16 or not x.is_cpu or x.stride(1) != 1:
        raise ValueError(f"x must be bfloat16 on CPU with contiguous rows, got {x.dtype} on {x.device}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous bfloat16 [{n}], got {bias.dtype} {tuple(bias.shape)}")
    return m, n, k


def _run(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, mode: int,
         residual: torch.Tensor | None) -> torch.Tensor:
    m, n, k = x.shape[0], panels.shape[0] * PANEL, x.shape[1]
    rc = native.function("loraplex_amx_gemm_epilogue",
                         [_I64, _I64, _I64, _P, _I64, _P, _P, _P, _I64, ctypes.c_int, _P, _I64])(
        m, n, k, x.data_ptr(), x.stride(0), panels.data_ptr(), None if bias is None else bias.data_ptr(),
        y.data_ptr(), y.stride(0), mode, None if residual is None else residual.data_ptr(),
        0 if residual is None else residual.stride(0))
    if rc != 0:
        raise RuntimeError(f"loraplex_amx_gemm_epilogue failed ({rc}): AMX not enabled (-1), bad shape (-2), "
                           f"not built (-3), out of memory (-4)")
    return y


def gemm(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bfloat16 (rows may be strided, K contiguous) @ W.T (+ bias [N]) -> [M, N] bfloat16.
    With `residual` [M, N] (rows may be strided): residual + that, rounded as torch rounds
    `residual + linear(x)` in bfloat16 (bit-identical), in the same pass."""
    m, n, _ = _check(x, panels, bias)
    if residual is not None and (residual.shape != (m, n) or residual.dtype != torch.bfloat16
                                 or not residual.is_cpu or residual.stride(1) != 1):
        raise ValueError(f"residual must be bfloat16 [{m}, {n}] on CPU with contiguous rows, "
                         f"got {residual.dtype} {tuple(residual.shape)}")
    y = torch.empty(m, n, dtype=torch.bfloat16)
    return _run(x, panels, bias, y, PLAIN if residual is None else RESIDUAL, residual)


def gemm_float(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """gemm(x, panels, bias).float() [M, N] float32, bit for bit, written in the GEMM's own pass."""
    m, n, _ = _check(x, panels, bias)
    y = torch.empty(m, n, dtype=torch.float32)
    return _run(x, panels, bias, y, FLOAT, None)


def gemm_argmax(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch.argmax(gemm_float(x, panels, bias), dim=-1) [M] int64 -- each row's first index of its
    largest value, NaN counting as largest -- without writing the [M, N] float32 result (the
    ARGMAX epilogue): a greedy decode step's tokens from the vocab projection."""
    m, _, _ = _check(x, panels, bias)
    y = torch.empty(m, dtype=torch.int64)
    return _run(x, panels, bias, y, ARGMAX, None)


def swiglu(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W = [W_gate; W_up] as one panel set of 2 I columns (I % 16 == 0): x [M, K] ->
    silu(gate) * up [M, I] bfloat16, each op rounded like torch's on bfloat16 tensors, with our
    exp inside silu (a result can differ from torch's by one bfloat16 step)."""
    m, n, _ = _check(x, panels, bias)
    if n % (2 * PANEL):
        raise ValueError(f"SwiGLU panels need two halves of whole panels, got {n} columns")
    y = torch.empty(m, n // 2, dtype=torch.bfloat16)
    return _run(x, panels, bias, y, SWIGLU, None)
