"""LoRA weights of projections that read the same input (q/k/v; gate/up), applied in one pass.

The members' A matrices share one tensor [slots, R, M, in] with ranks interleaved: a slot's first
w ranks of ALL members are then one contiguous [w * M, in] block, so the CPU backend shrinks x
against every member at once (one matmul of width M * w where three would each pay a small-GEMM
start-up and a gather of x) and expands per member (loraplex_kernels.add_lora_multi). Each member
is an ordinary LoraWeights whose A and scales are views into the group, so slot writes, the
untargeted-module skip and byte counts work per module exactly as for a standalone projection.
"""

from __future__ import annotations

import torch

from loraplex_kernels import BoundLora

from .layers import LoraWeights


class LoraGroup:
    def __init__(self, num_slots: int, max_rank: int, in_features: int, out_features: list[int],
                 dtype: torch.dtype, device: torch.device | str):
        m = len(out_features)
        self.A = torch.zeros(num_slots, max_rank, m, in_features, dtype=dtype, device=device)  # [slots, R, M, in]
        self.scales = torch.zeros(num_slots, m, dtype=torch.float32, device=device)  # [slots, M]
        self.members = [
            LoraWeights(num_slots, max_rank, in_features, out, dtype, device,
                        A=self.A[:, :, i], scales=self.scales[:, i], group=self)
            for i, out in enumerate(out_features)
        ]
        self._op = BoundLora(self.A, [w.B for w in self.members], self.scales)

    def apply(self, ys: list[torch.Tensor], x: torch.Tensor, lora) -> None:
        """ys[m] [T, out_m] += member m's per-token LoRA delta of x [T, in], for the members some
        adapter of the step targets (the others' deltas are exactly zero)."""
        targeted = tuple(i for i, w in enumerate(self.members) if w.targeted(lora))
        if targeted:
            self._op(ys, x, lora.meta, targeted)
