"""Projection: one linear layer of the model, with a hook for the batched multi-LoRA delta.

The model's q/k/v/o and gate/up/down layers are Projections named exactly like HF's modules
(`model.layers.{i}.self_attn.q_proj`, ...), so PEFT adapter keys map onto them 1:1.
`base` does the base-model matmul (nn.Linear today; a quantized layer may replace it), and the
LoRA side installs `lora_weights` (loraplex.lora.layers.PoolMember) to add its delta in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraplex.model.amx_linear import AmxLinear
from loraplex.model.fused_linear import group_outputs


class Projection(nn.Module):
    def __init__(self, base: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base = base  # maps [T, in_features] -> [T, out_features]
        self.in_features = in_features
        self.out_features = out_features
        self.lora_weights: Any = None  # PoolMember | None, set by the LoRA manager

    @classmethod
    def linear(cls, in_features: int, out_features: int, bias: bool = False,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Projection":
        return cls(nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device),
                   in_features, out_features)

    def forward(self, x: torch.Tensor, lora: Any = None) -> torch.Tensor:
        y = self.base.forward(x)  # [T, out]; .forward: see LlamaForCausalLM.forward
        # No LoRA work at all when no token of the step uses an adapter (lora is None) or when
        # this module is not targeted by any loaded adapter (lora_weights is None).
        if lora is not None and self.lora_weights is not None:
            self.lora_weights.apply(y, x, lora)
        return y

    def lora_due(self, lora: Any) -> bool:
        """Does some adapter of this step add a delta here? (The LoRA manager gives every
        projection a handle once any adapter targets it; `due` asks about this step's adapters.)"""
        return lora is not None and self.lora_weights is not None and self.lora_weights.due(lora)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor, lora: Any = None) -> torch.Tensor:
        """residual + forward(x, lora): the residual add rides in the GEMM's own pass when the base
        is an AmxLinear and no LoRA delta is due here (the delta must be added before the
        residual: the same rounding order as the two-op form)."""
        base = self.base
        if type(base) is AmxLinear and x.dim() == 2 and not self.lora_due(lora):
            return base.forward_add(x, residual)
        return residual + self.forward(x, lora)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def project_all(projections: tuple[Projection, ...], x: torch.Tensor, lora: Any = None) -> list[torch.Tensor]:
    """[p(x, lora) for p in projections] for projections that read the same x (q/k/v, gate/up):
    when their LoRA weights form one group (lora/layers.py PoolGroup) the deltas are added in one pass."""
    # One GEMM when their bases are one packed group (model/fused_linear.py): column views.
    ys = group_outputs(projections, x) or [p.base(x) for p in projections]  # [T, out_p] each
    if lora is None:
        return ys
    group = getattr(projections[0].lora_weights, "group", None)
    if group is not None and [p.lora_weights for p in projections] == group.members:
        group.apply(ys, x, lora)
        return ys
    for p, y in zip(projections, ys):
        if p.lora_weights is not None:
            p.lora_weights.apply(y, x, lora)
    return ys
