"""Read and validate one PEFT adapter folder into plain per-module LoRA weights.

`read_adapter(path, base, max_rank, max_bytes)` turns a folder written by PEFT's
`save_pretrained` (adapter_config.json + adapter_model.safetensors, or a legacy
adapter_model.bin) into `AdapterWeights`: for every adapted projection an A [r, in], a
B [out, r] and one float `scale`, such that

    y = base(x) + scale * (x @ A.T) @ B.T

is exactly what PEFT 0.21.2 computes when it loads the same folder onto the HF model.

Semantics (checked against the peft source and, in tests, against PEFT itself):
- LoRA: scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; r and lora_alpha
  come per module from rank_pattern / alpha_pattern (first matching key, see target_match).
- AdaLoRA: delta = B @ (A * E) * scaling / (ranknum + 1e-5) with scaling = lora_alpha (or the
  module's current rank when lora_alpha <= 0). ranknum is init_r: when PEFT shrinks a module by
  its saved rank_pattern mask it copies the old ranknum back ("the scaling is exactly as the
  previous"). E is folded into A and the whole factor into scale, so callers see plain LoRA.
- Which modules are adapted: target_match.TargetRule (target_modules list/regex/"all-linear",
  exclude_modules, layers_to_transform, layers_pattern).

Everything PEFT would do differently from that plain formula (DoRA, biases, embeddings,
modules_to_save, base-modifying inits, variants...) is refused with an `AdapterFormatError`
naming the config field, file or tensor -- never ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import torch

from loraplex.lora.target_match import (
    PROJECTIONS,
    TargetRule,
    TargetRuleError,
    check_pattern_keys,
    get_pattern_key,
    projection_key,
    projection_parent,
)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"  # legacy; read only through torch.load(weights_only=True)
_MAX_CONFIG_BYTES = 16 << 20  # a real config is a few KB; an AdaLoRA rank_pattern mask a few hundred
SUPPORTED_PEFT_TYPES = ("LORA", "ADALORA")


class AdapterFormatError(ValueError):
    """The folder is not a servable PEFT adapter; `field` names the config field, file or tensor."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --------------------------------------------------------------------------------------------
