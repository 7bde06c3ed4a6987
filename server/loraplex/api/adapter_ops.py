"""Adapter management below both front doors: load / unload / list and the adapter step of a
generation request, each failing with `ApiError` (api/status.py).

Every manager call runs in a worker thread (loop.run_in_executor): a load reads and validates a
folder from disk, and even list/unload take the manager's lock, which the engine thread holds while
it copies weights into a device slot. The event loop (every other request, gRPC and HTTP alike) and
the engine step loop therefore never wait on a disk.

Status codes (messages start with the request field, then the manager's own message, which names
the config field, file or tensor at fault; field names are the gRPC ones, "adapter_id" and "path":
the HTTP front renames them to its own):
  AdapterPathError   -> INVALID_ARGUMENT  bad id, path outside the roots, path that is not a folder
                        NOT_FOUND         path inside the roots that does not exist (the proto's
                                          "missing folder"; outside the roots we never tell)
  AdapterFormatError -> INVALID_ARGUMENT  unsupported or corrupt PEFT folder
  AdapterExistsError -> ALREADY_EXISTS    id taken by another folder, or still draining an unload
  AdapterCapacityError, out of memory -> RESOURCE_EXHAUSTED
  AdapterNotFoundError -> NOT_FOUND
  s3:// sources (lora/s3_source.py):
  AdapterSourceNotFoundError    -> NOT_FOUND          no such bucket, key or prefix
  AdapterAccessDeniedError      -> PERMISSION_DENIED  the store refused the server's credentials
  AdapterSourceUnavailableError -> UNAVAILABLE        store unreachable, download cut or not
                                                      matching its size / MD5: retry
  AdapterStateError    -> INTERNAL          applied, but not recorded in --state-dir (disk)
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

import torch

from loraplex.api.status import ApiError, Code
from loraplex.engine.errors import OUT_OF_MEMORY, AdapterNotFoundError
from loraplex.lora.errors import (AdapterAccessDeniedError, AdapterCapacityError, AdapterError,
                                  AdapterExistsError, AdapterPathError, AdapterSourceNotFoundError,
                                  AdapterSourceUnavailableError, AdapterStateError)
from loraplex.lora.s3_source import is_s3_url
from loraplex.lora.paths import validate_adapter_id
from loraplex.lora.peft_format import AdapterFormatError

log = logging.getLogger(__name__)

NO_MANAGER = ("adapter management is not enabled on this server (it runs without a LoRA manager): "
              "only the base model is served")
LOADING = "the model is still loading; retry shortly"
SHUTTING_DOWN = "the server is shutting down (draining); retry on another replica or once it is back"


class _FolderMissing(Exception):
    """LoadAdapter named a folder inside the allowed roots that does not exist (NOT_FOUND)."""


# The fields of each request that the manager's errors may name as they are.
LOAD_FIELDS = ("adapter_id", "path")
GENERATE_FIELDS = ("adapter_id",)


# The manager's AdapterError kinds and their status (see the module doc); their messages name a field.
_ADAPTER_ERROR_CODES = (
    (AdapterSourceNotFoundError, Code.NOT_FOUND),
    (AdapterAccessDeniedError, Code.PERMISSION_DENIED),
    (AdapterSourceUnavailableError, Code.UNAVAILABLE),
    (AdapterStateError, Code.INTERNAL),
    (AdapterExistsError, Code.ALREADY_EXISTS),
    (AdapterCapacityError, Code.RESOURCE_EXHAUSTED),
    (AdapterPathError, Code.INVALID_ARGUMENT),
)


def adapter_status(exc: BaseException, request_field: str,
                   request_fields: tuple[str, ...] = LOAD_FIELDS) -> tuple[Code, str] | None:
    """The status for an adapter-side failure, or None when `exc` is not one.

    Details start with a field of the request: the manager's own field when the request has it
    (`request_fields`), else `request_field` (the folder's field: "path" for LoadAdapter,
    "adapter_id" for Generate) followed by the manager's message, which names the config field,
    file or tensor at fault.
    """
    if isinstance(exc, AdapterNotFoundError):
        return Code.NOT_FOUND, f"adapter_id: {exc}"
    if isinstance(exc, _FolderMissing):
        return Code.NOT_FOUND, f"path: {exc}"
    for cls, code in _ADAPTER_ERROR_CODES:
        if isinstance(exc, cls):
            return code, _prefixed(exc, request_field, request_fields)
    if isinstance(exc, AdapterFormatError):
        return Code.INVALID_ARGUMENT, f"{request_field}: not a servable PEFT adapter: {exc}"
    if isinstance(exc, OUT_OF_MEMORY):
        return Code.RESOURCE_EXHAUSTED, f"{request_field}: out of memory while loading the adapter: {exc}"
    return None


def _prefixed(exc: AdapterError, request_field: str, request_fields: tuple[str, ...]) -> str:
    """The manager's message, led by `request_field` when it names no field of the request."""
    message = str(exc)
    return message if exc.field in request_fields else f"{request_field}: {message}"


