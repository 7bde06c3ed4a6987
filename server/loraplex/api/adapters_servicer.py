"""The Adapters service. Its messages are final (proto/loraplex/v1/adapters.proto); the server does
not manage adapters yet, so every call answers UNIMPLEMENTED with a message that says so rather
than the generic "method not found" a missing service would give.
"""

from __future__ import annotations

import grpc

from loraplex.api.pb.loraplex.v1 import adapters_pb2, adapters_pb2_grpc

NOT_YET = ("adapter management is not implemented in this loraplex version yet: the server serves "
           "the base model only, and any non-empty adapter_id is answered with NOT_FOUND")


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    async def LoadAdapter(self, request: adapters_pb2.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> adapters_pb2.LoadAdapterResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"LoadAdapter: {NOT_YET}")

    async def UnloadAdapter(self, request: adapters_pb2.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> adapters_pb2.UnloadAdapterResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"UnloadAdapter: {NOT_YET}")

    async def ListAdapters(self, request: adapters_pb2.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> adapters_pb2.ListAdaptersResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"ListAdapters: {NOT_YET}")
