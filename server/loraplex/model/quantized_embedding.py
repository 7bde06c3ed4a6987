"""A 4-bit (bitsandbytes nf4 / fp4) token embedding table that also serves as a tied lm_head.

Why: on small models the embedding table is a large share of the weights (SmolLM2-135M: 28M of
135M parameters, tied to lm_head), so quantizing only the projections leaves the base at 0.42x of
float16. `--quantize-embeddings` keeps the table in 4 bits too. transformers/PEFT keep embeddings
and lm_head in 16 bits, so this is opt-in and changes the model's outputs a little more.

Storage: one bitsandbytes Params4bit `weight` ([vocab, hidden] quantized in 64-element blocks,
the same quant type / double quantization as the projections), nothing else: no float copy.

- Lookup (`forward(ids)`): only the rows of the step's token ids are dequantized. With hidden a
  multiple of the blocksize, row r is exactly blocks [r * hidden/64, (r+1) * hidden/64) and packed
  bytes [r * hidden/2, (r+1) * hidden/2): both are gathered by row and handed to bitsandbytes'
  own dequantize_4bit, so a looked-up row is bit for bit the row of the fully dequantized table.
  With double quantization the gathered 8-bit block scales are dequantized here with bitsandbytes'
  formula (code2[q] * absmax2[block // 256] + offset), since a gather breaks its 256-scale groups.
  A hidden size that is not a multiple of the blocksize is refused (a row would share blocks).
  bnb.nn.Embedding4bit does the same gather but is not reused: it cannot take double-quantized
  scales, deep-copies the whole quant state (all scales) on every call, and builds the float table
  before quantizing it.
- Tied lm_head (`project(x)`): bnb.matmul_4bit on the SAME packed bytes and quant state, in vocab
  chunks (views, no copy) so that bitsandbytes' CPU path, which dequantizes its weight before a
  plain matmul, holds one chunk (4096 rows) in float at a time, never the whole table. We never
  pass the table through bnb.nn.Linear4bit: on AVX512-BF16 CPUs its first forward repacks the
  weight in place into a layout the lookup could not read.
"""

from __future__ import annotations

import torch
from torch import nn

BLOCKSIZE = 64  # bitsandbytes' 4-bit default, the projections' blocksize too
NESTED_BLOCKSIZE = 256  # double quantization: one float scale per 256 8-bit block scales
LM_HEAD_CHUNK_ROWS = 4096  # vocab rows dequantized at once by project(); a multiple of 256 (see _chunks)


