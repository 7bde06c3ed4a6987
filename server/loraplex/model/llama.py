"""Our compact Llama-family decoder: Llama 2/3, Mistral, Qwen2, Qwen3 on flat paged batches.

Module names mirror HF's (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`, ...,
`model.norm`, `lm_head`) so checkpoint tensors and PEFT adapter keys map 1:1; each linear is a
`Projection` whose `.base` holds the weight. Differences between the families are flags on
ArchConfig (qkv bias, q/k norm, sliding windows, tied embeddings), not subclasses.

The forward takes one flat ForwardBatch ([T] tokens of many sequences) and a KVCache, and
returns float32 logits only for batch.logits_indices ([S, vocab]).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex_kernels import argmax_native

from loraplex.model.amx_linear import AmxLinear
from loraplex.model.arch import ArchConfig
from loraplex.model.attention import AttentionPlan, paged_attention, rotate_and_write_kv
from loraplex.model.forward_batch import ForwardBatch
from loraplex.model.fused_linear import group_swiglu
from loraplex.model.kv_cache import KVCache
from loraplex.model.linear import Projection, project_all
from loraplex.model.norm import RMSNorm
from loraplex.model.rope import RotaryEmbedding

# Fold SwiGLU and the residual adds into the AMX GEMMs' epilogues (gemm_amx.c) where they apply:
# three torch ops a layer fewer, the same bits (SwiGLU: up to one bfloat16 step where our exp
# differs). False = always the separate ops (tests and benchmarks compare the two).
FUSED_EPILOGUES = True
# A greedy step's tokens straight from the AMX vocab GEMM (its ARGMAX epilogue), without writing
# the [S, vocab] float32 logits and reading them back; False = logits, then argmax (the same
# tokens: benchmarks compare the two).
FUSED_ARGMAX = True

PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_Factory = dict[str, Any]  # {"dtype": ..., "device": ...} passed to every parameter constructor


class Attention(nn.Module):
    def __init__(self, arch: ArchConfig, layer_idx: int, fk: _Factory) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.scale = arch.head_dim ** -0.5
        self.window = arch.sliding_windows[layer_idx]
        h = arch.hidden_size
        self.q_proj = Projection.linear(h, arch.q_size, bias=arch.qkv_bias, **fk)
        self.k_proj = Projection.linear(h, arch.kv_size, bias=arch.qkv_bias, **fk)
        self.v_proj = Projection.linear(h, arch.kv_size, bias=arch.qkv_bias, **fk)
        self.o_proj = Projection.linear(arch.q_size, h, bias=arch.o_bias, **fk)
        # The projections that read the same input, as one tuple: built once, not every step
        # (the Projection modules stay the same objects; only their `.base` is ever swapped).
        self.qkv = (self.q_proj, self.k_proj, self.v_proj)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, **fk)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, **fk)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: KVCache, plan: AttentionPlan,
                cos_sin: tuple[torch.Tensor, torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        """residual + attention(x): x is the normed input [T, hidden], residual the stream."""
        t = x.shape[0]
        lora = batch.lora
        q, k, v = project_all(self.qkv, x, lora)
        q = q.view(t, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        if self.q_norm is not None:  # Qwen3 normalises each head before RoPE
            q = self.q_norm(q)
            k = self.k_norm(k)
        k_cache, v_cache, k_scale, v_scale = kv.layer(self.layer_idx)
        q, k = rotate_and_write_kv(q, k, v, cos_sin, k_cache, v_cache, batch.slot_mapping, k_scale, v_scale)
        o = paged_attention(q, k, v, k_cache, v_cache, plan, self.scale, self.window, k_scale, v_scale)  # [T, H*D]
        if FUSED_EPILOGUES:
            return self.o_proj.forward_add(o, residual, lora)
        return residual + self.o_proj.forward(o, lora)


class MLP(nn.Module):
    def __init__(self, arch: ArchConfig, fk: _Factory) -> None:
        super().__init__()
        h, i = arch.hidden_size, arch.intermediate_size
        self.gate_proj = Projection.linear(h, i, bias=arch.mlp_bias, **fk)
        self.up_proj = Projection.linear(h, i, bias=arch.mlp_bias, **fk)
        self.down_proj = Projection.linear(i, h, bias=arch.mlp_bias, **fk)
        self.gate_up = (self.gate_proj, self.up_proj)  # read the same input: see Attention.qkv

    def forward(self, x: torch.Tensor, lora: Any, residual: torch.Tensor) -> torch.Tensor:
        """residual + down(silu(gate(x)) * up(x)): [T, hidden] -> [T, intermediate] -> [T, hidden]."""
        h = None
        if FUSED_EPILOGUES and not (self.gate_proj.lora_due(lora) or self.up_proj.lora_due(lora)):
            h = group_swiglu(self.gate_up, x)  # [T, intermediate] in one pass; None unless one AMX group
        if h is None:
            gate, up = project_all(self.gate_up, x, lora)  # [T, intermediate] each
            h = F.silu(gate) * up
        if FUSED_EPILOGUES:
            return self.down_proj.forward_add(h, residual, lora)
        return residual + self.down_proj.forward(h, lora)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, layer_idx: int, fk: _Factory) -> None:
        super().__init__()
        self.self_attn = Attention(arch, layer_idx, fk)
        self.mlp = MLP(arch, fk)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, **fk)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, **fk)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: KVCache, plan: AttentionPlan,
                cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.mlp_block(self.attention_block(x, batch, kv, plan, cos_sin), batch.lora)

    def attention_block(self, x: torch.Tensor, batch: ForwardBatch, kv: KVCache, plan: AttentionPlan,
                        cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x + attention(norm(x)), [T, hidden]."""
        return self.self_attn.forward(self.input_layernorm.forward(x), batch, kv, plan, cos_sin, x)

    def mlp_block(self, x: torch.Tensor, lora: Any) -> torch.Tensor:
        """x + mlp(norm(x)), [T, hidden]."""
        return self.mlp.forward(self.post_attention_layernorm.forward(x), lora, x)


