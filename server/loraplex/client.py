"""A Python client for loraplex's gRPC API, sync and asyncio, with typed results.

    from loraplex.client import Client, AsyncClient

    with Client("127.0.0.1:50051") as c:                       # token=..., tls_ca=... for a secured server
        done = c.generate("Once upon a time", max_new_tokens=16, temperature=0)
        print(done.text, done.finish_reason, done.usage.completion_tokens)
        for chunk in c.stream(messages=[{"role": "user", "content": "Hi!"}], adapter="my-adapter"):
            print(chunk.text, end="", flush=True)
        c.load_adapter("sql", "/srv/adapters/sql", pinned=True)
        print([a.adapter_id for a in c.list_adapters()], c.model_info().model_name)

    async with AsyncClient("127.0.0.1:50051") as c:
        done = await c.generate("Hello", max_new_tokens=8)
        async for chunk in c.stream("Hello", max_new_tokens=8):
            ...

Scale-out: `target` may list several replicas ("a:50051,b:50051" or a list) or name one proxy in
front of them; a call refused with UNAVAILABLE is tried again on the next one, with the bounded
policy of loraplex/failover.py (`retry=RetryPolicy(...)`; `timeout` is the deadline of the whole
call, retries included); a stream that already delivered a chunk is never replayed. Every
generation call carries its adapter in the `x-adapter-id` metadata, which proxies hash on (adapter
affinity) and the server checks against the request.

Exactly one of `prompt` (text), `messages` (a chat, rendered with the model's template) and
`prompt_token_ids` is given. Sampling fields left None take the server's defaults (the model's
generation_config.json, see `model_info().sampling_defaults`). Every failure raises LoraplexError
with the gRPC status name in `code` ("NOT_FOUND", "INVALID_ARGUMENT", ...) and the server's
message, which starts with the offending field. Leaving a `stream()` loop early cancels the
request on the server (its KV cache is freed).
"""

from __future__ import annotations

from dataclasses import dataclass
import asyncio
import time
from typing import Any, AsyncIterator, Iterable, Iterator, Mapping, Sequence

import grpc

from loraplex.api.affinity import HEADER as ADAPTER_HEADER
from loraplex.api.pb.loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from loraplex.failover import NO_RETRY, Attempts, RetryPolicy, Targets, parse_targets

__all__ = ["Adapter", "AsyncClient", "Chunk", "Client", "Completion", "LoraplexError", "ModelInfo",
           "RetryPolicy", "SamplingDefaults", "Timings", "Usage"]


class LoraplexError(Exception):
    """An RPC that failed: `code` is the gRPC status name, `details` the server's message."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> "LoraplexError":
        code = err.code().name if hasattr(err, "code") and err.code() is not None else "UNKNOWN"
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code, details or "")

    def after(self, attempts: Attempts) -> "LoraplexError":
        """This error, saying where it was tried when that was more than once."""
        if attempts.count == 1:
            return self
        return LoraplexError(self.code, f"{self.details} ({attempts.describe()})")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class Logprob:
    """A generated token's log-probability (asked with logprobs=k), with the k most likely
    alternatives at that step as (token id, token text, logprob), most likely first."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "eos" | "length" | "stop" | "cancelled" | "grammar" (structured output complete)
    usage: Usage
    timings: Timings
    logprobs: tuple[Logprob, ...] = ()  # one per token id when asked


