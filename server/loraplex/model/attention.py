"""Paged attention over the block KV cache, in plain torch (CPU and CUDA).

Per layer and step: `write_kv` stores this step's keys/values at `batch.slot_mapping`, then
`paged_attention` lets every new token attend to its own sequence's cached context.

How the work is shaped (it runs once per layer, so per-call overhead matters):
- On CPU, decode tokens go through the compiled kernel (loraplex_kernels/decode_attention.c): each
  sequence reads its blocks where they lie, no copy, no mask (same semantics as below). In
  bfloat16 so do the tokens of short prefill chunks (<= NATIVE_PREFILL_MAX_QUERY): a prefill token
  at position p is a "decode row" over its sequence's first p + 1 cached keys (this step's k/v are
  written first), so one kernel call per layer covers the whole step instead of one SDPA call per
  chunk (~230 us each on the dev box, most of it fixed cost for a chat prompt). Longer chunks keep
  SDPA's blocked kernel, which wins once the triangle is large. float32 prefill stays on SDPA: it
  is then bit-identical to transformers' sdpa attention, which the peer tests lean on (a bnb int8
  model turns a last-bit change in a prefill logit into whole units). Otherwise:
- All decode sequences (query_len == 1) of the step go through ONE padded gather of their KV
  blocks ([B, max_blocks * block_size, H_kv, D]) and ONE scaled_dot_product_attention call with a
  length mask. GQA costs no copy: the n_rep query heads that share a kv head are laid out as n_rep
  "query rows" of that kv head ([B, H_kv, n_rep, D]), which is exact because a decode token's
  mask is the same for each of them.
- Prefill chunks (query_len > 1) go one sequence at a time. A chunk with no cached context before
  it attends over its own fresh k/v with is_causal; a chunk that follows cached context (chunked
  prefill) gathers its blocks and uses the mask `key_pos <= query_pos` (is_causal would align the
  triangle at key 0, which is wrong once the keys start before the queries).
- Sliding windows (Mistral / Qwen layers that use them) add `key_pos > query_pos - window`.
- An int8 cache (--kv-cache-dtype int8; model/kv_quant.py) comes with per-(slot, head) scales:
  every path attends over the values the cache gives back (codes times scale), the compiled one
  reading the codes in place, the torch ones dequantizing their gathers. A fresh prefill chunk's
  own k/v go through the same rounding first, so a token's attention does not depend on which
  path its step took.
Everything derived from the batch alone (indices, masks) lives in an AttentionPlan built once
per step and shared by all layers; the Python-side length lists avoid device->host syncs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from loraplex.model.forward_batch import ForwardBatch
from loraplex.model import kv_quant, rope
from loraplex_kernels import attention_native, layer_ops_native

# Decode tokens through the compiled paged kernel (loraplex_kernels/decode_attention.c) on CPU:
# None = whenever it is built and takes the operands; False = always the torch formulation.
NATIVE_DECODE: bool | None = None
# Rotary of q and k plus both cache writes in one compiled pass (rotary.c) for bfloat16 on CPU:
# the same bits as apply_rotary + write_kv, four calls a layer fewer. None = whenever it is
# built and takes the operands (and rope.NATIVE allows the compiled rotary); False = always the
# separate calls.
NATIVE_ROTARY_KV: bool | None = None
# Prefill chunks up to this many tokens join the compiled kernel's rows (see the module docstring).
NATIVE_PREFILL_MAX_QUERY = 64


def _use_native(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return NATIVE_DECODE is not False and attention_native.supports(q, k_cache)


@dataclass
class PrefillSegment:
    start: int  # first token row of the chunk in the flat batch
    end: int  # one past its last row
    context_len: int  # cached + new keys the chunk attends over
    blocks: torch.Tensor  # [ceil(context_len / block_size)] int64 physical block ids
    query_pos: torch.Tensor  # [query_len] int64 absolute positions of the chunk's tokens
    seq_index: int  # its sequence's row in batch.block_tables

    @property
    def fresh(self) -> bool:
        """True when nothing is cached before the chunk: its own k/v are the whole context."""
        return self.context_len == self.end - self.start


@dataclass
class AttentionPlan:
    """Per-step attention metadata, shared by every layer of the forward."""

    num_tokens: int
    block_size: int
    # Decode part: B sequences with one new token each.
    decode_rows: slice | torch.Tensor | None  # their token rows (a slice when contiguous)
    decode_blocks: torch.Tensor | None  # [B * nb] block ids, row-major over [B, nb]
    decode_table: torch.Tensor | None  # [B, nb] the same, as a table (the compiled kernel reads it)
    decode_num_blocks: int  # nb: blocks of the longest decode context
    decode_seq_lens: torch.Tensor | None  # [B] context length (incl. the new token)
    prefills: list[PrefillSegment]
    decode_seq_index: torch.Tensor | None = None  # [B] the decode sequences' rows in batch.block_tables
    block_tables: torch.Tensor | None = None  # [S, max_blocks] the batch's, for native_rows
    _masks: dict = field(default_factory=dict)  # (kind, index, window) -> bool mask

    @property
    def num_decode(self) -> int:
        return 0 if self.decode_seq_lens is None else int(self.decode_seq_lens.shape[0])

    @classmethod
    def build(cls, batch: ForwardBatch, block_size: int) -> "AttentionPlan":
        qsl = batch.query_lens_list
        starts = [0]
        for n in qsl:
            starts.append(starts[-1] + n)
        device = batch.input_ids.device
        decode_seqs = [i for i, n in enumerate(qsl) if n == 1]
        decode_rows: slice | torch.Tensor | None = None
        decode_blocks = decode_lens = tables = None
        nb = 0
        if decode_seqs:
            rows = [starts[i] for i in decode_seqs]
            if rows == list(range(rows[0], rows[0] + len(rows))):
                decode_rows = slice(rows[0], rows[0] + len(rows))
            else:
                decode_rows = torch.tensor(rows, dtype=torch.int64, device=device)
            nb = max(-(-batch.seq_lens_list[i] // block_size) for i in decode_seqs)
            idx = torch.tensor(decode_seqs, dtype=torch.int64, device=device)
            if len(decode_seqs) == batch.num_seqs:
                tables = batch.block_tables[:, :nb]  # [B, nb]
                decode_lens = batch.seq_lens
            else:
                tables = batch.block_tables.index_select(0, idx)[:, :nb]  # [B, nb]
                decode_lens = batch.seq_lens.index_select(0, idx)
            decode_blocks = tables.reshape(-1)
        prefills = []
        for i, n in enumerate(qsl):
            if n <= 1:
                continue
            ctx = batch.seq_lens_list[i]
            if ctx < n:
                raise ValueError(f"seq_lens[{i}]={ctx} is shorter than its query length {n}")
            blocks = batch.block_tables[i, : -(-ctx // block_size)]
            query_pos = batch.positions[starts[i]:starts[i] + n]  # == ctx - n .. ctx - 1
            prefills.append(PrefillSegment(starts[i], starts[i] + n, ctx, blocks, query_pos, i))
        return cls(batch.num_tokens, block_size, decode_rows, decode_blocks, tables, nb, decode_lens, prefills,
                   idx if decode_seqs else None, batch.block_tables)

    def native_rows(self, with_prefill: bool) -> tuple[torch.Tensor | slice | None, torch.Tensor | None,
                                                        torch.Tensor | None, list[int]]:
        """The compiled kernel's rows: every decode token and (with_prefill) every token of a short
        prefill chunk. Returns (rows: a slice when contiguous, else [R] int64, or None; table [R, nb]
        int64 block ids; seq_lens [R] int64 = keys each row attends over; indices into
        self.prefills of the chunks left to SDPA). Built once per step, on first use."""
        cached = self._masks.get(("native_rows", with_prefill))
        if cached is not None:
            return cached
        short, long = [], []
        for j, seg in enumerate(self.prefills):
            (short if with_prefill and seg.end - seg.start <= NATIVE_PREFILL_MAX_QUERY else long).append(j)
        if not short:  # decode rows only (a pure decode step): the plan's own table
            cached = (self.decode_rows, self.decode_table, self.decode_seq_lens, long)
        else:
            rows, seqs, lens = [], [], []
            if self.num_decode:
                d = self.decode_rows
                rows.append(torch.arange(d.start, d.stop) if isinstance(d, slice) else d)
                seqs.append(self.decode_seq_index)
                lens.append(self.decode_seq_lens)
            for j in short:
                seg = self.prefills[j]
                rows.append(torch.arange(seg.start, seg.end))
                seqs.append(torch.full((seg.end - seg.start,), seg.seq_index, dtype=torch.int64))
                lens.append(seg.query_pos + 1)  # causal: a token at position p sees keys 0..p
            row_idx = torch.cat(rows)  # [R]
            seq_lens = torch.cat(lens).to(torch.int64)  # [R]
            nb = -(-int(seq_lens.max()) // self.block_size)
            table = self.block_tables.index_select(0, torch.cat(seqs))[:, :nb]  # [R, nb]
            r = len(row_idx)
            contiguous = bool((row_idx == torch.arange(int(row_idx[0]), int(row_idx[0]) + r)).all())
            cached = (slice(int(row_idx[0]), int(row_idx[0]) + r) if contiguous else row_idx, table, seq_lens, long)
        self._masks[("native_rows", with_prefill)] = cached
        return cached

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, 1, nb * block_size] bool, True where a decode token may attend."""
        key = ("decode", 0, window)
        mask = self._masks.get(key)
        if mask is None:
            lens = self.decode_seq_lens[:, None]  # [B, 1]
            key_pos = torch.arange(self.decode_num_blocks * self.block_size,
                                   device=lens.device)[None, :]  # [1, L]
            mask = key_pos < lens  # padding past the context is never read
            if window is not None:
                mask = mask & (key_pos > lens - 1 - window)
            mask = mask[:, None, None, :]
            self._masks[key] = mask
        return mask

    def prefill_mask(self, j: int, window: int | None) -> torch.Tensor:
        """[query_len, context_len] bool for prefill segment j (causal with a cached offset)."""
        key = ("prefill", j, window)
        mask = self._masks.get(key)
        if mask is None:
            seg = self.prefills[j]
            q = seg.query_pos[:, None]  # [Q, 1]
            k = torch.arange(seg.context_len, device=q.device)[None, :]  # [1, C]
            mask = k <= q
            if window is not None:
                mask = mask & (k > q - window)
            self._masks[key] = mask
        return mask


