"""The Generation service: protobuf in, engine request out, engine events back as protobuf.

Threading: handlers run on the server's asyncio loop; the engine calls our callback from its own
thread, so each request gets an `_Outputs` queue fed through loop.call_soon_threadsafe.

Adapters: a request naming an adapter first makes sure its weights are on the host tier
(`LoraManager.ensure_available`, in a worker thread: it may read the folder from --adapter-root or
re-read one dropped to disk), then submits; the engine's submit reserves it so it cannot be dropped
again until the request ends.

Cancellation: when the client cancels or its deadline passes, grpc.aio cancels the handler task;
the CancelledError surfaces at `await outputs.get()` and the `finally` aborts the request in the
engine, which frees its KV blocks within a step. A done-callback on the RPC context does the same
in case the handler is torn down another way (both are no-ops once the request has finished).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

import grpc

from loraplex.api import convert
from loraplex.api.adapters_servicer import GENERATE_FIELDS, adapter_status, bounded_details, run_adapter_call
from loraplex.api.pb.loraplex.v1 import generation_pb2, generation_pb2_grpc
from loraplex.config import RequestLimits
from loraplex.engine.errors import AdapterNotFoundError, EngineStoppedError, QueueFullError
from loraplex.engine.request import FinishReason, InvalidRequestError, Request, RequestOutput
from loraplex.lora.errors import AdapterPathError
from loraplex.lora.paths import validate_adapter_id

log = logging.getLogger(__name__)

# ensure_available -> submit is not atomic: under host-tier pressure another adapter's load may drop
# ours back to disk in between (it is idle until submit reserves it). Each retry re-reads it.
_SUBMIT_ATTEMPTS = 3


@dataclass(frozen=True)
class Runtime:
    """What the servicers serve: the loaded model and its running engine."""

    loaded: Any  # loraplex.model.loader.LoadedModel
    engine: Any  # loraplex.engine.engine.Engine
    lora_manager: Any = None  # loraplex.lora.manager.LoraManager; None = base model only
    metrics: Any = None  # loraplex.api.metrics.LoraplexMetrics; None = metrics off


class _Outputs:
    """Engine-thread callback -> asyncio queue on the server loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

    def __call__(self, out: RequestOutput) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)
        except RuntimeError:
            pass  # the loop is closed: the server is gone and nobody waits for this output

    async def get(self) -> RequestOutput:
        return await self._queue.get()


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, runtime: Runtime | None = None, limits: RequestLimits | None = None):
        self.runtime = runtime  # None while the model loads: RPCs answer UNAVAILABLE
        self.limits = limits or RequestLimits()  # per-request bounds checked by convert

    async def _require_runtime(self, context: grpc.aio.ServicerContext) -> Runtime:
        if self.runtime is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        return self.runtime

    async def _outputs(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[RequestOutput]:
        """Submit the request and yield its engine events, the finished one last."""
        rt = await self._require_runtime(context)
        try:
            req, outputs = await self._accept(rt, request, context)
        except BaseException:
            if rt.metrics is not None and context.code() is not None:  # aborted before the engine
                rt.metrics.record_rejected(context.code().name)  # loraplex_requests_rejected_total
            raise
        engine = rt.engine
        finished = False

        def abort_if_running(_context: Any = None) -> None:
            if not finished:
                engine.abort(req.request_id)

        context.add_done_callback(abort_if_running)
        try:
            while True:
                out = await outputs.get()
                if out.finished:
                    finished = True
                    if out.finish_reason is FinishReason.ERROR:
                        log.error("request %s failed: %s", out.request_id, out.error)
                        status = adapter_status(out.cause, "adapter_id", GENERATE_FIELDS) \
                            if out.cause is not None else None
                        if status is not None:
                            await context.abort(status[0], bounded_details(status[1]))
                        if out.out_of_memory:
                            await context.abort(
                                grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"adapter_id: out of memory while copying the adapter into a device slot "
                                f"for request {out.request_id}: {out.error}; retry later")
                        await context.abort(grpc.StatusCode.INTERNAL,
                                            f"generation failed for request {out.request_id}: {out.error}")
                yield out
                if finished:
                    return
        finally:
            abort_if_running()

    async def _accept(self, rt: Runtime, request: generation_pb2.GenerateRequest,
                      context: grpc.aio.ServicerContext) -> tuple[Request, _Outputs]:
        """Convert and submit; refusals abort the RPC with their status."""
        engine = rt.engine
        try:
            req = convert.request_from_proto(request, rt.loaded.tokenizer, rt.loaded.arch.vocab_size,
                                             engine.max_model_len, engine.config.max_new_tokens_cap,
                                             self.limits)
        except InvalidRequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        outputs = _Outputs(asyncio.get_running_loop())
        try:
            await self._submit(rt, req, outputs, context)
        except InvalidRequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except AdapterNotFoundError as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter_id: {err}")
        except QueueFullError as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except EngineStoppedError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        return req, outputs

    @staticmethod
    async def _submit(rt: Runtime, req: Request, outputs: _Outputs,
                      context: grpc.aio.ServicerContext) -> None:
        """engine.submit, after bringing the request's adapter onto the host tier."""
        manager = rt.lora_manager
        if not req.adapter_id or manager is None:
            rt.engine.submit(req, outputs)  # no manager: the engine answers NOT_FOUND for an adapter
            return
        try:
            validate_adapter_id(req.adapter_id)  # before it can name a folder under --adapter-root
        except AdapterPathError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        for attempt in range(1, _SUBMIT_ATTEMPTS + 1):
            await run_adapter_call(context, "adapter_id", GENERATE_FIELDS, manager.ensure_available,
                                   req.adapter_id)
            try:
                rt.engine.submit(req, outputs)
                return
            except AdapterNotFoundError:
                if not manager.exists(req.adapter_id):
                    raise  # unloaded meanwhile: NOT_FOUND
                if attempt == _SUBMIT_ATTEMPTS:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"adapter_id: {req.adapter_id!r} was dropped from the host tier before the request "
                        f"could start, {attempt} times (too many adapters in use for max_cpu_loras); retry")

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> generation_pb2.GenerateResponse:
        events = [out async for out in self._outputs(request, context)]
        return convert.response_to_proto(events)

    async def GenerateStream(self, request: generation_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        async for out in self._outputs(request, context):
            yield convert.stream_chunk_to_proto(out)

    async def GetModelInfo(self, request: generation_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> generation_pb2.ModelInfo:
        rt = await self._require_runtime(context)
        return convert.model_info_to_proto(rt.loaded, rt.engine)
