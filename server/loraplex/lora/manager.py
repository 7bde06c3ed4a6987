"""The adapter cache: a host tier of loaded adapters and a pool of device slots.

Three places an adapter can be, as ListAdapters reports them:
  DISK   registered (its folder is known) but its weights were dropped from host memory;
  HOST   weights in host memory (pinned memory on CUDA), ready to copy into a device slot;
  DEVICE weights also in one of the `max_loras` device slots the kernels index.

Life of a request's adapter, as the engine drives it:
  reserve(id)        at submit: NOT_FOUND unless the adapter is on the host tier; counts the
                     request in flight, which keeps the adapter from being dropped or freed.
  acquire_slot(id)   at admission (engine thread): a slot, copying the weights in if needed,
                     evicting the least recently used slot nobody runs on; None = "not now".
  release_slot(id)   when the sequence leaves the running batch (finish, abort, preemption).
  finish(id)         when the request ends; an adapter being unloaded is freed at its last finish.

Disk reads (LoadAdapter, on-demand loads from --adapter-root) happen outside the lock, so the
step loop never waits for a disk; a failed read changes nothing. Device slot writes only happen
in acquire_slot, which the engine calls between forwards, so a forward never sees a half-written slot.
"""

from __future__ import annotations

import enum
from collections import deque
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.config import LoraConfig
from loraplex.engine.errors import AdapterNotFoundError

from loraplex_kernels import build_lora_meta, slot_weight_dtype

from .batch import LoraBatch
from .errors import AdapterCapacityError, AdapterExistsError
from .group import LoraGroup
from .layers import LoraWeights
from .paths import resolve_under_roots, validate_adapter_id
from .peft_format import AdapterWeights, BaseShapes, read_adapter


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
    nbytes: int
    tier: Tier
    requests_in_flight: int
    last_used: float  # unix time, 0 = never used
    pinned: bool


@dataclass
class _Entry:
    adapter_id: str
    source: Path
    fingerprint: str
    pinned: bool
    weights: AdapterWeights | None  # None: dropped to DISK, reloaded on the next use
    target_modules: tuple[str, ...]
    min_rank: int
    max_rank: int
    nbytes: int
    slot: int | None = None
    slot_users: int = 0  # running sequences using the device slot
    in_flight: int = 0  # requests reserved (waiting or running)
    unloading: bool = False
    last_used: float = 0.0
    last_used_mono: float = field(default_factory=time.monotonic)


