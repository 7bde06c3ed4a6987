"""Sampling defaults from a model folder's generation_config.json.

A request that leaves temperature, top_p, top_k or repetition_penalty unset gets the model's
value from generation_config.json (the model author's recommended settings, as transformers'
generate() and vLLM's `--generation-config auto` use them); a request's own value always wins.
`loraplex serve --generation-config` chooses the source:

    auto     the model folder's generation_config.json (the default; no file or no sampling
             fields = neutral)
    neutral  SamplingParams' own defaults (temperature 1.0, top_p 1.0, top_k off, no penalty);
             "vllm" is accepted as a synonym, as vLLM spells it
    FOLDER   the generation_config.json in FOLDER

Only those four fields are read. `do_sample` is not: like vLLM, a temperature in the file is used
even when do_sample is false (send temperature 0 for greedy decoding). A value that no request
could send (a negative temperature, top_p 0) stops start-up with the file and field named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from loraplex.engine.request import InvalidRequestError, SamplingParams

CHOICES = ("auto", "neutral", "vllm")
FILE_NAME = "generation_config.json"
# generation_config.json key -> SamplingParams field (the same names today).
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
           "repetition_penalty": "repetition_penalty"}


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    source: str = "neutral"  # the file they were read from, or "neutral"

    def as_kwargs(self) -> dict[str, Any]:
        """The set values, as SamplingParams keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "source" and getattr(self, f.name) is not None}

    def effective(self) -> dict[str, Any]:
        """What a request that sets none of the four gets (the model's values over SamplingParams')."""
        base = SamplingParams()
        out = {name: getattr(base, name) for name in _FIELDS.values()}
        out.update(self.as_kwargs())
        return out


NEUTRAL = SamplingDefaults()


def read_sampling_defaults(path: str | Path) -> SamplingDefaults:
    """The sampling fields of `path` (a generation_config.json file; NEUTRAL when it sets none);
    ValueError naming the file and field when one is malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"generation_config: cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"generation_config: {path} does not hold a JSON object")
    values: dict[str, Any] = {}
    for key, name in _FIELDS.items():
        value = data.get(key)
        if value is None:
            continue
        want_int = name == "top_k"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (want_int and not isinstance(value, int)):
            raise ValueError(f"generation_config: {path}: {key}: expected a number, got {value!r}")
        values[name] = int(value) if want_int else float(value)
    try:
        SamplingParams(**values)
    except InvalidRequestError as err:
        raise ValueError(f"generation_config: {path}: {err}") from None
    return SamplingDefaults(**values, source=str(path)) if values else NEUTRAL


def resolve_sampling_defaults(choice: str, model_path: str | Path) -> SamplingDefaults:
    """`--generation-config` (auto | neutral | vllm | FOLDER) -> the defaults in force."""
    if choice in ("neutral", "vllm"):
        return NEUTRAL
    folder = Path(model_path) if choice == "auto" else Path(choice)
    path = folder / FILE_NAME
    if not path.is_file():
        if choice == "auto":
            return NEUTRAL
        raise ValueError(f"generation_config: {folder} holds no {FILE_NAME}")
    return read_sampling_defaults(path)
