"""Generation below both front doors: what a gRPC Generate call and an OpenAI HTTP completion have
in common once their bodies are converted into engine `Request`s.

    gen = await generation.start(runtime, make_requests)   # convert, resolve adapters, submit
    async for index, out in gen.events(): ...              # engine events of every request
    gen.abort()                                            # idempotent; events() calls it last

Threading: the front doors run on one asyncio loop; the engine calls our callback from its own
thread, so each call's outputs go through loop.call_soon_threadsafe into one asyncio queue, tagged
with the index of the request they belong to (an OpenAI call with n > 1 or several prompts submits
one engine request per choice).

Adapters: a request naming an adapter first makes sure its weights are on the host tier
(`LoraManager.ensure_available`, in a worker thread: it may read the folder from --adapter-root or
re-read one dropped to disk), then submits; the engine's submit reserves it so it cannot be dropped
again until the request ends.

Cancellation: when the caller goes away (gRPC cancel or deadline, an HTTP client closing the
connection), the front door's task is cancelled; the CancelledError surfaces at the queue and the
`finally` of events() aborts every request still running, which frees its KV blocks within a step.

Failures raise ApiError (api/status.py) with the gRPC field names ("adapter_id", "sampling.top_p");
each refusal before the engine is counted in loraplex_requests_rejected_total.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any, AsyncIterator, Callable, Sequence

from loraplex.api import adapter_ops
from loraplex.api.structured_output import compile_all
from loraplex.api.status import ApiError, Code
from loraplex.api.token_text import TokenText
from loraplex.engine.errors import AdapterNotFoundError, EngineStoppedError, QueueFullError
from loraplex.engine.request import FinishReason, InvalidRequestError, Request, RequestOutput

log = logging.getLogger(__name__)

# ensure_available -> submit is not atomic: under host-tier pressure another adapter's load may drop
# ours back to disk in between (it is idle until submit reserves it). Each retry re-reads it.
SUBMIT_ATTEMPTS = 3


@dataclass(frozen=True)
class Runtime:
    """What the front doors serve: the loaded model and its running engine."""

    loaded: Any  # loraplex.model.loader.LoadedModel
    engine: Any  # loraplex.engine.engine.Engine
    lora_manager: Any = None  # loraplex.lora.manager.LoraManager; None = base model only
    metrics: Any = None  # loraplex.api.metrics.LoraplexMetrics; None = metrics off
    # Sampling values a request leaves unset (model/generation_config.py): the model folder's
    # generation_config.json, or neutral ones. None = neutral (SamplingParams' own defaults).
    sampling_defaults: Any = None  # loraplex.model.generation_config.SamplingDefaults

    @cached_property
    def token_text(self) -> TokenText:
        """Token texts for logprobs answers: one cache for both front doors, built on first use."""
        return TokenText(self.loaded.tokenizer)


def require(runtime: Runtime | None) -> Runtime:
    if runtime is None:
        raise ApiError(Code.UNAVAILABLE, adapter_ops.LOADING)
    return runtime


class Outputs:
    """Engine-thread callback -> (index, output) on an asyncio queue of the front doors' loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int = 0):
        self._loop = loop
        self._queue = queue
        self._index = index

    def __call__(self, out: RequestOutput) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (self._index, out))
        except RuntimeError:
            pass  # the loop is closed: the server is gone and nobody waits for this output


def error_status(out: RequestOutput) -> ApiError:
    """The ApiError for a request the engine finished with ERROR."""
    log.error("request %s failed: %s", out.request_id, out.error)
    if out.cause is not None:
        status = adapter_ops.adapter_status(out.cause, "adapter_id", adapter_ops.GENERATE_FIELDS)
        if status is not None:
            return ApiError(*status)
    if out.out_of_memory:
        return ApiError(Code.RESOURCE_EXHAUSTED,
                        f"adapter_id: out of memory while copying the adapter into a device slot "
                        f"for request {out.request_id}: {out.error}; retry later")
    return ApiError(Code.INTERNAL, f"generation failed for request {out.request_id}: {out.error}")