# Base-model shapes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseShapes:
    """What an adapter must fit: the layer count and (in_features, out_features) per projection."""

    num_layers: int
    features: Mapping[str, tuple[int, int]]  # short name (q_proj...) -> (in_features, out_features)

    def __post_init__(self) -> None:
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers: must be an int >= 1, got {self.num_layers!r}")
        if set(self.features) != set(PROJECTIONS):
            raise ValueError(f"features: must have exactly {PROJECTIONS}, got {sorted(self.features)}")
        clean: dict[str, tuple[int, int]] = {}
        for name in PROJECTIONS:
            dims = tuple(self.features[name])
            if len(dims) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
                raise ValueError(f"features[{name}]: must be two ints >= 1, got {self.features[name]!r}")
            clean[name] = (dims[0], dims[1])
        object.__setattr__(self, "features", MappingProxyType(clean))

    def __hash__(self) -> int:  # a mappingproxy is unhashable; hash its items instead
        return hash((self.num_layers, tuple(self.features.items())))

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> BaseShapes:
        """From a Llama-family HF config.json dict (as transformers' LlamaAttention/LlamaMLP size them)."""
        try:
            hidden = int(config["hidden_size"])
            inter = int(config["intermediate_size"])
            heads = int(config["num_attention_heads"])
            layers = int(config["num_hidden_layers"])
        except KeyError as e:
            raise ValueError(f"{e.args[0]}: missing from the model config") from None
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        q, kv = heads * head_dim, kv_heads * head_dim
        return cls(layers, {
            "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
        })

    @classmethod
    def from_projections(cls, projections: Iterable[tuple[int, str, Any]]) -> BaseShapes:
        """From `model.iter_projections()`: (layer_idx, short_name, module with in/out_features)."""
        features: dict[str, tuple[int, int]] = {}
        seen: set[tuple[int, str]] = set()
        for layer, name, proj in projections:
            dims = (int(proj.in_features), int(proj.out_features))
            if features.setdefault(name, dims) != dims:
                raise ValueError(f"{name}: layer {layer} has shape {dims}, other layers {features[name]}")
            seen.add((layer, name))
        num_layers = 1 + max((layer for layer, _ in seen), default=-1)
        missing = [(i, s) for i in range(num_layers) for s in PROJECTIONS if (i, s) not in seen]
        if missing:
            raise ValueError(f"projections: missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        return cls(num_layers, features)

    @classmethod
    def from_model(cls, model: Any) -> BaseShapes:
        """From a loaded loraplex model (anything with `iter_projections()`)."""
        return cls.from_projections(model.iter_projections())


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # eq=False: tensor fields have no boolean ==; compare fingerprints
class LoraModule:
    """One adapted projection: delta_y = scale * (x @ A.T) @ B.T."""

    A: torch.Tensor  # [rank, in_features] contiguous; float32 from read_adapter
    B: torch.Tensor  # [out_features, rank] contiguous, same dtype as A
    scale: float
    rank: int

    def __post_init__(self) -> None:
        if not self.A.is_floating_point() or self.A.dtype != self.B.dtype:
            raise ValueError(f"A/B: must share one floating dtype, got {self.A.dtype}/{self.B.dtype}")
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.rank or self.B.shape[1] != self.rank:
            raise ValueError(f"A/B: shapes {tuple(self.A.shape)}/{tuple(self.B.shape)} do not fit rank {self.rank}")
        if self.rank < 1 or not math.isfinite(self.scale):
            raise ValueError(f"rank/scale: need rank >= 1 and a finite scale, got {self.rank}/{self.scale}")
        if not (self.A.is_contiguous() and self.B.is_contiguous()):
            raise ValueError("A/B: must be contiguous")


@dataclass(frozen=True, eq=False)
class AdapterWeights:
    """A validated adapter, as plain LoRA per (layer_idx, short_name)."""

    modules: Mapping[tuple[int, str], LoraModule]
    peft_type: str  # LORA | ADALORA (as read; the weights are plain LoRA either way)
    source_path: str  # the resolved folder
    weights_file: str  # adapter_model.safetensors | adapter_model.bin
    file_bytes: int  # size of the weights file
    config_sha256: str  # sha256 of adapter_config.json's bytes
    fingerprint: str  # sha256 over config + weights bytes: equal <=> same adapter content
    target_modules: tuple[str, ...] = field(init=False)  # short names present, in PROJECTIONS order
    min_rank: int = field(init=False)
    max_rank: int = field(init=False)
    nbytes: int = field(init=False)  # bytes held by all A and B (float32 unless converted with .to)

    def __post_init__(self) -> None:
        if not self.modules:
            raise ValueError("modules: an adapter needs at least one module")
        object.__setattr__(self, "modules", MappingProxyType(dict(self.modules)))
        names = {name for _, name in self.modules}
        ranks = [m.rank for m in self.modules.values()]
        object.__setattr__(self, "target_modules", tuple(n for n in PROJECTIONS if n in names))
        object.__setattr__(self, "min_rank", min(ranks))
        object.__setattr__(self, "max_rank", max(ranks))
        object.__setattr__(self, "nbytes", sum(m.A.nbytes + m.B.nbytes for m in self.modules.values()))

    def to(self, dtype: torch.dtype | None = None, pin_memory: bool = False) -> AdapterWeights:
        """A copy with every A/B cast to `dtype` (e.g. the serving dtype) and optionally pinned
        (page-locked, for async host->device copies; needs CUDA). Scales stay float."""
        def convert(t: torch.Tensor) -> torch.Tensor:
            t = t if dtype is None else t.to(dtype).contiguous()
            return t.pin_memory() if pin_memory else t
        modules = {k: LoraModule(convert(m.A), convert(m.B), m.scale, m.rank) for k, m in self.modules.items()}
        return dataclasses.replace(self, modules=modules)


# --------------------------------------------------------------------------------------------
# adapter_config.json
# --------------------------------------------------------------------------------------------

# Fields that change nothing at inference on Llama projections (or only act through fields that
# are checked elsewhere), so they may hold any value.
_INERT_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout",  # dropout is off at inference
    "fan_in_fan_out",  # PEFT forces it to False on nn.Linear (it only applies to GPT-2 Conv1D)
    "megatron_core", "qalora_group_size", "runtime_config",
    "ensure_weight_tying",  # only ties embedding/lm_head adapters, which are refused anyway
    # init-time settings; the inits that change the base weights are refused via init_lora_weights
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    # AdaLoRA's training schedule
    "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
})
# Fields read below.
_READ_FIELDS = frozenset({
    "r", "init_r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "bias", "init_lora_weights",
})
# Fields that make PEFT compute something other than plain LoRA on the seven projections.
_REFUSED_WHEN_SET = {
    "use_dora": "DoRA adapters are not supported",
    "lora_bias": "LoRA-B bias terms are not supported",
    "modules_to_save": "fully trained extra modules (modules_to_save) are not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "layer_replication": "layer replication changes the base model and is not supported",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "use_qalora": "QA-LoRA is not supported",
    "velora_config": "the VeLoRA variant is not supported",
    "monteclora_config": "the MonteCLoRA variant is not supported",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "the KaSA variant is not supported",
}
# init_lora_weights values whose saved A/B only make sense on a base model they modified.
_BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


