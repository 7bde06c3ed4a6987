"""ArchConfig: the architecture facts of a Llama-family checkpoint, parsed from its config.json.

Only what our own implementation (llama.py) needs, validated up front so that an unsupported
checkpoint is refused at load with the offending config.json field named, never run wrongly.

Handles both config.json styles: transformers < 5 (`rope_theta` + `rope_scaling`) and
transformers >= 5 (`rope_parameters` holding `rope_type`, `rope_theta` and the scaling keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# architectures entry -> model family. Everything else is refused.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

DEFAULT_ROPE_THETA = 10000.0  # transformers' default_theta for all four families


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters. rope_type: default | linear | llama3."""

    rope_type: str = "default"
    theta: float = DEFAULT_ROPE_THETA
    factor: float = 1.0  # linear, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_parameters.rope_type: unsupported value {self.rope_type!r} "
                             "(supported: default, linear, llama3)")
        if not self.theta > 0:
            raise ValueError(f"rope_theta: must be > 0, got {self.theta}")
        if not self.factor > 0:
            raise ValueError(f"rope_parameters.factor: must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ValueError("rope_parameters: llama3 needs high_freq_factor > low_freq_factor > 0, "
                                 f"got {self.high_freq_factor} and {self.low_freq_factor}")
            if self.original_max_position_embeddings < 1:
                raise ValueError("rope_parameters.original_max_position_embeddings: must be >= 1")


@dataclass(frozen=True)
class ArchConfig:
    architecture: str  # e.g. "LlamaForCausalLM"
    family: str  # llama | mistral | qwen2 | qwen3
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: always; Llama/Qwen3: attention_bias
    o_bias: bool = False  # Llama/Qwen3 attention_bias (Qwen2's o_proj never has one)
    mlp_bias: bool = False  # Llama mlp_bias
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    # Per layer: attend to at most this many most recent keys (incl. the token itself), None = all.
    sliding_windows: tuple[int | None, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_key_value_heads: {self.num_kv_heads} does not divide "
                             f"num_attention_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps: must be > 0, got {self.rms_norm_eps}")
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError(f"sliding_windows: need one entry per layer ({self.num_layers}), "
                             f"got {len(self.sliding_windows)}")
        if any(w is not None and w < 1 for w in self.sliding_windows):
            raise ValueError(f"sliding_window: must be >= 1, got {self.sliding_windows}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any],
                       generation_config: dict[str, Any] | None = None) -> "ArchConfig":
        """Parse a config.json dict (and optionally generation_config.json for extra eos ids)."""
        archs = cfg.get("architectures") or []
        supported = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if not supported:
            raise ValueError(f"architectures: {archs!r} is not supported; expected one of "
                             f"{sorted(SUPPORTED_ARCHITECTURES)}")
        arch = supported[0]
        family = SUPPORTED_ARCHITECTURES[arch]

        def need(key: str) -> Any:
            if cfg.get(key) is None:
                raise ValueError(f"{key}: missing from config.json")
            return cfg[key]

        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act: only 'silu' is supported, got {act!r}")
        hidden = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        num_kv = int(cfg.get("num_key_value_heads") or num_heads)
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        num_layers = int(need("num_hidden_layers"))
        attention_bias = bool(cfg.get("attention_bias", False))

        return cls(
            architecture=arch,
            family=family,
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            vocab_size=int(need("vocab_size")),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
            rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
            rope=_parse_rope(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=False if family in ("qwen2", "mistral") else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)) if family == "llama" else False,
            qk_norm=family == "qwen3",
            sliding_windows=_parse_sliding_windows(cfg, family, num_layers),
            eos_token_ids=_eos_ids(cfg, generation_config),
            bos_token_id=cfg.get("bos_token_id"),
        )


def _parse_rope(cfg: dict[str, Any]) -> RopeConfig:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # transformers 5 per-layer-type rope dicts (e.g. {"full_attention": {...}}); our families
        # use one rope for every layer, so they must all agree.
        distinct = {tuple(sorted(v.items())) for v in params.values()}
        if len(distinct) != 1:
            raise ValueError("rope_parameters: per-layer-type rope parameters differ; unsupported")
        params = next(iter(params.values()))
    if not isinstance(params, dict):
        params = dict(cfg.get("rope_scaling") or {})
    else:
        params = dict(params)
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    theta = float(theta) if theta is not None else DEFAULT_ROPE_THETA
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor: only 1.0 is supported, got {partial}")
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if params.get(key) is None:
                raise ValueError(f"rope_parameters.{key}: required for rope_type 'llama3'")
        return RopeConfig(
            rope_type="llama3", theta=theta, factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    if rope_type == "linear":
        if params.get("factor") is None:
            raise ValueError("rope_parameters.factor: required for rope_type 'linear'")
        return RopeConfig(rope_type="linear", theta=theta, factor=float(params["factor"]))
    return RopeConfig(rope_type=str(rope_type), theta=theta)


def _parse_sliding_windows(cfg: dict[str, Any], family: str, num_layers: int) -> tuple[int | None, ...]:
    """Which layers use sliding-window attention, following each family's HF config rules.

    Mistral: `sliding_window` (None = off) applies to every layer. Qwen2/Qwen3: only when
    `use_sliding_window`, and then to the layers named "sliding_attention" in `layer_types`
    (or, for older configs without it, the layers at index >= `max_window_layers`).
    """
    window = cfg.get("sliding_window")
    if family == "llama" or window is None:
        return (None,) * num_layers
    window = int(window)
    if family == "mistral":
        return (window,) * num_layers
    if not cfg.get("use_sliding_window", False):
        return (None,) * num_layers
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise ValueError(f"layer_types: need {num_layers} entries, got {len(layer_types)}")
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"layer_types: unsupported entries {sorted(unknown)}")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    first = int(cfg.get("max_window_layers", 28))
    return tuple(window if i >= first else None for i in range(num_layers))


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _eos_ids(cfg: dict[str, Any], generation_config: dict[str, Any] | None) -> tuple[int, ...]:
    """Union of config.json and generation_config.json eos ids, config.json's first."""
    ids: list[int] = []
    for source in (cfg, generation_config or {}):
        for i in _as_id_list(source.get("eos_token_id")):
            if i not in ids:
                ids.append(i)
    return tuple(ids)

