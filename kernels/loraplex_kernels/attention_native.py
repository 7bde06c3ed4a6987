"""The compiled paged decode attention (decode_attention.c) as a Python call.

model/attention.py runs it for the decode tokens of a CPU step when the library is built (native.py)
and the operands suit it (`supports`); otherwise its torch formulation (a padded gather of the
blocks and scaled_dot_product_attention) runs.
"""

from __future__ import annotations

import ctypes

import torch

from . import native
from .native import DTYPE_CODES

_I64 = ctypes.c_int64
_P = ctypes.c_void_p
_ARGTYPES = [
    _I64, _I64, _I64, _I64,  # num_seqs, num_heads, num_kv_heads, head_dim
    _P, ctypes.c_int, _P, _I64, _I64,  # q, q dtype, q_rows (or NULL), q row / head strides
    _P, _P, ctypes.c_int, _P, _P,  # k_cache, v_cache, cache dtype, k / v scales (int8 caches) or NULL
    _I64, _I64, _I64, _I64,  # block / position / head strides, block_size
    _P, _I64, _P,  # block_table, its row stride, seq_lens
    _I64, ctypes.c_float,  # window (0 = none), scale
    _P, _I64,  # out, its row stride
]


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """CPU, q float32 or bfloat16 and the cache the same dtype or int8, head dims contiguous,
    library built."""
    return (q.device.type == "cpu" and q.dtype in DTYPE_CODES and (k_cache.dtype == q.dtype or k_cache.dtype == torch.int8)
            and q.stride(2) == 1 and k_cache.stride(3) == 1 and native.available())



def decode_attention(q: torch.Tensor, rows: slice | torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     table: torch.Tensor, seq_lens: torch.Tensor, scale: float, window: int | None,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of B decode tokens over their sequences' cached context -> [B, H * D] in q's dtype.

    q [T, H, D] (head dim contiguous); rows: the decode tokens' rows of q (a slice, or [B] int64);
    caches [num_blocks, block_size, H_kv, D] (this step's k/v already written), q's dtype or int8
    with k_scale / v_scale [num_blocks, block_size, H_kv] float32 (model/kv_quant.py); table
    [B, >= nb] int64 block ids; seq_lens [B] int64 context lengths including the new token.
    """
    if k_cache.stride() != v_cache.stride() or k_cache.dtype != v_cache.dtype:
        raise ValueError("k and v caches must share dtype and layout")
    kv_code, ks_ptr, vs_ptr = native.kv_operands(k_cache, v_cache, k_scale, v_scale)
    if table.dtype != torch.int64 or table.stride(1) != 1 or seq_lens.dtype != torch.int64:
        raise ValueError("block table and seq_lens must be int64, table rows contiguous")
    seq_lens = seq_lens.contiguous()
    b = int(table.shape[0])
    _, h, d = q.shape
    h_kv = k_cache.shape[2]
    if h % h_kv:
        raise ValueError(f"{h} query heads are not a multiple of {h_kv} kv heads")
    if isinstance(rows, slice):
        q_ptr, q_rows = q[rows.start].data_ptr(), None  # rows start .. start + b - 1
    else:
        rows = rows.to(torch.int64).contiguous()
        q_ptr, q_rows = q.data_ptr(), rows.data_ptr()
    out = torch.empty(b, h * d, dtype=q.dtype)
    fn = native.function("loraplex_decode_attention", _ARGTYPES)
    rc = fn(b, h, h_kv, d,
             q_ptr, DTYPE_CODES[q.dtype], q_rows, q.stride(0), q.stride(1),
             k_cache.data_ptr(), v_cache.data_ptr(),
             kv_code, ks_ptr, vs_ptr,
             k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.shape[1],
             table.data_ptr(), table.stride(0), seq_lens.data_ptr(),
             window or 0, scale, out.data_ptr(), out.stride(0))
    if rc == -2:
        raise ValueError(f"q ({q.dtype}) and the cache ({k_cache.dtype}) must share a dtype, or the cache be int8")
    if rc != 0:
        raise MemoryError("decode attention could not allocate its scratch buffers")
    return out
