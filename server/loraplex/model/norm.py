"""RMSNorm as the Llama family defines it (statistics in float32, scale applied in model dtype)."""

from __future__ import annotations

import torch
from torch import nn

from loraplex_kernels import layer_ops_native

# bfloat16 rows on CPU through the compiled kernel (loraplex_kernels/rmsnorm.c): one pass instead
# of ~8 torch ops. None = whenever it is built; False = always the torch formulation.
NATIVE: bool | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [..., dim]. Normalise in float32 (bf16 squares lose too much), cast back BEFORE the
        # weight multiply: that is the order HF uses (and the compiled kernel's).
        w = self.weight  # one nn.Module attribute lookup, not three
        if NATIVE is not False and layer_ops_native.supports(x, w):
            if x.dim() == 2:
                return layer_ops_native.rms_norm(x, w, self.eps)
            if x.dim() == 3:  # [T, heads, head_dim]: Qwen3's per-head q/k norms
                return layer_ops_native.rms_norm_heads(x, w, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(dtype)