@dataclass(frozen=True)
class _Settings:
    """The parts of adapter_config.json that decide which modules are adapted and how."""

    peft_type: str
    rule: TargetRule
    r: int  # LoRA default rank
    lora_alpha: float
    use_rslora: bool
    rank_pattern: Mapping[str, int]  # LoRA: pattern key -> r
    alpha_pattern: Mapping[str, float]  # LoRA: pattern key -> lora_alpha
    init_r: int  # AdaLoRA: every module's rank at creation (= ranknum)
    ada_masks: Mapping[str, tuple[bool, ...]]  # AdaLoRA: module key -> kept rows of the init_r


def _is_set(value: Any) -> bool:
    """True for a non-default value (PEFT defaults are None / False / 0 / empty)."""
    if value is None or value is False:
        return False
    if isinstance(value, (str, list, tuple, dict)):
        return len(value) > 0
    return not (isinstance(value, (int, float)) and value == 0)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterFormatError(name, f"must be a finite number, got {value!r}")
    return float(value)


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AdapterFormatError(name, f"must be an int >= {minimum}, got {value!r}")
    return value


def _parse_config(raw: Mapping[str, Any]) -> _Settings:
    peft_type = raw.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise AdapterFormatError(
            "peft_type", f"{peft_type!r} is not supported (only {', '.join(SUPPORTED_PEFT_TYPES)})")
    ada = peft_type == "ADALORA"

    for name, value in raw.items():
        if name in _REFUSED_WHEN_SET:
            if _is_set(value):
                raise AdapterFormatError(name, f"{_REFUSED_WHEN_SET[name]} (got {value!r})")
        elif name not in _INERT_FIELDS and name not in _READ_FIELDS and _is_set(value):
            raise AdapterFormatError(
                name, f"unknown adapter_config.json field with a non-default value {value!r} (written by a newer "
                      "PEFT?); refusing rather than ignoring it")

    bias = raw.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise AdapterFormatError("bias", f"must be 'none', 'all' or 'lora_only', got {bias!r}")
    # bias 'all'/'lora_only' trains base biases; Llama has none, and any saved bias tensor is refused.

    init = raw.get("init_lora_weights", True)
    if not ada and not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
        if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
            raise AdapterFormatError(
                "init_lora_weights", f"{init!r} adapters only work on the base weights they modified; convert it "
                "with save_pretrained(path_initial_model_for_weight_conversion=...) first")
        raise AdapterFormatError("init_lora_weights", f"unknown value {init!r}")

    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterFormatError("use_rslora", f"must be true or false, got {use_rslora!r}")
    lora_alpha = _number("lora_alpha", raw.get("lora_alpha", 8))

    try:
        rule = TargetRule.from_config(raw.get("target_modules"), raw.get("exclude_modules"),
                                      raw.get("layers_to_transform"), raw.get("layers_pattern"))
    except TargetRuleError as e:
        raise AdapterFormatError(e.field, e.message) from None

    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pattern, dict):
            raise AdapterFormatError(name, f"must be a mapping, got {pattern!r}")

    if ada:
        # PEFT's AdaLoRA builds every module with init_r and lora_alpha; it never reads these two.
        if use_rslora:
            raise AdapterFormatError("use_rslora", "PEFT's AdaLoRA ignores it; refusing an ambiguous config")
        if alpha_pattern:
            raise AdapterFormatError("alpha_pattern", "PEFT's AdaLoRA ignores it; refusing an ambiguous config")
        init_r = _int("init_r", raw.get("init_r", 12), 0)
        masks = _parse_ada_masks(rank_pattern, init_r)
        return _Settings(peft_type, rule, 0, lora_alpha, False, {}, {}, init_r, masks)

    r = _int("r", raw.get("r", 8), 1)
    ranks = {str(k): _int(f"rank_pattern[{k!r}]", v, 1) for k, v in rank_pattern.items()}
    alphas = {str(k): _number(f"alpha_pattern[{k!r}]", v) for k, v in alpha_pattern.items()}
    try:
        check_pattern_keys("rank_pattern", list(ranks))
        check_pattern_keys("alpha_pattern", list(alphas))
    except TargetRuleError as e:
        raise AdapterFormatError(e.field, e.message) from None
    return _Settings(peft_type, rule, r, lora_alpha, use_rslora, ranks, alphas, 0, {})


