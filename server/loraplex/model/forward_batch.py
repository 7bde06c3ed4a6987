"""Per-step inputs of one model forward: a flat batch of tokens from many sequences.

Every step the runner packs the new tokens of all scheduled sequences (prefill chunks and single
decode tokens alike) into one flat batch of T tokens. Sequences are contiguous segments of it,
delimited by `query_start_loc`. Worked example, block_size=4, two sequences:

    seq 0: prefill chunk of 3 tokens, nothing cached yet        -> tokens 0..2
    seq 1: decode, 6 tokens already cached, 1 new token         -> token  3
    input_ids       = [a0, a1, a2, b6]
    positions       = [0, 1, 2, 6]
    query_start_loc = [0, 3, 4]            # seq i owns tokens query_start_loc[i]:query_start_loc[i+1]
    seq_lens        = [3, 7]               # cached + new, i.e. the context each seq attends over
    block_tables    = [[5, 0], [2, 9]]     # physical KV blocks, padded with 0 (never read past seq_len)
    slot_mapping    = [20, 21, 22, 38]     # block_tables[s][pos // 4] * 4 + pos % 4, per token
    logits_indices  = [2, 3]               # last token of each seq: only these rows reach lm_head

The adapter side of the same step travels in `lora` (None when no token uses an adapter, which
keeps the base-model path free of LoRA work).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, flat KV slot (block * block_size + offset) to write
    query_start_loc: torch.Tensor  # [S + 1] int64, cumulative token offsets of the sequences
    seq_lens: torch.Tensor  # [S] int64, context length after this step (cached + new)
    block_tables: torch.Tensor  # [S, max_blocks_per_seq] int64, padded with 0
    logits_indices: torch.Tensor  # [S] int64, rows whose logits are wanted (usually last token)
    # Python-side copies so the attention code can slice without a device->host sync.
    query_lens_list: list[int]  # [S]
    seq_lens_list: list[int]  # [S]
    lora: Any = None  # loraplex.lora.batch.LoraBatch | None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)
