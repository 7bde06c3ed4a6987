"""The Adapters service: LoadAdapter / UnloadAdapter / ListAdapters over the LoRA manager.

Every manager call runs in a worker thread (loop.run_in_executor): a load reads and validates a
folder from disk, and even list/unload take the manager's lock, which the engine thread holds while
it copies weights into a device slot. The event loop (every other RPC) and the engine step loop
therefore never wait on a disk.

Status codes (details start with the request field, then the manager's own message, which names
the config field, file or tensor at fault):
  AdapterPathError   -> INVALID_ARGUMENT  bad id, path outside the roots, path that is not a folder
                        NOT_FOUND         path inside the roots that does not exist (the proto's
                                          "missing folder"; outside the roots we never tell)
  AdapterFormatError -> INVALID_ARGUMENT  unsupported or corrupt PEFT folder
  AdapterExistsError -> ALREADY_EXISTS    id taken by another folder, or still draining an unload
  AdapterCapacityError, out of memory -> RESOURCE_EXHAUSTED
  AdapterNotFoundError -> NOT_FOUND
  anything else (a bug)  -> INTERNAL      the exception's type and message, logged with its traceback
A failed load changes nothing the manager reports (it reads outside its lock, registers after).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from pathlib import Path
from typing import Any, Callable

import grpc
import torch

from loraplex.api import convert
from loraplex.api.pb.loraplex.v1 import adapters_pb2, adapters_pb2_grpc
from loraplex.engine.errors import OUT_OF_MEMORY, AdapterNotFoundError
from loraplex.lora.errors import (AdapterCapacityError, AdapterError, AdapterExistsError,
                                  AdapterPathError)
from loraplex.lora.paths import validate_adapter_id
from loraplex.lora.peft_format import AdapterFormatError

log = logging.getLogger(__name__)


NO_MANAGER = ("adapter management is not enabled on this server (it runs without a LoRA manager): "
              "only the base model is served")


class _FolderMissing(Exception):
    """LoadAdapter named a folder inside the allowed roots that does not exist (NOT_FOUND)."""


# The fields of each request that the manager's errors may name as they are.
LOAD_FIELDS = ("adapter_id", "path")
GENERATE_FIELDS = ("adapter_id",)


def adapter_status(exc: BaseException, request_field: str,
                   request_fields: tuple[str, ...] = LOAD_FIELDS) -> tuple[grpc.StatusCode, str] | None:
    """The status for an adapter-side failure, or None when `exc` is not one.

    Details start with a field of the request: the manager's own field when the request has it
    (`request_fields`), else `request_field` (the folder's field: "path" for LoadAdapter,
    "adapter_id" for Generate) followed by the manager's message, which names the config field,
    file or tensor at fault.
    """
    if isinstance(exc, AdapterNotFoundError):
        return grpc.StatusCode.NOT_FOUND, f"adapter_id: {exc}"
    if isinstance(exc, _FolderMissing):
        return grpc.StatusCode.NOT_FOUND, f"path: {exc}"
    if isinstance(exc, AdapterExistsError):
        return grpc.StatusCode.ALREADY_EXISTS, _prefixed(exc, request_field, request_fields)
    if isinstance(exc, AdapterCapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, _prefixed(exc, request_field, request_fields)
    if isinstance(exc, AdapterPathError):
        return grpc.StatusCode.INVALID_ARGUMENT, _prefixed(exc, request_field, request_fields)
    if isinstance(exc, AdapterFormatError):
        return (grpc.StatusCode.INVALID_ARGUMENT,
                f"{request_field}: not a servable PEFT adapter: {exc}")
    if isinstance(exc, OUT_OF_MEMORY):
        return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{request_field}: out of memory while loading the adapter: {exc}")
    return None


def _prefixed(exc: AdapterError, request_field: str, request_fields: tuple[str, ...]) -> str:
    """The manager's message, led by `request_field` when it names no field of the request."""
    message = str(exc)
    return message if exc.field in request_fields else f"{request_field}: {message}"


def _inside_missing(path: str, roots: tuple[str, ...]) -> bool:
    real = Path(path).expanduser().resolve(strict=False)
    for root in roots:
        real_root = Path(root).expanduser().resolve(strict=False)
        if real == real_root or real_root in real.parents:
            return not real.exists()
    return False


