"""LoRA weights of one projection for every device slot, applied with the batched kernel.

One LoraWeights lives in each Projection (model/linear.py) once a LoraManager is attached. It holds
the A/B matrices of all slots stacked, so one `add_lora` call serves every adapter of the batch.
Rows of A (columns of B) beyond an adapter's rank for this module stay zero: an adapter whose
rank_pattern gives this module a smaller rank than its maximum, or that does not target this module
at all, then contributes exactly nothing here, whatever rank the kernel metadata carries.

Layout: B is kept rank-major, Bt [slots, R, out], and handed to the kernel as the [slots, out, R]
view the contract names: one slot's first r ranks are then one contiguous block, which the CPU
kernel reads row by row in place (and the torch fallback gathers with a memcpy per row; a [out, r]
column slice of [out, R] is `out` strided pieces, ~8x slower), and Triton reads B rows along `out`
coalesced. The dtype is the backend's choice (loraplex_kernels.slot_weight_dtype): the model's,
or float32 for the CPU torch fallback.
"""

from __future__ import annotations

import torch

from loraplex_kernels import BoundLora


class LoraWeights:
    def __init__(self, num_slots: int, max_rank: int, in_features: int, out_features: int,
                 dtype: torch.dtype, device: torch.device | str,
                 A: torch.Tensor | None = None, scales: torch.Tensor | None = None, group=None):
        """`A`/`scales`/`group`: this module is a member of a LoraGroup (lora/group.py), whose
        storage these views point into; None: standalone, with its own storage."""
        if A is None:
            A = torch.zeros(num_slots, max_rank, in_features, dtype=dtype, device=device)
        if scales is None:
            scales = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.A = A  # [slots, R, in] (a strided view for a group member)
        self.Bt = torch.zeros(num_slots, max_rank, out_features, dtype=dtype, device=device)  # [slots, R, out]
        self.scales = scales  # [slots] float32
        self.group = group  # LoraGroup | None: projections reading the same x, applied together
        # Slots whose adapter targets this module. A step whose adapters all skip this module
        # (e.g. q,k,v,o adapters at gate/up/down) then costs nothing here instead of a kernel
        # call on zero weights; plain Python ints, so the check needs no device sync.
        self._filled: set[int] = set()
        # Rank rows per slot that may hold non-zeros (rows beyond stay zero). A slot write then
        # zeroes only what the previous adapter left beyond the new rank, and a module the new
        # adapter skips costs nothing if the slot is already clean: evictions write ~half the bytes.
        self._dirty_rows = [0] * num_slots
        # The kernel bound to these slot tensors (shapes checked once, not per call).
        self._op = None if group is not None else BoundLora(self.A.unsqueeze(2), [self.B], self.scales.unsqueeze(1))

    def set_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scale: float) -> None:
        """Write one adapter's weights for this module into `slot` (None: the adapter skips it)."""
        r = 0 if A is None or B is None else A.shape[0]  # A: [r, in], B: [out, r]
        dirty = self._dirty_rows[slot]
        if dirty > r:
            self.A[slot, r:dirty].zero_()
            self.Bt[slot, r:dirty].zero_()
        self._dirty_rows[slot] = r
        if r == 0:
            self.scales[slot] = 0.0
            self._filled.discard(slot)
            return
        self._filled.add(slot)
        self.A[slot, :r].copy_(A, non_blocking=True)
        self.Bt[slot, :r].copy_(B.T, non_blocking=True)
        self.scales[slot] = scale

    def clear_slot(self, slot: int) -> None:
        self.set_slot(slot, None, None, 0.0)

    @property
    def B(self) -> torch.Tensor:
        """[slots, out, R]: the kernel contract's B, a view of Bt."""
        return self.Bt.transpose(1, 2)

    def targeted(self, lora) -> bool:
        """Does any adapter of this step target this module? (else its delta is exactly zero)"""
        filled = self._filled
        return any(s in filled for b in lora.meta.buckets for s in b.group_slot_ids)

    def apply(self, y: torch.Tensor, x: torch.Tensor, lora) -> None:
        """y [T, out] += per-token LoRA delta of x [T, in]; lora is the step's LoraBatch."""
        if self.targeted(lora):
            if self._op is None:  # a group member applied on its own
                self._op = BoundLora(self.A.unsqueeze(2), [self.B], self.scales.unsqueeze(1))
            self._op([y], x, lora.meta, (0,))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.Bt, self.scales))
