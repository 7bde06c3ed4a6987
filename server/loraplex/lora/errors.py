"""Errors of the adapter side; the gRPC layer maps each to one status code."""

from __future__ import annotations


class AdapterError(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class AdapterPathError(AdapterError):
    """Bad adapter id or folder outside the roots (INVALID_ARGUMENT)."""


class AdapterExistsError(AdapterError):
    """The id is taken by another folder (ALREADY_EXISTS)."""


class AdapterCapacityError(AdapterError):
    """No room: every host or device place is pinned or busy, or out of memory (RESOURCE_EXHAUSTED)."""


class AdapterNotFoundError(Exception):
    """The request names an adapter the LoRA manager does not know (-> NOT_FOUND)."""

    def __init__(self, adapter_id: str, detail: str | None = None):
        super().__init__(f"adapter {adapter_id!r} is not loaded" + (f": {detail}" if detail else ""))
        self.adapter_id = adapter_id


class AdapterSourceNotFoundError(AdapterError):
    """The adapter's source (an object-store prefix, a bucket) does not exist (NOT_FOUND)."""


class AdapterAccessDeniedError(AdapterError):
    """The object store refused our credentials for the adapter's source (PERMISSION_DENIED)."""


class AdapterSourceUnavailableError(AdapterError):
    """The object store could not be reached, or a download was cut or failed verification; the
    next request retries (UNAVAILABLE)."""


class AdapterStateError(AdapterError):
    """The change was applied in memory but could not be recorded in --state-dir (a full or
    read-only disk): it would be lost at the next restart (INTERNAL)."""


class AdapterCombineError(AdapterError):
    """Adapters that cannot be combined or mixed as asked; `field` names the request field (INVALID_ARGUMENT)."""
