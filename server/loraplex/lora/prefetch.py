"""The prefetcher: one background thread that brings adapters into the pool off the step loop.

    prefetcher = Prefetcher(make_resident)   # make_resident(id) -> True done / False no room yet
    prefetcher.request(id)                   # an adapter some waiting request needs (idempotent)
    prefetcher.notify()                      # memory may have freed up: retry what waited for room

The manager asks for an adapter as soon as a request for it is submitted (reserve), so its disk
read and pool write overlap the steps that run meanwhile; the engine's admission check
(acquire) never waits. Adapters are brought in first come, first served; one that finds no
room (the pool is full of adapters in use) stays queued and is retried whenever a sequence
releases an adapter, without blocking those behind it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

from loraplex_kernels import openmp_pool

log = logging.getLogger(__name__)

RETRY_SECONDS = 0.05


class Prefetcher:
    def __init__(self, make_resident: Callable[[str], bool]):
        self._make_resident = make_resident
        self._cv = threading.Condition()
        self._queue: OrderedDict[str, None] = OrderedDict()  # ids to bring in, in request order
        self._blocked: OrderedDict[str, None] = OrderedDict()  # ids that found no room
        self._stop = False
        self._busy = False  # an adapter is being brought in right now
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="loraplex-prefetch", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    @property
    def depth(self) -> int:
        """Adapters queued or waiting for room (loraplex_adapter_load_queue_depth)."""
        with self._cv:
            return len(self._queue) + len(self._blocked)

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until nothing is queued or in progress (adapters blocked for room do not count).
        For tests and benchmarks; True unless the timeout passed first."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, RETRY_SECONDS))
        return True

    def request(self, adapter_id: str) -> None:
        with self._cv:
            if adapter_id in self._queue or adapter_id in self._blocked:
                return
            self._queue[adapter_id] = None
            self._cv.notify_all()

    def notify(self) -> None:
        with self._cv:
            self._retry_blocked()
            self._cv.notify_all()

    def _retry_blocked(self) -> None:
        """Under the lock: blocked ids go back to the front (they were requested earlier)."""
        if self._blocked:
            self._blocked.update(self._queue)
            self._queue, self._blocked = self._blocked, OrderedDict()

    def _loop(self) -> None:
        # Loads run next to the engine's steps: on one torch thread, so this long-lived thread
        # never holds an OpenMP pool of its own (openmp_pool.py).
        openmp_pool.one_thread()
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    # A release may notify while a placement is deciding it has no room; the
                    # timeout retries blocked ids anyway, so no wake-up is ever lost for long.
                    self._cv.wait(RETRY_SECONDS if self._blocked else None)
                    self._retry_blocked()
                if self._stop:
                    return
                adapter_id, _ = self._queue.popitem(last=False)
                self._busy = True
            try:
                done = self._make_resident(adapter_id)
            except Exception:  # a bug: the manager records load errors itself; go on
                log.exception("prefetch of adapter %r failed", adapter_id)
                done = True
            with self._cv:
                self._busy = False
                if not done:
                    self._blocked[adapter_id] = None
                self._cv.notify_all()
