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

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
