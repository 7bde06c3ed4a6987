"""A bfloat16 CPU step's decoder layers in one compiled call (loraplex_kernels/decode_layers.c).

Why: once the projections run our AMX GEMM with SwiGLU and the residual adds in its epilogues,
and rotary and the KV writes are one pass, a decoder layer is ~7 kernel calls -- and on the
2-core dev box the Python around them (argument checks, tensor allocations, ctypes) is a visible
share of a decode step, most of it at small batches. decode_layers.c runs the same kernels in the
same order for every block of the step, so the logits are bit-identical to the Python path's
(tests/test_compiled_layers.py); the Python is then one call per step.

Where it applies (the engine attaches it after packing, engine.pack_cpu_weights):
- the model: bfloat16 on CPU, every projection an AMX panel set (model/amx_linear.py) with q/k/v
  and gate/up fused (model/fused_linear.py) (Qwen3's per-head q/k norms included);
- the step: every row is an attention row of the compiled kernel (decode tokens and short prefill
  chunks: attention.AttentionPlan.native_rows), and no switch turns one of the compiled pieces off;
- LoRA: the deltas due this step run inside the compiled blocks through the same pooled kernel
  the Python path calls (lora_rows.c), before SwiGLU / the residual add as there. A block whose
  delta would take another route (another backend or formulation, sibling projections whose
  handles are not one pool group) runs in Python, between compiled runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

import torch
from torch import nn

from loraplex.model import attention, norm, rope
from loraplex.model.amx_linear import AmxLinear, amx_wanted
from loraplex.model.fused_linear import packed_group
from loraplex.model.kv_cache import KVCache
from loraplex_kernels import backend, cpu, native
from loraplex_kernels import decode_layers_native as dl
from loraplex_kernels.pool_table import PoolTable

log = logging.getLogger(__name__)

# None = wherever it applies; False = never (the Python layers; tests compare the two).
COMPILED: bool | None = None


def _panels(projections: tuple) -> nn.Module | None:
    """The AmxLinear holding these projections' weights as one panel set, in their order (a fused
    group, or a single projection's own base); None when they are not."""
    if len(projections) == 1:
        base = projections[0].base
        return base if type(base) is AmxLinear else None
    group = packed_group(projections)
    return group.linear if group is not None and type(group.linear) is AmxLinear else None


def refusal(model: nn.Module) -> str | None:
    """Why this model's layers cannot run compiled (None: they can)."""
    if not (native.available() and amx_wanted()):
        return "the AMX kernels are not built or not enabled on this CPU"
    arch = model.arch
    if model.dtype != torch.bfloat16 or model.device.type != "cpu":
        return f"the model is {model.dtype} on {model.device}, not bfloat16 on CPU"
    if arch.head_dim % 2:
        return f"odd head dim {arch.head_dim}"
    eps = {float(m.eps) for m in model.modules() if isinstance(m, norm.RMSNorm)}
    if len(eps) != 1:
        return f"norms with several eps {sorted(eps)}"
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        for what, projections in (("q/k/v", a.qkv), ("o", (a.o_proj,)), ("gate/up", m.gate_up),
                                  ("down", (m.down_proj,))):
            if _panels(projections) is None:
                return f"layer {i} {what} is not one AMX panel set"
        widths = m.gate_proj.base.group.widths
        if widths[0] != widths[1] or widths[0] % 16:
            return f"layer {i} gate/up halves {widths} do not fit the SwiGLU epilogue"
    return None


def attach(model: nn.Module) -> bool:
    """Give the model its compiled layers (model.compiled_layers) when it qualifies and
    LORAPLEX_COMPILED_LAYERS is not 0."""
    why = "LORAPLEX_COMPILED_LAYERS=0" if os.environ.get("LORAPLEX_COMPILED_LAYERS", "1") == "0" else refusal(model)
    if why is not None:
        log.info("decoder layers run in Python: %s", why)
        model.compiled_layers = None
        return False
    model.compiled_layers = CompiledLayers(model)
    log.info("decoder layers run as one compiled call per step, LoRA deltas included "
             "(model/compiled_layers.py; LORAPLEX_COMPILED_LAYERS=0 turns it off)")
    return True


def _due_call(projections: tuple, lora: Any, columns: tuple[int, ...]) -> tuple | bool | None:
    """The LoRA delta due at these sibling projections this step, as the Python path would add it
    (model/linear.py project_all / Projection.forward): False = none due; (PreparedPool, each due
    member's first column) = one pooled kernel call; None = not as one compiled pooled call."""
    handles = [p.lora_weights for p in projections]
    if all(h is None for h in handles):
        return False
    group = getattr(handles[0], "group", None)
    if group is None or handles != group.members or lora.meta.num_slots != group.table.num_slots:
        return None
    members = group.due_members(lora)
    if not members:
        return False
    call = group.native_call(members)
    if call is None:
        return None
    return call, tuple(columns[m] for m in members)