def _native_cache(cache: torch.Tensor) -> bool:
    """A cache the compiled rotary/cache pass writes: contiguous CPU bfloat16 or int8."""
    return cache.is_cpu and cache.dtype in (torch.bfloat16, torch.int8) and cache.is_contiguous()


def rotate_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cos_sin: tuple[torch.Tensor, torch.Tensor], k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotary(q), rotary(k)) for q [T, H, D], k / v [T, H_kv, D], cos/sin [T, 1, D]; the caches
    (see write_kv) get the rotated k and v at slot_mapping [T]."""
    cos, sin = cos_sin
    if (NATIVE_ROTARY_KV is not False and rope.NATIVE is not False and _native_cache(k_cache)
            and _native_cache(v_cache) and layer_ops_native.supports(q, k, v, cos, sin)):
        return layer_ops_native.rotary_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    q, k = rope.apply_rotary(q, k, cos_sin)
    write_kv(k_cache, v_cache, k, v, slot_mapping, k_scale, v_scale)
    return q, k


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Store k, v ([T, H_kv, D]) into caches [num_blocks, block_size, H_kv, D] at flat slots [T];
    an int8 cache gets codes, its scales [num_blocks, block_size, H_kv] the slots' scales."""
    h, d = k_cache.shape[-2:]
    if k_cache.dtype != torch.int8:
        k_cache.view(-1, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        return
    for cache, scales, x in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        codes, sc = kv_quant.quantize(x)  # [T, H_kv, D] int8, [T, H_kv] float32
        cache.view(-1, h, d).index_copy_(0, slot_mapping, codes)
        scales.view(-1, h).index_copy_(0, slot_mapping, sc)


def _gather(cache: torch.Tensor, scales: torch.Tensor | None, blocks: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """The cache's blocks [n] as [n, block_size, H_kv, D] values in dtype (an int8 cache's codes
    times their scales)."""
    if scales is None:
        return cache.index_select(0, blocks)
    return kv_quant.dequantize(cache.index_select(0, blocks), scales.index_select(0, blocks), dtype)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, plan: AttentionPlan, scale: float,
                    window: int | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of every new token over its sequence's context.

    q: [T, H, D]; k, v: [T, H_kv, D] (this step's, already written to the caches);
    caches: [num_blocks, block_size, H_kv, D], q's dtype, or int8 with k_scale / v_scale
    [num_blocks, block_size, H_kv] float32. Returns [T, H * D].
    """
    if (k_scale is None) != (k_cache.dtype != torch.int8):
        raise ValueError(f"a {k_cache.dtype} cache comes with scales exactly when it is int8")
    t, h, d = q.shape
    h_kv = k_cache.shape[2]
    rep = h // h_kv
    bs = plan.block_size
    out = None
    if _use_native(q, k_cache):
        return _native_attention(q, k, v, k_cache, v_cache, plan, scale, window, k_scale, v_scale)
    if plan.num_decode:
        b = plan.num_decode
        rows = plan.decode_rows
        qd = q[rows] if isinstance(rows, slice) else q.index_select(0, rows)  # [B, H, D]
        qd = qd.reshape(b, h_kv, rep, d)  # query heads grouped under their kv head
        length = plan.decode_num_blocks * bs
        kd = _gather(k_cache, k_scale, plan.decode_blocks, q.dtype).view(b, length, h_kv, d).transpose(1, 2)
        vd = _gather(v_cache, v_scale, plan.decode_blocks, q.dtype).view(b, length, h_kv, d).transpose(1, 2)
        # kd, vd: [B, H_kv, L, D]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=plan.decode_mask(window),
                                            scale=scale)  # [B, H_kv, rep, D]
        od = od.reshape(b, h * d)
    if plan.num_decode:
        rows = plan.decode_rows
        if plan.num_decode == t:  # pure decode step: the decode output is the whole output
            return od
        out = q.new_empty(t, h * d)
        if isinstance(rows, slice):
            out[rows] = od
        else:
            out.index_copy_(0, rows, od)
    if out is None:
        out = q.new_empty(t, h * d)
    _prefill_sdpa(q, k, v, k_cache, v_cache, plan, scale, window, out, range(len(plan.prefills)), k_scale, v_scale)
    return out


def _native_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, plan: AttentionPlan, scale: float, window: int | None,
                      k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
    """Decode tokens (and bf16 short prefill chunks) in one compiled call, the rest through SDPA."""
    t, h, d = q.shape
    rows, table, seq_lens, long = plan.native_rows(with_prefill=q.dtype == torch.bfloat16)
    if rows is not None:
        o = attention_native.decode_attention(q, rows, k_cache, v_cache, table, seq_lens, scale, window,
                                              k_scale, v_scale)  # [R, H*D]
        if isinstance(rows, slice) and rows.start == 0 and rows.stop == t:  # every row of the step
            return o
    out = q.new_empty(t, h * d)
    if isinstance(rows, slice):
        out[rows] = o
    elif rows is not None:
        out.index_copy_(0, rows, o)
    _prefill_sdpa(q, k, v, k_cache, v_cache, plan, scale, window, out, long, k_scale, v_scale)
    return out


def _prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, plan: AttentionPlan, scale: float, window: int | None,
                  out: torch.Tensor, segments, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> None:
    """out[chunk rows] = SDPA attention of each prefill chunk j in `segments` ([T, H*D] out)."""
    t, h, d = q.shape
    h_kv = k_cache.shape[2]
    rep = h // h_kv
    for j in segments:
        seg = plan.prefills[j]
        n = seg.end - seg.start
        qs = q[seg.start:seg.end].transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
        if seg.fresh and window is None:
            ks, vs = k[seg.start:seg.end], v[seg.start:seg.end]  # [Q, H_kv, D]
            if k_scale is not None:  # what the int8 cache holds for them
                ks, vs = kv_quant.round_trip(ks), kv_quant.round_trip(vs)
            ks = ks.transpose(0, 1).unsqueeze(0)  # [1, H_kv, Q, D]
            vs = vs.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                               enable_gqa=rep > 1)
        else:
            c = seg.context_len
            ks = _gather(k_cache, k_scale, seg.blocks, q.dtype).view(-1, h_kv, d)[:c]  # [C, H_kv, D]
            vs = _gather(v_cache, v_scale, seg.blocks, q.dtype).view(-1, h_kv, d)[:c]
            ks = ks.transpose(0, 1).unsqueeze(0)  # [1, H_kv, C, D]
            vs = vs.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=plan.prefill_mask(j, window),
                                               scale=scale, enable_gqa=rep > 1)
        out[seg.start:seg.end] = o[0].transpose(0, 1).reshape(n, h * d)  # [1, H, Q, D] -> [Q, H*D]