class Generation:
    """The engine requests of one API call and the stream of their events."""

    def __init__(self, runtime: Runtime, mixture: Sequence[tuple[str, float]] = ()):
        self.runtime = runtime
        self.mixture = list(mixture)  # GenerateRequest.adapters: (adapter id, weight), served as one adapter
        self.requests: list[Request] = []
        self._running: set[str] = set()  # submitted, finished event not seen yet
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    async def submit(self, req: Request) -> None:
        """engine.submit, after bringing the request's adapter onto the host tier."""
        rt = self.runtime
        callback = Outputs(self._loop, self._queue, len(self.requests))
        manager = rt.lora_manager
        try:
            if self.mixture:
                await self._submit_mixture(req, callback, adapter_ops.manager_of(rt))
            elif not req.adapter_id or manager is None:
                rt.engine.submit(req, callback)  # no manager: the engine answers NOT_FOUND for an adapter
            else:
                await self._submit_adapter(req, callback, manager)
        except InvalidRequestError as err:
            raise ApiError(Code.INVALID_ARGUMENT, str(err)) from None
        except AdapterNotFoundError as err:
            raise ApiError(Code.NOT_FOUND, f"adapter_id: {err}") from None
        except QueueFullError as err:
            raise ApiError(Code.RESOURCE_EXHAUSTED, str(err)) from None
        except EngineStoppedError as err:
            raise ApiError(Code.UNAVAILABLE, str(err)) from None
        self.requests.append(req)
        self._running.add(req.request_id)

    async def _submit_adapter(self, req: Request, callback: Outputs, manager: Any) -> None:
        for attempt in range(1, SUBMIT_ATTEMPTS + 1):
            await adapter_ops.ensure_available(manager, req.adapter_id)
            try:
                self.runtime.engine.submit(req, callback)
                return
            except AdapterNotFoundError:
                if not manager.exists(req.adapter_id):
                    raise  # unloaded meanwhile: NOT_FOUND
                if attempt == SUBMIT_ATTEMPTS:
                    raise ApiError(
                        Code.RESOURCE_EXHAUSTED,
                        f"adapter_id: {req.adapter_id!r} was dropped from the host tier before the request "
                        f"could start, {attempt} times (too many adapters in use for max_cpu_loras); retry"
                    ) from None

    async def _submit_mixture(self, req: Request, callback: Outputs, manager: Any) -> None:
        """Submit on the mixture's transient adapter (built once, cached by content; see
        LoraManager.mixture). The cache may drop it before submit reserves it: then build again."""
        for attempt in range(1, SUBMIT_ATTEMPTS + 1):
            req.adapter_id = await adapter_ops.resolve_mixture(manager, self.mixture)
            try:
                self.runtime.engine.submit(req, callback)
                return
            except AdapterNotFoundError:
                if attempt == SUBMIT_ATTEMPTS:
                    raise ApiError(Code.RESOURCE_EXHAUSTED, "adapters: the mixture was dropped from the mixture "
                                   f"cache before the request could start, {attempt} times; retry") from None

    def abort(self) -> None:
        """Cancel every request still running (no-op once all have finished)."""
        for request_id in tuple(self._running):
            self.runtime.engine.abort(request_id)

    @property
    def finished(self) -> bool:
        return not self._running

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(request index, event) until every request has finished; a request the engine failed
        raises its ApiError (the others are aborted)."""
        try:
            while self._running:
                index, out = await self._queue.get()
                if out.finished:
                    self._running.discard(out.request_id)
                    if out.finish_reason is FinishReason.ERROR:
                        raise error_status(out)
                    if out.finish_reason is FinishReason.CANCELLED and not self.runtime.engine.accepting:
                        # Still running when the drain timeout passed: a status the client's
                        # retry policy acts on, not a normal end with fewer tokens.
                        raise ApiError(Code.UNAVAILABLE, f"the server is shutting down: request "
                                       f"{out.request_id} was cancelled when the drain timeout passed; retry")
                yield index, out
        finally:
            self.abort()


async def start(runtime: Runtime | None, make_requests: Callable[[], Sequence[Request]],
                mixture: Callable[[], Sequence[tuple[str, float]]] = tuple) -> Generation:
    """Convert (make_requests and mixture raise InvalidRequestError or ApiError on bad input),
    compile the requests' structured-output constraints, and submit every request, on the
    per-request mixture of adapters `mixture()` returns if it is not empty; on any refusal, abort
    those already submitted, count the refusal and raise."""
    rt = require(runtime)
    gen = None
    try:
        if not rt.engine.accepting:  # draining: refused before any work, whatever the request names
            raise ApiError(Code.UNAVAILABLE, adapter_ops.SHUTTING_DOWN)
        try:
            requests = make_requests()
            parts = mixture()
            await compile_all(rt.engine, list(requests))  # structured output, off the engine thread
        except InvalidRequestError as err:
            raise ApiError(Code.INVALID_ARGUMENT, str(err)) from None
        gen = Generation(rt, parts)
        for req in requests:
            await gen.submit(req)
        return gen
    except BaseException as exc:
        if gen is not None:
            gen.abort()
        if rt.metrics is not None and isinstance(exc, ApiError):
            rt.metrics.record_rejected(exc.code.name)  # loraplex_requests_rejected_total
        raise
