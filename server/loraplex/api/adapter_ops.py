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
import math
from pathlib import Path
from typing import Any, Callable

from loraplex_kernels import openmp_pool

from loraplex.api.status import ApiError, Code
from loraplex.engine.errors import OUT_OF_MEMORY, AdapterNotFoundError
from loraplex.atomic_dir import FolderExistsError
from loraplex.lora.combine import CombineSpec
from loraplex.lora.errors import (AdapterAccessDeniedError, AdapterCapacityError, AdapterCombineError, AdapterError,
                                  AdapterExistsError, AdapterPathError, AdapterSourceNotFoundError,
                                  AdapterSourceUnavailableError, AdapterStateError)
from loraplex.lora.paths import destination_under_roots, validate_adapter_id
from loraplex.lora.s3_source import is_s3_url
from loraplex.lora.save import save_adapter as write_peft_folder
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
COMBINE_FIELDS = ("adapter_id", "adapters", "method", "density", "svd_rank", "svd_clamp",
                  "majority_sign_method")
MIXTURE_FIELDS = ("adapters",)
PIN_FIELDS = ("adapter_id", "pinned")


# The manager's AdapterError kinds and their status (see the module doc); their messages name a field.
_ADAPTER_ERROR_CODES = (
    (AdapterSourceNotFoundError, Code.NOT_FOUND),
    (AdapterAccessDeniedError, Code.PERMISSION_DENIED),
    (AdapterSourceUnavailableError, Code.UNAVAILABLE),
    (AdapterStateError, Code.INTERNAL),
    (AdapterExistsError, Code.ALREADY_EXISTS),
    (AdapterCapacityError, Code.RESOURCE_EXHAUSTED),
    (AdapterPathError, Code.INVALID_ARGUMENT),
    (AdapterCombineError, Code.INVALID_ARGUMENT),
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
    if isinstance(exc, FolderExistsError):
        return Code.ALREADY_EXISTS, "path: " + str(exc)
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


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    """Adapter calls' own worker threads, each with ONE torch thread: torch's intra-op pool is
    per OS thread, and a load's copies/casts at the process-wide thread count competed with the
    engine step for the same cores (the soak run: p99 0.3 s -> 8.4 s with loads during traffic).
    Four workers: loads of different adapters overlap (one disk read per id at a time anyway)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="loraplex-adapter", initializer=openmp_pool.one_thread)
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


async def pin_adapter(runtime: Any, adapter_id: str, pinned: bool) -> Any:
    """PinAdapter: pin or unpin a loaded adapter; the manager's AdapterInfo."""
    manager = manager_of(runtime)
    check_adapter_id(adapter_id)
    info = await adapter_call("adapter_id", PIN_FIELDS, manager.set_pinned, adapter_id, pinned)
    log.info("adapter %s %s", adapter_id, "pinned" if pinned else "unpinned")
    return info


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


def _check_parts(parts: list[tuple[str, float]], field: str = "adapters") -> None:
    """Each part's id is a plain name and its weight finite (INVALID_ARGUMENT naming the entry)."""
    if not parts:
        raise ApiError(Code.INVALID_ARGUMENT, f"{field}: name at least one adapter")
    for i, (adapter_id, weight) in enumerate(parts):
        try:
            validate_adapter_id(adapter_id)
        except AdapterPathError as err:
            raise ApiError(Code.INVALID_ARGUMENT, f"{field}[{i}].{err}") from None
        if not math.isfinite(weight):
            raise ApiError(Code.INVALID_ARGUMENT, f"{field}[{i}].weight: must be a finite number, got {weight}")


async def combine_adapters(runtime: Any, adapter_id: str, parts: list[tuple[str, float]], method: str,
                           pinned: bool = False, **options: Any) -> Any:
    """CombineAdapters: a new adapter from loaded ones (lora/combine.py); the manager's AdapterInfo."""
    manager = manager_of(runtime)
    check_adapter_id(adapter_id)
    _check_parts(parts)
    try:
        spec = CombineSpec(method=method or "svd", weights=tuple(w for _, w in parts), **options)
    except AdapterCombineError as err:
        raise ApiError(Code.INVALID_ARGUMENT, str(err)) from None
    info = await adapter_call("adapters", COMBINE_FIELDS, manager.combine, adapter_id,
                              [a for a, _ in parts], spec, pinned)
    log.info("adapter %s combined from %s (%s, rank %d-%d)", adapter_id, [a for a, _ in parts], spec.method,
             info.min_rank, info.max_rank)
    return info


def _save_blocking(manager: Any, adapter_id: str, path: str, overwrite: bool) -> str:
    dest = destination_under_roots(path, manager.config.roots)
    weights = manager.weights(adapter_id)
    return str(write_peft_folder(weights, dest, overwrite=overwrite))


async def save_adapter(runtime: Any, adapter_id: str, path: str, overwrite: bool = False) -> str:
    """SaveAdapter: write a loaded adapter as a PEFT folder under the allowed roots; the folder."""
    manager = manager_of(runtime)
    check_adapter_id(adapter_id)
    if not path or "\x00" in path:
        raise ApiError(Code.INVALID_ARGUMENT, "path: must be a non-empty path without NUL characters")
    out = await adapter_call("path", LOAD_FIELDS, _save_blocking, manager, adapter_id, path, overwrite)
    log.info("adapter %s saved to %s", adapter_id, out)
    return out


async def resolve_mixture(manager: Any, parts: list[tuple[str, float]]) -> str:
    """A per-request mixture -> the id of the transient adapter serving it (the manager's cache)."""
    _check_parts(parts)
    max_parts = manager.config.max_mixture_adapters
    if len(parts) > max_parts:
        raise ApiError(Code.INVALID_ARGUMENT, f"adapters: {len(parts)} adapters, more than the server's "
                                              f"--max-mixture-adapters {max_parts}")
    for i, (adapter_id, _) in enumerate(parts):
        try:
            await adapter_call("adapters", MIXTURE_FIELDS, manager.ensure_available, adapter_id)
        except ApiError as err:
            if err.code is not Code.NOT_FOUND:
                raise
            raise ApiError(Code.NOT_FOUND, f"adapters[{i}].adapter_id: adapter {adapter_id!r} is not loaded") from None
    return await adapter_call("adapters", MIXTURE_FIELDS, manager.mixture, parts)