def _parse_ada_masks(rank_pattern: Mapping[str, Any], init_r: int) -> dict[str, tuple[bool, ...]]:
    """AdaLoRA's rank_pattern: parameter name -> per-row keep mask of length init_r.

    Keys are saved as `<module>.lora_E` (older PEFT kept the adapter name: `<module>.lora_E.default`);
    PEFT maps them to the module by dropping the last one or two name parts, as done here.
    """
    masks: dict[str, tuple[bool, ...]] = {}
    for name, mask in rank_pattern.items():
        where = f"rank_pattern[{name!r}]"
        if not isinstance(mask, list) or not all(isinstance(b, bool) for b in mask):
            raise AdapterFormatError(where, "AdaLoRA expects a list of true/false row flags")
        if len(mask) != init_r:
            raise AdapterFormatError(where, f"has {len(mask)} row flags but init_r is {init_r}")
        parts = name.split(".")
        module = ".".join(parts[:-2] if "default" in name else parts[:-1])
        masks[module] = tuple(mask)
    return masks


def _expected_rank_and_scale(s: _Settings, module_key: str) -> tuple[int, float, str]:
    """(rank the tensors must have, the scale of delta = scale * B @ A, where the rank came from)."""
    if s.peft_type == "ADALORA":
        mask = s.ada_masks.get(module_key)
        rank = s.init_r if mask is None else sum(mask)
        source = "init_r" if mask is None else "rank_pattern (AdaLoRA mask)"
        # update_layer: scaling = lora_alpha if lora_alpha > 0 else float(r) (r = the current rank);
        # ranknum stays init_r even after the rank_pattern resize.
        scaling = s.lora_alpha if s.lora_alpha > 0 else float(rank)
        return rank, scaling / (s.init_r + 1e-5), source
    r_key = get_pattern_key(s.rank_pattern.keys(), module_key)
    a_key = get_pattern_key(s.alpha_pattern.keys(), module_key)
    r = s.rank_pattern.get(r_key, s.r)
    alpha = s.alpha_pattern.get(a_key, s.lora_alpha)
    source = f"rank_pattern[{r_key!r}]" if r_key in s.rank_pattern else "r"
    return r, (alpha / math.sqrt(r) if s.use_rslora else alpha / r), source


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def _resolve_inside(root: Path, folder: Path, name: str) -> Path | None:
    """The real path of folder/name, refusing symlinks that lead out of the adapter folder."""
    path = folder / name
    if not os.path.lexists(path):
        return None
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise AdapterFormatError(name, f"cannot be resolved (dangling or looping symlink?): {e}") from None
    if not real.is_relative_to(root):
        raise AdapterFormatError(name, f"is a symlink that resolves outside the adapter folder ({real})")
    if not real.is_file():
        raise AdapterFormatError(name, "is not a regular file")
    return real


def _read_bytes(path: Path, name: str, limit: int | None, limit_name: str) -> bytes:
    size = path.stat().st_size
    if limit is not None and size > limit:
        raise AdapterFormatError(name, f"is {size} bytes, larger than {limit_name}={limit}")
    with open(path, "rb") as f:
        # Read at most limit + 1 bytes: a file growing after stat() cannot slip past the limit.
        data = f.read(-1 if limit is None else limit + 1)
    if limit is not None and len(data) > limit:
        raise AdapterFormatError(name, f"grew past {limit_name}={limit} while being read")
    return data


