"""Constraint -> CompiledGrammar, off the engine thread, bounded in time and size, cached.

    compiler = GrammarCompiler(make_vocab, timeout_s=10, max_bytes=65536, cache_size=256)
    grammar = await compiler.compile_async(constraint)   # the API's asyncio loop
    grammar = compiler.compile(constraint)                # any other thread (never the engine's)

Compilation runs in this object's own worker thread, so a slow schema never blocks the engine loop
or the API's event loop, and a caller waits at most `timeout_s` (then gets InvalidRequestError
naming the field). A compile that timed out keeps its worker until llguidance gives up (its own
fuel limits bound every build), and later compiles queue behind it: they time out too rather than
pile up threads.

The cache is an LRU of at most `cache_size` entries keyed by the constraint (kind + text), holding
the compile's future: concurrent requests with one new schema share one compilation. Failed
compiles are dropped from it (so a bad schema costs each request its own compile, bounded).

The tokenizer's grammar view (GrammarVocab, 1-3 s for a 49k vocabulary) is built on first use in
the same worker, or earlier by `warm_up()` at server start; its time is not counted against a
request's timeout.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

from loraplex.engine.request import InvalidRequestError
from loraplex.engine.structured.grammar import CompiledGrammar, GrammarVocab, compile_constraint
from loraplex.engine.structured.spec import Constraint


class GrammarCompiler:
    def __init__(self, make_vocab: Callable[[], GrammarVocab], *, timeout_s: float, max_bytes: int,
                 cache_size: int):
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.cache_size = cache_size
        self._make_vocab = make_vocab
        self._vocab: Future | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-grammar")
        self._lock = threading.Lock()  # guards the cache and the counters
        self._cache: OrderedDict[Constraint, Future] = OrderedDict()
        self.hits = 0
        self.misses = 0
        # Compile durations (seconds, worker time, first mask included) of the latest compiles,
        # and how many ever finished / failed: the Prometheus histogram and counters read these.
        self.compile_seconds: deque[float] = deque(maxlen=1024)
        self.compiled = 0
        self.failures = 0

    # --- the tokenizer view ------------------------------------------------------------------
    def warm_up(self) -> Future:
        """Start building the tokenizer's grammar view (idempotent); returns its future."""
        with self._lock:
            if self._vocab is None:
                self._vocab = self._pool.submit(self._make_vocab)
            return self._vocab

    @property
    def vocab(self) -> GrammarVocab:
        return self.warm_up().result()

    # --- compiling ---------------------------------------------------------------------------
    def submit(self, c: Constraint) -> Future:
        """The compile's future (a cached one when this constraint was seen). Raises at once for
        a constraint over the size limit."""
        c.check_size(self.max_bytes)
        vocab = self.warm_up()
        with self._lock:
            fut = self._cache.get(c)
            if fut is not None:
                self._cache.move_to_end(c)
                self.hits += 1
                return fut
            self.misses += 1
            fut = self._pool.submit(self._timed_compile, vocab, c)
            self._cache[c] = fut
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        fut.add_done_callback(lambda f: self._drop_failed(c, f))
        return fut

    def _timed_compile(self, vocab: Future, c: Constraint) -> CompiledGrammar:
        """In the worker: one compile, its duration and outcome counted."""
        t0 = time.perf_counter()
        try:
            grammar = compile_constraint(vocab.result(), c)
        except BaseException:
            with self._lock:
                self.failures += 1
            raise
        with self._lock:
            self.compile_seconds.append(time.perf_counter() - t0)
            self.compiled += 1
        return grammar

    def _drop_failed(self, c: Constraint, fut: Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            with self._lock:
                if self._cache.get(c) is fut:
                    del self._cache[c]

    def _timed_out(self, c: Constraint) -> InvalidRequestError:
        return InvalidRequestError(c.field, f"did not compile within {self.timeout_s:g} s "
                                            f"(--structured-output-compile-timeout); simplify it")

    def compile(self, c: Constraint) -> CompiledGrammar:
        """Blocking; any thread but the engine's."""
        fut = self.submit(c)
        self.warm_up().result()  # the one-time tokenizer build is not the request's fault
        try:
            return fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise self._timed_out(c) from None

    async def compile_async(self, c: Constraint) -> CompiledGrammar:
        fut = self.submit(c)
        await asyncio.wrap_future(self.warm_up())
        try:
            # shield: a timeout must not cancel a compile other requests may share.
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), self.timeout_s)
        except asyncio.TimeoutError:
            raise self._timed_out(c) from None

    @property
    def cache_len(self) -> int:
        with self._lock:
            return len(self._cache)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
