"""The adapter cache: registered adapters, the memory pool they run from, and their loads.

Three places an adapter can be, as ListAdapters reports them:
  DISK   registered (its folder is known); no weights in memory, read again on the next use;
  HOST   weights in host memory, not in the pool: on CUDA the pinned host tier the pool is filled
         from; on CPU an adapter read while the pool had no room for it (it moves in as soon as
         room appears), or one evicted from the pool whose extent was kept (`spilled`, one
         memcpy back instead of a disk read); both count against --max-cpu-loras, and the
         spilled extents take at most the pool's own size in bytes;
  DEVICE in the adapter memory pool (lora/pool.py), where the kernels read it. On CPU the pool IS
         host memory: a read from disk goes straight into it (the one copy) and no second
         copy is kept while it is there.

The pool is sized in bytes (--adapter-memory) and each adapter takes its real size, so how
many adapters run at once is bounded by memory, not by a slot count (--max-loras, when given,
caps the number of resident adapters as vLLM's flag does).

Life of a request's adapter, as the servicer and the engine drive it:
  ensure_available(id) before submit (worker thread): registers an unknown id found under
                     --adapter-root (reads it, so bad folders fail the request at once) and
                     puts it into the pool if there is room. Known ids return at once.
  reserve(id)        at submit: counts the request in flight (its adapter is then never evicted
                     nor dropped) and, when the adapter is not in the pool, asks the prefetcher
                     (lora/prefetch.py) to bring it in while the engine keeps stepping.
  acquire(id)        at admission (engine thread, never blocks): its slot if it is in the pool,
                     else None ("not yet"); raises the load error if its background load failed.
  release(id)        when the sequence leaves the running batch (finish, abort, preemption).
  finish(id)         when the request ends; an adapter being unloaded is freed at its last finish.

Where adapters come from (lora/sources.py): folders under the allowed roots, and s3:// prefixes
under allowed s3:// roots, downloaded into a bounded local cache (lora/download_cache.py) each
time their weights are read. With --state-dir, API loads, pins and unloads are recorded once they
succeeded (lora/registry.py) and replay() loads them again at start-up; a record that no longer
loads is listed with state "failed" and never stops start-up.

Adapters built in memory: `combine(id, sources, spec)` (CombineAdapters, lora/combine.py) and
`mixture(parts)` (a per-request mixture: the `cat` of its parts, registered under a '~mix-' id that
no client can name, never listed, cached by content, MIXTURE_CACHE at most) keep their float32
weights in the entry (`memory`); the pool is refilled from there after an eviction, never from disk.
Otherwise they are served, refcounted and evicted like folder adapters.

Eviction only takes adapters no request holds (nothing running, waiting or pinned), least
recently used first within the allocator's window choice (lora/allocator.py). Disk reads and
pool writes happen outside the lock, in the caller's worker thread or the prefetcher; a pool
extent becomes visible to the kernels only once it is fully written (pool.publish), and an
evicted adapter's memory is reused only when no running sequence uses it, so a forward never
sees half-written or reused weights.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.config import LoraConfig

from loraplex_kernels import build_lora_meta, slot_weight_dtype

from .batch import LoraBatch
from .combine import CombineSpec, combine_adapters
from .errors import (AdapterCapacityError, AdapterCombineError, AdapterExistsError, AdapterNotFoundError,
                     AdapterSourceNotFoundError, AdapterStateError)
from .paths import validate_adapter_id
from .peft_format import AdapterWeights, BaseShapes, read_adapter
from .pool import AdapterPool, Layout, available_memory
from .prefetch import Prefetcher
from .registry import Record, Registry
from .sources import AdapterSources, Source

log = logging.getLogger(__name__)

# Resident adapters are capped by the tables' rows when --max-loras is not given: table memory is
# ~28 bytes per row per projection, so 4096 rows cost ~10 MB on the default model.
DEFAULT_TABLE_SLOTS = 4096
# Added to the last use of an adapter some waiting request holds: evicted only after every idle one.
_WAITED_FOR = 1e9
# How long an adapter brought in for waiting requests is kept from eviction until one of them is
# admitted (then running sequences protect it). Bounded, so a request the scheduler cannot admit
# (no KV blocks, starvation bound) never pins memory for long.
FRESH_SECONDS = 1.0
# Pinned adapters never leave the pool; keep a quarter of it for everyone else.
PINNED_SHARE = 0.75
# Per-request mixtures kept registered (built once per content, see `mixture`); beyond this the
# least recently used idle one is dropped.
MIXTURE_CACHE = 32
MIXTURE_PREFIX = "~mix-"  # '~' is not allowed in client ids: a mixture's id never collides with one


class Tier(enum.Enum):
    DISK = "disk"
    HOST = "host"
    DEVICE = "device"


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    source: str
    target_modules: tuple[str, ...]
    min_rank: int
    max_rank: int
    nbytes: int  # bytes the adapter takes in the pool
    tier: Tier | None  # None: not servable (state "failed")
    requests_in_flight: int
    last_used: float  # unix time, 0 = never used
    pinned: bool
    # "ready", or "failed": recorded in the --state-dir registry but not loaded again at start-up
    # (its source vanished or no longer reads); `error` says why. Requests for it get NOT_FOUND.
    state: str = "ready"
    error: str = ""
    combined_from: tuple[str, ...] = ()  # CombineAdapters: the ids it was built from
    combine_method: str = ""


@dataclass(frozen=True)
class _Failed:
    """A registry record whose replay failed: listed (state "failed") and kept recorded."""

    source: str
    pinned: bool
    error: str


@dataclass
class _Entry:
    adapter_id: str
    # A resolved folder, an s3:// URL (lora/sources.py), or a label for an adapter built in memory.
    source: Source | str
    fingerprint: str
    pinned: bool
    host: AdapterWeights | None  # weights in host memory outside the pool (see Tier.HOST)
    layout: Layout  # where its modules go inside a pool extent (fixed by its ranks)
    target_modules: tuple[str, ...]
    min_rank: int
    max_rank: int
    slot: int | None = None  # table row while it holds a pool extent (loading or resident)
    offset: int | None = None  # pool extent start (elements)
    resident: bool = False  # in the pool and published: the kernels may read it
    slot_users: int = 0  # running sequences using it
    in_flight: int = 0  # requests reserved (waiting or running)
    unloading: bool = False
    persisted: bool = False  # loaded through the API: recorded in the --state-dir registry
    error: Exception | None = None  # its last background load failed; waiting requests get it
    prefetched: bool = False  # placed by the prefetcher and not yet acquired
    acquire_missed: bool = False  # some acquire found it absent since it was last placed
    placed_mono: float = 0.0  # when it entered the pool; 0 once a sequence was admitted on it
    last_used: float = 0.0
    last_used_mono: float = field(default_factory=time.monotonic)
    # Built in memory (CombineAdapters, per-request mixtures): its float32 weights, never read
    # from disk; the pool is refilled from here after an eviction.
    memory: AdapterWeights | None = None
    # CPU only: its pool extent as it was when evicted ([elems], pool dtype), a host-tier copy
    # (--max-cpu-loras) put back with one memcpy. A read from disk again costs ~10 ms for a
    # rank-8 q/k/v/o adapter (parse, validate, hash, 240 per-tensor casts); this 0.7 ms
    # with the table entries and the spill of the adapter it evicts.
    spilled: torch.Tensor | None = None
    transient: bool = False  # a per-request mixture: not listed, dropped from the mixture cache
    combined_from: tuple[str, ...] = ()
    combine_method: str = ""

    @property
    def elems(self) -> int:  # pool elements it takes (layout.elems)
        return self.layout.elems


class LoraManager:
    def __init__(self, config: LoraConfig, model: torch.nn.Module, dtype: torch.dtype,
                 device: torch.device | str):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self._lock = threading.RLock()
        self._load_locks: dict[str, threading.Lock] = {}  # one disk read per id at a time
        self._entries: dict[str, _Entry] = {}
        # Pool weights in the kernel backend's dtype (the model's, or float32 for the CPU torch
        # fallback, see slot_weight_dtype).
        self.slot_dtype = slot_weight_dtype(dtype)
        num_slots = config.max_loras or DEFAULT_TABLE_SLOTS
        self.pool = AdapterPool(model, config.adapter_memory_bytes(lambda: available_memory(self.device)),
                                num_slots, self.slot_dtype, self.device)
        self._free_slots = list(range(num_slots - 1, -1, -1))  # a stack: low rows first
        self._slot_owner: list[str | None] = [None] * num_slots
        self.base_shapes = BaseShapes.from_model(model)
        self.stats = _Counters()
        # CUDA: pool writes from pinned host memory go on a side stream, off the compute stream.
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.sources = AdapterSources(config)
        self.registry = Registry(config.state_dir) if config.state_dir else None
        self._failed: dict[str, _Failed] = {}
        self.prefetcher = Prefetcher(self._prefetch)
        self.prefetcher.start()

    def close(self) -> None:
        self.prefetcher.stop()

    # ------------------------------------------------------------------ admin calls (any thread)
    def load(self, adapter_id: str, path: str | Path, pinned: bool = False, persist: bool = True) -> AdapterInfo:
        """Register and read an adapter folder (or s3:// prefix), and put it into the pool when
        there is room (a pinned one must fit now). Any failure leaves the manager exactly as it
        was. `persist`: an API load, recorded in the --state-dir registry once it has succeeded
        (start-up adapters from flags are not)."""
        info = self._load(adapter_id, path, pinned)
        if persist:
            with self._lock:
                entry = self._entries.get(adapter_id)
                if entry is not None and not entry.unloading:
                    entry.persisted = True
                self._failed.pop(adapter_id, None)
            self._save_registry()
        return info

    def _load(self, adapter_id: str, path: str | Path, pinned: bool) -> AdapterInfo:
        validate_adapter_id(adapter_id)
        real = self.sources.resolve(path)
        known = False
        with self._load_lock(adapter_id):
            with self._lock:
                entry = self._entries.get(adapter_id)
                if entry is not None and not entry.unloading:
                    if entry.source != real:
                        raise AdapterExistsError(
                            "adapter_id", f"{adapter_id!r} is already loaded from {entry.source}")
                    if entry.resident and pinned and not entry.pinned:
                        self._check_pin_room(entry.elems)
                        entry.pinned = True
                    if entry.resident or not pinned or entry.pinned:
                        known = True
                was_new = entry is None
            if not known:
                weights = self._read(real)  # slow; outside the lock, nothing changed if it raises
                self._register(adapter_id, real, weights, pinned, source_kind="api")
        if known:  # registered already: bring it in if it is not (a concurrent load may be doing it)
            self._make_resident(adapter_id)
            with self._lock:
                entry = self._entries.get(adapter_id)
                if entry is None:
                    raise AdapterNotFoundError(adapter_id)
                return self._info(entry)
        try:
            self._make_resident(adapter_id, required=pinned)
        except Exception:
            with self._lock:
                entry = self._entries.get(adapter_id)
                if entry is not None:
                    if was_new:
                        self._entries.pop(adapter_id)
                    else:
                        entry.pinned = False
                self.stats.loads["api"] -= 1
            raise
        with self._lock:
            return self._info(self._entries[adapter_id])

    def set_pinned(self, adapter_id: str, pinned: bool) -> AdapterInfo:
        """PinAdapter: pin a registered adapter (it must fit in the pinned share now; it is brought
        into the pool and stays) or unpin it (evictable again). A failed pin leaves it as it was.
        Recorded in the --state-dir registry when the adapter was loaded through the API."""
        with self._load_lock(adapter_id):
            with self._lock:
                entry = self._entries.get(adapter_id)
                if entry is None or entry.unloading or entry.transient:
                    raise AdapterNotFoundError(adapter_id)
                changed = entry.pinned != pinned
                if changed and pinned:
                    self._check_pin_room(entry.elems)
                entry.pinned = pinned
        if changed and pinned:
            try:
                self._make_resident(adapter_id, required=True)
            except Exception:
                with self._lock:
                    entry.pinned = False
                raise
        with self._lock:
            persisted, info = entry.persisted, self._info(entry)
        if changed and persisted:
            self._save_registry()
        return info

    def _check_pin_room(self, elems: int) -> None:
        # Pinned adapters never leave the pool; leave room for everyone else, or requests for
        # unpinned adapters would wait forever.
        pinned = [e for e in self._entries.values() if e.pinned and not e.unloading]
        limit = int(self.pool.capacity_bytes * PINNED_SHARE)
        if (sum(e.elems for e in pinned) + elems) * self.pool.elem_size > limit:
            raise AdapterCapacityError(
                "pinned", f"pinned adapters may take at most {PINNED_SHARE:.0%} of the adapter pool "
                f"({limit / 2**20:.1f} MiB); raise --adapter-memory or unpin one")
        if self.config.max_loras is not None and len(pinned) + 1 > self.config.max_loras - 1:
            raise AdapterCapacityError(
                "pinned", f"at most {self.config.max_loras - 1} adapters may be pinned "
                f"(--max-loras {self.config.max_loras} minus one kept for unpinned adapters)")

    def unload(self, adapter_id: str) -> None:
        """New requests get NOT_FOUND at once; memory is freed when the last running one ends.
        A failed registry record (see AdapterInfo.state) is forgotten."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.unloading:
                if self._failed.pop(adapter_id, None) is None:
                    raise AdapterNotFoundError(adapter_id)
                persisted = True
            else:
                entry.unloading = True
                persisted = entry.persisted
                if entry.in_flight == 0:
                    self._free(entry)
        if persisted:
            self._save_registry()

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            infos = [self._info(e) for e in self._entries.values() if not e.unloading and not e.transient]
            ready = {i.adapter_id for i in infos}
            return infos + [AdapterInfo(adapter_id=i, source=f.source, target_modules=(), min_rank=0, max_rank=0,
                                        nbytes=0, tier=None, requests_in_flight=0, last_used=0.0, pinned=f.pinned,
                                        state="failed", error=f.error)
                            for i, f in self._failed.items() if i not in ready]

    # ------------------------------------------------------------------ the --state-dir registry
    def replay(self) -> None:
        """Load the adapters the registry recorded (start-up, after the --adapter ones). Each source
        is resolved again under today's roots; a failure is logged and listed, never raised."""
        if self.registry is None:
            return
        records = self.registry.read()
        for rec in records:
            try:
                info = self._load(rec.adapter_id, rec.source, rec.pinned)
            except Exception as exc:  # noqa: BLE001 - any failure: listed, never stops start-up
                log.warning("adapter %s recorded in %s could not be loaded again from %s: %s: %s",
                            rec.adapter_id, self.registry.path, rec.source, type(exc).__name__, exc)
                with self._lock:
                    self._failed[rec.adapter_id] = _Failed(rec.source, rec.pinned, f"{type(exc).__name__}: {exc}")
                continue
            with self._lock:
                self._entries[rec.adapter_id].persisted = True
            log.info("adapter %s loaded again from %s (recorded in %s%s)", rec.adapter_id, info.source,
                     self.registry.path, ", pinned" if info.pinned else "")
        try:
            self._save_registry()
        except AdapterStateError:
            pass  # logged; the server starts all the same

    def _save_registry(self) -> None:
        """Record the API-loaded adapters and pins (and the failed records) in --state-dir."""
        if self.registry is None:
            return

        def snapshot() -> list[Record]:
            with self._lock:
                records = {e.adapter_id: Record(e.adapter_id, str(e.source), e.pinned)
                           for e in self._entries.values() if e.persisted and not e.unloading}
                for adapter_id, f in self._failed.items():
                    records.setdefault(adapter_id, Record(adapter_id, f.source, f.pinned))
                return list(records.values())

        try:
            self.registry.save(snapshot)
        except OSError as err:
            log.error("adapter registry %s could not be written: %s", self.registry.path, err)
            raise AdapterStateError(
                "state_dir", f"the change was applied but could not be recorded in {self.registry.path} "
                f"({err.strerror or err}); it will be lost at the next restart unless it is repeated") from None

    # ------------------------------------------------------------------ combined adapters
    def weights(self, adapter_id: str) -> AdapterWeights:
        """The adapter's float32 weights as read (its folder read again, validated) or as built
        (combined in memory). Slow for a folder: call it from a worker thread."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.unloading:
                raise AdapterNotFoundError(adapter_id)
            memory, source = entry.memory, entry.source
        if memory is not None:
            return memory
        return self._read_again(adapter_id, source)

    def combine(self, adapter_id: str, sources: list[str], spec: CombineSpec, pinned: bool = False) -> AdapterInfo:
        """Register `adapter_id`, built from the registered adapters `sources` with `spec` (PEFT's
        add_weighted_adapter, lora/combine.py), and put it into the pool when there is room. Any
        failure registers nothing."""
        validate_adapter_id(adapter_id)
        if len(sources) != len(spec.weights):
            raise AdapterCombineError("adapters", f"{len(sources)} adapters but {len(spec.weights)} weights")
        with self._lock:
            if adapter_id in self._entries:
                raise AdapterExistsError("adapter_id", f"{adapter_id!r} is already loaded")
        parts = [self.weights(s) for s in sources]
        label = f"combined:{spec.method}({','.join(sources)})"
        weights = combine_adapters(parts, spec, self.config.max_lora_rank, label=label)
        with self._load_lock(adapter_id):
            self._register(adapter_id, label, weights, pinned, source_kind="combine", memory=weights,
                           combined_from=tuple(sources), combine_method=spec.method)
        try:
            self._make_resident(adapter_id, required=pinned)
        except Exception:
            with self._lock:
                self._entries.pop(adapter_id, None)
                self.stats.loads["combine"] -= 1
            raise
        with self._lock:
            return self._info(self._entries[adapter_id])

    def mixture(self, parts: list[tuple[str, float]]) -> str:
        """The id of a transient adapter serving the weighted sum of `parts` (registered adapter
        ids, weights): their A and scaled B concatenated (`cat`, rank = sum of ranks). Built once
        per content (the parts' content keys and weights) and kept in a bounded cache; served
        like any adapter (pool, refcounts, eviction). Blocking: call from a worker thread."""
        digest = hashlib.sha256()
        for adapter_id, weight in parts:
            digest.update(f"{self.content_key(adapter_id)}:{float(weight)!r};".encode())
        mix_id = MIXTURE_PREFIX + digest.hexdigest()[:32]
        with self._lock:
            entry = self._entries.get(mix_id)
            if entry is not None and not entry.unloading:
                self._touch(entry)
                return mix_id
        # Built under its load lock: concurrent first requests for one mixture read and combine
        # the parts once; the later ones find it registered.
        with self._load_lock(mix_id):
            with self._lock:
                built = mix_id in self._entries
            if not built:
                spec = CombineSpec("cat", tuple(w for _, w in parts))
                weights = combine_adapters([self.weights(a) for a, _ in parts], spec, self.config.max_lora_rank,
                                           label="mixture:" + ",".join(f"{a}*{w:g}" for a, w in parts))
                with self._lock:
                    self._drop_idle_mixtures(keep=MIXTURE_CACHE - 1)
                    self._register(mix_id, weights.source_path, weights, False, source_kind="mixture",
                                   memory=weights, transient=True)
        self._make_resident(mix_id)
        return mix_id

    def _drop_idle_mixtures(self, keep: int) -> None:
        """Under the lock: unload the least recently used idle mixtures beyond `keep`."""
        mixes = sorted((e for e in self._entries.values() if e.transient and not e.unloading),
                       key=lambda e: e.last_used_mono)
        for e in mixes[:max(0, len(mixes) - keep)]:
            if e.in_flight == 0:
                e.unloading = True
                self._free(e)

    def exists(self, adapter_id: str) -> bool:
        with self._lock:
            e = self._entries.get(adapter_id)
            return e is not None and not e.unloading

    # ------------------------------------------------------------------ request path
    def ensure_available(self, adapter_id: str) -> None:
        """Make `adapter_id` known, reading it from --adapter-root if it is not registered yet.

        Blocking (disk) for a new id only: call it from a worker thread. A registered adapter
        returns at once, wherever its weights are: reserve() has the prefetcher bring them in.
        Raises AdapterNotFoundError when the id is unknown and not under --adapter-root.
        """
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is not None and not entry.unloading:
                return
        try:
            validate_adapter_id(adapter_id)
        except Exception as exc:
            raise AdapterNotFoundError(adapter_id) from exc
        with self._load_lock(adapter_id):
            with self._lock:
                entry = self._entries.get(adapter_id)
                if entry is not None:
                    if entry.unloading:
                        raise AdapterNotFoundError(adapter_id)
                    return
            source = self.sources.on_demand(adapter_id)
            if source is None:
                raise AdapterNotFoundError(adapter_id)
            try:
                weights = self._read(source)
            except AdapterSourceNotFoundError as err:  # no such prefix under the s3:// root
                raise AdapterNotFoundError(adapter_id, str(err)) from None
            self._register(adapter_id, source, weights, pinned=False, source_kind="on_demand")
        self._make_resident(adapter_id)  # the one copy, here and now when the pool has room

    def reserve(self, adapter_id: str) -> bool:
        """Count a request in flight; returns whether its adapter is already in the pool."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.unloading:
                raise AdapterNotFoundError(adapter_id)
            entry.in_flight += 1
            entry.error = None  # a new request retries a failed background load
            self._touch(entry)
            if entry.resident:
                self.stats.hits += 1
                return True
            self.stats.misses += 1
        self.prefetcher.request(adapter_id)
        return False

    def acquire(self, adapter_id: str) -> int | None:
        """Engine thread only, never blocks: the adapter's slot if it is in the pool, else None."""
        with self._lock:
            entry = self._entries[adapter_id]
            if entry.error is not None:
                raise entry.error
            if entry.resident:
                if entry.prefetched and not entry.acquire_missed:
                    self.stats.prefetch_hits += 1
                entry.prefetched = False
                entry.placed_mono = 0.0  # admitted once: no longer protected as freshly placed
                entry.slot_users += 1
                self._touch(entry)
                return entry.slot
            entry.acquire_missed = True
        self.prefetcher.request(adapter_id)  # idempotent: queued once however often it is asked
        return None

    def release(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries[adapter_id]
            entry.slot_users = max(0, entry.slot_users - 1)
            idle = entry.slot_users == 0
        if idle:
            self.prefetcher.notify()  # loads waiting for room may find some now

    def finish(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                return
            entry.in_flight = max(0, entry.in_flight - 1)
            if entry.unloading and entry.in_flight == 0:
                self._free(entry)
        self.prefetcher.notify()

    def content_key(self, adapter_id: str) -> str:
        """What the adapter's weights are, for caches keyed by them (the prefix cache's KV depends
        on them): a sha256 over its config and weights bytes. The same id loaded again with other
        weights (unload + load, or a folder changed on disk before a reload) gets another key."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                raise AdapterNotFoundError(adapter_id)
            return entry.fingerprint

    def observe_wait(self, seconds: float) -> None:
        """A request waited `seconds` in the queue for its adapter to reach the pool (scheduler)."""
        self.stats.wait_seconds.append(seconds)
        self.stats.wait_count += 1

    def build_lora_batch(self, token_slots: torch.Tensor, row_slots: torch.Tensor) -> LoraBatch:
        """token_slots [T] int64 (-1 = base) -> the step's LoraBatch, kernel metadata included."""
        return LoraBatch(token_slots=token_slots, meta=build_lora_meta(token_slots, self.pool.slot_ranks))

    # ------------------------------------------------------------------ the pool
    def _make_resident(self, adapter_id: str, required: bool = False) -> bool:
        """Bring the adapter into the pool (any thread but the engine's). True when it is there
        (or needs nothing: gone, unloading); False when there is no room now (retry once some
        adapter goes idle). Reads it from disk first if its weights are nowhere in memory. With
        `required`, no room raises AdapterCapacityError instead."""
        with self._load_lock(adapter_id):
            while True:
                placed = self._place(adapter_id, required)
                if placed is not None:
                    return placed

    def _place(self, adapter_id: str, required: bool) -> bool | None:
        """One try of _make_resident, under its load lock; None = its weights left host memory
        between the two locked sections (the host tier dropped them): try again."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            # An adapter being unloaded is still brought in for the requests it accepted.
            if entry is None or entry.resident or (entry.unloading and entry.in_flight == 0):
                return True
            if entry.host is None and entry.spilled is None and entry.memory is not None:
                entry.host = self._to_host(entry.memory)  # built in memory: nothing to read
            # Held here: the host tier may drop its copy meanwhile (_host_room).
            spilled = entry.spilled if entry.host is None else None
            spill_layout = entry.layout
            source, need_read = entry.source, entry.host is None and spilled is None
        if need_read:
            try:
                weights = self._read_again(adapter_id, source)
                if weights.fingerprint != entry.fingerprint:
                    log.warning("adapter %r changed on disk since it was registered; serving the "
                                "new weights", adapter_id)
            except Exception as exc:
                with self._lock:
                    entry.error = exc  # the requests waiting for it fail with this
                log.warning("adapter %r could not be read again from %s: %s", adapter_id, source, exc)
                return True
            with self._lock:
                if entry.unloading and entry.in_flight == 0:
                    return True
                entry.fingerprint = weights.fingerprint  # new content: a new content_key
                entry.host = self._to_host(weights)
                entry.layout = self.pool.layout(entry.host)
                self.stats.loads["disk_reload"] = self.stats.loads.get("disk_reload", 0) + 1
        with self._lock:
            if not self._reserve_extent(entry, required):
                return False
            slot, offset, layout, host = entry.slot, entry.offset, entry.layout, entry.host
            if host is not None:
                spilled = None  # read, or registered again meanwhile: these weights
            elif spilled is None or layout is not spill_layout:
                self._drop_extent(entry)  # nothing to write from any more
                return None
        # The one copy, outside the lock: no table points at this extent yet.
        t0 = time.perf_counter()
        try:
            if spilled is not None:
                self.pool.write_extent(offset, spilled)
            elif self._copy_stream is not None:
                with torch.cuda.stream(self._copy_stream):
                    self.pool.write(offset, layout, host)
                self._copy_stream.synchronize()
            else:
                self.pool.write(offset, layout, host)
        except BaseException:
            with self._lock:  # nothing points at the extent yet: give it back, as it was
                self._drop_extent(entry)
                if entry.unloading and entry.in_flight == 0:
                    self._free(entry)
            raise
        self.stats.pool_write_seconds.append(time.perf_counter() - t0)
        with self._lock:
            if entry.unloading and entry.in_flight == 0:
                self._drop_extent(entry)  # unloaded while it was being written
                self._free(entry)
                return True
            self.pool.publish(slot, offset, layout)
            entry.resident = True
            entry.placed_mono = time.monotonic()
            entry.prefetched = threading.current_thread() is self.prefetcher.thread
            entry.acquire_missed = False
            if spilled is not None:
                self.stats.spill_refills += 1
            if self.device.type == "cpu":
                entry.host = entry.spilled = None  # the pool holds it now; no second copy on CPU
        return True

    def _prefetch(self, adapter_id: str) -> bool:
        """The prefetcher's call: _make_resident, any failure recorded for the waiting requests."""
        try:
            return self._make_resident(adapter_id)
        except Exception as exc:
            with self._lock:
                entry = self._entries.get(adapter_id)
                if entry is not None:
                    entry.error = exc
            log.warning("adapter %r could not be brought into the pool: %s", adapter_id, exc)
            return True

    def _reserve_extent(self, entry: _Entry, required: bool) -> bool:
        """Under the lock: a table row and a pool extent for `entry`, evicting idle adapters."""
        need = entry.layout.elems
        self._check_fits(entry.adapter_id, need)
        if not self._free_slots:
            victim = min((e for e in self._entries.values() if self._evictable(e)),
                         key=lambda e: self._age(e.adapter_id), default=None)
            if victim is None:
                return self._no_room(entry, required, f"all {self.pool.num_slots} slots (--max-loras) are in use")
            self._evict(victim, placing=entry)
        offset = self.pool.allocator.alloc(need, entry.adapter_id)
        if offset is None:
            plan = self.pool.allocator.plan(need, self._age)
            if plan is None:
                return self._no_room(entry, required, "the adapter pool is full of adapters in use")
            for victim_id in plan.victims:
                self._evict(self._entries[victim_id], placing=entry)
            self.pool.allocator.take(plan.offset, need, entry.adapter_id)
            offset = plan.offset
        entry.slot, entry.offset = self._free_slots.pop(), offset
        self._slot_owner[entry.slot] = entry.adapter_id
        return True

    def _check_fits(self, adapter_id: str, elems: int) -> None:
        if elems > self.pool.allocator.capacity:
            raise AdapterCapacityError(
                "adapter_memory", f"adapter {adapter_id!r} needs {elems * self.pool.elem_size / 2**20:.1f} MiB, "
                f"more than the whole adapter pool ({self.pool.capacity_bytes / 2**20:.1f} MiB); raise --adapter-memory")

    def _no_room(self, entry: _Entry, required: bool, why: str) -> bool:
        if required:
            raise AdapterCapacityError("adapter_memory", f"no room for adapter {entry.adapter_id!r} now: "
                                       f"{why}; raise --adapter-memory or retry later")
        return False

    def _evictable(self, e: _Entry) -> bool:
        """In the pool, not pinned, no running sequence on it. Adapters that only WAITING
        requests hold may go too (they come back through the prefetcher), but last (`_age`):
        otherwise a queue of waiting requests could hold the pool against the one request the
        scheduler's starvation bound is waiting to admit."""
        if not e.resident or e.pinned or e.slot_users:
            return False
        # Just brought in for a waiting request that has not been admitted yet: evicting it now
        # for another waiting request's adapter would let two loads evict each other forever.
        return not (e.in_flight and time.monotonic() - e.placed_mono < FRESH_SECONDS)

    def _age(self, owner) -> float | None:
        """Eviction order key (smaller goes first), None = may not be evicted."""
        e = self._entries.get(owner)
        if e is None or not self._evictable(e):
            return None
        return e.last_used_mono + (_WAITED_FOR if e.in_flight else 0.0)

    def _evict(self, entry: _Entry, placing: _Entry | None = None) -> None:
        """Take `entry` out of the pool (to make room for `placing`); on CPU its extent is kept on
        the host tier when there is room there (`placing`'s host copy is never dropped for it)."""
        keep = (entry.adapter_id,) if placing is None else (entry.adapter_id, placing.adapter_id)
        if (self.device.type == "cpu" and self.config.spill_evicted and entry.host is None
                and self._spill_room(entry.elems, keep, placing) and self._host_room(exclude=keep)):
            # Under the lock, before the extent is handed on: a memcpy (~0.2 ms for 1.9 MB). On
            # CUDA the pinned host copy was kept, so there is nothing to save.
            entry.spilled = self.pool.read_extent(entry.offset, entry.elems)
        self._drop_extent(entry)
        self.stats.device_evictions += 1

    def _spill_room(self, elems: int, keep: tuple[str, ...], placing: _Entry | None) -> bool:
        """Room for `elems` more spilled elements: spills take at most the pool's own size (on CPU
        both are host memory: --adapter-memory bounds the two together at twice itself), the
        least recently used spill dropped first, one no request waits for before one some does;
        nothing is dropped when even dropping all it may would not make the room. The spill of
        the adapter being placed (`placing`) is not counted: it goes once written."""
        spilled = [e for e in self._entries.values() if e.spilled is not None and e is not placing]
        over = sum(e.spilled.numel() for e in spilled) + elems - self.pool.allocator.capacity
        droppable = sorted((e for e in spilled if e.adapter_id not in keep and e.slot is None),
                           key=lambda e: (e.in_flight > 0, e.last_used_mono))
        if over > sum(e.spilled.numel() for e in droppable):
            return False
        for victim in droppable:
            if over <= 0:
                break
            over -= victim.spilled.numel()
            self._drop_host_copy(victim)
        return True

    def _drop_extent(self, entry: _Entry) -> None:
        if entry.slot is None:
            return
        if entry.resident:
            self.pool.unpublish(entry.slot, entry.layout)
        self.pool.allocator.release(entry.offset)
        self._slot_owner[entry.slot] = None
        self._free_slots.append(entry.slot)
        entry.slot = entry.offset = None
        entry.resident = False

    # ------------------------------------------------------------------ internals
    def _load_lock(self, adapter_id: str) -> threading.Lock:
        with self._lock:
            return self._load_locks.setdefault(adapter_id, threading.Lock())

    def _read(self, source: Source) -> AdapterWeights:
        t0 = time.perf_counter()
        try:
            with self.sources.folder(source) as folder:  # downloaded first for an s3:// source
                weights = read_adapter(folder, self.base_shapes, self.config.max_lora_rank,
                                       self.config.max_adapter_bytes)
        except Exception:
            self.stats.load_failures += 1
            raise
        self.stats.load_seconds.append(time.perf_counter() - t0)
        self.stats.load_count += 1
        return weights

    def _read_again(self, adapter_id: str, source: Source) -> AdapterWeights:
        """A registered adapter's weights read again from its source; a vanished folder is NOT_FOUND."""
        if isinstance(source, Path) and not source.is_dir():
            raise AdapterNotFoundError(adapter_id, f"its folder {source} is gone")
        return self._read(source)

    def _to_host(self, weights: AdapterWeights) -> AdapterWeights:
        """CUDA: cast to the pool dtype and pin, for async copies into the pool. CPU: keep the
        file's tensors as read (the pool write casts them: one copy, not two)."""
        if self.device.type == "cuda":
            return weights.to(dtype=self.slot_dtype, pin_memory=True)
        return weights

    def _register(self, adapter_id: str, source: Source | str, weights: AdapterWeights, pinned: bool,
                  source_kind: str, memory: AdapterWeights | None = None, transient: bool = False,
                  combined_from: tuple[str, ...] = (), combine_method: str = "") -> AdapterInfo:
        layout = self.pool.layout(weights)
        self._check_fits(adapter_id, layout.elems)
        host = self._to_host(weights)
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is not None and entry.unloading:
                # Requests still run on the unloaded weights; replacing the entry now would hand
                # their slot to other adapters mid-generation and let their finish() decrement
                # the new entry's counts.
                if source_kind in ("api", "combine"):
                    raise AdapterExistsError(
                        "adapter_id", f"{adapter_id!r} is being unloaded and {entry.in_flight} request(s) "
                        "still use it; load it again once they have finished")
                raise AdapterNotFoundError(adapter_id)
            if entry is not None and entry.source != source:
                raise AdapterExistsError("adapter_id", f"{adapter_id!r} is already loaded from {entry.source}")
            if entry is not None and memory is not None:  # built in memory: never re-registered
                raise AdapterExistsError("adapter_id", f"{adapter_id!r} is already loaded")
            if pinned and not (entry is not None and entry.pinned):
                self._check_pin_room(layout.elems)
            self._make_host_room(exclude=(adapter_id,))
            if entry is None:
                entry = _Entry(adapter_id=adapter_id, source=source, fingerprint=weights.fingerprint,
                               pinned=pinned, host=host, layout=layout,
                               target_modules=tuple(weights.target_modules),
                               min_rank=weights.min_rank, max_rank=weights.max_rank, memory=memory,
                               transient=transient, combined_from=combined_from,
                               combine_method=combine_method)
                self._entries[adapter_id] = entry
            else:
                if not entry.resident:
                    entry.host, entry.layout, entry.spilled = host, layout, None
                entry.pinned = entry.pinned or pinned
                entry.last_used_mono = time.monotonic()
            self.stats.loads[source_kind] = self.stats.loads.get(source_kind, 0) + 1
            return self._info(entry)

    def _make_host_room(self, exclude: tuple[str, ...]) -> None:
        """Bound the host copies (--max-cpu-loras): drop the least recently used one that is not
        needed (its adapter is in the pool already, or nothing waits for it)."""
        if not self._host_room(exclude):
            raise AdapterCapacityError(
                "max_cpu_loras", f"host tier full ({self.config.max_cpu_loras}) and every adapter on it is "
                "waiting to enter the pool")

    def _host_room(self, exclude: tuple[str, ...]) -> bool:
        """Room for one more host copy, made by dropping the least recently used one not needed;
        False when every copy is needed. Spilled extents count as host copies."""
        on_host = [e for e in self._entries.values() if e.host is not None or e.spilled is not None]
        if len(on_host) < self.config.max_cpu_loras:
            return True
        idle = [e for e in on_host if e.adapter_id not in exclude and not e.pinned and e.slot is None
                and e.in_flight == 0]
        idle += [e for e in on_host if e.adapter_id not in exclude and e.resident]
        if not idle:
            # A spilled extent is only a faster way back than the disk: it goes, even when a
            # request waits for it, before a load is refused. Not while it is being written back.
            idle = [e for e in on_host if e.adapter_id not in exclude and e.host is None and e.slot is None]
        if not idle:
            return False
        self._drop_host_copy(min(idle, key=lambda e: e.last_used_mono))
        return True

    def _drop_host_copy(self, entry: _Entry) -> None:
        entry.host = entry.spilled = None  # back to DISK (or only in the pool); read again when needed
        self.stats.host_evictions += 1

    def _free(self, entry: _Entry) -> None:
        if entry.in_flight:
            return
        if entry.slot is not None and not entry.resident:
            return  # a load is writing its extent: _make_resident frees it when done
        self._drop_extent(entry)
        entry.host = entry.spilled = None
        self._entries.pop(entry.adapter_id, None)
        self.stats.unloads += 1

    def _touch(self, entry: _Entry) -> None:
        entry.last_used = time.time()
        entry.last_used_mono = time.monotonic()

    def _info(self, e: _Entry) -> AdapterInfo:
        tier = (Tier.DEVICE if e.resident else Tier.HOST if e.host is not None or e.spilled is not None
                else Tier.DISK)
        return AdapterInfo(adapter_id=e.adapter_id, source=str(e.source), target_modules=e.target_modules,
                           min_rank=e.min_rank, max_rank=e.max_rank, nbytes=e.elems * self.pool.elem_size,
                           tier=tier, requests_in_flight=e.in_flight, last_used=e.last_used, pinned=e.pinned,
                           combined_from=e.combined_from, combine_method=e.combine_method)

    # ------------------------------------------------------------------ gauges
    def tier_counts(self) -> dict[Tier, int]:
        with self._lock:
            counts = {t: 0 for t in Tier}
            for e in self._entries.values():
                counts[self._info(e).tier] += 1
            return counts

    @property
    def device_bytes(self) -> int:
        """Bytes reserved for adapter weights on the serving device (the pool)."""
        return self.pool.capacity_bytes

    @property
    def pool_used_bytes(self) -> int:
        return self.pool.used_bytes

    @property
    def load_queue_depth(self) -> int:
        return self.prefetcher.depth

    def capacity_summary(self) -> str:
        """How many adapters of typical shapes fit the pool (start-up log)."""
        parts = []
        for label, targets in (("q,v", ("q_proj", "v_proj")), ("all-linear", tuple(
                {name for _, name in self.pool.features}))):
            fits = [f"r{r}: {self.pool.capacity_bytes // self.pool.adapter_bytes(targets, r)}" for r in (8, 16, 64)]
            parts.append(f"{label} " + ", ".join(fits))
        return "; ".join(parts)


@dataclass
class _Counters:
    hits: int = 0  # requests whose adapter was in the pool when submitted
    misses: int = 0
    prefetch_hits: int = 0  # adapters the prefetcher placed before the scheduler first asked
    device_evictions: int = 0
    host_evictions: int = 0
    spill_refills: int = 0  # CPU: evicted adapters put back from their spilled extent, not disk
    unloads: int = 0
    load_failures: int = 0
    loads: dict[str, int] = field(default_factory=dict)
    load_seconds: deque = field(default_factory=lambda: deque(maxlen=1024))
    load_count: int = 0  # appended to load_seconds, ever (the metrics read the new ones)
    wait_count: int = 0
    pool_write_seconds: deque = field(default_factory=lambda: deque(maxlen=1024))
    wait_seconds: deque = field(default_factory=lambda: deque(maxlen=4096))