def _decode_tensors(name: str, data: bytes) -> dict[str, torch.Tensor]:
    if name == SAFETENSORS_NAME:
        import safetensors.torch

        try:
            tensors = safetensors.torch.load(data)
        except Exception as e:  # SafetensorError and friends: truncated, bad header, bad offsets
            raise AdapterFormatError(name, f"is not a valid safetensors file (truncated or corrupt?): {e}") from None
    else:
        try:
            # weights_only: a pickle can run code; only tensors and plain containers are allowed.
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterFormatError(name, f"cannot be read with torch.load(weights_only=True): {e}") from None
        if not isinstance(tensors, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise AdapterFormatError(name, "must hold a flat dict of name -> tensor")
    return tensors


# --------------------------------------------------------------------------------------------
# Tensor names
# --------------------------------------------------------------------------------------------

# PEFT saves `base_model.model.<module key>.lora_A.weight` (LoRA: nn.Linear children) or
# `....lora_A` (AdaLoRA: bare parameters); the adapter name is stripped on save, but a
# `.default` left in by other tools is tolerated.
_TENSOR_KEY = re.compile(
    r"base_model\.model\.model\.layers\.(?P<layer>0|[1-9]\d*)\.(?P<parent>self_attn|mlp)\."
    r"(?P<proj>[a-z]+_proj)\.(?P<part>lora_[ABE])(?P<adapter>\.default)?(?P<suffix>\.weight)?")

_KEY_HINTS = (
    ("lora_magnitude_vector", "DoRA magnitudes are not supported"),
    ("lora_embedding_", "LoRA on embeddings is not supported"),
    ("modules_to_save", "modules_to_save weights are not supported"),
    ("trainable_tokens", "trainable token embeddings are not supported"),
    ("lm_head", "LoRA on lm_head is not supported"),
    ("embed_tokens", "LoRA on embed_tokens is not supported"),
)


def _unexpected(key: str, why: str = "") -> AdapterFormatError:
    if not why:
        why = next((hint for marker, hint in _KEY_HINTS if marker in key), "")
        if not why and key.endswith(".bias"):
            why = "trained bias terms (bias='all'/'lora_only' or lora_bias) are not supported"
    example = "base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"
    return AdapterFormatError(key, f"unexpected tensor{': ' + why if why else ''} (expected names like {example})")


def _tensor_name(module_key: str, part: str, peft_type: str) -> str:
    return f"base_model.model.{module_key}.{part}" + ("" if peft_type == "ADALORA" else ".weight")


def _group_tensors(tensors: Mapping[str, torch.Tensor], s: _Settings, base: BaseShapes,
                   targeted: set[tuple[int, str]]) -> dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]]:
    """Sort tensors per (layer, projection) -> {lora_A/lora_B/lora_E: (key, tensor)}, refusing strays."""
    ada = s.peft_type == "ADALORA"
    groups: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key in sorted(tensors):
        m = _TENSOR_KEY.fullmatch(key)
        if m is None or m["proj"] not in PROJECTIONS or projection_parent(m["proj"]) != m["parent"]:
            raise _unexpected(key)
        part = m["part"]
        if ada and (m["suffix"] is not None):
            raise _unexpected(key, "AdaLoRA tensors are saved without a '.weight' suffix")
        if not ada and (part == "lora_E" or m["suffix"] is None):
            raise _unexpected(key, "a LORA adapter has only lora_A.weight / lora_B.weight tensors")
        layer, proj = int(m["layer"]), m["proj"]
        if layer >= base.num_layers:
            raise AdapterFormatError(key, f"is for layer {layer} but the base model has {base.num_layers} layers")
        module_key = projection_key(layer, proj)
        if (layer, proj) not in targeted:
            raise AdapterFormatError(
                key, f"module {module_key} is not targeted by adapter_config.json (target_modules / "
                     "exclude_modules / layers_to_transform); PEFT would not load this tensor")
        parts = groups.setdefault((layer, proj), {})
        if part in parts:
            raise AdapterFormatError(key, f"duplicates tensor {parts[part][0]}")
        parts[part] = (key, tensors[key])
    return groups