# Projections of one layer that read the same input; their LoRA deltas are computed together.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class LoraManager:
    def __init__(self, config: LoraConfig, model: torch.nn.Module, dtype: torch.dtype,
                 device: torch.device | str):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self._lock = threading.RLock()
        self._load_locks: dict[str, threading.Lock] = {}  # one disk read per id at a time
        self._entries: dict[str, _Entry] = {}
        self._slot_owner: list[str | None] = [None] * config.max_loras
        # Adapter max rank per slot: the kernel metadata's rank (work per token ∝ this).
        self.slot_ranks = torch.zeros(config.max_loras, dtype=torch.int32)  # [slots], host
        self._modules: dict[tuple[int, str], LoraWeights] = {}
        # Slot weights in the kernel backend's dtype (the model's, or float32 for the CPU torch
        # fallback, see slot_weight_dtype); the host tier keeps adapters in the model's dtype.
        self.slot_dtype = slot_weight_dtype(dtype)
        projections = {(layer_idx, name): proj for layer_idx, name, proj in model.iter_projections()}
        for key, proj in projections.items():
            if key in self._modules:
                continue
            # q/k/v and gate/up read the same input: their weights form a group applied in one
            # pass (lora/group.py); o and down (and any set a model lacks) stand alone.
            layer_idx, name = key
            names = next((g for g in FUSED_GROUPS if name in g), (name,))
            keys = [(layer_idx, n) for n in names]
            members = [projections.get(k) for k in keys]
            if len(names) > 1 and all(p is not None for p in members):
                group = LoraGroup(config.max_loras, config.max_lora_rank, proj.in_features,
                                  [p.out_features for p in members], self.slot_dtype, device)
                weights = group.members
            else:
                keys, members = [key], [proj]
                weights = [LoraWeights(config.max_loras, config.max_lora_rank, proj.in_features,
                                       proj.out_features, self.slot_dtype, device)]
            for k, p, w in zip(keys, members, weights):
                p.lora_weights = w
                self._modules[k] = w
        self.base_shapes = BaseShapes.from_model(model)
        self.stats = _Counters()

    # ------------------------------------------------------------------ admin calls (any thread)
    def load(self, adapter_id: str, path: str | Path, pinned: bool = False) -> AdapterInfo:
        validate_adapter_id(adapter_id)
        real = resolve_under_roots(path, self.config.roots)
        with self._load_lock(adapter_id):
            with self._lock:
                entry = self._entries.get(adapter_id)
                if pinned and not (entry is not None and entry.pinned):
                    self._check_pin_room()
                if entry is not None and not entry.unloading:
                    if entry.source != real:
                        raise AdapterExistsError(
                            "adapter_id", f"{adapter_id!r} is already loaded from {entry.source}")
                    if entry.weights is not None:
                        entry.pinned = entry.pinned or pinned
                        return self._info(entry)
            weights = self._read(real)  # slow; outside the lock, nothing changed if it raises
            return self._register(adapter_id, real, weights, pinned, source_kind="api")

    def _check_pin_room(self) -> None:
        # Pinned adapters never leave their device slot; keep one slot for everyone else, or
        # requests for any unpinned adapter would wait forever.
        pinned = sum(1 for e in self._entries.values() if e.pinned and not e.unloading)
        if pinned + 1 > self.config.max_loras - 1:
            raise AdapterCapacityError(
                "pinned", f"at most {self.config.max_loras - 1} adapters may be pinned "
                f"(max_loras {self.config.max_loras} minus one slot kept for unpinned adapters)")

    def unload(self, adapter_id: str) -> None:
        """New requests get NOT_FOUND at once; memory is freed when the last running one ends."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.unloading:
                raise AdapterNotFoundError(adapter_id)
            entry.unloading = True
            if entry.in_flight == 0:
                self._free(entry)

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._info(e) for e in self._entries.values() if not e.unloading]

    def exists(self, adapter_id: str) -> bool:
        with self._lock:
            e = self._entries.get(adapter_id)
            return e is not None and not e.unloading

    # ------------------------------------------------------------------ request path
    def ensure_available(self, adapter_id: str) -> None:
        """Make `adapter_id` ready on the host tier, reading it from disk if needed.

        Blocking (disk): call it from a worker thread, not the event loop or the step loop.
        Raises AdapterNotFoundError when the id is unknown and not under --adapter-root.
        """
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is not None and not entry.unloading and entry.weights is not None:
                return
        try:
            validate_adapter_id(adapter_id)
        except Exception as exc:
            raise AdapterNotFoundError(adapter_id) from exc
        with self._load_lock(adapter_id):
            with self._lock:
                entry = self._entries.get(adapter_id)
                if entry is not None and entry.unloading:
                    raise AdapterNotFoundError(adapter_id)
                if entry is not None and entry.weights is not None:
                    return
                source = entry.source if entry is not None else None
            if source is None:
                root = self.config.adapter_root
                if not root or not (Path(root) / adapter_id).is_dir():
                    raise AdapterNotFoundError(adapter_id)
                source = resolve_under_roots(Path(root) / adapter_id, self.config.roots)
            weights = self._read(source)
            self._register(adapter_id, source, weights, pinned=False,
                           source_kind="disk_reload" if entry is not None else "on_demand")

    def reserve(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.unloading or entry.weights is None:
                raise AdapterNotFoundError(adapter_id)
            entry.in_flight += 1
            self._touch(entry)

    def acquire_slot(self, adapter_id: str) -> int | None:
        """Engine thread only. A device slot for a reserved adapter, or None if all are busy."""
        with self._lock:
            entry = self._entries[adapter_id]
            if entry.slot is not None:
                self.stats.hits += 1
            else:
                slot = self._free_or_evict_slot()
                if slot is None:
                    return None
                self.stats.misses += 1
                self._write_slot(slot, entry)
            entry.slot_users += 1
            self._touch(entry)
            return entry.slot

    def release_slot(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries[adapter_id]
            entry.slot_users = max(0, entry.slot_users - 1)

    def finish(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                return
            entry.in_flight = max(0, entry.in_flight - 1)
            if entry.unloading and entry.in_flight == 0:
                self._free(entry)

    # The engine's names for the slot calls (engine/scheduler.py, engine/model_runner.py).
    acquire = acquire_slot
    release = release_slot

    def build_lora_batch(self, token_slots: torch.Tensor, row_slots: torch.Tensor) -> LoraBatch:
        """token_slots [T] int64 (-1 = base) -> the step's LoraBatch, kernel metadata included."""
        return LoraBatch(token_slots=token_slots, meta=build_lora_meta(token_slots, self.slot_ranks))

    # ------------------------------------------------------------------ internals
    def _load_lock(self, adapter_id: str) -> threading.Lock:
        with self._lock:
            return self._load_locks.setdefault(adapter_id, threading.Lock())

    def _read(self, path: Path) -> AdapterWeights:
        t0 = time.perf_counter()
        try:
            weights = read_adapter(path, self.base_shapes, self.config.max_lora_rank,
                                   self.config.max_adapter_bytes)
        except Exception:
            self.stats.load_failures += 1
            raise
        self.stats.load_seconds.append(time.perf_counter() - t0)
        return weights

    def _register(self, adapter_id: str, source: Path, weights: AdapterWeights, pinned: bool,
                  source_kind: str) -> AdapterInfo:
        weights = _to_host(weights, self.dtype, pin=self.device.type == "cuda")
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is not None and entry.unloading:
                # Requests still run on the unloaded weights (an unloading entry always has some:
                # the last finish() frees it). Their device slot, slot_users and in_flight are keyed
                # by this id, so replacing the entry now would hand their slot to other adapters
                # mid-generation and let their finish() decrement the new entry's counts.
                if source_kind == "api":
                    raise AdapterExistsError(
                        "adapter_id", f"{adapter_id!r} is being unloaded and {entry.in_flight} request(s) "
                        "still use it; load it again once they have finished")
                raise AdapterNotFoundError(adapter_id)
            if entry is not None and entry.source != source:
                raise AdapterExistsError("adapter_id", f"{adapter_id!r} is already loaded from {entry.source}")
            if entry is None or entry.weights is None:
                self._make_host_room(exclude=adapter_id)
            if entry is None:
                entry = _Entry(adapter_id=adapter_id, source=source, fingerprint=weights.fingerprint,
                               pinned=pinned, weights=weights,
                               target_modules=tuple(weights.target_modules),
                               min_rank=weights.min_rank, max_rank=weights.max_rank,
                               nbytes=weights.nbytes)
                self._entries[adapter_id] = entry
            else:
                entry.weights = weights
                entry.pinned = entry.pinned or pinned
                # Brought back for a request about to reserve it: with its old timestamp it would
                # be the next host-tier victim, dropped again by any load before that reserve.
                entry.last_used_mono = time.monotonic()
            self.stats.loads[source_kind] = self.stats.loads.get(source_kind, 0) + 1
            return self._info(entry)

    def _make_host_room(self, exclude: str) -> None:
        on_host = [e for e in self._entries.values() if e.weights is not None]
        if len(on_host) < self.config.max_cpu_loras:
            return
        idle = [e for e in on_host if e.adapter_id != exclude and not e.pinned
                and e.in_flight == 0 and e.slot_users == 0]
        if not idle:
            raise AdapterCapacityError(
                "max_cpu_loras", f"host tier full ({self.config.max_cpu_loras}) and every adapter is pinned or in use")
        victim = min(idle, key=lambda e: e.last_used_mono)
        self._drop_slot(victim)
        victim.weights = None  # back to DISK; reloaded from its folder on the next request
        self.stats.host_evictions += 1

    def _free_or_evict_slot(self) -> int | None:
        for slot, owner in enumerate(self._slot_owner):
            if owner is None:
                return slot
        idle = [self._entries[o] for o in self._slot_owner
                if o is not None and self._entries[o].slot_users == 0 and not self._entries[o].pinned]
        if not idle:
            return None
        victim = min(idle, key=lambda e: e.last_used_mono)
        slot = victim.slot
        self._drop_slot(victim)
        self.stats.device_evictions += 1
        return slot

    def _write_slot(self, slot: int, entry: _Entry) -> None:
        assert entry.weights is not None
        for key, w in self._modules.items():
            mod = entry.weights.modules.get(key)
            if mod is None:
                w.clear_slot(slot)
            else:
                w.set_slot(slot, mod.A, mod.B, mod.scale)
        self.slot_ranks[slot] = entry.max_rank
        self._slot_owner[slot] = entry.adapter_id
        entry.slot = slot

    def _drop_slot(self, entry: _Entry) -> None:
        if entry.slot is None:
            return
        # Weights may stay in the freed slot: its rank goes to 0 and no token indexes it.
        self.slot_ranks[entry.slot] = 0
        self._slot_owner[entry.slot] = None
        entry.slot = None

    def _free(self, entry: _Entry, force: bool = False) -> None:
        if entry.in_flight and not force:
            return
        self._drop_slot(entry)
        entry.weights = None
        self._entries.pop(entry.adapter_id, None)
        self.stats.unloads += 1

    def _touch(self, entry: _Entry) -> None:
        entry.last_used = time.time()
        entry.last_used_mono = time.monotonic()

    def _info(self, e: _Entry) -> AdapterInfo:
        tier = Tier.DEVICE if e.slot is not None else Tier.HOST if e.weights is not None else Tier.DISK
        return AdapterInfo(adapter_id=e.adapter_id, source=str(e.source), target_modules=e.target_modules,
                           min_rank=e.min_rank, max_rank=e.max_rank, nbytes=e.nbytes, tier=tier,
                           requests_in_flight=e.in_flight, last_used=e.last_used, pinned=e.pinned)

    # ------------------------------------------------------------------ gauges
    def tier_counts(self) -> dict[Tier, int]:
        with self._lock:
            counts = {t: 0 for t in Tier}
            for e in self._entries.values():
                counts[self._info(e).tier] += 1
            return counts

    @property
    def device_bytes(self) -> int:
        return sum(w.nbytes for w in self._modules.values())


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    device_evictions: int = 0
    host_evictions: int = 0
    unloads: int = 0
    load_failures: int = 0
    loads: dict[str, int] = field(default_factory=dict)
    load_seconds: deque = field(default_factory=lambda: deque(maxlen=1024))


def _to_host(weights: AdapterWeights, dtype: torch.dtype, pin: bool) -> AdapterWeights:
    """Cast to the serving dtype (halves host memory in bf16) and pin for async H2D copies."""
    return weights.to(dtype=dtype, pin_memory=pin)
