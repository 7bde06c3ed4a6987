"""Which modules a PEFT adapter targets: PEFT's matching rules, re-implemented for the Llama tree.

The rules mirror peft 0.21.2 line by line, because an adapter must reach exactly the modules
PEFT would wrap when it loads the same folder onto the same HF model:

- `tuners_utils.check_target_module_exists`: `exclude_modules` first (a str is a regex matched
  with `re.fullmatch`; a list matches a key exactly or as a `.`-suffix); then `target_modules`:
  a str is a regex matched with `re.fullmatch` against the whole module key, a list matches a key
  exactly or as a `.`-suffix. `layers_to_transform` (+ `layers_pattern`) only filters list
  suffix matches: an exact list hit and any regex hit ignore it.
- `tuners_utils._maybe_include_all_linear_layers`: "all-linear" (any case) means every
  nn.Linear except the output embedding (lm_head) -- on the Llama family that is exactly the
  seven projections of every layer.
- `utils.other.get_pattern_key`: rank_pattern / alpha_pattern keys are regexes tried in dict
  order as `(.*\\.)?(key)$` with `re.match`; the first hit wins.

Module keys are the names HF `LlamaForCausalLM.named_modules()` gives (PEFT matches against
those), e.g. `model.layers.3.self_attn.q_proj`; loraplex's model uses the same names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
ALL_LINEAR = "all-linear"  # peft.utils.INCLUDE_LINEAR_LAYERS_SHORTHAND

# Every other module of a Llama-family causal LM (Qwen3 adds q_norm/k_norm). Knowing them lets a
# refusal say "lm_head is not supported" instead of "lm_head is unknown".
_MODEL_LEVEL = ("model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
_LAYER_LEVEL = ("", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm", ".post_attention_layernorm",
                ".self_attn.q_norm", ".self_attn.k_norm")

# Layer-index extraction, copied from check_target_module_exists: the lazy `.*?` takes the FIRST
# numbered segment (the layer), not a later one.
_DEFAULT_LAYER_RE = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


class TargetRuleError(ValueError):
    """A target rule PEFT would reject or that loraplex cannot serve; `field` names the config key."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def projection_key(layer: int, short_name: str) -> str:
    """The HF/PEFT module key of one projection: `model.layers.{layer}.{self_attn|mlp}.{short_name}`."""
    return f"model.layers.{layer}.{_PARENT[short_name]}.{short_name}"


def module_order(key: tuple[int, str]) -> tuple[int, int]:
    """Sort key of a (layer, projection) module: HF named_modules order (layers, then PROJECTIONS)."""
    return key[0], PROJECTIONS.index(key[1])


def projection_parent(short_name: str) -> str:
    return _PARENT[short_name]


def projection_keys(num_layers: int) -> list[str]:
    return [projection_key(i, s) for i in range(num_layers) for s in PROJECTIONS]


def other_module_keys(num_layers: int) -> list[str]:
    """Names of the non-projection modules of a Llama-family model with `num_layers` layers."""
    return list(_MODEL_LEVEL) + [f"model.layers.{i}{s}" for i in range(num_layers) for s in _LAYER_LEVEL]


