"""The Generation service: protobuf in, engine requests out, engine events back as protobuf.

A thin translator: convert.py turns the proto into an engine Request, api/generation.py (shared
with the HTTP front) resolves the adapter, submits and streams the engine's events, and every
refusal arrives as an ApiError whose code this servicer aborts with.

Cancellation: when the client cancels or its deadline passes, grpc.aio cancels the handler task;
the CancelledError surfaces in Generation.events(), whose `finally` aborts the request in the
engine, which frees its KV blocks within a step. A done-callback on the RPC context does the same
in case the handler is torn down another way (both are no-ops once the request has finished).
"""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from loraplex.api import affinity, convert, generation
from loraplex.api.adapters_servicer import abort_with
from loraplex.api.generation import Runtime  # noqa: F401 - re-exported (serve.py, tests)
from loraplex.api.pb.loraplex.v1 import generation_pb2, generation_pb2_grpc
from loraplex.api.status import ApiError
from loraplex.config import RequestLimits
from loraplex.engine.request import RequestOutput


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, runtime: Runtime | None = None, limits: RequestLimits | None = None):
        self.runtime = runtime  # None while the model loads: RPCs answer UNAVAILABLE
        self.limits = limits or RequestLimits()  # per-request bounds checked by convert

    async def _outputs(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[RequestOutput]:
        """Submit the request and yield its engine events, the finished one last."""
        try:
            rt = generation.require(self.runtime)
            header = affinity.header_values(context.invocation_metadata())
            gen = await generation.start(rt, lambda: [self._convert(rt, request, header)],
                                         lambda: convert.mixture_from_proto(request))
        except ApiError as err:
            await abort_with(context, err)
        context.add_done_callback(lambda _context: gen.abort())
        try:
            async for _, out in gen.events():
                yield out
        except ApiError as err:
            await abort_with(context, err)

    def _convert(self, rt: Runtime, request: generation_pb2.GenerateRequest, header: list[str]):
        engine = rt.engine
        # Before the conversion: a proxy routed this call by the header (api/affinity.py).
        affinity.check_adapter_header(header, request.adapter_id)
        return convert.request_from_proto(request, rt.loaded.tokenizer, rt.loaded.arch.vocab_size,
                                          engine.max_model_len, engine.config.max_new_tokens_cap,
                                          self.limits, rt.sampling_defaults)

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> generation_pb2.GenerateResponse:
        events = [out async for out in self._outputs(request, context)]
        return convert.response_to_proto(events, self.runtime.token_text)

    async def GenerateStream(self, request: generation_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        async for out in self._outputs(request, context):
            yield convert.stream_chunk_to_proto(out, self.runtime.token_text)

    async def GetModelInfo(self, request: generation_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> generation_pb2.ModelInfo:
        try:
            rt = generation.require(self.runtime)
        except ApiError as err:
            await abort_with(context, err)
        return convert.model_info_to_proto(rt.loaded, rt.engine, rt.sampling_defaults)
