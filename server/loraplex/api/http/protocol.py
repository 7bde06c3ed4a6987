"""OpenAI request bodies -> engine Requests, engine events -> OpenAI response objects. No HTTP here:
bad input raises InvalidRequestError naming the body field (the app answers 400 with OpenAI's
error object, `param` = the field), so every rule is testable without a server.

What is accepted (everything else is refused with 400 naming the field, never silently ignored):

    both routes    model (the base model's name or an adapter id), max_tokens, temperature, top_p,
                   n, seed, stop (string or list), stream, stream_options.include_usage, user
                   (accepted, not used), presence_penalty / frequency_penalty (in [-2, 2], over the
                   generated tokens), logit_bias ({"token id": bias in [-100, 100]}); extensions
                   as vLLM spells them: top_k (-1 or 0 = off), repetition_penalty, ignore_eos
    completions    prompt: a string, a list of strings, a list of token ids, a list of lists of
                   token ids (one choice each, times n); logprobs (0..20: the sampled token's and
                   the k most likely); echo (the prompt's text before the completion; not with
                   logprobs, which would need the prompt's logprobs); best_of >= n (best_of
                   choices generated per prompt, the n with the highest total logprob returned;
                   not with stream); suffix null
    chat           messages (role system | developer (read as system) | user | assistant; content a
                   string or a list of {"type": "text", "text"} parts), max_completion_tokens (wins
                   over max_tokens), logprobs (boolean) with top_logprobs (0..20), tools /
                   functions null or [], tool_choice / function_call null or "none"
    structured     (both routes) response_format (text, json_object, json_schema) and vLLM's
                   guided_json / guided_regex / guided_choice / guided_grammar / structured_outputs:
                   see api/structured_output.py

Logprobs are those of the model's own distribution (engine/logprobs.py), before penalties,
logit_bias and temperature, as vLLM reports them by default.

Defaults: max_tokens 16 for completions (as OpenAI and vLLM); for chat what fits the context
(max_model_len - prompt tokens), at most --max-new-tokens-cap. temperature / top_p / top_k /
repetition_penalty left unset take the model's generation_config.json (Runtime.sampling_defaults).
With n > 1 and a seed, choice i samples with seed + i (the same seed n times would give n copies).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from collections.abc import Sequence as Seq

from loraplex.api import convert, structured_output
from loraplex.api.http import logprobs_format
from loraplex.api.structured_output import json_type_name as _type_name
from loraplex.config import RequestLimits
from loraplex.engine.logprobs import MAX_TOP_LOGPROBS
from loraplex.engine.request import FinishReason, InvalidRequestError, Request, RequestOutput

MAX_CHOICES = 128  # prompts x n in one call: each is an engine request
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_SEED_RANGE = 2**64

# A completed structure (GRAMMAR) is "stop", as vLLM reports it.
_FINISH = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
           FinishReason.CANCELLED: "abort", FinishReason.ERROR: "error", FinishReason.GRAMMAR: "stop"}

# The names of SamplingParams fields in OpenAI bodies (errors name what the client sent).
_SAMPLING_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
                   "top_k": "top_k", "repetition_penalty": "repetition_penalty", "seed": "seed",
                   "stop": "stop", "ignore_eos": "ignore_eos", "presence_penalty": "presence_penalty",
                   "frequency_penalty": "frequency_penalty"}


def _neutral(*values: Any) -> Callable[[Any], bool]:
    return lambda v: any(v == x and type(v) is type(x) or (v is None and x is None) for x in values)


# OpenAI fields we know but do not implement: accepted only at the value that changes nothing.
_NOT_SUPPORTED_COMPLETIONS: dict[str, Callable[[Any], bool]] = {
    "suffix": lambda v: v is None,
}
_NOT_SUPPORTED_CHAT: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: v is None or v == [], "functions": lambda v: v is None or v == [],
    "tool_choice": _neutral(None, "none"), "function_call": _neutral(None, "none"),
    "parallel_tool_calls": lambda v: v is None, "store": _neutral(False, None),
    "metadata": lambda v: v is None or v == {}, "service_tier": _neutral(None, "auto", "default"),
    "modalities": lambda v: v is None or v == ["text"], "audio": lambda v: v is None,
    "prediction": lambda v: v is None, "reasoning_effort": lambda v: v is None,
    "web_search_options": lambda v: v is None,
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream",
           "stream_options", "user", "top_k", "repetition_penalty", "ignore_eos", "presence_penalty",
           "frequency_penalty", "logit_bias", "adapters"}
COMPLETIONS_FIELDS = frozenset(_COMMON | structured_output.OPENAI_FIELDS | {"prompt", "best_of", "logprobs", "echo"})
CHAT_FIELDS = frozenset(_COMMON | structured_output.OPENAI_FIELDS | {"messages", "max_completion_tokens", "logprobs",
                                                                     "top_logprobs"})
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# --- typed reads ---------------------------------------------------------------------------------
_KINDS = {"string": str, "boolean": bool, "object": dict, "array": list}
_ARTICLE = {"integer": "an integer", "number": "a finite number", "string": "a string",
            "boolean": "a boolean", "object": "an object", "array": "an array"}


def _get(body: dict, name: str, kind: str) -> Any:
    """body[name] if present and not null, checked to be of `kind` (integer, number, string,
    boolean, object, array); None when absent or null."""
    v = body.get(name)
    if v is None:
        return None
    ok = (isinstance(v, int) and not isinstance(v, bool) if kind == "integer" else
          (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) if kind == "number" else
          isinstance(v, _KINDS[kind]))
    if not ok:
        raise InvalidRequestError(name, f"expected {_ARTICLE[kind]}, got {_type_name(v)}")
    return v


def check_fields(body: Any, allowed: frozenset[str], not_supported: dict[str, Callable[[Any], bool]]) -> None:
    if not isinstance(body, dict):
        raise InvalidRequestError("body", f"expected a JSON object, got {_type_name(body)}")
    for name, value in body.items():
        if name in allowed:
            continue
        if name in not_supported:
            if not not_supported[name](value):
                raise InvalidRequestError(name, f"not supported by this server (got {value!r:.100})")
            continue
        raise InvalidRequestError(name, "unknown field")


# --- requests ------------------------------------------------------------------------------------
@dataclass
class Call:
    """One parsed completions / chat call: what to submit and how to answer."""

    kind: str  # "completion" | "chat"
    model: str  # as the client sent it (echoed in responses)
    adapter_id: str
    prompts: list[list[int]]  # token ids, one per prompt
    n: int
    stream: bool
    include_usage: bool
    sampling: list[Any] = field(default_factory=list)  # SamplingParams per engine request
    id: str = ""
    created: int = 0
    logprobs: int | None = None  # what the client asked for: None = no logprobs in the answer
    best_of: int = 0  # engine requests per prompt (>= n); 0 = n
    mixture: list[tuple[str, float]] = field(default_factory=list)  # "adapters": a per-request mixture
    constraint: Any = None  # structured output (engine.structured.spec.Constraint), every choice
    echo: list[str] | None = None  # completions with echo: each prompt's text, put before its choices

    @property
    def per_prompt(self) -> int:
        return self.best_of or self.n

    def requests(self) -> list[Request]:
        """One engine request per generated choice: prompt-major, per_prompt of them per prompt
        (request index = p * per_prompt + i)."""
        out = []
        for p, ids in enumerate(self.prompts):
            for i in range(self.per_prompt):
                k = p * self.per_prompt + i
                out.append(Request(request_id=f"{self.id}-{k}", prompt_token_ids=list(ids),
                                   sampling=self.sampling[k], adapter_id=self.adapter_id,
                                   constraint=self.constraint))
        return out


@dataclass(frozen=True)
class Context:
    """What parsing needs from the server."""

    tokenizer: Any
    vocab_size: int
    max_model_len: int
    max_new_tokens_cap: int
    limits: RequestLimits
    base_model_names: frozenset[str]  # `model` values that mean the base model
    sampling_defaults: Any = None
    token_text: Any = None  # api/token_text.TokenText of the tokenizer, for logprobs answers


def resolve_model(body: dict, ctx: Context) -> tuple[str, str]:
    """(model as sent, adapter id: "" for the base model)."""
    model = _get(body, "model", "string")
    if model is None:
        raise InvalidRequestError("model", "required: the base model's name or an adapter id (GET /v1/models)")
    if not model:
        raise InvalidRequestError("model", "must not be empty")
    return model, "" if model in ctx.base_model_names else model


def parse_mixture(body: dict, adapter_id: str, field_name: str = "adapters",
                  id_keys: tuple[str, ...] = ("adapter_id", "model")) -> list[tuple[str, float]]:
    """The loraplex extension "adapters": [{"adapter_id" (or "model"): id, "weight": w}, ...], a
    per-request mixture; `model` must then name the base model (adapter_id "")."""
    items = _get(body, field_name, "array")
    if not items:
        return []
    if adapter_id:
        raise InvalidRequestError(field_name, "set `model` to the base model's name when mixing adapters")
    parts = []
    for i, item in enumerate(items):
        where = f"{field_name}[{i}]"
        if not isinstance(item, dict) or set(item) - {*id_keys, "weight"}:
            raise InvalidRequestError(where, f"expected an object with one of {'/'.join(id_keys)} and weight")
        ids = [item[k] for k in id_keys if k in item]
        if len(ids) != 1 or not isinstance(ids[0], str):
            raise InvalidRequestError(f"{where}.adapter_id", f"give one of {'/'.join(id_keys)} as a string")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise InvalidRequestError(f"{where}.weight", f"expected a finite number, got {weight!r}")
        parts.append((ids[0], float(weight)))
    return parts


COMBINE_FIELDS = frozenset({"lora_name", "adapters", "method", "density", "svd_rank", "svd_clamp",
                            "majority_sign_method", "seed", "pinned"})


def parse_combine(body: dict) -> dict[str, Any]:
    """POST /v1/combine_lora_adapters -> adapter_ops.combine_adapters keyword arguments."""
    check_fields(body, COMBINE_FIELDS, {})
    name = _get(body, "lora_name", "string")
    if not name:
        raise InvalidRequestError("lora_name", "required string: the new adapter's id")
    parts = parse_mixture(body, "", id_keys=("lora_name", "adapter_id"))
    if not parts:
        raise InvalidRequestError("adapters", "required: a non-empty array of {lora_name, weight}")
    svd_rank = _get(body, "svd_rank", "integer")
    seed = _get(body, "seed", "integer")
    return dict(adapter_id=name, parts=parts, method=_get(body, "method", "string") or "svd",
                pinned=bool(_get(body, "pinned", "boolean")), density=_get(body, "density", "number"),
                svd_rank=svd_rank, svd_clamp=_get(body, "svd_clamp", "number"), seed=seed,
                majority_sign_method=_get(body, "majority_sign_method", "string") or "total")


def _stop(body: dict, limits: RequestLimits) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequestError("stop", f"expected a string or a list of strings, got {_type_name(v)}")
    convert.check_stop(stops, limits, "stop")
    return tuple(stops)


def _stream(body: dict) -> tuple[bool, bool]:
    stream = bool(_get(body, "stream", "boolean"))
    options = _get(body, "stream_options", "object")
    include_usage = False
    if options is not None:
        if not stream:
            raise InvalidRequestError("stream_options", "only allowed when stream is true")
        for key, value in options.items():
            if key != "include_usage":
                raise InvalidRequestError(f"stream_options.{key}", "unknown field")
            if value is not None and not isinstance(value, bool):
                raise InvalidRequestError("stream_options.include_usage", f"expected a boolean, got {_type_name(value)}")
            include_usage = bool(value)
    return stream, include_usage


def _logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id as a string": bias} -> sorted (token id, bias) pairs."""
    v = _get(body, "logit_bias", "object")
    if not v:
        return ()
    out = []
    for key, bias in v.items():
        if not (isinstance(key, str) and key.lstrip("-").isdigit()):
            raise InvalidRequestError("logit_bias", f"keys must be token ids, got {key!r:.40}")
        token = int(key)
        if not 0 <= token < vocab_size:
            raise InvalidRequestError("logit_bias", f"token id {token} is outside the vocabulary [0, {vocab_size})")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise InvalidRequestError("logit_bias", f"bias of token {token} must be a finite number, "
                                                    f"got {_type_name(bias)}")
        out.append((token, float(bias)))
    return tuple(sorted(out))


