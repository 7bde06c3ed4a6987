"""Frozen, validated configuration. Built from CLI flags in cli.py; no env-var globals."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # HF folder; None = embedded default model (SmolLM2-135M-Instruct)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 on CPU and CUDA)
    device: str = "auto"  # auto | cpu | cuda
    cache_dir: str | None = None  # where the default model is converted to; None = ~/.cache/loraplex

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: unknown value {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: unknown value {self.device!r}")


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int = 2048  # KV cache size in blocks (all sequences share them)
    max_num_seqs: int = 64  # sequences in one step (running batch)
    max_num_batched_tokens: int = 512  # per-step token budget: decode tokens + prefill chunks
    max_model_len: int = 2048  # prompt + generated tokens, capped by the model's own limit
    max_new_tokens_cap: int = 2048  # requests asking for more get INVALID_ARGUMENT
    max_waiting: int = 256  # waiting queue bound; beyond it RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        for name in ("block_size", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens",
                     "max_model_len", "max_new_tokens_cap", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    shutdown_grace_seconds: float = 10.0
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    lora: "LoraConfig" = field(default_factory=lambda: LoraConfig())

    def __post_init__(self) -> None:
        if not (0 <= self.port < 65536):
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")
        if self.shutdown_grace_seconds < 0:
            raise ValueError("shutdown_grace_seconds: must be >= 0")


@dataclass(frozen=True)
class LoraConfig:
    max_loras: int = 16  # device slots: adapters usable in one step
    max_lora_rank: int = 16  # slot size; adapters of a larger rank are refused at load
    max_cpu_loras: int = 128  # host tier; beyond it the LRU unpinned, idle adapter is dropped to disk
    adapter_root: str | None = None  # on-demand loading of <root>/<adapter_id>
    allowed_roots: tuple[str, ...] = ()  # LoadAdapter paths must lie under one of these (or adapter_root)
    max_adapter_bytes: int = 2 * 1024**3  # largest adapter folder accepted

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras", "max_adapter_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras: must be >= max_loras (every device adapter is also on the host)")

    @property
    def roots(self) -> tuple[str, ...]:
        return ((self.adapter_root,) if self.adapter_root else ()) + self.allowed_roots
