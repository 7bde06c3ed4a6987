"""What a caller hands the engine, and what the engine hands back.

The gRPC servicer turns protobuf into a `Request`, submits it with a callback, and receives
`RequestOutput` events from the engine thread (one per step that produced something, the last
one with `finished=True`). Exactly one finished event is delivered per request, whatever happens
(EOS, length, stop string, cancel, error, shutdown).
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from loraplex.engine.logprobs import MAX_TOP_LOGPROBS, TokenLogprob


class FinishReason(enum.Enum):
    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"
    ERROR = "error"
    # Structured output: the constraint's structure is complete and its grammar allows nothing
    # more (engine/structured/). OpenAI's API reports it as "stop", as vLLM does.
    GRAMMAR = "grammar"


class InvalidRequestError(ValueError):
    """Bad input; `field` names the offending request field (-> INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; HF semantics (divide positive logits, multiply negative)
    # OpenAI semantics over the generated tokens: logit -= presence * (count > 0) + frequency * count
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None = nondeterministic
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # None = no log-probabilities; k >= 0 = the sampled token's logprob and the k most likely
    # alternatives, at every step (engine/logprobs.py: of the raw model distribution).
    logprobs: int | None = None
    # OpenAI's logit_bias: (token id, bias) pairs added to the logits before sampling, bias in
    # [-100, 100] (-100 effectively bans the token, 100 forces it). Token ids are checked against
    # the vocabulary by the engine.
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError("temperature", f"must be finite and >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0, got {self.top_k}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidRequestError(
                "repetition_penalty", f"must be finite and > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2.0 <= value <= 2.0:
                raise InvalidRequestError(name, f"must be in [-2, 2], got {value}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop", "stop strings must be non-empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError("logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        for token, bias in self.logit_bias:
            if not math.isfinite(bias) or not -100.0 <= bias <= 100.0:
                raise InvalidRequestError("logit_bias", f"bias of token {token} must be in [-100, 100], got {bias}")
            if token < 0:
                raise InvalidRequestError("logit_bias", f"token id {token} must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Timings:
    queue_seconds: float = 0.0  # arrival -> first scheduled
    ttft_seconds: float = 0.0  # arrival -> first generated token
    total_seconds: float = 0.0  # arrival -> finished


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: tuple[int, ...]  # tokens produced since the previous event
    text_delta: str  # text produced since the previous event (stop strings already cut)
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens whose K/V came from the prefix cache (OpenAI usage.prompt_tokens_details.
    # cached_tokens); set on the finished event.
    cached_prompt_tokens: int = 0
    timings: Timings | None = None  # set on the finished event
    error: str | None = None  # set when finish_reason is ERROR
    out_of_memory: bool = False  # an ERROR for lack of memory (-> RESOURCE_EXHAUSTED: retry later)
    # One per new_token_ids entry when the request asked for logprobs; () otherwise.
    logprobs: tuple[TokenLogprob, ...] = ()
    # The adapter-side exception behind an ERROR (its background load failed: corrupt file,
    # folder gone, no room), so the API answers with that error's own status.
    cause: BaseException | None = None


OutputCallback = Callable[[RequestOutput], None]


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter_id: str = ""  # "" = base model
    arrival_time: float = field(default_factory=time.monotonic)
    # Structured output: what the output must match (engine.structured.spec.Constraint), and its
    # compiled grammar (engine.structured.grammar.CompiledGrammar) once compiled. The API compiles
    # off the engine thread before submit; Engine.submit compiles one left None.
    constraint: Any = None
    grammar: Any = None
