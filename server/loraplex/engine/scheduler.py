"""Continuous batching: which sequences run this step, and how many tokens each feeds.

Every step packs, under a token budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`):

1. decodes: every running sequence whose prompt is cached feeds its one new token. They go first
   so that streams already producing text never stall behind long prompts.
2. prefill chunks of running sequences whose prompt is only partly cached (chunked prefill).
3. admissions from the waiting queue (FIFO), each with a first chunk, while KV blocks for that
   chunk are free and its adapter can get a device slot. A request whose leading tokens the
   prefix cache holds (same tokens, same adapter weights; block_manager.py) starts with them
   computed: its first chunk begins after them.

KV blocks are allocated as sequences grow. When a running sequence cannot get a block, the most
recently admitted running sequence that is not already in this step is preempted by *recompute*:
its blocks are freed, its adapter slot released, and it goes back to the front of the waiting
queue keeping its generated tokens; on re-admission its prompt + generated tokens are prefilled
again (less what the prefix cache still holds of them). Preempting the youngest first means the
oldest sequence always makes progress, so the system cannot deadlock as long as one sequence at
`max_model_len` fits in the cache.

Adapter-aware admission. Adapters come from an optional hook (`AdapterSlots`, the LoRA
manager): `acquire(adapter_id)` returns the adapter's slot when it is in memory, or None ("not
yet": its background load is still running, or the adapter pool is full of adapters in use).
Adapter memory is sized in bytes, so while it has room the running batch is as large as KV memory
allows, exactly as without adapters. A request whose adapter is not ready is passed over, and
requests behind it whose adapters are ready (or that use none) are admitted: a load never stalls
the batch. Starvation bound: once a request has been passed over `adapter_starvation_steps`
times, no adapter request behind it is admitted until it is (requests without an adapter still
are). Running sequences then finish, their adapters go idle, the pool evicts them and the
starved request's adapter moves in; so every waiting request is admitted within that many steps
plus the longest running sequence's remaining tokens plus one adapter load.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from loraplex.config import EngineConfig
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.errors import QueueFullError
from loraplex.engine.sequence import NO_ADAPTER_SLOT, Sequence, SequenceStatus


class AdapterSlots(Protocol):
    """What the scheduler needs from the LoRA manager (loraplex.lora.manager.LoraManager)."""

    def acquire(self, adapter_id: str) -> int | None: ...  # device slot, or None = not now

    def release(self, adapter_id: str) -> None: ...

    def observe_wait(self, seconds: float) -> None: ...  # a request's wait for its adapter, at admission


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens each seq feeds this step
    # Sequences that could not be admitted for good (e.g. acquire() raised): the engine fails them.
    failed: list[tuple[Sequence, str]] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Whether seq i reaches the end of its tokens this step (so a token is sampled)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager,
                 adapter_slots: AdapterSlots | None = None):
        self.config = config
        self.block_manager = block_manager
        self.adapter_slots = adapter_slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.num_preemptions_total = 0

    # --- queue management ----------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence, check_bound: bool = True) -> None:
        """Queue a new sequence. The bound may be checked by the caller instead (the engine
        counts its own inbox too), hence `check_bound`."""
        if check_bound and len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(self.config.max_waiting)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Take seq out of the queues for good and give back its KV blocks and adapter slot."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    # --- the step's schedule -----------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        in_batch: set[int] = set()  # id(seq) of sequences already in this step

        # 1. Decodes, oldest first. A decode that cannot get a block preempts the youngest.
        for seq in [s for s in self.running if s.is_decoding]:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted by an older decode above
                continue
            if not self._make_room(seq, 1, in_batch, out):
                continue  # seq preempted itself: it was the youngest
            if not self.block_manager.can_allocate(seq, 1):
                continue  # unreachable: everything younger is preemptible here; kept for safety
            self._add(out, in_batch, seq, 1)
            budget -= 1

        # 2. Continue partial prefills of running sequences, oldest first.
        for seq in [s for s in self.running if not s.is_decoding]:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, n, in_batch, out):
                continue
            # Younger sequences already in this step cannot be preempted: shrink to what fits.
            n = min(n, self.block_manager.max_tokens_allocatable(seq))
            if n == 0:
                continue
            self._add(out, in_batch, seq, n)
            budget -= n

        # 3. Admit waiting sequences (FIFO), each with its first chunk. Not in a step that had to
        # preempt: the cache is short, and re-admitting the victim at once would only thrash.
        skipped: list[Sequence] = []  # waiting on their adapter; keep their queue order
        starving = False  # a request behind which no adapter request may pass (module docstring)
        while (self.waiting and budget > 0 and out.num_preempted == 0
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            # Its leading tokens whose K/V the prefix cache holds are not computed again: the
            # first chunk starts after them (so the step's budget admits more requests).
            cached = self.block_manager.cached_prefix_tokens(seq)
            n = min(seq.num_uncomputed_tokens - cached, budget)
            if not self.block_manager.can_allocate(seq, n, cached):
                break  # FIFO: do not let later (smaller) requests starve this one
            self.waiting.popleft()
            if starving and seq.adapter_id:
                skipped.append(seq)
                continue
            try:
                got_slot = self._acquire_slot(seq)
            except Exception as exc:  # the adapter vanished, failed to load, ...
                out.failed.append((seq, f"adapter {seq.adapter_id!r}: {exc}"))
                seq.status = SequenceStatus.FINISHED
                continue
            if not got_slot:
                seq.adapter_skips += 1
                if seq.adapter_wait_start is None:
                    seq.adapter_wait_start = time.monotonic()
                starving = starving or seq.adapter_skips > self.config.adapter_starvation_steps
                skipped.append(seq)
                continue
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.block_manager.use_cached_prefix(seq, cached)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
                seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            self._add(out, in_batch, seq, n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return out

    # --- helpers -------------------------------------------------------------------------------
    def _add(self, out: ScheduledBatch, in_batch: set[int], seq: Sequence, n: int) -> None:
        self.block_manager.allocate(seq, n)  # grows the table only where the chunk needs it
        out.seqs.append(seq)
        out.num_new_tokens.append(n)
        in_batch.add(id(seq))

    def _make_room(self, seq: Sequence, n: int, in_batch: set[int], out: ScheduledBatch) -> bool:
        """Preempt the youngest running sequences not in this step until seq's next `n` tokens
        fit (or until none is left that may be preempted). False if seq itself was preempted."""
        while not self.block_manager.can_allocate(seq, n):
            victim = self.running[-1]
            if id(victim) in in_batch:
                return True  # nothing preemptible left; the caller shrinks or skips
            self._preempt(victim)
            out.num_preempted += 1
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0  # recompute: prompt + generated tokens are prefilled again
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions_total += 1

    def _acquire_slot(self, seq: Sequence) -> bool:
        if not seq.adapter_id:
            seq.adapter_slot = NO_ADAPTER_SLOT
            return True
        if self.adapter_slots is None:
            raise RuntimeError("no LoRA manager is configured")
        slot = self.adapter_slots.acquire(seq.adapter_id)
        if slot is None:
            return False
        if seq.num_preemptions == 0:  # its first admission (re-admissions after preemption: not a wait)
            waited = 0.0 if seq.adapter_wait_start is None else time.monotonic() - seq.adapter_wait_start
            observe = getattr(self.adapter_slots, "observe_wait", None)
            if observe is not None:
                observe(waited)
        seq.adapter_wait_start = None
        seq.adapter_skips = 0
        seq.adapter_slot = slot
        seq.holds_adapter_slot = True
        return True

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq.holds_adapter_slot and self.adapter_slots is not None:
            self.adapter_slots.release(seq.adapter_id)
        seq.holds_adapter_slot = False
        seq.adapter_slot = NO_ADAPTER_SLOT
