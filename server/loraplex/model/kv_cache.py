"""The paged KV cache tensors: fixed-size blocks shared by all sequences.

Which block belongs to which sequence is the block manager's business (engine/block_manager.py);
this file only owns the memory. Block 0 is a valid block like any other.

An int8 cache (--kv-cache-dtype int8, model/kv_quant.py) holds int8 codes in k / v and one
float32 scale per slot and kv head in k_scale / v_scale; a float cache has no scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def element_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensors' dtype for EngineConfig.kv_cache_dtype ("auto": the model's)."""
    return torch.int8 if kv_cache_dtype == "int8" else model_dtype


@dataclass
class KVCache:
    # One pair per layer: [num_blocks, block_size, num_kv_heads, head_dim]
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int
    # int8 caches only, one pair per layer: [num_blocks, block_size, num_kv_heads] float32
    k_scale: list[torch.Tensor] | None = None
    v_scale: list[torch.Tensor] | None = None

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> "KVCache":
        """dtype: the model's float dtype, or torch.int8 for a quantized cache (with scales)."""
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        if dtype != torch.int8:
            return cls(k=k, v=v, block_size=block_size)
        # Ones, not zeros: a slot never written then reads back as zeros times a finite scale.
        k_scale = [torch.ones(shape[:3], dtype=torch.float32, device=device) for _ in range(num_layers)]
        v_scale = [torch.ones(shape[:3], dtype=torch.float32, device=device) for _ in range(num_layers)]
        return cls(k=k, v=v, block_size=block_size, k_scale=k_scale, v_scale=v_scale)

    @property
    def num_blocks(self) -> int:
        return int(self.k[0].shape[0])

    @property
    def dtype_name(self) -> str:
        """The cache elements' dtype as logged and reported ("bfloat16", "int8")."""
        return str(self.k[0].dtype).removeprefix("torch.")

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Layer i's (k, v, k_scale, v_scale); the scales are None for a float cache."""
        if self.k_scale is None:
            return self.k[i], self.v[i], None, None
        return self.k[i], self.v[i], self.k_scale[i], self.v_scale[i]

    @property
    def nbytes(self) -> int:
        tensors = self.k + self.v + (self.k_scale or []) + (self.v_scale or [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        scales = 4 if dtype == torch.int8 else 0  # one float32 per slot and head, for k and for v
        return 2 * num_layers * block_size * num_kv_heads * (head_dim * elem + scales)
