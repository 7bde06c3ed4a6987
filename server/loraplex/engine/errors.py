"""Engine-side exceptions a caller of `Engine.submit` must map to a status.

`InvalidRequestError` (bad input, -> INVALID_ARGUMENT) lives with the request types in request.py;
these are the failures that are not the caller's input being malformed.
"""

from __future__ import annotations

import torch

# Adapter errors belong to the adapter side; the engine raises this one too, so callers of
# Engine.submit find it here as well.
from loraplex.lora.errors import AdapterNotFoundError  # noqa: F401

# What running out of memory raises: host allocations (MemoryError) and CUDA's allocator
# (torch.OutOfMemoryError). Both map to RESOURCE_EXHAUSTED (retry later), never INTERNAL.
OUT_OF_MEMORY = (MemoryError, torch.OutOfMemoryError)


class EngineError(Exception):
    """Base class of the engine's own errors."""


class QueueFullError(EngineError):
    """The waiting queue is at `EngineConfig.max_waiting` (-> RESOURCE_EXHAUSTED)."""

    def __init__(self, max_waiting: int):
        super().__init__(f"the engine's waiting queue is full ({max_waiting} requests); retry later")
        self.max_waiting = max_waiting


class EngineStoppedError(EngineError):
    """submit() after shutdown() began (-> UNAVAILABLE). Submitting before start() is fine:
    requests queue until the loop runs."""
