"""Protobuf <-> engine objects. No gRPC here: bad input raises InvalidRequestError naming the field
(the servicer turns it into INVALID_ARGUMENT), so every rule is testable without a server.

Field names in errors are the proto paths a client sees: "prompt", "prompt_token_ids.ids",
"messages[2].role", "sampling.temperature", "input" (none of the prompt forms set).
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Sequence

import loraplex
from loraplex.api.pb.loraplex.v1 import adapters_pb2, generation_pb2
from loraplex.api.structured_output import constraint_from_proto
from loraplex.config import RequestLimits
from loraplex.engine.logprobs import TokenLogprob
from loraplex.engine.request import (FinishReason, InvalidRequestError, Request, RequestOutput,
                                     SamplingParams, Timings)

MESSAGE_ROLES = ("system", "user", "assistant")

_FINISH_REASONS = {
    FinishReason.EOS: generation_pb2.FINISH_REASON_EOS,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.CANCELLED: generation_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: generation_pb2.FINISH_REASON_ERROR,
    FinishReason.GRAMMAR: generation_pb2.FINISH_REASON_GRAMMAR,
}


# --- requests ------------------------------------------------------------------------------------
def _rename(err: InvalidRequestError, field: str) -> InvalidRequestError:
    """The same error under the proto path of its field (SamplingParams knows only its own names)."""
    message = str(err)
    prefix = f"{err.field}: "
    return InvalidRequestError(field, message[len(prefix):] if message.startswith(prefix) else message)


def sampling_params(kwargs: dict[str, Any], max_new_tokens_cap: int, defaults: Any = None,
                    field: Callable[[str], str] = lambda name: name) -> SamplingParams:
    """SamplingParams from the fields a request set (`kwargs`, SamplingParams' names); unset ones
    take `defaults` (model/generation_config.SamplingDefaults: the model's generation_config.json)
    and then SamplingParams' own. Errors name `field(name)`, the request's path of the field."""
    merged = dict(defaults.as_kwargs()) if defaults is not None else {}
    merged.update(kwargs)
    try:
        params = SamplingParams(**merged)
    except InvalidRequestError as err:
        raise _rename(err, field(err.field)) from None
    if params.max_new_tokens > max_new_tokens_cap:
        raise InvalidRequestError(field("max_new_tokens"),
                                  f"{params.max_new_tokens} is above the server's cap of {max_new_tokens_cap}")
    return params


def sampling_from_proto(sp: generation_pb2.SamplingParams, max_new_tokens_cap: int,
                        defaults: Any = None) -> SamplingParams:
    """Unset `optional` fields take the model's defaults (`defaults`), then SamplingParams'
    (max_new_tokens 64, temperature 1.0, top_p 1.0, top_k 0 = off, repetition_penalty 1.0,
    seed None = random)."""
    kwargs: dict[str, Any] = {}
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
                 "presence_penalty", "frequency_penalty"):
        if sp.HasField(name):
            kwargs[name] = getattr(sp, name)
    kwargs["stop"] = tuple(sp.stop)
    kwargs["ignore_eos"] = sp.ignore_eos
    if sp.HasField("logprobs"):
        kwargs["logprobs"] = sp.logprobs
    kwargs["logit_bias"] = tuple(sorted(sp.logit_bias.items()))
    return sampling_params(kwargs, max_new_tokens_cap, defaults, lambda name: f"sampling.{name}")


def render_chat(conversation: Sequence[dict[str, str]], tokenizer: Any, field: str = "messages") -> list[int]:
    """[{"role", "content"}, ...] -> prompt token ids through the model's own chat template."""
    if not conversation:
        raise InvalidRequestError(field, "must hold at least one message")
    for i, m in enumerate(conversation):
        if m["role"] not in MESSAGE_ROLES:
            raise InvalidRequestError(f"{field}[{i}].role",
                                      f"unknown role {m['role']!r}; expected one of {', '.join(MESSAGE_ROLES)}")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(field, "this model has no chat template; send a prompt instead")
    text = tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
    # The template already wrote the special tokens (BOS, role markers); adding them again would
    # put a second BOS in front.
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_messages(messages: generation_pb2.Messages, tokenizer: Any) -> list[int]:
    """Chat messages -> prompt token ids through the model's own chat template."""
    return render_chat([{"role": m.role, "content": m.content} for m in messages.messages], tokenizer)


def check_token_ids(ids: Sequence[int], vocab_size: int, field: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(field, f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def check_prompt_length(ids: Sequence[int], max_model_len: int, field: str) -> None:
    if not ids:
        raise InvalidRequestError(field, "must not be empty")
    if len(ids) >= max_model_len:
        # At least one generated token must fit next to the prompt.
        raise InvalidRequestError(field, f"{len(ids)} tokens is longer than the context: at most "
                                         f"{max_model_len - 1} prompt tokens fit (max_model_len {max_model_len})")


def encode_text(text: str, tokenizer: Any, field: str) -> list[int]:
    """Raw text -> token ids (special tokens such as BOS added as the tokenizer does by default)."""
    if not text:
        raise InvalidRequestError(field, "must not be empty")
    return list(tokenizer.encode(text))


def prompt_from_proto(req: generation_pb2.GenerateRequest, tokenizer: Any, vocab_size: int,
                      max_model_len: int) -> list[int]:
    """The request's prompt token ids, whichever of prompt / prompt_token_ids / messages is set."""
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("input", "set one of prompt, prompt_token_ids or messages")
    if which == "prompt":
        field = "prompt"
        ids = encode_text(req.prompt, tokenizer, field)
    elif which == "prompt_token_ids":
        field = "prompt_token_ids.ids"
        ids = list(req.prompt_token_ids.ids)
        check_token_ids(ids, vocab_size, field)
    else:
        field = "messages"
        ids = render_messages(req.messages, tokenizer)
    check_prompt_length(ids, max_model_len, field)
    return ids


def check_request_id(request_id: str, limits: RequestLimits, field: str = "request_id") -> None:
    if len(request_id) > limits.max_request_id_chars:
        raise InvalidRequestError(field, f"{len(request_id)} characters; at most "
                                         f"{limits.max_request_id_chars} (max_request_id_chars)")


def check_stop(stop: Sequence[str], limits: RequestLimits, field: str) -> None:
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequestError(field, f"{len(stop)} stop strings; at most "
                                         f"{limits.max_stop_strings} (max_stop_strings)")
    i, longest = max(enumerate(len(s) for s in stop), key=lambda p: p[1], default=(0, 0))
    if longest > limits.max_stop_chars:
        raise InvalidRequestError(f"{field}[{i}]", f"{longest} characters; at most "
                                                   f"{limits.max_stop_chars} (max_stop_chars)")


def check_prompt_chars(text_len: int, limits: RequestLimits, max_model_len: int, field: str) -> None:
    max_chars = limits.prompt_chars(max_model_len)
    if text_len > max_chars:
        raise InvalidRequestError(field, f"{text_len} characters; at most {max_chars} (max_prompt_chars)")


def check_messages(contents: Sequence[str], limits: RequestLimits, max_model_len: int,
                   field: str = "messages") -> None:
    if len(contents) > limits.max_messages:
        raise InvalidRequestError(field, f"{len(contents)} messages; at most {limits.max_messages} (max_messages)")
    total = sum(len(c) for c in contents)
    max_chars = limits.prompt_chars(max_model_len)
    if total > max_chars:
        raise InvalidRequestError(field, f"{total} characters of content; at most {max_chars} (max_prompt_chars)")


def check_limits(req: generation_pb2.GenerateRequest, limits: RequestLimits, max_model_len: int) -> None:
    """The size bounds of `limits` (see config.RequestLimits), checked before any tokenizing: a
    16 MiB prompt must cost a length check, not a tokenizer run."""
    check_request_id(req.request_id, limits)
    check_stop(req.sampling.stop, limits, "sampling.stop")
    which = req.WhichOneof("input")
    if which == "prompt":
        check_prompt_chars(len(req.prompt), limits, max_model_len, "prompt")
    if which == "messages":
        check_messages([m.content for m in req.messages.messages], limits, max_model_len)


def request_from_proto(req: generation_pb2.GenerateRequest, tokenizer: Any, vocab_size: int,
                       max_model_len: int, max_new_tokens_cap: int,
                       limits: RequestLimits | None = None, defaults: Any = None) -> Request:
    check_limits(req, limits or RequestLimits(), max_model_len)
    sampling = sampling_from_proto(req.sampling, max_new_tokens_cap, defaults)
    constraint = constraint_from_proto(req)
    ids = prompt_from_proto(req, tokenizer, vocab_size, max_model_len)
    return Request(request_id=req.request_id or uuid.uuid4().hex, prompt_token_ids=ids,
                   sampling=sampling, adapter_id=req.adapter_id, constraint=constraint)


# --- responses -----------------------------------------------------------------------------------
def finish_reason_to_proto(reason: FinishReason | None) -> int:
    return generation_pb2.FINISH_REASON_UNSPECIFIED if reason is None else _FINISH_REASONS[reason]


def usage_to_proto(out: RequestOutput) -> generation_pb2.Usage:
    return generation_pb2.Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                                cached_prompt_tokens=out.cached_prompt_tokens)


def timings_to_proto(t: Timings | None) -> generation_pb2.Timings:
    t = t or Timings()
    return generation_pb2.Timings(queue_seconds=t.queue_seconds, time_to_first_token_seconds=t.ttft_seconds,
                                  total_seconds=t.total_seconds)


def logprobs_to_proto(logprobs: Sequence[TokenLogprob], token_text: Any) -> list[generation_pb2.TokenLogprob]:
    """token_text: api/token_text.TokenText of the served tokenizer."""
    return [generation_pb2.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob, token=token_text.text(lp.token_id),
        top_logprobs=[generation_pb2.TopLogprob(token_id=t, logprob=v, token=token_text.text(t))
                      for t, v in lp.top]) for lp in logprobs]


def stream_chunk_to_proto(out: RequestOutput, token_text: Any = None) -> generation_pb2.GenerateStreamResponse:
    chunk = generation_pb2.GenerateStreamResponse(request_id=out.request_id, text=out.text_delta,
                                                  token_ids=out.new_token_ids)
    if out.logprobs:
        chunk.logprobs.extend(logprobs_to_proto(out.logprobs, token_text))
    if out.finished:
        chunk.finish_reason = finish_reason_to_proto(out.finish_reason)
        chunk.usage.CopyFrom(usage_to_proto(out))
        chunk.timings.CopyFrom(timings_to_proto(out.timings))
    return chunk


def response_to_proto(outputs: list[RequestOutput], token_text: Any = None) -> generation_pb2.GenerateResponse:
    """All events of one request (the last one finished) -> the unary response."""
    last = outputs[-1]
    logprobs = [lp for o in outputs for lp in o.logprobs]
    return generation_pb2.GenerateResponse(
        logprobs=logprobs_to_proto(logprobs, token_text) if logprobs else (),
        request_id=last.request_id,
        text="".join(o.text_delta for o in outputs),
        token_ids=[t for o in outputs for t in o.new_token_ids],
        finish_reason=finish_reason_to_proto(last.finish_reason),
        usage=usage_to_proto(last),
        timings=timings_to_proto(last.timings),
    )


def model_info_to_proto(loaded: Any, engine: Any, sampling_defaults: Any = None) -> generation_pb2.ModelInfo:
    from loraplex.model.quantize import float16_weight_bytes, quantized_bytes

    model = loaded.model
    # Counts bitsandbytes' quant state (absmax, code, SCB) too, which model.parameters() misses.
    weight_bytes = quantized_bytes(model)
    device = next(model.parameters()).device
    return generation_pb2.ModelInfo(
        model_name=loaded.path.name,
        model_path=str(loaded.path),
        architecture=loaded.arch.architecture,
        dtype=str(loaded.dtype).removeprefix("torch."),
        device=str(device),
        max_model_len=engine.max_model_len,
        vocab_size=loaded.arch.vocab_size,
        quantization=loaded.quant.method,  # "none" | "nf4" | "fp4" | "int8"
        quantized_embeddings=loaded.quant.embeddings,
        base_weight_bytes=weight_bytes,
        loraplex_version=loraplex.__version__,
        max_new_tokens_cap=engine.config.max_new_tokens_cap,
        eos_token_ids=sorted(engine.eos_token_ids),
        float16_weight_bytes=float16_weight_bytes(model),  # quantized layers at their logical shape
        sampling_defaults=sampling_defaults_to_proto(sampling_defaults),
        kv_cache_dtype=engine.runner.kv.dtype_name,
        kv_cache_tokens=engine.config.num_kv_blocks * engine.config.block_size,
        kv_cache_bytes=engine.runner.kv.nbytes,
    )


def sampling_defaults_to_proto(defaults: Any) -> generation_pb2.SamplingDefaults:
    """model.generation_config.SamplingDefaults (None = neutral) -> what a request gets unset."""
    from loraplex.model.generation_config import NEUTRAL

    defaults = defaults or NEUTRAL
    return generation_pb2.SamplingDefaults(**defaults.effective(), source=defaults.source)


# --- adapters (used once the Adapters service is implemented) -------------------------------------
_TIERS = {"device": adapters_pb2.ADAPTER_TIER_DEVICE, "host": adapters_pb2.ADAPTER_TIER_HOST,
          "disk": adapters_pb2.ADAPTER_TIER_DISK}


_STATES = {"ready": adapters_pb2.ADAPTER_STATE_READY, "failed": adapters_pb2.ADAPTER_STATE_FAILED}


def adapter_info_to_proto(info: Any) -> adapters_pb2.AdapterInfo:
    """loraplex.lora.manager.AdapterInfo -> proto."""
    tier = getattr(info.tier, "value", info.tier)
    return adapters_pb2.AdapterInfo(
        adapter_id=info.adapter_id, source=str(info.source), target_modules=list(info.target_modules),
        min_rank=info.min_rank, max_rank=info.max_rank, bytes=info.nbytes,
        tier=_TIERS.get(tier, adapters_pb2.ADAPTER_TIER_UNSPECIFIED),
        requests_in_flight=info.requests_in_flight, last_used_unix_seconds=info.last_used,
        pinned=info.pinned, state=_STATES.get(info.state, adapters_pb2.ADAPTER_STATE_UNSPECIFIED),
        error=info.error, combined_from=list(getattr(info, "combined_from", ())),
        combine_method=getattr(info, "combine_method", ""))


def combine_options(req: adapters_pb2.CombineAdaptersRequest) -> dict[str, Any]:
    """CombineAdaptersRequest's optional fields -> lora.combine.CombineSpec keyword arguments."""
    return dict(density=req.density if req.HasField("density") else None,
                svd_rank=req.svd_rank if req.HasField("svd_rank") else None,
                svd_clamp=req.svd_clamp if req.HasField("svd_clamp") else None,
                majority_sign_method=req.majority_sign_method or "total",
                seed=req.seed if req.HasField("seed") else None)


def mixture_from_proto(req: generation_pb2.GenerateRequest) -> list[tuple[str, float]]:
    """GenerateRequest.adapters as (adapter id, weight); INVALID_ARGUMENT when adapter_id is set too."""
    if req.adapters and req.adapter_id:
        raise InvalidRequestError("adapters", "set adapter_id or adapters, not both")
    return [(a.adapter_id, a.weight) for a in req.adapters]

