"""A server-wide bound on generation RPCs in progress, as a grpc.aio server interceptor.

The engine's max_waiting bounds its queue, but a request costs before it gets there: its prompt is
tokenized (chat template included), its adapter may be read from disk. Without a bound, a client
opening thousands of streams makes the server hold them all. Here each Generate / GenerateStream
call takes a place for its whole life -- from before conversion to its last response -- and a call
finding every place taken fails at once with RESOURCE_EXHAUSTED. The place is given back in a
`finally`, so a call that fails, is cancelled or passes its deadline frees it too.

The places are shared with the HTTP front (GenerationSlots): --max-concurrent-requests bounds both
front doors together. Every interceptor and handler of both runs on the server's one event loop: a
plain counter is enough.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import grpc

from loraplex.api.status import ApiError, Code

GENERATION_METHODS = frozenset({"/loraplex.v1.Generation/Generate", "/loraplex.v1.Generation/GenerateStream"})


class GenerationSlots:
    """The server-wide count of generation calls in progress, shared by both front doors (a gRPC
    Generate and an HTTP completion take a place alike): acquire() before any work, release() in
    a `finally`."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"limit: must be >= 1, got {limit}")
        self.limit = limit
        self.active = 0
        self.metrics = None  # api.metrics.LoraplexMetrics once attached: counts the refusals

    def acquire(self) -> None:
        if self.active >= self.limit:
            if self.metrics is not None:
                self.metrics.record_rejected(Code.RESOURCE_EXHAUSTED.name)
            raise ApiError(Code.RESOURCE_EXHAUSTED,
                           f"server busy: {self.limit} generation requests in progress "
                           f"(max_concurrent_requests); retry later")
        self.active += 1

    def release(self) -> None:
        self.active -= 1


class ConcurrencyLimitInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, limit: int | GenerationSlots, methods: frozenset[str] = GENERATION_METHODS):
        self.slots = limit if isinstance(limit, GenerationSlots) else GenerationSlots(limit)
        self._methods = methods

    @property
    def limit(self) -> int:
        return self.slots.limit

    @property
    def active(self) -> int:
        return self.slots.active

    @property
    def metrics(self):
        return self.slots.metrics

    @metrics.setter
    def metrics(self, value) -> None:
        self.slots.metrics = value

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method not in self._methods or handler.request_streaming:
            return handler
        kw = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(self._wrap_stream(handler.unary_stream), **kw)
        return grpc.unary_unary_rpc_method_handler(self._wrap_unary(handler.unary_unary), **kw)

    async def _enter(self, context: grpc.aio.ServicerContext) -> None:
        try:
            self.slots.acquire()
        except ApiError as err:
            await context.abort(err.code, err.message)

    def _wrap_unary(self, behavior):
        async def unary(request, context):
            await self._enter(context)
            try:
                return await behavior(request, context)
            finally:
                self.slots.release()

        return unary

    def _wrap_stream(self, behavior):
        async def stream(request, context):
            await self._enter(context)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                self.slots.release()

        return stream
