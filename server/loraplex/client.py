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

Exactly one of `prompt` (text), `messages` (a chat, rendered with the model's template) and
`prompt_token_ids` is given. Sampling fields left None take the server's defaults (the model's
generation_config.json, see `model_info().sampling_defaults`). Every failure raises LoraplexError
with the gRPC status name in `code` ("NOT_FOUND", "INVALID_ARGUMENT", ...) and the server's
message, which starts with the offending field. Leaving a `stream()` loop early cancels the
request on the server (its KV cache is freed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable, Iterator, Mapping, Sequence

import grpc

from loraplex.api.pb.loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

__all__ = ["Adapter", "AsyncClient", "Chunk", "Client", "Completion", "LoraplexError", "ModelInfo",
           "SamplingDefaults", "Timings", "Usage"]


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
class Completion:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "eos" | "length" | "stop" | "cancelled" | "grammar" (structured output complete)
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class Chunk:
    """One streamed message; `finish_reason`, `usage` and `timings` are set on the last only."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None


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


def _chunk(msg: Any) -> Chunk:
    last = msg.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
    return Chunk(msg.request_id, msg.text, tuple(msg.token_ids), _reason(msg.finish_reason),
                 _usage(msg.usage) if last else None, _timings(msg.timings) if last else None)


def _completion(msg: Any) -> Completion:
    return Completion(msg.request_id, msg.text, tuple(msg.token_ids), _reason(msg.finish_reason) or "",
                      _usage(msg.usage), _timings(msg.timings))


def _adapter(a: Any) -> Adapter:
    return Adapter(a.adapter_id, a.source, tuple(a.target_modules), a.min_rank, a.max_rank, a.bytes,
                   adapters_pb2.AdapterTier.Name(a.tier).removeprefix("ADAPTER_TIER_").lower(),
                   a.requests_in_flight, a.last_used_unix_seconds, a.pinned)


def _model_info(m: Any) -> ModelInfo:
    d = m.sampling_defaults
    return ModelInfo(m.model_name, m.model_path, m.architecture, m.dtype, m.device, m.max_model_len,
                     m.vocab_size, m.quantization, m.max_new_tokens_cap, tuple(m.eos_token_ids),
                     m.loraplex_version,
                     SamplingDefaults(d.temperature, d.top_p, d.top_k, d.repetition_penalty, d.source), m)


_SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def build_request(prompt: str | None = None, *, messages: Iterable[Mapping[str, str]] | None = None,
                  prompt_token_ids: Sequence[int] | None = None, adapter: str = "",
                  max_new_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None,
                  repetition_penalty: float | None = None, seed: int | None = None,
                  stop: Sequence[str] = (), ignore_eos: bool = False,
                  request_id: str = "") -> generation_pb2.GenerateRequest:
    """The GenerateRequest for these arguments (ValueError unless exactly one input is given)."""
    given = [name for name, v in (("prompt", prompt), ("messages", messages),
                                  ("prompt_token_ids", prompt_token_ids)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})")
    req = generation_pb2.GenerateRequest(adapter_id=adapter, request_id=request_id)
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
                  repetition_penalty=repetition_penalty, seed=seed)
    for name in _SAMPLING:
        if values[name] is not None:
            setattr(req.sampling, name, values[name])
    req.sampling.stop.extend(stop)
    req.sampling.ignore_eos = ignore_eos
    return req


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _credentials(tls_ca: str | None, tls_cert: str | None, tls_key: str | None):
    if tls_ca is None:
        if tls_cert is not None or tls_key is not None:
            raise ValueError("tls_cert/tls_key need tls_ca")
        return None
    from loraplex.api.tls import channel_credentials

    return channel_credentials(tls_ca, tls_cert, tls_key)


# --- sync ---------------------------------------------------------------------------------------
class Client:
    """A blocking client over one gRPC channel (thread-safe: share it between threads)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, timeout: float | None = None):
        creds = _credentials(tls_ca, tls_cert, tls_key)
        self._channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
        self._gen = generation_pb2_grpc.GenerationStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self._channel)
        self._md = _metadata(token)
        self.timeout = timeout  # default deadline of every call, seconds; None = none

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout, metadata=self._md)
        except grpc.RpcError as err:
            raise LoraplexError.from_rpc(err) from None

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> Completion:
        """The whole completion (see build_request for the arguments)."""
        return _completion(self._call(self._gen.Generate, build_request(prompt, **kwargs), timeout))

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> Iterator[Chunk]:
        """The completion as it is generated; the last chunk carries finish_reason and usage."""
        call = self._call(self._gen.GenerateStream, build_request(prompt, **kwargs), timeout)
        try:
            for msg in call:
                yield _chunk(msg)
        except grpc.RpcError as err:
            raise LoraplexError.from_rpc(err) from None
        finally:
            call.cancel()  # no-op once finished; leaving the loop early frees the server's KV

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return _model_info(self._call(self._gen.GetModelInfo, generation_pb2.GetModelInfoRequest(), timeout))

    def load_adapter(self, adapter_id: str, path: str, *, pinned: bool = False,
                     timeout: float | None = None) -> Adapter:
        req = adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id, path=str(path), pinned=pinned)
        return _adapter(self._call(self._adapters.LoadAdapter, req, timeout).adapter)

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        self._call(self._adapters.UnloadAdapter, adapters_pb2.UnloadAdapterRequest(adapter_id=adapter_id), timeout)

    def list_adapters(self, *, timeout: float | None = None) -> list[Adapter]:
        resp = self._call(self._adapters.ListAdapters, adapters_pb2.ListAdaptersRequest(), timeout)
        return [_adapter(a) for a in resp.adapters]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- asyncio ------------------------------------------------------------------------------------
