"""Which implementation add_lora dispatches to: chosen once at start-up, then left alone.

"reference" (float64 per-token loop, tests), "cpu" (cpu.py), "triton" (triton_shrink_expand.py,
CUDA; or any device under TRITON_INTERPRET=1). Triton is imported only when its backend is chosen,
so the package imports on machines without it.
"""

from __future__ import annotations

from typing import Callable

import torch

BACKENDS = ("reference", "cpu", "triton")

_current: str | None = None
_impl: Callable | None = None


def default_backend() -> str:
    """"triton" when CUDA and triton are both there, else "cpu"."""
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
        except ImportError:
            return "cpu"
        return "triton"
    return "cpu"


def slot_weight_dtype(model_dtype: torch.dtype, backend: str | None = None) -> torch.dtype:
    """The dtype to keep adapter slot weights (A, B) in for `backend` (default: the selected one).

    The model's dtype, except on the cpu backend without its compiled kernel (native.py: no C
    compiler, or LORAPLEX_NATIVE_KERNELS=0): then float32, because the torch fallback's work on
    decode shapes is a handful of tiny matmuls and gathers whose cost is fixed overhead, and on
    CPUs without AMX a bfloat16 [32, 576] x [576, 8] bmm costs ~3-4x a float32 one
    (benchmarks/results/kernels_cpu.md); upcasting bf16/fp16 adapter weights is exact, at twice
    the slot memory. The compiled kernel reads bfloat16 weights directly (half the bytes from
    memory, which is what a decode step's LoRA call waits on) and sums in float32.
    """
    name = backend if backend is not None else get_backend()
    if name == "cpu" and model_dtype in (torch.bfloat16, torch.float16):
        from . import native

        if model_dtype == torch.bfloat16 and native.available():
            return torch.bfloat16
        return torch.float32
    return model_dtype


def load_impl(name: str) -> Callable:
    """The add_lora implementation of backend `name` (imports triton for "triton")."""
    if name == "reference":
        from .reference import add_lora_reference

        return add_lora_reference
    if name == "cpu":
        from .cpu import add_lora_cpu

        return add_lora_cpu
    if name == "triton":
        from .triton_shrink_expand import add_lora_triton

        return add_lora_triton
    raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")


def set_backend(name: str) -> None:
    """Select the backend for every later add_lora call (call at start-up)."""
    global _current, _impl
    _impl = load_impl(name)
    _current = name


def get_backend() -> str:
    """The selected backend's name; picks default_backend() on first use."""
    if _current is None:
        set_backend(default_backend())
    return _current  # type: ignore[return-value]


def current_impl() -> Callable:
    if _impl is None:
        get_backend()
    return _impl  # type: ignore[return-value]