def _top_count(body: dict, name: str) -> int | None:
    v = _get(body, name, "integer")
    if v is not None and not 0 <= v <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(name, f"must be in [0, {MAX_TOP_LOGPROBS}], got {v}")
    return v


def _sampling(body: dict, ctx: Context, prompts: list[list[int]], n: int, max_tokens_field: str,
              default_max_tokens: Callable[[list[int]], int], logprobs: int | None = None) -> list[Any]:
    """SamplingParams for n engine requests per prompt; `logprobs` = what the engine must report."""
    kwargs: dict[str, Any] = {"stop": _stop(body, ctx.limits), "logit_bias": _logit_bias(body, ctx.vocab_size),
                              "logprobs": logprobs}
    for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        v = _get(body, name, "number")
        if v is not None:
            kwargs[name] = float(v)
    top_k = _get(body, "top_k", "integer")
    if top_k is not None:
        kwargs["top_k"] = 0 if top_k == -1 else top_k  # vLLM's -1 = off
    if _get(body, "ignore_eos", "boolean"):
        kwargs["ignore_eos"] = True
    seed = _get(body, "seed", "integer")
    if seed is not None and not 0 <= seed < _SEED_RANGE:
        raise InvalidRequestError("seed", f"must be in [0, 2^64), got {seed}")
    max_tokens = _get(body, max_tokens_field, "integer")
    names = dict(_SAMPLING_NAMES, max_new_tokens=max_tokens_field)
    out = []
    for ids in prompts:
        room = ctx.max_model_len - len(ids)
        want = max_tokens if max_tokens is not None else min(default_max_tokens(ids), ctx.max_new_tokens_cap, room)
        for i in range(n):
            k = dict(kwargs, max_new_tokens=want)
            if seed is not None:
                k["seed"] = (seed + i) % _SEED_RANGE
            out.append(convert.sampling_params(k, ctx.max_new_tokens_cap, ctx.sampling_defaults,
                                               lambda name: names.get(name, name)))
    return out