class QuantizedEmbedding(nn.Module):
    """[vocab, hidden] table in 4 bits: forward(ids [...]) -> [..., hidden]; project(x [S, hidden]) -> [S, vocab]."""

    def __init__(self, weight: torch.Tensor, quant_type: str, double_quant: bool,
                 device: torch.device | str) -> None:
        """Quantize `weight` [vocab, hidden] (any float dtype; the looked-up rows come back in
        that dtype) on `device`. The caller drops its float `weight` afterwards."""
        import bitsandbytes as bnb

        super().__init__()
        vocab, hidden = weight.shape
        if hidden % BLOCKSIZE != 0:
            raise ValueError(
                f"quantize_embeddings: hidden size {hidden} is not a multiple of the 4-bit blocksize "
                f"{BLOCKSIZE}, so an embedding row is not a whole number of quantization blocks and "
                "could not be dequantized on its own; run without --quantize-embeddings")
        if weight.dtype == torch.float64:  # bitsandbytes quantizes 16/32-bit floats only
            weight = weight.float()
        self.num_embeddings, self.embedding_dim = vocab, hidden
        self.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, blocksize=BLOCKSIZE,
                                        compress_statistics=double_quant).to(device)
        qs = self.weight.quant_state
        if qs.blocksize != BLOCKSIZE or tuple(qs.shape) != (vocab, hidden):
            raise RuntimeError(f"bitsandbytes quantized the table as {tuple(qs.shape)} / blocksize {qs.blocksize}")
        self._lm_head_chunks = self._chunks()

    @property
    def quant_state(self):
        return self.weight.quant_state

    def _packed_rows(self) -> torch.Tensor:
        """The packed codes as [vocab, hidden/2] uint8 (a view): two 4-bit codes per byte, row-major."""
        return self.weight.data.view(torch.uint8).view(self.num_embeddings, self.embedding_dim // 2)

    def _row_scales(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 block scales of rows `ids` [T] -> [T * hidden/64], row after row."""
        qs = self.quant_state
        per_row = self.embedding_dim // BLOCKSIZE
        if not qs.nested:
            return qs.absmax.view(self.num_embeddings, per_row).index_select(0, ids).reshape(-1)
        blocks = (ids[:, None] * per_row + torch.arange(per_row, device=ids.device)).reshape(-1)  # [T*per_row]
        q = qs.absmax.index_select(0, blocks).long()  # 8-bit codes of the scales
        # bitsandbytes' dequantize_blockwise then `+= offset`, in float32, for just these blocks.
        return qs.state2.code[q] * qs.state2.absmax[blocks // qs.state2.blocksize] + qs.offset

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from bitsandbytes.functional import QuantState, dequantize_4bit

        qs = self.quant_state
        flat = ids.reshape(-1)  # [T]
        if flat.numel() == 0:
            return torch.empty(*ids.shape, self.embedding_dim, dtype=qs.dtype, device=self.weight.device)
        packed = self._packed_rows().index_select(0, flat)  # [T, hidden/2]
        rows = QuantState(absmax=self._row_scales(flat), shape=torch.Size((flat.numel(), self.embedding_dim)),
                          code=qs.code, blocksize=BLOCKSIZE, quant_type=qs.quant_type, dtype=qs.dtype)
        out = dequantize_4bit(packed.view(-1, 1), rows)  # [T, hidden] in the table's dtype
        return out.view(*ids.shape, self.embedding_dim)

    def _chunks(self) -> list[tuple[int, int, torch.Tensor, object]]:
        """(start, end, packed bytes view, QuantState) per vocab chunk, for project(). Views into
        the table's own tensors: no copy. A chunk starts at a multiple of 4096 rows, so its first
        block is a multiple of 256 and, with double quantization, its 8-bit scales line up with
        whole groups of the nested float scales."""
        from bitsandbytes.functional import QuantState

        qs = self.quant_state
        packed = self.weight.data.view(torch.uint8).view(-1)  # [vocab * hidden / 2]
        per_row = self.embedding_dim // BLOCKSIZE
        chunks = []
        for start in range(0, self.num_embeddings, LM_HEAD_CHUNK_ROWS):
            end = min(start + LM_HEAD_CHUNK_ROWS, self.num_embeddings)
            b0, b1 = start * per_row, end * per_row  # block range of these rows
            state2 = None
            if qs.nested:
                n = NESTED_BLOCKSIZE
                s2 = qs.state2
                state2 = QuantState(absmax=s2.absmax[b0 // n:(b1 + n - 1) // n], code=s2.code, blocksize=s2.blocksize,
                                    dtype=s2.dtype)
            state = QuantState(absmax=qs.absmax[b0:b1], shape=torch.Size((end - start, self.embedding_dim)),
                               code=qs.code, blocksize=BLOCKSIZE, quant_type=qs.quant_type, dtype=qs.dtype,
                               offset=qs.offset, state2=state2)
            data = packed[start * self.embedding_dim // 2:end * self.embedding_dim // 2].view(-1, 1)
            chunks.append((start, end, data, state))
        return chunks

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x [S, hidden] @ table.T -> [S, vocab] in x's dtype (the tied lm_head)."""
        import bitsandbytes as bnb

        out = torch.empty(x.shape[0], self.num_embeddings, dtype=x.dtype, device=x.device)  # [S, vocab]
        for start, end, data, state in self._lm_head_chunks:
            out[:, start:end] = bnb.matmul_4bit(x, data, quant_state=state)  # [S, chunk]
        return out

    def extra_repr(self) -> str:
        qs = self.quant_state
        return (f"{self.num_embeddings}, {self.embedding_dim}, quant_type={qs.quant_type}, "
                f"double_quant={qs.nested}, blocksize={BLOCKSIZE}")