class CompiledLayers:
    """model.compiled_layers: runs a step's decoder layers, compiled where it may."""

    def __init__(self, model: nn.Module) -> None:
        arch = model.arch
        self.layers = list(model.model.layers)
        self.hidden, self.heads, self.kv_heads = arch.hidden_size, arch.num_heads, arch.num_kv_heads
        self.head_dim, self.inter = arch.head_dim, arch.intermediate_size
        self.eps = float(self.layers[0].input_layernorm.eps)
        self.scale = self.layers[0].self_attn.scale
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        # Scratch per token, in bfloat16 elements: xn, qkv_out, q_rot, k_rot, attn, h, gate_up.
        self.scratch_widths = (self.hidden, q + 2 * kv, q, kv, q, self.inter, 2 * self.inter)
        # Each member's first column in its site's output: q/k/v in the fused q/k/v output, gate / up.
        self.qkv_columns, self.gate_up_columns = (0, q, q + kv), (0, self.inter)
        # The weights' pointers are fixed for the model's life (packed once); the tensors are
        # held here so the pointers cannot outlive them.
        self.tensors: list[torch.Tensor] = []
        self.weights = [self._weights(layer) for layer in self.layers]
        self.all_blocks = (ctypes.c_int64 * (2 * len(self.layers)))(*range(2 * len(self.layers)))
        self.table: ctypes.Array | None = None  # per KV cache (its tensors' pointers)
        self._plan_key: tuple | None = None  # the last step's LoRA plan (_lora_sites) and its key
        self._plan: tuple = ()
        # int64 [len(decode_layers_native.PHASES)]: set it (benchmarks/profile_decode.py) and the
        # compiled blocks add each phase's nanoseconds to it; None = no timing.
        self.phase_ns: torch.Tensor | None = None
        self.kv: KVCache | None = None
        self.kv_code = 0  # the cache's dtype code for the step (native.kv_operands), set with the table

    def _ptr(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        if not t.is_contiguous() or t.dtype != torch.bfloat16:
            raise ValueError("compiled layers need contiguous bfloat16 weights")
        self.tensors.append(t)
        return t.data_ptr()

    def _weights(self, layer: nn.Module) -> dict:
        a, m = layer.self_attn, layer.mlp
        qkv, o, gu, down = (_panels(p) for p in (a.qkv, (a.o_proj,), m.gate_up, (m.down_proj,)))
        return dict(in_norm=self._ptr(layer.input_layernorm.weight.detach()),
                    post_norm=self._ptr(layer.post_attention_layernorm.weight.detach()),
                    qkv=self._ptr(qkv.packed), qkv_bias=self._ptr(qkv.bias), o=self._ptr(o.packed),
                    o_bias=self._ptr(o.bias), gate_up=self._ptr(gu.packed), gate_up_bias=self._ptr(gu.bias),
                    down=self._ptr(down.packed), down_bias=self._ptr(down.bias), window=a.window or 0,
                    q_norm=None if a.q_norm is None else self._ptr(a.q_norm.weight.detach()),
                    k_norm=None if a.k_norm is None else self._ptr(a.k_norm.weight.detach()))

    def _layer_table(self, kv: KVCache) -> ctypes.Array:
        """The layers' operands with this cache's tensors, built once per cache."""
        if kv is not self.kv:
            table = (dl.LayerOperands * len(self.layers))()
            for i, w in enumerate(self.weights):
                k, v, ks, vs = kv.layer(i)
                if not (k.is_contiguous() and v.is_contiguous() and k.dtype == v.dtype
                        and k.dtype in (torch.bfloat16, torch.int8)):
                    raise ValueError("compiled layers need contiguous bfloat16 or int8 KV caches")
                self.kv_code, ks_ptr, vs_ptr = native.kv_operands(k, v, ks, vs)
                table[i] = dl.LayerOperands(k_cache=k.data_ptr(), v_cache=v.data_ptr(), k_scale=ks_ptr,
                                            v_scale=vs_ptr, **w)
            self.table, self.kv = table, kv  # the cache is held: its pointers stay valid
        return self.table

    @staticmethod
    def switched_on() -> bool:
        """No switch turns off a compiled piece the Python path would otherwise use."""
        return (COMPILED is not False and norm.NATIVE is not False and rope.NATIVE is not False
                and attention.NATIVE_ROTARY_KV is not False and attention.NATIVE_DECODE is not False)

    def _lora_sites(self, lora: Any) -> tuple[list[bool], ctypes.Array | None]:
        """Per block (layer i's attention at 2 i, its MLP at 2 i + 1): may it run compiled? And the
        step's due LoRA deltas per layer and site (decode_layers.c's sites), None when none is due.
        A block runs in Python when one of its deltas would not run the compiled pooled kernel
        there (another backend or formulation, members that are not one pool group)."""
        num = len(self.layers)
        if lora is None or not lora.meta.has_lora:
            return [True] * (2 * num), None
        # What decides the plan: the step's adapters, the pool tables' contents, which LoRA route
        # the kernels take. Decode steps of one batch repeat it: ~120 Python checks saved a step.
        key = (lora.meta.active_slots, lora.meta.num_slots, PoolTable.generation, cpu.NATIVE, backend.get_backend())
        if self._plan_key == key:
            return self._plan
        self._plan = self._build_lora_sites(lora)
        self._plan_key = key
        return self._plan

    def _build_lora_sites(self, lora: Any) -> tuple[list[bool], ctypes.Array | None]:
        num = len(self.layers)
        sites = (dl.LoraSite * (num * dl.SITES))()
        blocks, any_due = [], False
        for i, layer in enumerate(self.layers):
            a, m = layer.self_attn, layer.mlp
            ok = [True, True]
            for site, (projections, columns) in enumerate(((a.qkv, self.qkv_columns), ((a.o_proj,), (0,)),
                                                           (m.gate_up, self.gate_up_columns),
                                                           ((m.down_proj,), (0,)))):
                due = _due_call(projections, lora, columns)
                if due is None:
                    ok[site // 2] = False
                elif due:
                    call, cols = due
                    entry = sites[i * dl.SITES + site]
                    entry.pool = ctypes.addressof(call.pool_struct)
                    for j, c in enumerate(cols):
                        entry.y_cols[j] = c
                    any_due = True
            blocks += ok
        return blocks, (sites if any_due else None)

    def forward(self, x: torch.Tensor, batch: Any, kv: KVCache, plan: Any,
                cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """x [T, hidden] after every decoder layer, or None when this step does not qualify (the
        caller runs the Python layers). x (the forward's own embedding output: nobody else holds
        it) is updated in place by the compiled blocks."""
        t = x.shape[0]
        rows, table, seq_lens, long = plan.native_rows(with_prefill=True)
        if (long or rows is None or not self.switched_on() or x.dtype != torch.bfloat16
                or kv.k[0].dtype not in (torch.bfloat16, torch.int8)):
            return None
        if isinstance(rows, slice):
            if rows.start != 0 or rows.stop != t:
                return None
        elif len(rows) == t:  # every token, decode rows first: put the table in token order
            order = torch.argsort(rows)  # (a row's attention does not depend on its neighbours)
            table, seq_lens = table.index_select(0, order), seq_lens.index_select(0, order)
        else:
            return None
        cos, sin = cos_sin
        slots, seq_lens = batch.slot_mapping.contiguous(), seq_lens.contiguous()
        if table.dtype != torch.int64 or table.stride(1) != 1 or slots.dtype != torch.int64:
            return None
        cos2, sin2 = cos.reshape(t, -1), sin.reshape(t, -1)
        if not (cos2.is_contiguous() and sin2.is_contiguous()):
            return None
        phase_ns = self.phase_ns
        if phase_ns is not None and (phase_ns.dtype != torch.int64 or phase_ns.shape != (len(dl.PHASES),)
                                     or not phase_ns.is_contiguous()):
            raise ValueError(f"phase_ns must be a contiguous int64 [{len(dl.PHASES)}] tensor")
        layer_table = self._layer_table(kv)
        widths = self.scratch_widths
        scratch = torch.empty(t * sum(widths), dtype=torch.bfloat16)
        ptrs, offset = [], 0
        for w in widths:
            ptrs.append(scratch.data_ptr() + 2 * offset)
            offset += t * w
        x = x.contiguous()  # the forward's own embedding output, updated in place
        k0 = kv.k[0]
        step = dl.StepOperands(
            hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
            inter=self.inter, block_size=k0.shape[1], num_slots=k0.numel() // (self.kv_heads * self.head_dim),
            kv_dtype=self.kv_code,
            eps=self.eps, scale=self.scale, tokens=t, x=x.data_ptr(), cos=cos2.data_ptr(), sin=sin2.data_ptr(),
            cs_stride=cos2.stride(0), slots=slots.data_ptr(), table=table.data_ptr(), seq_lens=seq_lens.data_ptr(),
            table_stride=table.stride(0), xn=ptrs[0], qkv_out=ptrs[1], q_rot=ptrs[2], k_rot=ptrs[3],
            attn=ptrs[4], h=ptrs[5], gate_up=ptrs[6],
            phase_ns=None if phase_ns is None else phase_ns.data_ptr())
        blocks, sites = self._lora_sites(batch.lora)
        if sites is not None:
            meta = batch.lora.meta
            order, idx = meta.sorted_token_ids.contiguous(), meta.token_slots.contiguous()
            if meta.num_tokens != t or order.dtype != torch.int64 or idx.dtype != torch.int64:
                return None
            step.sites, step.lora_order, step.lora_idx, step.lora_rows = sites, order.data_ptr(), idx.data_ptr(), len(order)
        if all(blocks):
            dl.run(step, layer_table, self.all_blocks)
            return x
        run: list[int] = []  # consecutive compiled blocks, run as one call

        def flush() -> None:
            if run:
                dl.run(step, layer_table, (ctypes.c_int64 * len(run))(*run))
                run.clear()

        for b, compiled in enumerate(blocks):
            if compiled:
                run.append(b)
                continue
            flush()
            layer = self.layers[b // 2]
            if b % 2 == 0:
                x = layer.attention_block(x, batch, kv, plan, cos_sin)
            else:
                x = layer.mlp_block(x, batch.lora)
            x = x.contiguous()
            step.x = x.data_ptr()
        flush()
        return x