def _n(body: dict) -> int:
    n = _get(body, "n", "integer")
    if n is None:
        return 1
    if n < 1:
        raise InvalidRequestError("n", f"must be >= 1, got {n}")
    return n


def _check_choices(prompts: int, n: int) -> None:
    if prompts * n > MAX_CHOICES:
        raise InvalidRequestError("n", f"{prompts} prompt(s) x n={n} choices; at most {MAX_CHOICES} in one call")


def _new_id(prefix: str, request_id: str | None) -> str:
    return request_id or f"{prefix}-{uuid.uuid4().hex}"


def _prompt_ids(body: dict, ctx: Context) -> list[list[int]]:
    """The completions `prompt`: string | [string] | [int] | [[int]] -> token ids per prompt."""
    v = body.get("prompt")
    if v is None:
        raise InvalidRequestError("prompt", "required")
    if isinstance(v, str):
        items: list[Any] = [v]
        single = True
    elif isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        items, single = [v], True
    elif isinstance(v, list) and v:
        items, single = v, False
    else:
        raise InvalidRequestError("prompt", "expected a non-empty string, list of strings, list of token ids "
                                            "or list of lists of token ids" + (", got an empty list" if v == [] else
                                                                                f", got {_type_name(v)}"))
    chars = 0
    out = []
    for i, item in enumerate(items):
        name = "prompt" if single else f"prompt[{i}]"
        if isinstance(item, str):
            chars += len(item)
            convert.check_prompt_chars(chars, ctx.limits, ctx.max_model_len, name)
            ids = convert.encode_text(item, ctx.tokenizer, name)
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids = list(item)
            convert.check_token_ids(ids, ctx.vocab_size, name)
        else:
            raise InvalidRequestError(name, f"expected a string or a list of token ids, got {_type_name(item)}")
        convert.check_prompt_length(ids, ctx.max_model_len, name)
        out.append(ids)
    return out