def _compile(field: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise TargetRuleError(field, f"invalid regular expression {pattern!r}: {e}") from None


def _as_name_set(field: str, value: object) -> str | frozenset[str] | None:
    """PEFT accepts a str (regex) or a list of names; it turns the list into a set."""
    if value is None:
        return None
    if isinstance(value, str):
        _compile(field, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise TargetRuleError(field, f"must be a string (regex) or a list of module names, got {value!r}")


@dataclass(frozen=True)
class TargetRule:
    """target_modules / exclude_modules / layers_to_transform / layers_pattern of one adapter."""

    target_modules: str | frozenset[str]
    exclude_modules: str | frozenset[str] | None = None
    layers_to_transform: int | frozenset[int] | None = None
    layers_pattern: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Same refusals as LoraConfig.__post_init__: a regex rule cannot be combined with layers.
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise TargetRuleError("layers_to_transform", "cannot be used when target_modules is a str")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise TargetRuleError("layers_pattern", "cannot be used when target_modules is a str")
        if self.layers_pattern and self.layers_to_transform is None:
            raise TargetRuleError("layers_pattern", "needs layers_to_transform to be set as well")

    @classmethod
    def from_config(cls, target_modules: object, exclude_modules: object = None,
                    layers_to_transform: object = None, layers_pattern: object = None) -> TargetRule:
        """Build from the raw adapter_config.json values, normalised the way PEFT reads them."""
        if target_modules is None:
            raise TargetRuleError("target_modules", "missing; loraplex needs an explicit list, regex or 'all-linear'")
        # LoraConfig.__post_init__ refuses these on the raw values (an empty list is "set" too).
        if isinstance(target_modules, str) and layers_to_transform is not None:
            raise TargetRuleError("layers_to_transform", "cannot be used when target_modules is a str")
        if isinstance(target_modules, str) and layers_pattern is not None:
            raise TargetRuleError("layers_pattern", "cannot be used when target_modules is a str")
        if layers_pattern and layers_to_transform is None:
            raise TargetRuleError("layers_pattern", "needs layers_to_transform to be set as well")
        targets = _as_name_set("target_modules", target_modules)
        if isinstance(targets, frozenset) and not targets:
            raise TargetRuleError("target_modules", "is empty")
        excludes = _as_name_set("exclude_modules", exclude_modules)

        layers: int | frozenset[int] | None
        if layers_to_transform is None:
            layers = None
        elif isinstance(layers_to_transform, int) and not isinstance(layers_to_transform, bool):
            layers = layers_to_transform
        elif isinstance(layers_to_transform, list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers_to_transform):
            # PEFT: an empty list means "no layer filter" (is_using_layer_indexes is False).
            layers = frozenset(layers_to_transform) if layers_to_transform else None
        else:
            raise TargetRuleError("layers_to_transform",
                                  f"must be an int or a list of ints, got {layers_to_transform!r}")

        # PEFT: None, "" and [] all mean "any layer pattern".
        pattern: tuple[str, ...] | None
        if layers_pattern is None or (isinstance(layers_pattern, (str, list)) and len(layers_pattern) == 0):
            pattern = None
        elif isinstance(layers_pattern, str):
            pattern = (layers_pattern,)
        elif isinstance(layers_pattern, list) and all(isinstance(p, str) for p in layers_pattern):
            pattern = tuple(layers_pattern)
        else:
            raise TargetRuleError("layers_pattern", f"must be a string or a list of strings, got {layers_pattern!r}")
        for p in pattern or ():
            _compile("layers_pattern", p)
        return cls(targets, excludes, layers, pattern)

    @property
    def is_all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def is_excluded(self, key: str) -> bool:
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return re.fullmatch(ex, key) is not None
        return key in ex or any(key.endswith(f".{e}") for e in ex)

    def _layer_index(self, key: str) -> int | None:
        if self.layers_pattern is None:
            m = _DEFAULT_LAYER_RE.match(key)
        else:
            m = None
            for pattern in self.layers_pattern:
                m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if m is not None:
                    break
        return int(m.group("idx")) if m else None

    def matches(self, key: str) -> bool:
        """True when PEFT would put this adapter on module `key` (check_target_module_exists)."""
        if self.is_excluded(key):
            return False
        targets = self.target_modules
        if self.is_all_linear:
            # PEFT expands "all-linear" into the exact names of every Linear but lm_head.
            return _is_projection_key(key)
        if isinstance(targets, str):
            return re.fullmatch(targets, key) is not None
        if key in targets:
            return True  # an exact name bypasses the layer filter, as in PEFT
        if not any(key.endswith(f".{t}") for t in targets):
            return False
        layers = self.layers_to_transform
        if layers is None:
            return True
        idx = self._layer_index(key)
        if idx is None:
            return False
        return idx == layers if isinstance(layers, int) else idx in layers

    def check_supported(self, num_layers: int) -> None:
        """Refuse rules that name modules loraplex cannot adapt (embeddings, lm_head, norms, unknowns).

        PEFT would wrap lm_head / embed_tokens or fail on a norm; loraplex only serves the seven
        projections, and an adapter silently missing part of its training would be wrong output.
        """
        projections = set(projection_keys(num_layers))
        others = other_module_keys(num_layers)
        supported = ", ".join(PROJECTIONS)
        if self.is_all_linear:
            return
        if isinstance(self.target_modules, str):
            for key in others:
                if key and re.fullmatch(self.target_modules, key) and not self.is_excluded(key):
                    raise TargetRuleError(
                        "target_modules",
                        f"regex {self.target_modules!r} matches module {key!r}, which loraplex does not "
                        f"support (only {supported})")
            return
        every = sorted(projections) + others
        for entry in sorted(self.target_modules):
            hits = [k for k in every if k == entry or k.endswith(f".{entry}")]
            if not hits:
                raise TargetRuleError(
                    "target_modules",
                    f"{entry!r} names no module of a Llama-family model with {num_layers} layers "
                    f"(supported: {supported})")
            bad = [k for k in hits if k not in projections and not self.is_excluded(k)]
            if bad:
                raise TargetRuleError(
                    "target_modules",
                    f"{entry!r} targets module {bad[0]!r}, which loraplex does not support (only {supported})")


_PROJECTION_KEY_RE = re.compile(
    r"model\.layers\.(0|[1-9]\d*)\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")


def _is_projection_key(key: str) -> bool:
    return _PROJECTION_KEY_RE.fullmatch(key) is not None


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """peft.utils.other.get_pattern_key: the first pattern key matching as a `.`-suffix regex, else the key."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key_to_match):
            return pattern
    return key_to_match


def check_pattern_keys(field: str, pattern_keys: Sequence[str]) -> None:
    """Refuse rank_pattern / alpha_pattern keys that are not valid regexes (PEFT would crash on them)."""
    for pattern in pattern_keys:
        _compile(field, rf"(.*\.)?({pattern})$")
