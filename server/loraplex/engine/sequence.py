"""One request's running state inside the engine (owned by the engine thread only).

A `Sequence` is the engine-side twin of a `Request`: the growing token list (prompt followed by
generated tokens), how many of those tokens already have their K/V in the cache, the physical KV
blocks holding them, the adapter slot, the per-request random generator and the timings.

The invariant the scheduler and runner rely on: tokens `token_ids[:num_computed_tokens]` are in
the KV cache; the rest (a prompt not fully prefilled yet, or the one token sampled last step) are
fed to the model next. A step that computes up to the end of `token_ids` yields logits for the
last token, from which the next token is sampled.
"""

from __future__ import annotations

import array
import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from loraplex.engine.request import FinishReason, OutputCallback, Request, SamplingParams, Timings

NO_ADAPTER_SLOT = -1  # ForwardBatch / kernel convention: slot -1 means "base model only"


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # in the scheduler's waiting queue, holds no KV blocks and no adapter slot
    RUNNING = "running"  # admitted: holds KV blocks (and an adapter slot when it uses an adapter)
    FINISHED = "finished"


@dataclass(eq=False)  # identity equality: two sequences are never "equal" by value
class Sequence:
    request: Request
    callback: OutputCallback | None = None
    detokenizer: Any = None  # detokenizer.IncrementalDetokenizer, attached by the engine
    generator: torch.Generator | None = None  # set when the request has a seed

    token_ids: list[int] = field(init=False)  # prompt + generated
    # The same ids as int64 in a buffer, grown with token_ids: the sampler's penalties read a
    # sequence's history through it without converting its Python ints every step (32 histories
    # of 2000 tokens: ~2 ms a step).
    token_array: array.array = field(init=False)
    num_prompt_tokens: int = field(init=False)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)  # physical KV block ids, in order
    status: SequenceStatus = SequenceStatus.WAITING
    adapter_slot: int = NO_ADAPTER_SLOT
    holds_adapter_slot: bool = False  # True between a successful acquire() and its release()
    adapter_skips: int = 0  # admission passes that skipped it because its adapter was not ready
    adapter_wait_start: float | None = None  # when admission first found its adapter not ready
    num_preemptions: int = 0
    # Prefix cache (engine/block_manager.py). The key names what the KV depends on besides the
    # tokens: "" for the base model, the adapter's content key otherwise; None = never cached.
    prefix_cache_key: str | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # hash chain of its full blocks (memo)
    num_hashed_blocks: int = 0  # leading blocks of block_table already offered to the cache
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the cache at first admission
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_reason: FinishReason | None = None
    # Structured output: this sequence's position in its grammar (engine.structured.grammar.
    # Matcher), advanced once per appended token -- never by a recompute after preemption, which
    # replays tokens the matcher has already consumed.
    matcher: Any = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.request.prompt_token_ids)
        self.token_array = array.array("q", self.token_ids)
        self.num_prompt_tokens = len(self.token_ids)

    @classmethod
    def from_request(cls, request: Request, callback: OutputCallback | None = None,
                     device: torch.device | str = "cpu") -> "Sequence":
        generator = None
        if request.sampling.seed is not None:
            # One generator per request: its draws never depend on which other requests share
            # the batch, so a seeded request is reproducible under continuous batching.
            generator = torch.Generator(device=device)
            generator.manual_seed(request.sampling.seed)
        return cls(request=request, callback=callback, generator=generator)

    # --- read-only views -------------------------------------------------------------------
    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def adapter_id(self) -> str:
        return self.request.adapter_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to feed the model before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Everything but the last sampled token is cached: the next step feeds one token."""
        return self.num_computed_tokens > 0 and self.num_uncomputed_tokens == 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    # --- mutations (engine thread) -------------------------------------------------------------
    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.token_array.append(token_id)

    def timings(self, now: float | None = None) -> Timings:
        now = time.monotonic() if now is None else now
        arrival = self.request.arrival_time
        queue = (self.first_scheduled_time if self.first_scheduled_time is not None else now) - arrival
        ttft = (self.first_token_time - arrival) if self.first_token_time is not None else 0.0
        return Timings(queue_seconds=max(queue, 0.0), ttft_seconds=max(ttft, 0.0),
                       total_seconds=max(now - arrival, 0.0))
