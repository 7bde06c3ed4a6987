"""Base-model decode steps replayed from CUDA graphs, one graph per batch-size bucket (--cuda-graphs).

A decode step of a small model on a GPU is launch-bound: ~30 layers x ~20 kernels, each a few
microseconds of work and as much of CPU-side launch. A CUDA graph records the whole forward once
and replays it with one launch. A graph replays fixed shapes and fixed addresses, so:

- every input lives in a static buffer sized for the largest bucket (input_ids, positions,
  slot_mapping, seq_lens [B_max]; block_tables [B_max, W], W = blocks of the longest sequence);
  a step copies its values into the first B rows and pads the rest up to its bucket b >= B;
- a padding row is a harmless one-token sequence on a scratch KV block that the block manager
  never hands out (the runner allocates it past config.num_kv_blocks): it writes its K/V there
  and attends over that one key, and its logits are dropped;
- attention gets a fixed-shape plan (`static_plan`): all b rows decode over W blocks with a
  length mask, built inside the recorded function, never from Python lists of this step;
- steps the graphs do not cover run eagerly as before: any prefill token, any adapter in the step
  (the LoRA metadata is built on the host per step), more sequences than the largest bucket.

Buckets follow vLLM / SGLang: 1, 2, 4, 8, then every 8 up to max_num_seqs, so padding wastes at
most 7 rows. On CPU nothing is captured (`capture=False`): the same static-shape forward runs
eagerly, which is what the tests check against the ordinary forward; the engine refuses
--cuda-graphs on a CPU device (model_runner.py). Never run on a GPU so far (no GPU was lent while
it was written): the capture itself is untested.

The logits a replay returns are a view of the graph's output buffer: valid until the next step.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence as Seq

import torch

from loraplex.model.attention import AttentionPlan
from loraplex.model.forward_batch import ForwardBatch
from loraplex.model.kv_cache import KVCache


def batch_buckets(max_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to (and always including) max_seqs."""
    out = [b for b in (1, 2, 4) if b < max_seqs] + list(range(8, max_seqs, 8))
    return out + [max_seqs]


def static_plan(block_size: int, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> AttentionPlan:
    """Every row a decode row over the full width of `block_tables` ([b, W]), masked by `seq_lens` [b]."""
    b, width = block_tables.shape
    return AttentionPlan(num_tokens=b, block_size=block_size, decode_rows=slice(0, b),
                         decode_blocks=block_tables.reshape(-1), decode_table=block_tables,
                         decode_num_blocks=width, decode_seq_lens=seq_lens, prefills=[],
                         decode_seq_index=torch.arange(b, device=seq_lens.device), block_tables=block_tables)


class DecodeGraphs:
    """Static buffers + one recorded forward per bucket; `run` serves a pure base-model decode step."""

    def __init__(self, model: torch.nn.Module, kv: KVCache, max_seqs: int, max_blocks_per_seq: int,
                 scratch_block: int, device: torch.device, capture: bool = True):
        self.model = model
        self.kv = kv
        self.buckets = batch_buckets(max_seqs)
        self.width = max_blocks_per_seq
        self.scratch_block = scratch_block
        self.block_size = kv.block_size
        self.capture = capture
        n = self.buckets[-1]
        z = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(n, **z)  # [B_max]
        self.positions = torch.zeros(n, **z)  # [B_max]
        self.slot_mapping = torch.zeros(n, **z)  # [B_max]
        self.seq_lens = torch.zeros(n, **z)  # [B_max]
        self.block_tables = torch.zeros(n, max_blocks_per_seq, **z)  # [B_max, W]
        self.row_index = torch.arange(n + 1, **z)  # [B_max + 1]: row i's logits are row i's
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._pad(0, n)

    def covers(self, num_seqs: int, num_new_tokens: Seq[int], block_table_lens: Seq[int], any_adapter: bool) -> bool:
        return (not any_adapter and 0 < num_seqs <= self.buckets[-1] and all(n == 1 for n in num_new_tokens)
                and max(block_table_lens) <= self.width)

    def bucket(self, num_seqs: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, num_seqs)]

    def _pad(self, start: int, stop: int) -> None:
        """Rows start..stop become one-token sequences on the scratch block."""
        self.input_ids[start:stop] = 0
        self.positions[start:stop] = 0
        self.slot_mapping[start:stop] = self.scratch_block * self.block_size
        self.seq_lens[start:stop] = 1
        self.block_tables[start:stop] = self.scratch_block

    def _forward(self, b: int) -> torch.Tensor:
        """The recorded function: the model over the first b rows of the static buffers."""
        batch = ForwardBatch(input_ids=self.input_ids[:b], positions=self.positions[:b],
                             slot_mapping=self.slot_mapping[:b], query_start_loc=self.row_index[:b + 1],
                             seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b],
                             logits_indices=self.row_index[:b], query_lens_list=[1] * b,
                             seq_lens_list=[1] * b)  # the lists are unused: the plan is given
        plan = static_plan(self.block_size, self.block_tables[:b], self.seq_lens[:b])
        return self.model(batch, self.kv, plan=plan)

    def capture_all(self) -> None:
        """Record every bucket, largest first so the smaller ones reuse its memory pool. Runs on
        padding rows only: nothing but the scratch block is written."""
        pool = None
        for b in reversed(self.buckets):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up runs (allocator, Triton autotune) off the graph
                for _ in range(2):
                    self._forward(b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[b] = self._forward(b)
            pool = graph.pool()
            self._graphs[b] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            tables: list[list[int]]) -> torch.Tensor:
        """One decode step of S = len(input_ids) sequences -> logits [S, vocab] (a view, see above)."""
        s = len(input_ids)
        b = self.bucket(s)
        dev = self.input_ids.device
        self.input_ids[:s].copy_(torch.tensor(input_ids), non_blocking=True)
        self.positions[:s].copy_(torch.tensor(positions), non_blocking=True)
        self.slot_mapping[:s].copy_(torch.tensor(slots), non_blocking=True)
        self.seq_lens[:s].copy_(torch.tensor(seq_lens), non_blocking=True)
        padded = [t + [self.scratch_block] * (self.width - len(t)) for t in tables]
        self.block_tables[:s].copy_(torch.tensor(padded, dtype=torch.long), non_blocking=True)
        self._pad(s, b)
        if self.capture and dev.type == "cuda":
            self._graphs[b].replay()
            return self._outputs[b][:s]
        return self._forward(b)[:s]
