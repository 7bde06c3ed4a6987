"""Scheduled sequences -> one flat ForwardBatch -> model forward -> logits, one row per sequence.

Owns the KV cache tensors. The batch layout is documented with a worked example in
model/forward_batch.py; this file only fills it in from each sequence's cached length, the
tokens it feeds this step and its block table.

Decode graphs (--cuda-graphs, model/decode_graphs.py): pure base-model decode steps replay a CUDA
graph captured per batch-size bucket; every other step runs eagerly. `decode_graphs`: "off",
"cuda" (capture at start-up; refused unless the model is on a CUDA device) or "eager" (the same
fixed-shape step without capture: what the CPU tests check against the ordinary forward).

LoRA seam: each sequence carries `adapter_slot` (-1 = base model). When any sequence of the step
uses an adapter, `lora_batch_builder(token_slots [T], row_slots [S])` builds ForwardBatch.lora
(loraplex.lora.batch.LoraBatch); when none does, lora stays None and the model does no LoRA work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence as Seq
from typing import Any

import torch

from loraplex_kernels.argmax_native import first_argmax

from loraplex.config import EngineConfig
from loraplex.engine.sequence import NO_ADAPTER_SLOT, Sequence
from loraplex.model.decode_graphs import DecodeGraphs
from loraplex.model.forward_batch import ForwardBatch
from loraplex.model.kv_cache import KVCache, element_dtype

LoraBatchBuilder = Callable[[torch.Tensor, torch.Tensor], Any]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, arch: Any, config: EngineConfig,
                 dtype: torch.dtype, device: torch.device | str,
                 lora_batch_builder: LoraBatchBuilder | None = None, decode_graphs: str = "off"):
        self.model = model
        self.arch = arch
        self.block_size = config.block_size
        self.device = torch.device(device)
        self.lora_batch_builder = lora_batch_builder
        if decode_graphs not in ("off", "cuda", "eager"):
            raise ValueError(f"decode_graphs: unknown mode {decode_graphs!r}; expected off, cuda or eager")
        if decode_graphs == "cuda" and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs: needs a CUDA device, the model is on {self.device.type} "
                             "(leave --cuda-graphs off)")
        # Decode graphs need one scratch block for their padding rows, past those the block
        # manager hands out (it is given config.num_kv_blocks).
        extra = 0 if decode_graphs == "off" else 1
        self.kv = KVCache.allocate(
            num_layers=arch.num_layers, num_blocks=config.num_kv_blocks + extra, block_size=config.block_size,
            num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
            dtype=element_dtype(config.kv_cache_dtype, dtype), device=self.device)
        self.graphs: DecodeGraphs | None = None
        if decode_graphs != "off":
            self.graphs = DecodeGraphs(model, self.kv, config.max_num_seqs, -(-config.max_model_len // self.block_size),
                                       scratch_block=config.num_kv_blocks, device=self.device,
                                       capture=decode_graphs == "cuda")
            if decode_graphs == "cuda":
                with torch.inference_mode():
                    self.graphs.capture_all()

    def prepare(self, seqs: Seq[Sequence], num_new_tokens: Seq[int]) -> ForwardBatch:
        """Pack the step: seq i feeds token_ids[computed : computed + num_new_tokens[i]]."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        token_adapter: list[int] = []
        for seq, n in zip(seqs, num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            query_start.append(query_start[-1] + n)
            seq_lens.append(end)
            token_adapter += [seq.adapter_slot] * n
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]

        def t(values: Any) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

        batch = ForwardBatch(
            input_ids=t(input_ids),  # [T]
            positions=t(positions),  # [T]
            slot_mapping=t(slots),  # [T]
            query_start_loc=t(query_start),  # [S + 1]
            seq_lens=t(seq_lens),  # [S]
            block_tables=t(tables),  # [S, max_blocks]
            logits_indices=t(query_start[1:]) - 1,  # [S] last token of each sequence
            query_lens_list=list(num_new_tokens),
            seq_lens_list=seq_lens,
        )
        row_adapter = [s.adapter_slot for s in seqs]
        if any(a != NO_ADAPTER_SLOT for a in row_adapter):
            if self.lora_batch_builder is None:
                raise RuntimeError("a sequence has an adapter slot but no LoRA batch builder is set")
            batch.lora = self.lora_batch_builder(t(token_adapter), t(row_adapter))
        return batch

    @torch.inference_mode()
    def run(self, seqs: Seq[Sequence], num_new_tokens: Seq[int], greedy: bool = False) -> torch.Tensor:
        """Forward the step; returns logits [S, vocab] float32 (row i = last fed token of seq i),
        or with `greedy` each row's greedy token [S] int64 (first_argmax of those logits; the
        model computes it without the logits where it can: model.output_argmax)."""
        if self.graphs is not None and self.graphs.covers(
                len(seqs), num_new_tokens, [len(s.block_table) for s in seqs],
                any(s.adapter_slot != NO_ADAPTER_SLOT for s in seqs)):
            logits = self._run_decode_graph(seqs).float()
            return first_argmax(logits) if greedy else logits
        batch = self.prepare(seqs, num_new_tokens)
        if greedy:
            return self.model(batch, self.kv, greedy=True)
        return self.model(batch, self.kv).float()

    def _run_decode_graph(self, seqs: Seq[Sequence]) -> torch.Tensor:
        """A pure decode step (one new token per sequence) through the decode graphs."""
        bs = self.block_size
        pos = [s.num_computed_tokens for s in seqs]  # the fed token's position
        return self.graphs.run(
            input_ids=[s.token_ids[p] for s, p in zip(seqs, pos)], positions=pos,
            slots=[s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)],
            seq_lens=[p + 1 for p in pos], tables=[s.block_table for s in seqs])
