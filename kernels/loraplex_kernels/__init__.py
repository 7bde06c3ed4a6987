"""Batched multi-LoRA kernels: one call applies every adapter of a mixed batch.

    meta = build_lora_meta(idx, ranks)        # once per step (the step's one host sync)
    add_lora(y, x, A, B, scales, meta)        # per LoRA-targeted projection, in place
    set_backend("cpu" | "triton" | "reference")  # once at start-up; get_backend() reports it
"""

from __future__ import annotations

import torch

from .backend import BACKENDS, current_impl, default_backend, get_backend, set_backend, slot_weight_dtype
from .meta import LoraMeta, RankBucket, build_lora_meta

__all__ = [
    "BACKENDS", "LoraMeta", "RankBucket", "add_lora", "build_lora_meta", "default_backend",
    "get_backend", "set_backend", "slot_weight_dtype",
]


def add_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             scales: torch.Tensor, meta: LoraMeta) -> None:
    """Add every token's own LoRA delta to y, in place, for all adapters of the batch at once.

    Semantics:
        # T tokens, slots adapter slots, R = max_rank (rows of A beyond a slot's rank are ignored)
        # y:      [T, out]            x: [T, in]           (same dtype; y may be a column-slice view)
        # A:      [slots, R, in]      B: [slots, out, R]   (x's dtype, or float32 with a bf16 model)
        # scales: [slots] float32     meta = build_lora_meta(idx [T] int64, ranks [slots] int)
        for t in range(T):
            s = idx[t]
            if s < 0:
                continue                         # base-model row: y[t] is not touched
            r = ranks[s]
            y[t] += scales[s] * (x[t] @ A[s, :r, :].T) @ B[s, :, :r].T

    No work at all when no row has an adapter. Values of A/B beyond a slot's rank may be anything
    finite (they are masked out, not multiplied by zero-padding you must provide). Computation is in
    A's dtype with float32 accumulation where the backend allows (see each backend's module).
    """
    if not meta.has_lora:  # no-LoRA fast path: one attribute read
        return
    T = meta.num_tokens
    if x.shape[0] != T or y.shape[0] != T:
        raise ValueError(f"x {tuple(x.shape)} / y {tuple(y.shape)} do not have the meta's {T} rows")
    slots, max_rank, d_in = A.shape
    if x.shape[1] != d_in or B.shape != (slots, y.shape[1], max_rank):
        raise ValueError(
            f"shapes do not match: x {tuple(x.shape)}, y {tuple(y.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    if slots != meta.num_slots or scales.shape != (slots,):
        raise ValueError(f"A has {slots} slots, meta {meta.num_slots}, scales {tuple(scales.shape)}")
    if meta.max_rank > max_rank:
        raise ValueError(f"an active slot has rank {meta.max_rank} > A's max_rank {max_rank}")
    current_impl()(y, x, A, B, scales, meta)