# --------------------------------------------------------------------------------------------
# Per-module checks
# --------------------------------------------------------------------------------------------

# Source dtypes whose values float32 holds exactly: finite before the cast is finite after.
_EXACT_IN_FLOAT32 = (torch.bfloat16, torch.float16, torch.float32)


def _all_finite_exact(tensors: Mapping[str, torch.Tensor]) -> bool:
    """True when every tensor of a dtype in _EXACT_IN_FLOAT32 is finite: one check per dtype over
    all of them, instead of one per tensor (an adapter has a few hundred; the per-tensor checks
    were ~a quarter of re-reading a rank-8 q/k/v/o adapter into the pool). False: some tensor is
    not, and the per-tensor checks will name it."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors.values():
        if t.dtype in _EXACT_IN_FLOAT32:
            by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    return all(bool(torch.isfinite(torch.cat(ts)).all()) for ts in by_dtype.values())


def _as_float32(key: str, t: torch.Tensor, finite: bool = False) -> torch.Tensor:
    """t as a fresh contiguous float32 tensor, refused when not floating point or not finite.
    finite: t's dtype is in _EXACT_IN_FLOAT32 and _all_finite_exact held (no check again)."""
    if not t.is_floating_point():
        raise AdapterFormatError(key, f"has dtype {t.dtype}; LoRA weights must be floating point")
    # Always a fresh copy: safetensors.torch.load returns tensors that alias immutable `bytes`, and
    # a .bin tensor may be a view keeping a larger storage alive.
    out = t.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
    # Checked after the cast: a float64 value beyond float32's range would become inf here.
    if not (finite and t.dtype in _EXACT_IN_FLOAT32) and not bool(torch.isfinite(out).all()):
        raise AdapterFormatError(key, "contains non-finite values (NaN or Inf)")
    return out


def _build_module(parts: Mapping[str, tuple[str, torch.Tensor]], layer: int, proj: str, s: _Settings,
                  base: BaseShapes, max_rank: int, finite: bool = False) -> LoraModule | None:
    """finite: the file's tensors passed _all_finite_exact (see _as_float32)."""
    module_key = projection_key(layer, proj)
    need = ("lora_A", "lora_B", "lora_E") if s.peft_type == "ADALORA" else ("lora_A", "lora_B")
    for part in need:
        if part not in parts:
            raise AdapterFormatError(
                _tensor_name(module_key, part, s.peft_type),
                f"missing: adapter_config.json targets {module_key} but the weights file has no such tensor")
    in_f, out_f = base.features[proj]
    a_key, a = parts["lora_A"]
    b_key, b = parts["lora_B"]
    if a.dim() != 2 or a.shape[1] != in_f:
        raise AdapterFormatError(a_key, f"has shape {tuple(a.shape)}; {proj} of the base model needs [r, {in_f}]")
    if b.dim() != 2 or b.shape[0] != out_f:
        raise AdapterFormatError(b_key, f"has shape {tuple(b.shape)}; {proj} of the base model needs [{out_f}, r]")
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise AdapterFormatError(b_key, f"has rank {b.shape[1]} but {a_key} has rank {rank}")
    if "lora_E" in parts:
        e_key, e = parts["lora_E"]
        if tuple(e.shape) != (rank, 1):
            raise AdapterFormatError(e_key, f"has shape {tuple(e.shape)}; expected [{rank}, 1] to match {a_key}")
    expected, scale, source = _expected_rank_and_scale(s, module_key)
    if rank != expected:
        raise AdapterFormatError(
            a_key, f"has rank {rank} but adapter_config.json gives rank {expected} for {module_key} (from {source})")
    if rank > max_rank:
        raise AdapterFormatError(a_key, f"has rank {rank}, above the server's max_rank={max_rank}")
    if not math.isfinite(scale):
        raise AdapterFormatError("lora_alpha", f"gives a non-finite scale for {module_key}")

    a32 = _as_float32(a_key, a, finite)  # [r, in]
    b32 = _as_float32(b_key, b, finite)  # [out, r]
    if rank == 0:
        return None  # AdaLoRA pruned every row: PEFT adds exactly nothing here
    if s.peft_type == "ADALORA":
        e32 = _as_float32(e_key, e, finite)  # [r, 1]
        # Fold the singular values into A in float64, rounding once: A' = A * E row-wise.
        a32 = (a32.double() * e32.double()).to(torch.float32).contiguous()
        if not bool(torch.isfinite(a32).all()):
            raise AdapterFormatError(a_key, "times lora_E overflows float32")
    return LoraModule(A=a32, B=b32, scale=float(scale), rank=rank)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def _targeted(s: _Settings, base: BaseShapes) -> list[tuple[int, str]]:
    try:
        s.rule.check_supported(base.num_layers)
    except TargetRuleError as e:
        raise AdapterFormatError(e.field, e.message) from None
    targeted = [(i, p) for i in range(base.num_layers) for p in PROJECTIONS if s.rule.matches(projection_key(i, p))]
    if not targeted:
        raise AdapterFormatError("target_modules", f"matches none of the base model's {base.num_layers} x "
                                                   f"{len(PROJECTIONS)} projections")
    keys = {projection_key(i, p) for i, p in targeted}
    for module_key in s.ada_masks:
        if module_key not in keys:
            raise AdapterFormatError("rank_pattern", f"names {module_key!r}, which this adapter does not target")
    return targeted


