"""Per-step LoRA metadata: which adapter slot each token of the flat batch uses.

Built once per step by the model runner and passed explicitly to every LoRA-wrapped projection
(via ForwardBatch.lora). The kernel metadata (tokens grouped by slot, real ranks) is computed here
once, so the 7 x num_layers projection calls of a step do no bookkeeping of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex_kernels import LoraMeta, build_lora_meta


@dataclass(frozen=True)
class LoraBatch:
    token_slots: torch.Tensor  # [T] int64, device slot per token, -1 = base model
    meta: LoraMeta

    @classmethod
    def build(cls, seq_slots: list[int], query_lens: list[int], slot_ranks: torch.Tensor,
              device: torch.device | str) -> "LoraBatch | None":
        """seq_slots[i] is sequence i's slot (-1 for none); it owns query_lens[i] tokens.

        Returns None when no sequence uses an adapter: the projections then skip LoRA entirely.
        """
        if all(s < 0 for s in seq_slots):
            return None
        token_slots = torch.repeat_interleave(
            torch.tensor(seq_slots, dtype=torch.int64), torch.tensor(query_lens, dtype=torch.int64)
        ).to(device)  # [T]
        return cls(token_slots=token_slots, meta=build_lora_meta(token_slots, slot_ranks))