class AsyncClient:
    """The same calls as Client, as coroutines (create and use it inside one event loop)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, timeout: float | None = None):
        creds = _credentials(tls_ca, tls_cert, tls_key)
        self._channel = (grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target))
        self._gen = generation_pb2_grpc.GenerationStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self._channel)
        self._md = _metadata(token)
        self.timeout = timeout

    async def _call(self, method, request, timeout):
        try:
            return await method(request, timeout=timeout if timeout is not None else self.timeout,
                                metadata=self._md)
        except grpc.RpcError as err:
            raise LoraplexError.from_rpc(err) from None

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> Completion:
        return _completion(await self._call(self._gen.Generate, build_request(prompt, **kwargs), timeout))

    async def stream(self, prompt: str | None = None, *, timeout: float | None = None,
                     **kwargs: Any) -> AsyncIterator[Chunk]:
        call = self._gen.GenerateStream(build_request(prompt, **kwargs), metadata=self._md,
                                        timeout=timeout if timeout is not None else self.timeout)
        try:
            async for msg in call:
                yield _chunk(msg)
        except grpc.RpcError as err:
            raise LoraplexError.from_rpc(err) from None
        finally:
            call.cancel()

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return _model_info(await self._call(self._gen.GetModelInfo, generation_pb2.GetModelInfoRequest(), timeout))

    async def load_adapter(self, adapter_id: str, path: str, *, pinned: bool = False,
                           timeout: float | None = None) -> Adapter:
        req = adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id, path=str(path), pinned=pinned)
        return _adapter((await self._call(self._adapters.LoadAdapter, req, timeout)).adapter)

    async def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        await self._call(self._adapters.UnloadAdapter, adapters_pb2.UnloadAdapterRequest(adapter_id=adapter_id),
                         timeout)

    async def list_adapters(self, *, timeout: float | None = None) -> list[Adapter]:
        resp = await self._call(self._adapters.ListAdapters, adapters_pb2.ListAdaptersRequest(), timeout)
        return [_adapter(a) for a in resp.adapters]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
