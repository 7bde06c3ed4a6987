"""Client-side failover: which replica a call tries next, and how long it waits before.

loraplex.client takes one target (a proxy in front of the replicas: deploy/nginx, deploy/envoy) or
a list of replicas. A call refused with UNAVAILABLE (a replica loading, draining on SIGTERM, or
gone: the connection refused or reset, or a proxy answering 502/503 for it) is tried again:

    * on the next target of the list (one target: the same one, through the proxy, whose health
      checks route around the replica that failed);
    * at most `max_attempts` attempts in all, the first included;
    * no wait before a target this call has not tried yet (a different replica); before a target
      it already tried, a wait drawn uniformly from [0, min(max_backoff, initial_backoff *
      multiplier ** (n - 1))] for its n-th retry ("full jitter": clients that failed together do
      not come back together);
    * never past the call's deadline (`timeout`), which covers every attempt and wait.

Only UNAVAILABLE is retried: every other status is the server's answer about the request itself.
A stream that already delivered a chunk is never replayed (its tokens would arrive twice, and
sampling would not repeat them): its error is raised. The client then keeps using the target that
answered (sticky), so later calls do not pay for the dead one first.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Sequence

RETRYABLE = frozenset({"UNAVAILABLE"})


@dataclass(frozen=True)
class RetryPolicy:
    """How a call refused with UNAVAILABLE is tried again (see the module docstring)."""

    max_attempts: int = 3  # 1 = no retry
    initial_backoff: float = 0.1  # seconds, the upper bound of the first wait
    max_backoff: float = 2.0  # seconds, the largest upper bound
    multiplier: float = 2.0

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError(f"initial_backoff/max_backoff: need 0 <= initial_backoff <= max_backoff, got "
                             f"{self.initial_backoff}/{self.max_backoff}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier: must be >= 1, got {self.multiplier}")

    def backoff_bound(self, retry: int) -> float:
        """Upper bound of the wait before the `retry`-th retry on an already tried target (1-based)."""
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))


NO_RETRY = RetryPolicy(max_attempts=1)


def parse_targets(target: str | Sequence[str]) -> tuple[str, ...]:
    """"host:port", "a:1,b:2" or a list of them -> a non-empty tuple of targets."""
    items = target.split(",") if isinstance(target, str) else list(target)
    targets = tuple(t.strip() for t in items if t and t.strip())
    if not targets:
        raise ValueError(f"target: no server address in {target!r}")
    return targets


class Targets:
    """The targets and the one in use (thread-safe: one Client is shared between threads)."""

    def __init__(self, targets: Sequence[str]):
        self.names = tuple(targets)
        self._current = 0
        self._lock = threading.Lock()

    @property
    def current(self) -> int:
        return self._current

    def failed(self, index: int) -> int:
        """Target `index` refused a call: the next one becomes current (unless another thread moved
        on already). Returns the index to try next."""
        with self._lock:
            if self._current == index:
                self._current = (index + 1) % len(self.names)
            return (index + 1) % len(self.names)


class Attempts:
    """The bookkeeping of one call: its target, its remaining time, what to do after a failure."""

    def __init__(self, policy: RetryPolicy, targets: Targets, timeout: float | None,
                 rng: random.Random | None = None):
        self.policy = policy
        self.targets = targets
        self.index = targets.current
        self.count = 1  # attempts started
        self._tried = {self.index}
        self._retries_on_tried = 0
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._rng = rng or random

    @property
    def target(self) -> str:
        return self.targets.names[self.index]

    def remaining(self) -> float | None:
        """Seconds left before the call's deadline (None: no deadline); the attempt's timeout."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def after_failure(self, code: str) -> float | None:
        """The attempt on `target` failed with status `code`: the seconds to wait before the next
        attempt (whose target is then `target`), or None when the call must give up."""
        if code not in RETRYABLE:
            return None
        nxt = self.targets.failed(self.index)  # also when giving up: the next call starts elsewhere
        if self.count >= self.policy.max_attempts:
            return None
        wait = 0.0
        if nxt in self._tried:
            self._retries_on_tried += 1
            wait = self._rng.uniform(0.0, self.policy.backoff_bound(self._retries_on_tried))
        left = self.remaining()
        if left is not None and wait >= left:
            return None
        self.index = nxt
        self._tried.add(nxt)
        self.count += 1
        return wait

    def describe(self) -> str:
        tried = ", ".join(self.targets.names[i] for i in sorted(self._tried))
        return f"{self.count} attempt{'s' if self.count > 1 else ''} on {tried}"
