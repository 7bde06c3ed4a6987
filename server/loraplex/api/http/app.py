"""The OpenAI-compatible routes, as a Starlette app over the same runtime as the gRPC servicers.

    POST /v1/completions         POST /v1/chat/completions      (generation token)
    GET  /v1/models, /v1/models/{id}                            (generation token)
    POST /v1/load_lora_adapter   POST /v1/unload_lora_adapter   (admin token; vLLM's bodies)
    POST /v1/combine_lora_adapters                              (admin token; CombineAdapters)
    GET  /health                                                (open: 200 serving, 503 otherwise)

Each route is a translator: protocol.py parses the body (400 naming the field), api/generation.py
resolves the adapter and submits (shared with gRPC), auth.py / concurrency.py apply the same tokens
and the same --max-concurrent-requests places, and every refusal is an ApiError whose gRPC code
status.py maps to an HTTP status and OpenAI's error object
{"error": {"message", "type", "param", "code"}} (`code` = the gRPC status name).

Client disconnects: a generation response watches the connection while it runs; when the client
goes away (mid-stream or while waiting for a non-streamed answer) the generation task is cancelled,
which aborts its engine requests (their KV blocks are freed within a step), as a gRPC cancel does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from loraplex.api import adapter_ops, affinity, auth, generation
from loraplex.api.concurrency import GenerationSlots
from loraplex.api.http import logprobs_format, protocol
from loraplex.api.status import ApiError, Code, http_status, openai_error_body
from loraplex.config import AuthConfig, RequestLimits
from loraplex.engine.request import InvalidRequestError

log = logging.getLogger(__name__)

# The core's field names (gRPC's) -> this front door's.
_GENERATE_FIELDS = {"adapter_id": "model"}
_ADAPTER_FIELDS = {"adapter_id": "lora_name", "path": "lora_path"}
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _error(err: ApiError, mapping: dict[str, str] | None = None) -> tuple[int, dict]:
    """(HTTP status, OpenAI error object) of `err`, its field renamed by `mapping`."""
    message = protocol.rename_field(err.message, mapping) if mapping else err.message
    status = http_status(err.code)
    return status, openai_error_body(status, message, ApiError(err.code, message).field, err.code.name)


def error_response(err: ApiError, mapping: dict[str, str] | None = None) -> JSONResponse:
    status, body = _error(err, mapping)
    headers = {"retry-after": "1"} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


class _Guarded(Response):
    """A response produced by `produce(send)` while the client's connection is watched: when the
    client disconnects first, `produce` is cancelled. `cleanup` runs whatever happens."""

    def __init__(self, produce: Callable[[Any], Awaitable[None]], cleanup: Callable[[], None]):
        self._produce = produce
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(self._produce(send))
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                log.info("client disconnected: request cancelled")
                work.cancel()
            watch.cancel()
            await asyncio.gather(work, watch, return_exceptions=True)
            if work.done() and not work.cancelled() and work.exception() is not None:
                raise work.exception()
        finally:
            work.cancel()
            watch.cancel()
            self._cleanup()


class OpenAIApp:
    """The routes and the state they share with the gRPC server (set by HttpServer)."""

    def __init__(self, *, slots: GenerationSlots, auth_config: AuthConfig | None = None,
                 limits: RequestLimits | None = None, max_body_bytes: int = 16 * 1024 * 1024,
                 served_model_names: tuple[str, ...] = ()):
        self.runtime: generation.Runtime | None = None  # None while the model loads
        self.serving = False  # /health: true once attached, false again on shutdown
        self.slots = slots
        self.auth = auth_config or AuthConfig()
        self.limits = limits or RequestLimits()
        self.max_body_bytes = max_body_bytes
        self.started = int(time.time())
        self.served_model_names = served_model_names  # () = the model folder's name
        self._ctx: tuple[generation.Runtime, protocol.Context] | None = None  # see _context
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/v1/load_lora_adapter", self.load_lora_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload_lora_adapter, methods=["POST"]),
            Route("/v1/combine_lora_adapters", self.combine_lora_adapters, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ], exception_handlers={HTTPException: self._http_error, ApiError: self._api_error,
                               Exception: self._internal_error})

    # --- shared steps -----------------------------------------------------------------------
    def _authorize(self, request: HttpRequest, access: str) -> None:
        accepted = auth.accepted_for(self.auth, access)
        if accepted is None:
            return
        header = request.headers.get("authorization")
        token = auth.bearer_token([("authorization", header)] if header is not None else None)
        auth.check_token(token, accepted, f"{request.method} {request.url.path}",
                         "an `Authorization: Bearer <token>` header")

    async def _body(self, request: HttpRequest) -> Any:
        """The JSON body, read up to max_body_bytes (413 beyond), 400 when it is not JSON."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise _TooLarge(int(length), self.max_body_bytes)
        chunks, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > self.max_body_bytes:
                raise _TooLarge(size, self.max_body_bytes)
            chunks.append(piece)
        raw = b"".join(chunks)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(Code.INVALID_ARGUMENT, f"body: malformed JSON: {err}") from None

    def _context(self, rt: generation.Runtime) -> protocol.Context:
        """What parsing needs, built once per runtime (nothing in it changes while it serves)."""
        if self._ctx is None or self._ctx[0] is not rt:
            loaded, engine = rt.loaded, rt.engine
            self._ctx = (rt, protocol.Context(
                tokenizer=loaded.tokenizer, vocab_size=loaded.arch.vocab_size, max_model_len=engine.max_model_len,
                max_new_tokens_cap=engine.config.max_new_tokens_cap, limits=self.limits,
                base_model_names=frozenset(self.served_model_names or (loaded.path.name, str(loaded.path))),
                sampling_defaults=rt.sampling_defaults, token_text=rt.token_text))
        return self._ctx[1]

    # --- generation ---------------------------------------------------------------------------
    async def completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, protocol.parse_completion)

    async def chat_completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, protocol.parse_chat)

    async def _generate(self, request: HttpRequest, parse) -> Response:
        self._authorize(request, auth.GENERATION)
        rt = generation.require(self.runtime)
        self.slots.acquire()  # before any work, as the gRPC interceptor
        handed_over = False
        try:
            body = await self._body(request)
            request_id = request.headers.get("x-request-id") or None
            if request_id is not None and len(request_id) > self.limits.max_request_id_chars:
                raise ApiError(Code.INVALID_ARGUMENT, f"x-request-id: {len(request_id)} characters; at most "
                                                      f"{self.limits.max_request_id_chars} (max_request_id_chars)")
            parsed: list[protocol.Call] = []

            header = request.headers.getlist(affinity.HEADER)

            def make_requests():
                parsed.append(parse(body, self._context(rt), request_id))
                # `model` resolved to an adapter id ("" = base): a proxy routed by the header.
                affinity.check_adapter_header(header, parsed[0].adapter_id)
                return parsed[0].requests()

            try:  # refusals here count in loraplex_requests_rejected_total, as over gRPC
                gen = await generation.start(rt, make_requests, lambda: parsed[0].mixture)
            except ApiError as err:
                raise ApiError(err.code, protocol.rename_field(err.message, _GENERATE_FIELDS)) from None
            call = parsed[0]
            produce = self._stream if call.stream else self._unary
            ctx = self._context(rt)

            def cleanup() -> None:
                gen.abort()
                self.slots.release()

            handed_over = True
            return _Guarded(lambda send: produce(call, gen, send, ctx), cleanup)
        finally:
            if not handed_over:
                self.slots.release()

    async def _unary(self, call: protocol.Call, gen: generation.Generation, send,
                     ctx: protocol.Context) -> None:
        texts: dict[int, list[str]] = {}
        finals: dict[int, Any] = {}
        logprobs: dict[int, list[Any]] = {}
        try:
            async for k, out in gen.events():
                if out.text_delta:
                    texts.setdefault(k, []).append(out.text_delta)
                if out.logprobs:
                    logprobs.setdefault(k, []).extend(out.logprobs)
                if out.finished:
                    finals[k] = out
        except ApiError as err:
            response: Response = error_response(err, _GENERATE_FIELDS)
        else:
            response = Response(_dumps(protocol.full_response(call, texts, finals, logprobs, ctx)),
                                media_type="application/json")
        await _send(response, send)

    async def _stream(self, call: protocol.Call, gen: generation.Generation, send,
                      ctx: protocol.Context) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]
                    + [(k.encode(), v.encode()) for k, v in _SSE_HEADERS.items()]})

        async def event(obj: Any) -> None:
            await send({"type": "http.response.body", "body": b"data: " + _dumps(obj) + b"\n\n",
                        "more_body": True})

        finals: dict[int, Any] = {}
        offsets = [0] * len(call.sampling)  # completions' text_offset: characters sent per choice
        if call.kind == "chat":  # the role first, as OpenAI's stream starts
            for k in range(len(call.sampling)):
                await event(protocol.chunk(call, k, "", None, first=True))
        elif call.echo:  # the prompt's text first, as vLLM streams an echo
            for k in range(len(call.sampling)):
                offsets[k] = len(call.echo[k // call.per_prompt])
                await event(protocol.chunk(call, k, call.echo[k // call.per_prompt], None))
        try:
            async for k, out in gen.events():
                reason = protocol.finish_reason(out.finish_reason) if out.finished else None
                if out.finished:
                    finals[k] = out
                if out.text_delta or reason is not None or (out.logprobs and call.logprobs is not None):
                    lp = protocol.choice_logprobs(call, out.logprobs, ctx, offsets[k])
                    if lp is not None and call.kind != "chat":
                        offsets[k] = logprobs_format.completion_text_length(lp) or offsets[k]
                    await event(protocol.chunk(call, k, out.text_delta if out.text_delta or call.kind != "chat"
                                               else None, reason, logprobs=lp))
            if call.include_usage:
                await event(protocol.usage_chunk(call, finals))
        except ApiError as err:
            # Headers are out: the error travels as an event (the openai client raises on it).
            await event(_error(err, _GENERATE_FIELDS)[1])
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    # --- models and adapters ----------------------------------------------------------------
    async def models(self, request: HttpRequest) -> Response:
        self._authorize(request, auth.GENERATION)
        return JSONResponse({"object": "list", "data": await self._model_cards()})

    async def model(self, request: HttpRequest) -> Response:
        """GET /v1/models/{id}: one card, 404 for an id that is neither the base nor a loaded adapter."""
        self._authorize(request, auth.GENERATION)
        model_id = request.path_params["model_id"]
        for card in await self._model_cards():
            if card["id"] == model_id:
                return JSONResponse(card)
        raise ApiError(Code.NOT_FOUND, f"model: {model_id!r} is neither the base model nor a loaded adapter")

    async def _model_cards(self) -> list[dict]:
        rt = generation.require(self.runtime)
        from loraplex.model.generation_config import NEUTRAL

        base = self.served_model_names[0] if self.served_model_names else rt.loaded.path.name
        defaults = rt.sampling_defaults or NEUTRAL
        data = [protocol.model_card(base, self.started, str(rt.loaded.path), None,
                                    max_model_len=rt.engine.max_model_len,
                                    sampling_defaults={**defaults.effective(), "source": defaults.source})]
        if rt.lora_manager is not None:
            for info in await adapter_ops.list_adapters(rt):
                if info.state != "ready":
                    continue  # a failed registry record is not a model anyone can use
                data.append(protocol.model_card(info.adapter_id, self.started, str(info.source), base))
        return data

    async def _adapter_body(self, request: HttpRequest, allowed: tuple[str, ...]) -> dict:
        body = await self._body(request)
        if not isinstance(body, dict):
            raise ApiError(Code.INVALID_ARGUMENT, "body: expected a JSON object")
        for key in body:
            if key not in allowed:
                raise ApiError(Code.INVALID_ARGUMENT, f"{key}: unknown field")
        for key in allowed:
            value = body.get(key)
            if key == "pinned":
                if value is not None and not isinstance(value, bool):
                    raise ApiError(Code.INVALID_ARGUMENT, "pinned: expected a boolean")
            elif key != "lora_int_id" and not isinstance(value, str):
                raise ApiError(Code.INVALID_ARGUMENT, f"{key}: required string")
        return body

    async def load_lora_adapter(self, request: HttpRequest) -> Response:
        self._authorize(request, auth.ADMIN)
        body = await self._adapter_body(request, ("lora_name", "lora_path", "pinned"))
        try:
            info = await adapter_ops.load_adapter(self.runtime, body["lora_name"], body["lora_path"],
                                                  bool(body.get("pinned")))
        except ApiError as err:
            return error_response(err, _ADAPTER_FIELDS)
        return PlainTextResponse(f"Success: LoRA adapter '{info.adapter_id}' added successfully.")

    async def unload_lora_adapter(self, request: HttpRequest) -> Response:
        self._authorize(request, auth.ADMIN)
        body = await self._adapter_body(request, ("lora_name", "lora_int_id"))
        try:
            await adapter_ops.unload_adapter(self.runtime, body["lora_name"])
        except ApiError as err:
            return error_response(err, _ADAPTER_FIELDS)
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

    async def combine_lora_adapters(self, request: HttpRequest) -> Response:
        """CombineAdapters over HTTP: {"lora_name", "adapters": [{"lora_name", "weight"}], "method",
        "density", "svd_rank", "svd_clamp", "majority_sign_method", "seed", "pinned"} -> the new
        adapter's card (as GET /v1/models lists it) with combined_from and method."""
        self._authorize(request, auth.ADMIN)
        body = await self._body(request)
        try:
            if not isinstance(body, dict):
                raise ApiError(Code.INVALID_ARGUMENT, "body: expected a JSON object")
            try:
                options = protocol.parse_combine(body)
            except InvalidRequestError as err:
                raise ApiError(Code.INVALID_ARGUMENT, str(err)) from None
            info = await adapter_ops.combine_adapters(self.runtime, **options)
        except ApiError as err:
            return error_response(err, _ADAPTER_FIELDS)
        card = protocol.model_card(info.adapter_id, self.started, str(info.source), self.runtime.loaded.path.name,
                                   combined_from=list(info.combined_from), method=info.combine_method,
                                   max_rank=info.max_rank)
        return JSONResponse(card)

    async def health(self, request: HttpRequest) -> Response:
        if self.serving and self.runtime is not None:
            return JSONResponse({"status": "serving"})
        status = "loading" if self.runtime is None and not self.serving else "not serving"
        return JSONResponse({"status": status}, status_code=503)

    # --- errors -----------------------------------------------------------------------------
    async def _api_error(self, request: HttpRequest, err: Exception) -> Response:
        if isinstance(err, _TooLarge):
            return JSONResponse(openai_error_body(413, err.message, "body", Code.RESOURCE_EXHAUSTED.name),
                                status_code=413)
        return error_response(err)

    async def _http_error(self, request: HttpRequest, err: Exception) -> Response:
        status = getattr(err, "status_code", 500)
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(status, str(getattr(err, "detail", err)))
        return JSONResponse(openai_error_body(status, message), status_code=status,
                            headers=getattr(err, "headers", None))

    async def _internal_error(self, request: HttpRequest, err: Exception) -> Response:
        log.exception("HTTP %s %s failed", request.method, request.url.path, exc_info=err)
        return JSONResponse(openai_error_body(500, f"internal error: {type(err).__name__}: {err}"),
                            status_code=500)


class _TooLarge(ApiError):
    def __init__(self, size: int, limit: int):
        super().__init__(Code.RESOURCE_EXHAUSTED, f"body: {size} bytes or more; at most {limit} "
                                                  f"(--max-message-bytes)")


async def _send(response: Response, send) -> None:
    """Send a complete Response through a raw ASGI `send` (its __call__ needs scope and receive,
    which a complete body does not read)."""
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})