def _load_blocking(manager: Any, adapter_id: str, path: str, pinned: bool) -> Any:
    """manager.load, telling a missing folder (NOT_FOUND) from a bad one (worker thread)."""
    try:
        return manager.load(adapter_id, path, pinned=pinned)
    except AdapterPathError as err:
        if err.field == "path" and _inside_missing(path, manager.config.roots):
            raise _FolderMissing(f"{path} does not exist") from err
        raise


_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None


def _one_torch_thread() -> None:
    torch.set_num_threads(1)


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    """Adapter calls' own worker threads, each with ONE torch thread: torch's intra-op pool is
    per OS thread, and a load's copies/casts at the process-wide thread count competed with the
    engine step for the same cores (the soak run: p99 0.3 s -> 8.4 s with loads during traffic).
    Four workers: loads of different adapters overlap (one disk read per id at a time anyway)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="loraplex-adapter", initializer=_one_torch_thread)
    return _EXECUTOR


async def run_adapter_call(context: grpc.aio.ServicerContext, request_field: str,
                           request_fields: tuple[str, ...], fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a worker thread; adapter failures abort the RPC with their status, and any
    other exception (a bug) with INTERNAL and its message rather than grpc's bare UNKNOWN."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(_executor(), functools.partial(fn, *args))
    except Exception as exc:  # noqa: BLE001 - every failure gets a documented status
        status = adapter_status(exc, request_field, request_fields)
        if status is None:
            log.exception("adapter call %s failed unexpectedly", getattr(fn, "__name__", fn))
            status = (grpc.StatusCode.INTERNAL,
                      f"{request_field}: internal error: {type(exc).__name__}: {exc}")
        if status[0] is grpc.StatusCode.RESOURCE_EXHAUSTED:
            log.warning("adapter call refused: %s", status[1])
        await context.abort(status[0], bounded_details(status[1]))


# Status details travel in the grpc-message trailer, percent-encoded (up to 12 bytes for one
# character), and clients drop a trailer above 16 KiB: the call then ends with "Stream removed" and
# no details at all. Messages echo the request's id and path, which a client may make huge.
MAX_DETAILS_CHARS = 1000


def bounded_details(details: str) -> str:
    if len(details) <= MAX_DETAILS_CHARS:
        return details
    return f"{details[:MAX_DETAILS_CHARS]}... ({len(details) - MAX_DETAILS_CHARS} more characters cut)"


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, runtime: Any = None):
        self.runtime = runtime  # generation_servicer.Runtime; None while the model loads

    async def _manager(self, context: grpc.aio.ServicerContext) -> Any:
        if self.runtime is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        if self.runtime.lora_manager is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, NO_MANAGER)
        return self.runtime.lora_manager

    @staticmethod
    async def _check_id(adapter_id: str, context: grpc.aio.ServicerContext) -> None:
        try:
            validate_adapter_id(adapter_id)
        except AdapterPathError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded_details(str(err)))

    async def LoadAdapter(self, request: adapters_pb2.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> adapters_pb2.LoadAdapterResponse:
        manager = await self._manager(context)
        await self._check_id(request.adapter_id, context)
        if not request.path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "path: must not be empty")
        if "\x00" in request.path:  # no file system path holds one; os calls raise ValueError on it
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "path: must not contain a NUL character")
        info = await run_adapter_call(context, "path", LOAD_FIELDS, _load_blocking, manager,
                                      request.adapter_id, request.path, request.pinned)
        log.info("adapter %s loaded from %s (%s, rank %d-%d, %d bytes)", info.adapter_id, info.source,
                 info.tier.value, info.min_rank, info.max_rank, info.nbytes)
        return adapters_pb2.LoadAdapterResponse(adapter=convert.adapter_info_to_proto(info))

    async def UnloadAdapter(self, request: adapters_pb2.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> adapters_pb2.UnloadAdapterResponse:
        manager = await self._manager(context)
        await self._check_id(request.adapter_id, context)
        await run_adapter_call(context, "adapter_id", GENERATE_FIELDS, manager.unload, request.adapter_id)
        log.info("adapter %s unloaded (freed once its running requests finish)", request.adapter_id)
        return adapters_pb2.UnloadAdapterResponse()

    async def ListAdapters(self, request: adapters_pb2.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> adapters_pb2.ListAdaptersResponse:
        manager = await self._manager(context)
        infos = await run_adapter_call(context, "adapter_id", GENERATE_FIELDS, manager.list)
        return adapters_pb2.ListAdaptersResponse(
            adapters=[convert.adapter_info_to_proto(i) for i in sorted(infos, key=lambda i: i.adapter_id)])