def read_adapter(path: str | os.PathLike[str], base: BaseShapes, max_rank: int,
                 max_bytes: int | None = None) -> AdapterWeights:
    """Read, validate and convert one PEFT adapter folder; raises AdapterFormatError naming the problem.

    max_rank: the largest LoRA rank the server's slots hold. max_bytes: the largest weights file
    accepted (None = no limit). The whole file is read once; the fingerprint hashes those bytes.
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank: must be an int >= 1, got {max_rank!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise ValueError(f"max_bytes: must be None or an int >= 1, got {max_bytes!r}")
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFormatError("path", f"{str(path)!r} is not a directory")
    root = folder.resolve(strict=True)

    config_path = _resolve_inside(root, folder, CONFIG_NAME)
    if config_path is None:
        raise AdapterFormatError(CONFIG_NAME, f"missing from {str(path)!r}")
    config_bytes = _read_bytes(config_path, CONFIG_NAME, _MAX_CONFIG_BYTES, "the config size limit")
    try:
        raw = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(CONFIG_NAME, f"is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(CONFIG_NAME, f"must hold a JSON object, got {type(raw).__name__}")
    settings = _parse_config(raw)
    targeted = _targeted(settings, base)

    # PEFT prefers the safetensors file when both exist.
    weights_name, weights_path = SAFETENSORS_NAME, _resolve_inside(root, folder, SAFETENSORS_NAME)
    if weights_path is None:
        weights_name, weights_path = BIN_NAME, _resolve_inside(root, folder, BIN_NAME)
    if weights_path is None:
        raise AdapterFormatError(SAFETENSORS_NAME, f"missing from {str(path)!r} (and no legacy {BIN_NAME})")
    weights_bytes = _read_bytes(weights_path, weights_name, max_bytes, "max_adapter_bytes")
    tensors = _decode_tensors(weights_name, weights_bytes)
    if not tensors:
        raise AdapterFormatError(weights_name, "contains no tensors (empty adapter)")

    groups = _group_tensors(tensors, settings, base, set(targeted))
    finite = _all_finite_exact(tensors)
    modules: dict[tuple[int, str], LoraModule] = {}
    for layer, proj in targeted:
        module = _build_module(groups.get((layer, proj), {}), layer, proj, settings, base, max_rank, finite)
        if module is not None:
            modules[(layer, proj)] = module
    if not modules:
        raise AdapterFormatError(weights_name, "every module has rank 0 (empty adapter)")

    digest = hashlib.sha256()
    for chunk in (CONFIG_NAME.encode(), config_bytes, weights_name.encode(), weights_bytes):
        digest.update(len(chunk).to_bytes(8, "little"))  # length-prefixed: no ambiguity between parts
        digest.update(chunk)
    return AdapterWeights(
        modules=modules, peft_type=settings.peft_type, source_path=str(root), weights_file=weights_name,
        file_bytes=len(weights_bytes), config_sha256=hashlib.sha256(config_bytes).hexdigest(),
        fingerprint=digest.hexdigest())
