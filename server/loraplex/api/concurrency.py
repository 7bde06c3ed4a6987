"""A server-wide bound on generation RPCs in progress, as a grpc.aio server interceptor.

The engine's max_waiting bounds its queue, but a request costs before it gets there: its prompt is
tokenized (chat template included), its adapter may be read from disk. Without a bound, a client
opening thousands of streams makes the server hold them all. Here each Generate / GenerateStream
call takes a place for its whole life -- from before conversion to its last response -- and a call
finding every place taken fails at once with RESOURCE_EXHAUSTED. The place is given back in a
`finally`, so a call that fails, is cancelled or passes its deadline frees it too.

Every interceptor and handler runs on the server's one event loop: a plain counter is enough.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import grpc

GENERATION_METHODS = frozenset({"/loraplex.v1.Generation/Generate", "/loraplex.v1.Generation/GenerateStream"})


class ConcurrencyLimitInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, limit: int, methods: frozenset[str] = GENERATION_METHODS):
        if limit < 1:
            raise ValueError(f"limit: must be >= 1, got {limit}")
        self.limit = limit
        self.active = 0  # calls of `methods` in progress
        self.metrics = None  # api.metrics.LoraplexMetrics once attached: counts the refusals
        self._methods = methods

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
        if self.active >= self.limit:
            if self.metrics is not None:
                self.metrics.record_rejected(grpc.StatusCode.RESOURCE_EXHAUSTED.name)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server busy: {self.limit} generation requests in progress "
                                f"(max_concurrent_requests); retry later")
        self.active += 1

    def _wrap_unary(self, behavior):
        async def unary(request, context):
            await self._enter(context)
            try:
                return await behavior(request, context)
            finally:
                self.active -= 1

        return unary

    def _wrap_stream(self, behavior):
        async def stream(request, context):
            await self._enter(context)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                self.active -= 1

        return stream
