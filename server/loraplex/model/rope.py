"""Rotary position embeddings from per-token absolute positions (flat batches, any order).

cos/sin are tabulated once for every position up to max_position_embeddings, so a step only
gathers rows by `positions` ([T]) instead of recomputing trigonometry. Supports the plain
RoPE of Llama 2 / Mistral / Qwen, linear scaling, and Llama 3.1's "llama3" frequency scaling.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.model.arch import RopeConfig
from loraplex_kernels import layer_ops_native

# bfloat16 q/k on CPU through the compiled kernel (loraplex_kernels/rotary.c, bit-identical to
# `_rotate` but for denormals): one pass per tensor instead of ~6 ops. None = whenever built;
# False = torch always.
NATIVE: bool | None = None


def inv_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, after the configured scaling."""
    # float32 throughout, like the reference implementation: positions * inv_freq must round the
    # same way or angles at large positions drift apart.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)  # [D/2]
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor  # longer than this: fully scaled
        high_freq_wavelen = old_len / rope.high_freq_factor  # shorter than this: untouched
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        # In between, blend linearly (in 1/wavelength) between scaled and unscaled.
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(medium, blended, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.rope = rope
        self.register_buffer("cos", torch.empty(max_positions, head_dim, dtype=dtype, device=device),
                             persistent=False)  # [P, D]
        self.register_buffer("sin", torch.empty(max_positions, head_dim, dtype=dtype, device=device),
                             persistent=False)  # [P, D]
        if self.cos.device.type != "meta":
            self.build_tables()

    @torch.no_grad()
    def build_tables(self) -> None:
        """(Re)compute the cos/sin tables in float32, then store them in the model dtype.

        Called again by the loader after a meta-device model is materialised.
        """
        inv_freq = inv_frequencies(self.head_dim, self.rope).to(self.cos.device)  # [D/2]
        pos = torch.arange(self.max_positions, dtype=torch.int64, device=self.cos.device).float()
        angles = pos[:, None] * inv_freq[None, :]  # [P, D/2]
        emb = torch.cat((angles, angles), dim=-1)  # [P, D]: halves layout (rotate_half style)
        self.cos.copy_(emb.cos())
        self.sin.copy_(emb.sin())

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, D]; done once per step, shared by all layers."""
        cos = self.cos.index_select(0, positions).unsqueeze(1)  # [T, 1, D]
        sin = self.sin.index_select(0, positions).unsqueeze(1)  # [T, 1, D]
        return cos, sin


def apply_rotary(q: torch.Tensor, k: torch.Tensor,
                 cos_sin: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D], cos/sin: [T, 1, D] -> rotated (q, k), same shapes."""
    cos, sin = cos_sin
    if NATIVE is not False and layer_ops_native.supports(q, k, cos, sin):
        return layer_ops_native.rotary(q, cos, sin), layer_ops_native.rotary(k, cos, sin)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] for the halves x1, x2.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