class LlamaModel(nn.Module):
    def __init__(self, arch: ArchConfig, fk: _Factory) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size, **fk)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, fk) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, **fk)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope, **fk)


class LlamaForCausalLM(nn.Module):
    """forward(batch, kv) -> float32 logits [S, vocab] for the rows batch.logits_indices."""

    def __init__(self, arch: ArchConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.arch = arch
        fk: _Factory = {"dtype": dtype, "device": device}
        self.model = LlamaModel(arch, fk)
        # Tied checkpoints reuse the embedding matrix; with no lm_head module there is nothing
        # to keep tied when the model is moved or materialised from the meta device.
        self.lm_head = (None if arch.tie_word_embeddings
                        else nn.Linear(arch.hidden_size, arch.vocab_size, bias=False, **fk))
        # A packed copy of the tied table for the vocab GEMM (packed_linear.pack_lm_head), or None.
        self.packed_head: nn.Module | None = None
        # The decoder layers as one compiled call per step (model/compiled_layers.py), or None;
        # attached by the engine after packing.
        self.compiled_layers: Any = None

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVCache, plan: AttentionPlan | None = None,
                greedy: bool = False) -> torch.Tensor:
        """The sampled rows' float32 logits [S, vocab]; with `greedy`, each row's greedy token
        instead, [S] int64 (output_argmax). `plan`: the step's attention plan when the caller fixes
        it (model/decode_graphs.py: a fixed-shape plan a CUDA graph can replay); None = built from
        the batch."""
        if len(kv.k) != self.arch.num_layers:
            raise ValueError(f"kv cache has {len(kv.k)} layers, model has {self.arch.num_layers}")
        if plan is None:
            plan = AttentionPlan.build(batch, kv.block_size)
        cos_sin = self.model.rotary_emb.lookup(batch.positions)  # 2 x [T, 1, head_dim]
        x = self.model.embed_tokens(batch.input_ids)  # [T, hidden]
        # The layers call their submodules' forward directly, not through nn.Module.__call__: its
        # hook bookkeeping costs ~1 us a call, ~400 calls a decode step, for hooks this model never
        # has (a forward hook on a submodule is therefore not run; hook the whole model instead).
        compiled = self.compiled_layers
        y = None
        if compiled is not None and FUSED_EPILOGUES:  # the compiled blocks fuse what FUSED_EPILOGUES does
            y = compiled.forward(x, batch, kv, plan, cos_sin)  # None: this step runs the Python layers
        if y is not None:
            x = y
        else:
            for layer in self.model.layers:
                x = layer.forward(x, batch, kv, plan, cos_sin)
        # Only the rows that get sampled reach the final norm and the (large) vocab projection.
        x = self.model.norm(x.index_select(0, batch.logits_indices))  # [S, hidden]
        if greedy:
            return self.output_argmax(x)  # [S]
        return self.output_logits(x, as_float=True)  # [S, vocab]

    def output_argmax(self, x: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S] int64: torch.argmax(output_logits(x, as_float=True), -1), each row's
        first index of its largest logit (NaN counting as largest). An AMX head computes it in the
        vocab GEMM's own pass (FUSED_ARGMAX); otherwise the logits are made and reduced."""
        head = self._amx_head(x)
        if FUSED_ARGMAX and head is not None:
            return head.forward_argmax(x)
        return argmax_native.first_argmax(self.output_logits(x, as_float=True))

    def _amx_head(self, x: torch.Tensor) -> AmxLinear | None:
        """The vocab projection when it is an AMX panel set that takes x [S, hidden] in one call
        (its epilogues then produce float logits or the argmax in the GEMM's own pass)."""
        head = self.lm_head if self.lm_head is not None else self.packed_head
        return head if type(head) is AmxLinear and x.dim() == 2 else None

    def output_logits(self, x: torch.Tensor, as_float: bool = False) -> torch.Tensor:
        """lm_head: [S, hidden] -> [S, vocab] (as_float: then .float(), in the GEMM's own pass where
        the head is an AMX panel set). Untied: the lm_head module (nn.Linear, packed in place at
        start-up, or a bitsandbytes Linear4bit). Tied: the embedding table, or its packed copy
        (packed_head); a 4-bit table (quantized_embedding.py, --quantize-embeddings) multiplies from
        its own packed storage, with no float copy."""
        if as_float:
            head = self._amx_head(x)
            return head.forward_float(x) if head is not None else self.output_logits(x).float()
        if self.lm_head is not None:
            return self.lm_head(x)
        if self.packed_head is not None:
            return self.packed_head(x)
        embed = self.model.embed_tokens
        if isinstance(embed, nn.Embedding):
            return F.linear(x, embed.weight)
        return embed.project(x)

    def iter_projections(self) -> Iterator[tuple[int, str, Projection]]:
        """(layer_idx, short_name, Projection) for every LoRA-targetable linear, in layer order."""
        for i, layer in enumerate(self.model.layers):
            for name in PROJECTION_NAMES:
                parent = layer.mlp if name in ("gate_proj", "up_proj", "down_proj") else layer.self_attn
                yield i, name, getattr(parent, name)

    def rebuild_buffers(self) -> None:
        """Recompute non-persistent buffers (RoPE tables) after materialising from meta."""
        self.model.rotary_emb.build_tables()

    # From the final norm, not the embedding: with --quantize-embeddings the table is 4-bit (uint8).
    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype
