"""The int8 KV cache's element rule (--kv-cache-dtype int8), in torch.

Per cache slot and kv head, the head's D values x are kept as int8 codes and one float32 scale:

    amax = max_d |x_d|;  scale = amax / 127 (1 when amax is 0);  q_d = round_half_even(x_d / scale)

so a value comes back as q_d * scale, within amax / 254 of x_d. Why per (slot, head) and
symmetric: a head's values share a range within a token, but keys differ in range across tokens
and heads by more than an order of magnitude (a per-tensor scale would waste most codes on the
largest); symmetric needs no zero point, and dequantizing is one multiply per position and head
in the attention kernel (the scale multiplies the dot product or the probability, not each
element). 408 bytes per position and layer on the default model (k and v: 3 heads x (64 codes +
a 4-byte scale)) against 768 in bfloat16: 0.53x.

The compiled writer (loraplex_kernels/kv_int8.h, called from rotary.c) gives these same bits:
everything is float32 arithmetic with one rounding per step, in the same order.
"""

from __future__ import annotations

import torch


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (any float dtype) -> (codes int8 [..., D], scales float32 [...])."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)  # [...]
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    codes = torch.round(xf / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes int8 [..., D], scale float32 [...] -> values [..., D] in dtype."""
    return (codes.float() * scale.unsqueeze(-1)).to(dtype)


def round_trip(x: torch.Tensor) -> torch.Tensor:
    """x as an int8 cache would give it back, in x's dtype."""
    return dequantize(*quantize(x), x.dtype)