def _inside_missing(path: str, roots: tuple[str, ...]) -> bool:
    real = Path(path).expanduser().resolve(strict=False)
    if is_s3_url(path):
        return False  # an s3:// source reports a missing prefix itself (AdapterSourceNotFoundError)
    for root in roots:
        if is_s3_url(root):
            continue
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


async def adapter_call(request_field: str, request_fields: tuple[str, ...], fn: Callable[..., Any],
                       *args: Any) -> Any:
    """fn(*args) in a worker thread; adapter failures raise ApiError with their status, and any
    other exception (a bug) INTERNAL with its message rather than a bare UNKNOWN."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(_executor(), functools.partial(fn, *args))
    except Exception as exc:  # noqa: BLE001 - every failure gets a documented status
        status = adapter_status(exc, request_field, request_fields)
        if status is None:
            log.exception("adapter call %s failed unexpectedly", getattr(fn, "__name__", fn))
            status = (Code.INTERNAL, f"{request_field}: internal error: {type(exc).__name__}: {exc}")
        if status[0] is Code.RESOURCE_EXHAUSTED:
            log.warning("adapter call refused: %s", status[1])
        raise ApiError(*status) from None


def manager_of(runtime: Any) -> Any:
    """The runtime's LoRA manager; UNAVAILABLE while the model loads, UNIMPLEMENTED without one."""
    if runtime is None:
        raise ApiError(Code.UNAVAILABLE, LOADING)
    if runtime.lora_manager is None:
        raise ApiError(Code.UNIMPLEMENTED, NO_MANAGER)
    if not runtime.engine.accepting:
        raise ApiError(Code.UNAVAILABLE, SHUTTING_DOWN)
    return runtime.lora_manager


def check_adapter_id(adapter_id: str) -> None:
    """Before an id can name a folder under --adapter-root (INVALID_ARGUMENT "adapter_id: ...")."""
    try:
        validate_adapter_id(adapter_id)
    except AdapterPathError as err:
        raise ApiError(Code.INVALID_ARGUMENT, str(err)) from None


async def load_adapter(runtime: Any, adapter_id: str, path: str, pinned: bool = False) -> Any:
    """Read and register a PEFT folder; returns the manager's AdapterInfo."""
    manager = manager_of(runtime)
    check_adapter_id(adapter_id)
    if not path:
        raise ApiError(Code.INVALID_ARGUMENT, "path: must not be empty")
    if "\x00" in path:  # no file system path holds one; os calls raise ValueError on it
        raise ApiError(Code.INVALID_ARGUMENT, "path: must not contain a NUL character")
    info = await adapter_call("path", LOAD_FIELDS, _load_blocking, manager, adapter_id, path, pinned)
    log.info("adapter %s loaded from %s (%s, rank %d-%d, %d bytes)", info.adapter_id, info.source,
             info.tier.value, info.min_rank, info.max_rank, info.nbytes)
    return info


async def unload_adapter(runtime: Any, adapter_id: str) -> None:
    manager = manager_of(runtime)
    check_adapter_id(adapter_id)
    await adapter_call("adapter_id", GENERATE_FIELDS, manager.unload, adapter_id)
    log.info("adapter %s unloaded (freed once its running requests finish)", adapter_id)


async def list_adapters(runtime: Any) -> list:
    """The manager's AdapterInfo list, sorted by id."""
    manager = manager_of(runtime)
    infos = await adapter_call("adapter_id", GENERATE_FIELDS, manager.list)
    return sorted(infos, key=lambda i: i.adapter_id)


async def ensure_available(manager: Any, adapter_id: str) -> None:
    """The adapter step of a generation request: its weights onto the host tier, reading it from
    --adapter-root on first use (worker thread)."""
    check_adapter_id(adapter_id)
    await adapter_call("adapter_id", GENERATE_FIELDS, manager.ensure_available, adapter_id)