def parse_completion(body: Any, ctx: Context, request_id: str | None = None) -> Call:
    check_fields(body, COMPLETIONS_FIELDS, _NOT_SUPPORTED_COMPLETIONS)
    model, adapter_id = resolve_model(body, ctx)
    n = _n(body)
    stream, include_usage = _stream(body)
    logprobs = _top_count(body, "logprobs")
    echo = bool(_get(body, "echo", "boolean"))
    if echo and logprobs is not None:
        raise InvalidRequestError("echo", "not supported together with logprobs (that needs the prompt's logprobs)")
    best_of = _get(body, "best_of", "integer")
    if best_of is not None and best_of < n:
        raise InvalidRequestError("best_of", f"must be >= n ({n}), got {best_of}")
    if best_of is not None and best_of > n and stream:
        raise InvalidRequestError("best_of", "must equal n when stream is true (the best choices are "
                                             "known only at the end)")
    per_prompt = best_of or n
    _get(body, "user", "string")
    prompts = _prompt_ids(body, ctx)
    _check_choices(len(prompts), per_prompt)
    # Picking the best of several choices needs every choice's total logprob, asked or not.
    engine_logprobs = 0 if logprobs is None and per_prompt > n else logprobs
    sampling = _sampling(body, ctx, prompts, per_prompt, "max_tokens", lambda ids: COMPLETIONS_DEFAULT_MAX_TOKENS,
                         engine_logprobs)
    mixture = parse_mixture(body, adapter_id)
    prompt_texts = [ctx.tokenizer.decode(ids) for ids in prompts] if echo else None
    return Call("completion", model, adapter_id, prompts, n, stream, include_usage, sampling,
                _new_id("cmpl", request_id), int(time.time()), logprobs=logprobs,
                best_of=per_prompt if per_prompt > n else 0, echo=prompt_texts, mixture=mixture,
                constraint=structured_output.constraint_from_openai(body))


def _message_content(m: dict, i: int) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        raise InvalidRequestError(f"messages[{i}].content", "required")
    if not isinstance(content, list):
        raise InvalidRequestError(f"messages[{i}].content", f"expected a string or a list of text parts, "
                                                            f"got {_type_name(content)}")
    texts = []
    for j, part in enumerate(content):
        name = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict):
            raise InvalidRequestError(name, f"expected an object, got {_type_name(part)}")
        if part.get("type") != "text":
            raise InvalidRequestError(f"{name}.type", f"only \"text\" parts are supported, got {part.get('type')!r}")
        extra = set(part) - {"type", "text"}
        if extra:
            raise InvalidRequestError(f"{name}.{sorted(extra)[0]}", "unknown field")
        if not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{name}.text", f"expected a string, got {_type_name(part.get('text'))}")
        texts.append(part["text"])
    return "".join(texts)


def _conversation(body: dict, ctx: Context) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequestError("messages", "required")
    if not isinstance(messages, list):
        raise InvalidRequestError("messages", f"expected an array, got {_type_name(messages)}")
    conversation = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}]", f"expected an object, got {_type_name(m)}")
        extra = set(m) - {"role", "content"}
        if extra:
            name = sorted(extra)[0]
            raise InvalidRequestError(f"messages[{i}].{name}", "not supported by this server" if name in
                                      ("name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio")
                                      else "unknown field")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequestError(f"messages[{i}].role", f"unknown role {role!r}; expected one of "
                                                             f"{', '.join(_ROLES)}")
        conversation.append({"role": _ROLES[role], "content": _message_content(m, i)})
    convert.check_messages([m["content"] for m in conversation], ctx.limits, ctx.max_model_len)
    return conversation


def parse_chat(body: Any, ctx: Context, request_id: str | None = None) -> Call:
    check_fields(body, CHAT_FIELDS, _NOT_SUPPORTED_CHAT)
    model, adapter_id = resolve_model(body, ctx)
    n = _n(body)
    stream, include_usage = _stream(body)
    _get(body, "user", "string")
    max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    want_logprobs = bool(_get(body, "logprobs", "boolean"))
    top = _top_count(body, "top_logprobs")
    if top and not want_logprobs:
        raise InvalidRequestError("top_logprobs", "requires logprobs to be true")
    logprobs = (top or 0) if want_logprobs else None
    ids = convert.render_chat(_conversation(body, ctx), ctx.tokenizer)
    convert.check_prompt_length(ids, ctx.max_model_len, "messages")
    _check_choices(1, n)
    sampling = _sampling(body, ctx, [ids], n, max_field, lambda p: ctx.max_model_len - len(p), logprobs)
    return Call("chat", model, adapter_id, [ids], n, stream, include_usage, sampling,
                _new_id("chatcmpl", request_id), int(time.time()), logprobs=logprobs,
                mixture=parse_mixture(body, adapter_id), constraint=structured_output.constraint_from_openai(body))


# --- responses -----------------------------------------------------------------------------------
def finish_reason(reason: FinishReason | None) -> str | None:
    return None if reason is None else _FINISH[reason]


def usage(call: Call, finals: dict[int, RequestOutput]) -> dict:
    """OpenAI usage over the finished events of every generated choice (best_of ones included, as
    OpenAI bills them): each prompt counted once."""
    prompt = cached = completion = 0
    for k, out in finals.items():
        completion += out.completion_tokens
        if k % call.per_prompt == 0:  # the first choice of each prompt
            prompt += out.prompt_tokens
            cached += getattr(out, "cached_prompt_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def best_choices(call: Call, logprobs: dict[int, list[Any]]) -> list[int]:
    """The engine requests answered, in choice order: all of them, or with best_of the n of each
    prompt's best_of with the highest total logprob (ties: the earlier one)."""
    if not call.best_of:
        return list(range(len(call.sampling)))
    chosen = []
    for p in range(len(call.prompts)):
        ks = range(p * call.best_of, (p + 1) * call.best_of)
        ranked = sorted(ks, key=lambda k: -sum(lp.logprob for lp in logprobs.get(k, ())))
        chosen.extend(sorted(ranked[:call.n]))
    return chosen


def choice_logprobs(call: Call, logprobs: Seq[Any], ctx: Context, offset: int = 0) -> dict | None:
    """The OpenAI logprobs object of one choice (or of one streamed chunk), None when not asked."""
    if call.logprobs is None:
        return None
    if call.kind == "chat":
        return logprobs_format.chat_logprobs(logprobs, ctx.token_text)
    return logprobs_format.completion_logprobs(logprobs, ctx.token_text, offset)


def full_response(call: Call, texts: dict[int, list[str]], finals: dict[int, RequestOutput],
                  logprobs: dict[int, list[Any]] | None = None, ctx: Context | None = None) -> dict:
    """logprobs: each engine request's TokenLogprobs (when the engine reported them)."""
    logprobs = logprobs or {}
    choices = []
    for index, k in enumerate(best_choices(call, logprobs)):
        text = "".join(texts.get(k, ()))
        reason = finish_reason(finals[k].finish_reason)
        prefix = call.echo[k // call.per_prompt] if call.echo else ""
        lp = choice_logprobs(call, logprobs.get(k, ()), ctx, len(prefix))
        if call.kind == "chat":
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "logprobs": lp, "finish_reason": reason})
        else:
            choices.append({"index": index, "text": prefix + text, "logprobs": lp, "finish_reason": reason})
    return {"id": call.id, "object": "chat.completion" if call.kind == "chat" else "text_completion",
            "created": call.created, "model": call.model, "choices": choices, "usage": usage(call, finals)}


def chunk(call: Call, index: int, text: str | None, reason: str | None, first: bool = False,
          logprobs: dict | None = None) -> dict:
    """One streamed chunk for choice `index`; logprobs: choice_logprobs of its tokens."""
    if call.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        obj = "text_completion"
    out = {"id": call.id, "object": obj, "created": call.created, "model": call.model, "choices": [choice]}
    if call.include_usage:
        out["usage"] = None  # as OpenAI: null on every chunk but the last, usage-only one
    return out


def usage_chunk(call: Call, finals: dict[int, RequestOutput]) -> dict:
    return {"id": call.id, "object": "chat.completion.chunk" if call.kind == "chat" else "text_completion",
            "created": call.created, "model": call.model, "choices": [], "usage": usage(call, finals)}


def model_card(model_id: str, created: int, root: str, parent: str | None, **extra: Any) -> dict:
    """One entry of GET /v1/models, as vLLM lists the base model and its adapters."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "loraplex", "root": root,
            "parent": parent, "permission": [], **extra}


def rename_field(message: str, mapping: dict[str, str]) -> str:
    """"adapter_id: ..." -> "model: ..." (the core's field names -> this front door's)."""
    head, sep, rest = message.partition(": ")
    return f"{mapping[head]}: {rest}" if sep and head in mapping else message

