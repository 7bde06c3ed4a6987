"""The Adapters service: LoadAdapter / UnloadAdapter / ListAdapters / CombineAdapters / SaveAdapter /
PinAdapter,
a thin translator onto api/adapter_ops.py (shared with the HTTP front), where the status of each
failure is documented.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, TypeVar

import grpc

from loraplex.api import adapter_ops, convert
# Re-exported: older code and tests reach these through this module.
from loraplex.api.adapter_ops import GENERATE_FIELDS, LOAD_FIELDS, NO_MANAGER, adapter_status  # noqa: F401
from loraplex.api.pb.loraplex.v1 import adapters_pb2, adapters_pb2_grpc
from loraplex.api.status import ApiError

T = TypeVar("T")

# Status details travel in the grpc-message trailer, percent-encoded (up to 12 bytes for one
# character), and clients drop a trailer above 16 KiB: the call then ends with "Stream removed" and
# no details at all. Messages echo the request's id and path, which a client may make huge.
MAX_DETAILS_CHARS = 1000


def bounded_details(details: str) -> str:
    if len(details) <= MAX_DETAILS_CHARS:
        return details
    return f"{details[:MAX_DETAILS_CHARS]}... ({len(details) - MAX_DETAILS_CHARS} more characters cut)"


async def abort_with(context: grpc.aio.ServicerContext, err: ApiError) -> None:
    await context.abort(err.code, bounded_details(err.message))


async def answer(context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
    """await call(); an ApiError aborts the RPC with its status."""
    try:
        return await call()
    except ApiError as err:
        await abort_with(context, err)


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, runtime: Any = None):
        self.runtime = runtime  # generation_servicer.Runtime; None while the model loads

    async def LoadAdapter(self, request: adapters_pb2.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> adapters_pb2.LoadAdapterResponse:
        info = await answer(context, lambda: adapter_ops.load_adapter(
            self.runtime, request.adapter_id, request.path, request.pinned))
        return adapters_pb2.LoadAdapterResponse(adapter=convert.adapter_info_to_proto(info))

    async def UnloadAdapter(self, request: adapters_pb2.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> adapters_pb2.UnloadAdapterResponse:
        await answer(context, lambda: adapter_ops.unload_adapter(self.runtime, request.adapter_id))
        return adapters_pb2.UnloadAdapterResponse()

    async def ListAdapters(self, request: adapters_pb2.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> adapters_pb2.ListAdaptersResponse:
        infos = await answer(context, lambda: adapter_ops.list_adapters(self.runtime))
        return adapters_pb2.ListAdaptersResponse(adapters=[convert.adapter_info_to_proto(i) for i in infos])

    async def CombineAdapters(self, request: adapters_pb2.CombineAdaptersRequest,
                              context: grpc.aio.ServicerContext) -> adapters_pb2.CombineAdaptersResponse:
        info = await answer(context, lambda: adapter_ops.combine_adapters(
            self.runtime, request.adapter_id, [(a.adapter_id, a.weight) for a in request.adapters],
            request.method, request.pinned, **convert.combine_options(request)))
        return adapters_pb2.CombineAdaptersResponse(adapter=convert.adapter_info_to_proto(info))

    async def SaveAdapter(self, request: adapters_pb2.SaveAdapterRequest,
                          context: grpc.aio.ServicerContext) -> adapters_pb2.SaveAdapterResponse:
        path = await answer(context, lambda: adapter_ops.save_adapter(
            self.runtime, request.adapter_id, request.path, request.overwrite))
        return adapters_pb2.SaveAdapterResponse(path=path)

    async def PinAdapter(self, request: adapters_pb2.PinAdapterRequest,
                         context: grpc.aio.ServicerContext) -> adapters_pb2.PinAdapterResponse:
        info = await answer(context, lambda: adapter_ops.pin_adapter(self.runtime, request.adapter_id,
                                                                     request.pinned))
        return adapters_pb2.PinAdapterResponse(adapter=convert.adapter_info_to_proto(info))
