"""A point-in-time snapshot of the engine for health checks and Prometheus gauges/counters."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineStats:
    num_running: int  # admitted sequences (hold KV blocks)
    num_waiting: int  # queued, not admitted (incl. submitted but not yet seen by the loop)
    kv_blocks_used: int
    kv_blocks_total: int
    # Monotonic counters since start (Prometheus `_total` counters read these).
    steps_total: int = 0
    prompt_tokens_total: int = 0  # prompt tokens fed to the model (recomputes included)
    generation_tokens_total: int = 0  # tokens sampled
    preemptions_total: int = 0
    finished_total: dict[str, int] = field(default_factory=dict)  # FinishReason.value -> count
    # Prefix cache: tokens looked up at admission, how many were found cached, blocks holding a
    # cached prefix now (in use or evictable), cached blocks evicted for room.
    prefix_cache_queried_tokens_total: int = 0
    prefix_cache_hit_tokens_total: int = 0
    prefix_cache_blocks: int = 0
    prefix_cache_evictions_total: int = 0
    # Structured output (engine/structured/compiler.py): constraint lookups that found a compiled
    # (or compiling) grammar in the cache, those that started a compile, compiles that failed
    # (invalid, unsupported; a timed-out one counts when it ends), grammars cached now.
    structured_output_cache_hits_total: int = 0
    structured_output_cache_misses_total: int = 0
    structured_output_compile_failures_total: int = 0
    structured_output_cached_grammars: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
