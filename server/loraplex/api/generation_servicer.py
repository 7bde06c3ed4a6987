"""The Generation service: protobuf in, engine request out, engine events back as protobuf.

Threading: handlers run on the server's asyncio loop; the engine calls our callback from its own
thread, so each request gets an `_Outputs` queue fed through loop.call_soon_threadsafe.

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
from loraplex.api.pb.loraplex.v1 import generation_pb2, generation_pb2_grpc
from loraplex.engine.errors import AdapterNotFoundError, EngineStoppedError, QueueFullError
from loraplex.engine.request import FinishReason, InvalidRequestError, RequestOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """What the servicers serve: the loaded model and its running engine."""

    loaded: Any  # loraplex.model.loader.LoadedModel
    engine: Any  # loraplex.engine.engine.Engine


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
    def __init__(self, runtime: Runtime | None = None):
        self.runtime = runtime  # None while the model loads: RPCs answer UNAVAILABLE

    async def _require_runtime(self, context: grpc.aio.ServicerContext) -> Runtime:
        if self.runtime is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        return self.runtime

    async def _outputs(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[RequestOutput]:
        """Submit the request and yield its engine events, the finished one last."""
        rt = await self._require_runtime(context)
        engine = rt.engine
        try:
            req = convert.request_from_proto(request, rt.loaded.tokenizer, rt.loaded.arch.vocab_size,
                                             engine.max_model_len, engine.config.max_new_tokens_cap)
        except InvalidRequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        outputs = _Outputs(asyncio.get_running_loop())
        try:
            engine.submit(req, outputs)
        except InvalidRequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except AdapterNotFoundError as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter_id: {err}")
        except QueueFullError as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except EngineStoppedError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))

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
                        await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {out.error}")
                yield out
                if finished:
                    return
        finally:
            abort_if_running()

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
