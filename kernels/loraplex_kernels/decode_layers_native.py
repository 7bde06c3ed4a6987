"""The decoder layers of a bfloat16 step in one compiled call (decode_layers.c): its operand
structs and the call. model/compiled_layers.py fills them from the model and runs a step's
layers through `run`."""

from __future__ import annotations

import ctypes

from . import native

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class LayerOperands(ctypes.Structure):
    """decode_layers.c's lp_layer_t: one layer's weights (pointers) and KV cache (with its scales
    when it is int8)."""

    _fields_ = [("in_norm", _P), ("post_norm", _P), ("qkv", _P), ("qkv_bias", _P), ("o", _P), ("o_bias", _P),
                ("gate_up", _P), ("gate_up_bias", _P), ("down", _P), ("down_bias", _P),
                ("k_cache", _P), ("v_cache", _P), ("k_scale", _P), ("v_scale", _P), ("window", _I64), ("q_norm", _P), ("k_norm", _P)]


class LoraSite(ctypes.Structure):
    """decode_layers.c's lp_lora_site_t: one due LoRA delta (the pooled kernel's struct for the due
    members, lora_native.PreparedPool, and each member's first column in the site's output)."""

    _fields_ = [("pool", _P), ("y_cols", _I64 * 4)]


SITES = 4  # per layer: q/k/v, o, gate/up, down


class StepOperands(ctypes.Structure):
    """decode_layers.c's lp_step_t: the model's sizes and one step's tensors (pointers)."""

    _fields_ = [("hidden", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64), ("inter", _I64),
                ("block_size", _I64), ("num_slots", _I64), ("kv_dtype", _I64), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("tokens", _I64), ("x", _P), ("cos", _P), ("sin", _P), ("cs_stride", _I64), ("slots", _P),
                ("table", _P), ("seq_lens", _P), ("table_stride", _I64),
                ("xn", _P), ("qkv_out", _P), ("q_rot", _P), ("k_rot", _P), ("attn", _P), ("h", _P), ("gate_up", _P),
                ("sites", ctypes.POINTER(LoraSite)), ("lora_order", _P), ("lora_idx", _P), ("lora_rows", _I64),
                ("phase_ns", _P)]


# decode_layers.c's timed phases, in its order (StepOperands.phase_ns: int64 [len(PHASES)] ns).
PHASES = ("norms", "q/k/v GEMM", "rotary + KV write", "attention", "o GEMM + residual", "gate/up GEMM + SwiGLU",
          "down GEMM + residual", "LoRA deltas", "adds / SwiGLU after LoRA")


def run(step: StepOperands, layers: ctypes.Array, blocks: ctypes.Array) -> None:
    """Runs `blocks` (block b: layer b // 2's attention when b is even, its MLP when odd) in order.
    The caller vouches for every pointer and size (model/compiled_layers.py builds them)."""
    fn = native.function("loraplex_decode_layers",
                         [ctypes.POINTER(StepOperands), ctypes.POINTER(LayerOperands), _P, _I64])
    rc = fn(ctypes.byref(step), layers, ctypes.addressof(blocks), len(blocks))
    if rc == -1:  # the rotary/cache pass refuses before writing; attention's and LoRA's scratch
        raise IndexError("a KV slot is outside the cache, or a kernel's scratch could not be allocated")
    if rc == -2:
        raise ValueError("a LoRA pool table entry of this step points outside the pool, or the KV caches are "
                         "neither bfloat16 nor int8 with scales")
    if rc != 0:
        raise RuntimeError(f"loraplex_decode_layers failed ({rc})")