@dataclass(frozen=True)
class Chunk:
    """One streamed message; `finish_reason`, `usage` and `timings` are set on the last only."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    logprobs: tuple[Logprob, ...] = ()  # one per token id of this chunk when asked


@dataclass(frozen=True)
class Adapter:
    adapter_id: str
    source: str
    target_modules: tuple[str, ...]
    min_rank: int
    max_rank: int
    bytes: int
    tier: str  # "device" | "host" | "disk"
    requests_in_flight: int
    last_used_unix_seconds: float
    pinned: bool
    combined_from: tuple[str, ...] = ()
    combine_method: str = ""
    # "ready", or "failed": recorded in the server's --state-dir registry but not loadable at its
    # start-up (`error` says why); requests for it get NOT_FOUND until it is loaded again.
    state: str = "ready"
    error: str = ""


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    source: str


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    model_path: str
    architecture: str
    dtype: str
    device: str
    max_model_len: int
    vocab_size: int
    quantization: str
    max_new_tokens_cap: int
    eos_token_ids: tuple[int, ...]
    loraplex_version: str
    sampling_defaults: SamplingDefaults
    raw: Any  # the generation_pb2.ModelInfo message, every field


# --- proto <-> typed ------------------------------------------------------------------------------
def _reason(value: int) -> str | None:
    if value == generation_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return generation_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _usage(u: Any) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens, getattr(u, "cached_prompt_tokens", 0))


def _timings(t: Any) -> Timings:
    return Timings(t.queue_seconds, t.time_to_first_token_seconds, t.total_seconds)


def _logprobs(msg: Any) -> tuple[Logprob, ...]:
    return tuple(Logprob(lp.token_id, lp.token, lp.logprob,
                         tuple((t.token_id, t.token, t.logprob) for t in lp.top_logprobs)) for lp in msg.logprobs)


def _chunk(msg: Any) -> Chunk:
    last = msg.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
    return Chunk(msg.request_id, msg.text, tuple(msg.token_ids), _reason(msg.finish_reason),
                 _usage(msg.usage) if last else None, _timings(msg.timings) if last else None, _logprobs(msg))


def _completion(msg: Any) -> Completion:
    return Completion(msg.request_id, msg.text, tuple(msg.token_ids), _reason(msg.finish_reason) or "",
                      _usage(msg.usage), _timings(msg.timings), _logprobs(msg))


def _adapter(a: Any) -> Adapter:
    return Adapter(a.adapter_id, a.source, tuple(a.target_modules), a.min_rank, a.max_rank, a.bytes,
                   adapters_pb2.AdapterTier.Name(a.tier).removeprefix("ADAPTER_TIER_").lower(),
                   a.requests_in_flight, a.last_used_unix_seconds, a.pinned, tuple(a.combined_from),
                   a.combine_method,
                   "failed" if a.state == adapters_pb2.ADAPTER_STATE_FAILED else "ready", a.error)


def combine_request(adapter_id: str, adapters: Sequence[tuple[str, float]], method: str = "svd", *,
                    density: float | None = None, svd_rank: int | None = None, svd_clamp: float | None = None,
                    majority_sign_method: str = "", seed: int | None = None,
                    pinned: bool = False) -> adapters_pb2.CombineAdaptersRequest:
    """The CombineAdaptersRequest for these arguments; `adapters`: (adapter id, weight) pairs."""
    req = adapters_pb2.CombineAdaptersRequest(adapter_id=adapter_id, method=method,
                                              majority_sign_method=majority_sign_method, pinned=pinned)
    for a, w in adapters:
        req.adapters.add(adapter_id=a, weight=w)
    for name, value in (("density", density), ("svd_rank", svd_rank), ("svd_clamp", svd_clamp), ("seed", seed)):
        if value is not None:
            setattr(req, name, value)
    return req


def _model_info(m: Any) -> ModelInfo:
    d = m.sampling_defaults
    return ModelInfo(m.model_name, m.model_path, m.architecture, m.dtype, m.device, m.max_model_len,
                     m.vocab_size, m.quantization, m.max_new_tokens_cap, tuple(m.eos_token_ids),
                     m.loraplex_version,
                     SamplingDefaults(d.temperature, d.top_p, d.top_k, d.repetition_penalty, d.source), m)


_SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
             "presence_penalty", "frequency_penalty", "logprobs")


def build_request(prompt: str | None = None, *, messages: Iterable[Mapping[str, str]] | None = None,
                  prompt_token_ids: Sequence[int] | None = None, adapter: str = "",
                  max_new_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None,
                  repetition_penalty: float | None = None, seed: int | None = None,
                  stop: Sequence[str] = (), ignore_eos: bool = False,
                  presence_penalty: float | None = None, frequency_penalty: float | None = None,
                  logprobs: int | None = None, logit_bias: Mapping[int, float] | None = None,
                  request_id: str = "",
                  adapters: Sequence[tuple[str, float]] = ()) -> generation_pb2.GenerateRequest:
    """The GenerateRequest for these arguments (ValueError unless exactly one input is given)."""
    given = [name for name, v in (("prompt", prompt), ("messages", messages),
                                  ("prompt_token_ids", prompt_token_ids)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})")
    req = generation_pb2.GenerateRequest(adapter_id=adapter, request_id=request_id)
    for a, w in adapters:  # a per-request mixture (instead of `adapter`)
        req.adapters.add(adapter_id=a, weight=w)
    if prompt is not None:
        req.prompt = prompt
    elif messages is not None:
        for m in messages:
            req.messages.messages.add(role=m["role"], content=m["content"])
        req.messages.SetInParent()  # an empty list still selects `messages` (the server refuses it)
    else:
        req.prompt_token_ids.ids.extend(prompt_token_ids)
        req.prompt_token_ids.SetInParent()
    values = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                  repetition_penalty=repetition_penalty, seed=seed, presence_penalty=presence_penalty,
                  frequency_penalty=frequency_penalty, logprobs=logprobs)
    for name in _SAMPLING:
        if values[name] is not None:
            setattr(req.sampling, name, values[name])
    req.sampling.logit_bias.update(logit_bias or {})
    req.sampling.stop.extend(stop)
    req.sampling.ignore_eos = ignore_eos
    return req


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _with_adapter(md: tuple, request: generation_pb2.GenerateRequest) -> tuple:
    """The call's metadata plus `x-adapter-id` (api/affinity.py); left out for the base model,
    so that proxies spread base requests evenly instead of hashing an empty value."""
    return md + ((ADAPTER_HEADER, request.adapter_id),) if request.adapter_id else md


def _streamed_error(error: "LoraplexError", chunks: int) -> "LoraplexError":
    return LoraplexError(error.code, f"{error.details} (not retried: {chunks} chunk(s) had arrived; a replay "
                                     f"would repeat them)")


def _credentials(tls_ca: str | None, tls_cert: str | None, tls_key: str | None):
    if tls_ca is None:
        if tls_cert is not None or tls_key is not None:
            raise ValueError("tls_cert/tls_key need tls_ca")
        return None
    from loraplex.api.tls import channel_credentials

    return channel_credentials(tls_ca, tls_cert, tls_key)


# --- sync ---------------------------------------------------------------------------------------
class _Base:
    """What both clients share: targets, their stubs, metadata, deadline and retry policy."""

    def __init__(self, target: str | Sequence[str], token: str | None, tls_ca: str | None, tls_cert: str | None,
                 tls_key: str | None, timeout: float | None, retry: RetryPolicy, grpc_module: Any):
        creds = _credentials(tls_ca, tls_cert, tls_key)
        self._targets = Targets(parse_targets(target))
        self._channels = [grpc_module.secure_channel(t, creds) if creds else grpc_module.insecure_channel(t)
                          for t in self._targets.names]
        self._gen = [generation_pb2_grpc.GenerationStub(ch) for ch in self._channels]
        self._adapters = [adapters_pb2_grpc.AdaptersStub(ch) for ch in self._channels]
        self._md = _metadata(token)
        self.timeout = timeout  # default deadline of every call (all its attempts), seconds; None = none
        self.retry = retry

    @property
    def targets(self) -> tuple[str, ...]:
        return self._targets.names

    def _attempts(self, timeout: float | None, retry: bool = True) -> Attempts:
        return Attempts(self.retry if retry else NO_RETRY, self._targets,
                        timeout if timeout is not None else self.timeout)


class Client(_Base):
    """A blocking client (thread-safe: share it between threads). `target`: "host:port", a proxy,
    or several replicas ("a:50051,b:50051" or a list), tried in turn on UNAVAILABLE (`retry`)."""

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", *, token: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 timeout: float | None = None, retry: RetryPolicy = RetryPolicy()):
        super().__init__(target, token, tls_ca, tls_cert, tls_key, timeout, retry, grpc)

    def _call(self, stubs, name: str, request, timeout, metadata: tuple | None = None, retry: bool = True):
        att = self._attempts(timeout, retry)
        while True:
            try:
                return getattr(stubs[att.index], name)(request, timeout=att.remaining(),
                                                        metadata=self._md if metadata is None else metadata)
            except grpc.RpcError as err:
                error = LoraplexError.from_rpc(err)
            wait = att.after_failure(error.code)
            if wait is None:
                raise error.after(att) from None
            time.sleep(wait)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> Completion:
        """The whole completion (see build_request for the arguments)."""
        req = build_request(prompt, **kwargs)
        return _completion(self._call(self._gen, "Generate", req, timeout, _with_adapter(self._md, req)))

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> Iterator[Chunk]:
        """The completion as it is generated; the last chunk carries finish_reason and usage."""
        req = build_request(prompt, **kwargs)
        md = _with_adapter(self._md, req)
        att = self._attempts(timeout)
        while True:
            call = self._gen[att.index].GenerateStream(req, timeout=att.remaining(), metadata=md)
            chunks = 0
            try:
                for msg in call:
                    chunks += 1
                    yield _chunk(msg)
                return
            except grpc.RpcError as err:
                error = LoraplexError.from_rpc(err)
            finally:
                call.cancel()  # no-op once finished; leaving the loop early frees the server's KV
            if chunks:
                raise _streamed_error(error, chunks)
            wait = att.after_failure(error.code)
            if wait is None:
                raise error.after(att)
            time.sleep(wait)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return _model_info(self._call(self._gen, "GetModelInfo", generation_pb2.GetModelInfoRequest(), timeout))

    # Adapter changes act on one replica: no failover (a load must not land on another one).
    def load_adapter(self, adapter_id: str, path: str, *, pinned: bool = False,
                     timeout: float | None = None) -> Adapter:
        req = adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id, path=str(path), pinned=pinned)
        return _adapter(self._call(self._adapters, "LoadAdapter", req, timeout, retry=False).adapter)

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        self._call(self._adapters, "UnloadAdapter", adapters_pb2.UnloadAdapterRequest(adapter_id=adapter_id),
                   timeout, retry=False)

    def list_adapters(self, *, timeout: float | None = None) -> list[Adapter]:
        resp = self._call(self._adapters, "ListAdapters", adapters_pb2.ListAdaptersRequest(), timeout)
        return [_adapter(a) for a in resp.adapters]

    def combine_adapters(self, adapter_id: str, adapters: Sequence[tuple[str, float]], method: str = "svd", *,
                         timeout: float | None = None, **options: Any) -> Adapter:
        req = combine_request(adapter_id, adapters, method, **options)
        return _adapter(self._call(self._adapters, "CombineAdapters", req, timeout, retry=False).adapter)

    def save_adapter(self, adapter_id: str, path: str, *, overwrite: bool = False,
                     timeout: float | None = None) -> str:
        req = adapters_pb2.SaveAdapterRequest(adapter_id=adapter_id, path=str(path), overwrite=overwrite)
        return self._call(self._adapters, "SaveAdapter", req, timeout, retry=False).path

    def pin_adapter(self, adapter_id: str, pinned: bool = True, *, timeout: float | None = None) -> Adapter:
        """Pin (or, with pinned=False, unpin) a loaded adapter."""
        req = adapters_pb2.PinAdapterRequest(adapter_id=adapter_id, pinned=pinned)
        return _adapter(self._call(self._adapters, "PinAdapter", req, timeout, retry=False).adapter)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- asyncio ------------------------------------------------------------------------------------
class AsyncClient(_Base):
    """The same calls as Client, as coroutines (create and use it inside one event loop)."""

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", *, token: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 timeout: float | None = None, retry: RetryPolicy = RetryPolicy()):
        super().__init__(target, token, tls_ca, tls_cert, tls_key, timeout, retry, grpc.aio)

    async def _call(self, stubs, name: str, request, timeout, metadata: tuple | None = None, retry: bool = True):
        att = self._attempts(timeout, retry)
        while True:
            try:
                return await getattr(stubs[att.index], name)(request, timeout=att.remaining(),
                                                              metadata=self._md if metadata is None else metadata)
            except grpc.RpcError as err:
                error = LoraplexError.from_rpc(err)
            wait = att.after_failure(error.code)
            if wait is None:
                raise error.after(att) from None
            await asyncio.sleep(wait)

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> Completion:
        req = build_request(prompt, **kwargs)
        return _completion(await self._call(self._gen, "Generate", req, timeout, _with_adapter(self._md, req)))

    async def stream(self, prompt: str | None = None, *, timeout: float | None = None,
                     **kwargs: Any) -> AsyncIterator[Chunk]:
        req = build_request(prompt, **kwargs)
        md = _with_adapter(self._md, req)
        att = self._attempts(timeout)
        while True:
            call = self._gen[att.index].GenerateStream(req, metadata=md, timeout=att.remaining())
            chunks = 0
            try:
                async for msg in call:
                    chunks += 1
                    yield _chunk(msg)
                return
            except grpc.RpcError as err:
                error = LoraplexError.from_rpc(err)
            finally:
                call.cancel()
            if chunks:
                raise _streamed_error(error, chunks)
            wait = att.after_failure(error.code)
            if wait is None:
                raise error.after(att)
            await asyncio.sleep(wait)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return _model_info(await self._call(self._gen, "GetModelInfo", generation_pb2.GetModelInfoRequest(),
                                            timeout))

    async def load_adapter(self, adapter_id: str, path: str, *, pinned: bool = False,
                           timeout: float | None = None) -> Adapter:
        req = adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id, path=str(path), pinned=pinned)
        return _adapter((await self._call(self._adapters, "LoadAdapter", req, timeout, retry=False)).adapter)

    async def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        await self._call(self._adapters, "UnloadAdapter", adapters_pb2.UnloadAdapterRequest(adapter_id=adapter_id),
                         timeout, retry=False)

    async def list_adapters(self, *, timeout: float | None = None) -> list[Adapter]:
        resp = await self._call(self._adapters, "ListAdapters", adapters_pb2.ListAdaptersRequest(), timeout)
        return [_adapter(a) for a in resp.adapters]

    async def combine_adapters(self, adapter_id: str, adapters: Sequence[tuple[str, float]], method: str = "svd",
                               *, timeout: float | None = None, **options: Any) -> Adapter:
        req = combine_request(adapter_id, adapters, method, **options)
        return _adapter((await self._call(self._adapters, "CombineAdapters", req, timeout, retry=False)).adapter)

    async def save_adapter(self, adapter_id: str, path: str, *, overwrite: bool = False,
                           timeout: float | None = None) -> str:
        req = adapters_pb2.SaveAdapterRequest(adapter_id=adapter_id, path=str(path), overwrite=overwrite)
        return (await self._call(self._adapters, "SaveAdapter", req, timeout, retry=False)).path

    async def pin_adapter(self, adapter_id: str, pinned: bool = True, *, timeout: float | None = None) -> Adapter:
        req = adapters_pb2.PinAdapterRequest(adapter_id=adapter_id, pinned=pinned)
        return _adapter((await self._call(self._adapters, "PinAdapter", req, timeout, retry=False)).adapter)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
