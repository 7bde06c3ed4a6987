"""LoraManager on the tiny Llama model: the adapter memory pool, eviction, prefetch, unloads.

Each test builds its own model + manager over a shared folder of PEFT adapters with random
weights. The engine's calls are simulated directly: reserve (submit) -> acquire (admission) ->
release (leaves the batch) -> finish (request done). The pool is sized in bytes to hold a given
number of the rank-4 q/v adapters, so evictions happen where the tests want them.

The pool-reuse tests run the model: after the pool was filled with garbage and an all-linear
adapter's extent was reused, an adapter must give PEFT's logits, which fails if the kernels read
a byte outside its own blocks.
"""

from __future__ import annotations

import random
import shutil
import threading
import time

import pytest
import torch

from loraplex.config import LoraConfig
from loraplex.lora import manager as manager_module
from loraplex.lora.errors import AdapterCapacityError, AdapterExistsError, AdapterNotFoundError
from loraplex.lora.manager import LoraManager, Tier
from loraplex.lora.peft_format import AdapterFormatError, read_adapter
from loraplex.model.kv_cache import KVCache
from loraplex.model.loader import load_model
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.paged_batches import BlockPool, PagedSeq, make_step

PLAIN = ("a", "b", "c", "d", "p")  # rank-4 q/v adapters with different weights
REUSE_KINDS = ("patterns_r6", "layer1_r3", "qv_r4", "regex_mlp_r5")  # fewer modules / lower ranks
BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def adapter_root(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("manager_adapters")
    for i, name in enumerate(PLAIN):
        make_peft_adapter(tiny_model_dir, root / name, "qv_r4", seed=200 + i)
    for i, kind in enumerate(("all_r8_rslora",) + REUSE_KINDS):
        make_peft_adapter(tiny_model_dir, root / kind, kind, seed=300 + i)
    # A corrupt copy: the weights file cut in half (config fine, safetensors truncated).
    shutil.copytree(root / "a", root / "corrupt")
    weights = root / "corrupt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return root


def qv4_bytes(model_dir) -> int:
    """Pool bytes of one rank-4 q/v adapter of the tiny model (float32 pool)."""
    loaded = load_model(model_dir, torch.float32, "cpu")
    mgr = LoraManager(LoraConfig(adapter_memory="1MiB"), loaded.model, torch.float32, "cpu")
    try:
        return mgr.pool.adapter_bytes(("q_proj", "v_proj"), 4)
    finally:
        mgr.close()


def make_manager(model_dir, root, fit=2, max_cpu_loras=8, on_demand=False, extra_roots=(),
                 max_loras=None, memory=None, spill=True):
    """A manager whose pool holds exactly `fit` rank-4 q/v adapters (or `memory` bytes); with
    `spill` (the default) evicted adapters keep their extent on the host tier, else go to disk."""
    loaded = load_model(model_dir, torch.float32, "cpu")
    memory = memory if memory is not None else fit * qv4_bytes(model_dir)
    config = LoraConfig(adapter_memory=str(memory), max_loras=max_loras, max_lora_rank=16,
                        max_cpu_loras=max_cpu_loras, spill_evicted=spill,
                        adapter_root=str(root) if on_demand else None,
                        allowed_roots=(() if on_demand else (str(root),)) + tuple(map(str, extra_roots)))
    return LoraManager(config, loaded.model, torch.float32, "cpu"), loaded


def run_request(mgr, adapter_id) -> int:
    """A request that gets admitted, runs and finishes: reserve, (prefetch,) acquire, release, finish."""
    mgr.reserve(adapter_id)
    assert mgr.prefetcher.drain()
    slot = mgr.acquire(adapter_id)
    assert slot is not None, f"no slot for {adapter_id}"
    mgr.release(adapter_id)
    mgr.finish(adapter_id)
    return slot


def tiers(mgr) -> dict[str, Tier]:
    return {info.adapter_id: info.tier for info in mgr.list()}


def load_all(mgr, root, names, pinned=()):
    for name in names:
        mgr.load(name, root / name, pinned=name in pinned)


def pool_blocks(mgr, adapter_id):
    """(layer, name) -> (A [r, in], B [out, r], scale) as the kernels would read them."""
    entry = mgr._entries[adapter_id]
    out = {}
    for key, b in entry.layout.blocks.items():
        table = mgr.pool.groups[b.group].table
        s = entry.slot
        r = int(table.ranks[b.member, s])
        a0, bt0 = int(table.a_offs[b.member, s]), int(table.bt_offs[b.member, s])
        d_in, d_out = table.d_in, table.d_outs[b.member]
        A = mgr.pool.tensor[a0:a0 + r * d_in].view(r, d_in)
        Bt = mgr.pool.tensor[bt0:bt0 + r * d_out].view(r, d_out)
        out[key] = (A, Bt.T, float(table.scales[b.member, s]))
    return out


def assert_pool_holds(mgr, root, adapter_id, folder=None):
    want = read_adapter(root / (folder or adapter_id), mgr.base_shapes, 16)
    got = pool_blocks(mgr, adapter_id)
    assert set(got) == set(want.modules)
    for key, module in want.modules.items():
        A, B, scale = got[key]
        assert torch.equal(A, module.A) and torch.equal(B, module.B), key
        assert scale == pytest.approx(module.scale)


# ------------------------------------------------------------------------------------------------
# The pool: memory by real size, no copy on CPU, eviction
# ------------------------------------------------------------------------------------------------

def test_load_goes_straight_into_the_pool_at_its_real_size(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=3)
    load_all(mgr, adapter_root, "ab")
    assert tiers(mgr) == {"a": Tier.DEVICE, "b": Tier.DEVICE}
    # CPU: the pool is the only copy (no host tier copy kept).
    assert all(mgr._entries[n].host is None for n in "ab")
    assert_pool_holds(mgr, adapter_root, "a")
    assert_pool_holds(mgr, adapter_root, "b")
    info = {i.adapter_id: i for i in mgr.list()}
    assert info["a"].nbytes == qv4_bytes(tiny_model_dir) and mgr.pool_used_bytes == 2 * info["a"].nbytes
    # Its size is its real one: rank x (in + out) per targeted module and layer, 4-byte floats
    # here, each block rounded up to the 64-byte alignment at most.
    shapes = mgr.base_shapes
    exact = sum(4 * sum(shapes.features[n]) * 4 * shapes.num_layers for n in ("q_proj", "v_proj"))
    assert exact <= info["a"].nbytes <= exact + 64 * 4 * shapes.num_layers * 2
    assert mgr.stats.misses == 0 and run_request(mgr, "a") is not None and mgr.stats.hits == 1


def test_eviction_takes_the_least_recently_used_idle_adapter(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=3)
    load_all(mgr, adapter_root, "abc")
    for name in "bca":
        run_request(mgr, name)  # use order b, c, a: b is the least recently used
    mgr.load("d", adapter_root / "d")
    # b's extent is kept on the host tier (CPU spill).
    assert tiers(mgr) == {"a": Tier.DEVICE, "b": Tier.HOST, "c": Tier.DEVICE, "d": Tier.DEVICE}
    assert mgr.stats.device_evictions == 1
    # b comes back through the prefetcher (one copy from its spilled extent), evicting c now.
    assert mgr.reserve("b") is False and mgr.stats.misses == 1
    assert mgr.prefetcher.drain()
    assert mgr.acquire("b") is not None and mgr.stats.prefetch_hits == 1
    assert tiers(mgr)["c"] == Tier.HOST and mgr.stats.spill_refills == 1 and "disk_reload" not in mgr.stats.loads
    assert mgr._entries["b"].spilled is None  # back in the pool: no second copy
    assert_pool_holds(mgr, adapter_root, "b")
    mgr.release("b")
    mgr.finish("b")


def test_adapters_in_use_or_pinned_are_never_evicted(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=3)
    load_all(mgr, adapter_root, "pab", pinned="p")
    mgr.reserve("a")
    assert mgr.acquire("a") is not None  # a runs
    mgr.reserve("b")
    assert mgr.acquire("b") is not None  # b runs
    before = mgr.pool_used_bytes
    mgr.load("c", adapter_root / "c")  # no room: registered, kept in host memory until there is
    assert tiers(mgr)["c"] == Tier.HOST
    assert mgr.reserve("c") is False  # nothing may go: c waits, nothing changes
    assert mgr.prefetcher.drain()
    assert mgr.acquire("c") is None and mgr.pool_used_bytes == before
    assert tiers(mgr) == {"p": Tier.DEVICE, "a": Tier.DEVICE, "b": Tier.DEVICE, "c": Tier.HOST}
    mgr.release("a")  # a goes idle but a request still holds it: it is evicted anyway (last)
    mgr.finish("a")
    deadline = time.monotonic() + 10
    while mgr.acquire("c") is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tiers(mgr)["c"] == Tier.DEVICE and tiers(mgr)["a"] == Tier.HOST and tiers(mgr)["p"] == Tier.DEVICE
    assert_pool_holds(mgr, adapter_root, "c")
    assert_pool_holds(mgr, adapter_root, "b")  # the running adapter's weights are untouched


def test_pinned_adapters_leave_room_for_the_others(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=4)
    load_all(mgr, adapter_root, "abc", pinned="abc")  # 3 of 4: the 75% the pins may take
    before = mgr.list()
    with pytest.raises(AdapterCapacityError, match="pinned"):
        mgr.load("d", adapter_root / "d", pinned=True)
    assert mgr.list() == before and not mgr.exists("d")


def test_adapter_larger_than_the_pool_is_refused_naming_the_flag(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=2)
    before = mgr.list()
    with pytest.raises(AdapterCapacityError, match="adapter-memory") as err:
        mgr.load("all", adapter_root / "all_r8_rslora")
    assert err.value.field == "adapter_memory"
    assert mgr.list() == before and mgr.pool_used_bytes == 0


def test_max_loras_caps_resident_adapters(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=5, max_loras=2)
    load_all(mgr, adapter_root, "abc")
    assert sorted(tiers(mgr).values(), key=str) == sorted([Tier.DEVICE, Tier.DEVICE, Tier.HOST], key=str)


def test_spilled_extents_are_bounded_by_the_host_tier(tiny_model_dir, adapter_root):
    """CPU spill: an evicted adapter's extent is one of the --max-cpu-loras host copies; when the
    tier is full the least recently used idle copy goes to disk, and either way the adapter comes
    back with its own weights (from the spilled bytes, or read again)."""
    # Two host copies: while a loaded adapter goes into the pool its own weights are one of them.
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=2, max_cpu_loras=2)
    load_all(mgr, adapter_root, "ab")
    for name in "ab":
        run_request(mgr, name)
    mgr.load("c", adapter_root / "c")  # evicts a: spilled
    assert tiers(mgr) == {"a": Tier.HOST, "b": Tier.DEVICE, "c": Tier.DEVICE}
    assert mgr._entries["a"].spilled.numel() == mgr._entries["a"].elems
    mgr.load("d", adapter_root / "d")  # evicts b: d's weights and a's extent fill the tier: a's goes
    assert tiers(mgr) == {"a": Tier.DISK, "b": Tier.HOST, "c": Tier.DEVICE, "d": Tier.DEVICE}
    assert mgr.stats.host_evictions == 1
    run_request(mgr, "a")  # read again from disk; evicts c, whose spill displaces b's
    # (the tier holds a's weights and b's extent then)
    assert mgr.stats.loads["disk_reload"] == 1 and mgr.stats.spill_refills == 0
    assert tiers(mgr) == {"a": Tier.DEVICE, "b": Tier.DISK, "c": Tier.HOST, "d": Tier.DEVICE}
    assert_pool_holds(mgr, adapter_root, "a")
    run_request(mgr, "c")  # from its spilled extent
    assert mgr.stats.spill_refills == 1 and mgr.stats.loads["disk_reload"] == 1
    assert_pool_holds(mgr, adapter_root, "c")
    assert_pool_holds(mgr, adapter_root, "a")
    mgr.unload("d")  # a spilled adapter that is unloaded leaves nothing behind
    mgr.unload("a")
    assert all(e.spilled is None for e in mgr._entries.values() if e.adapter_id != "d")


def test_a_spill_never_drops_the_host_copy_of_the_adapter_it_makes_room_for(tiny_model_dir, adapter_root):
    """The host tier (one copy) holds the new adapter's weights while they go into the pool: the
    adapter it evicts is not spilled over them, it goes to disk."""
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=2, max_cpu_loras=1)
    load_all(mgr, adapter_root, "ab")
    mgr.load("c", adapter_root / "c")
    assert tiers(mgr) == {"a": Tier.DISK, "b": Tier.DEVICE, "c": Tier.DEVICE}
    assert mgr.stats.host_evictions == 0 and mgr._entries["a"].spilled is None
    assert_pool_holds(mgr, adapter_root, "c")
    assert_pool_holds(mgr, adapter_root, "b")


def test_a_full_host_tier_drops_a_waited_for_spill_before_refusing_a_load(tiny_model_dir, adapter_root):
    """Spilled extents are a cache: when every host copy has a waiting request, a new load drops
    one (its adapter is read from disk again later) instead of failing with max_cpu_loras."""
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=2, max_cpu_loras=2)
    load_all(mgr, adapter_root, "abc")  # c evicts a: spilled
    assert tiers(mgr)["a"] == Tier.HOST
    for name in "bc":  # both pool places run
        mgr.reserve(name)
        assert mgr.acquire(name) is not None
    mgr.reserve("a")  # waits, spilled
    mgr.load("d", adapter_root / "d")  # no room in the pool: waits on the host tier too
    mgr.reserve("d")
    assert mgr.prefetcher.drain()
    assert tiers(mgr) == {"a": Tier.HOST, "b": Tier.DEVICE, "c": Tier.DEVICE, "d": Tier.HOST}
    mgr.load("e", adapter_root / "e" if (adapter_root / "e").exists() else adapter_root / "p")
    assert tiers(mgr)["a"] == Tier.DISK and tiers(mgr)["e"] == Tier.HOST and mgr.stats.host_evictions == 1
    for name in "bc":
        mgr.release(name)
        mgr.finish(name)
    for name in "ad":  # the waiting requests are admitted once the pool has room: a from disk
        deadline = time.monotonic() + 10
        while mgr.acquire(name) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert_pool_holds(mgr, adapter_root, name)
        mgr.release(name)
        mgr.finish(name)
    assert mgr.stats.loads["disk_reload"] == 1


def test_weights_that_leave_host_memory_before_their_extent_is_written_are_read_again(
        tiny_model_dir, adapter_root, monkeypatch):
    """Between taking its extent and writing it, an adapter's host copy can be dropped by the
    host tier (another load made room): the placement starts again from disk, never writes
    nothing."""
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=2, spill=False)
    load_all(mgr, adapter_root, "ab")
    for name in "ab":
        mgr.reserve(name)
        assert mgr.acquire(name) is not None
    mgr.load("c", adapter_root / "c")  # no room: its host copy waits
    assert mgr._entries["c"].host is not None
    real = mgr._reserve_extent
    dropped = []

    def reserve_after_a_drop(entry, required):
        if entry.adapter_id == "c" and not dropped:
            entry.host = None  # what _host_room does to an idle copy
            dropped.append(True)
        return real(entry, required)

    monkeypatch.setattr(mgr, "_reserve_extent", reserve_after_a_drop)
    for name in "ab":
        mgr.release(name)
        mgr.finish(name)
    run_request(mgr, "c")
    assert dropped and mgr.stats.loads["disk_reload"] == 1
    assert_pool_holds(mgr, adapter_root, "c")


def test_spilled_extents_take_at_most_the_pools_size(tiny_model_dir, adapter_root):
    """On CPU spills and the pool are both host memory: the spills' bytes stay within the pool's
    (here one adapter's worth), the least recently used going to disk first."""
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=1, max_cpu_loras=8)
    load_all(mgr, adapter_root, "abc")  # b evicts a, c evicts b: room for one spill only
    assert tiers(mgr) == {"a": Tier.DISK, "b": Tier.HOST, "c": Tier.DEVICE}
    assert mgr.stats.host_evictions == 1
    spilled = sum(e.spilled.numel() for e in mgr._entries.values() if e.spilled is not None)
    assert spilled <= mgr.pool.allocator.capacity
    run_request(mgr, "b")  # from its spill; c is spilled in its place
    assert mgr.stats.spill_refills == 1 and tiers(mgr) == {"a": Tier.DISK, "b": Tier.DEVICE, "c": Tier.HOST}
    assert_pool_holds(mgr, adapter_root, "b")
    run_request(mgr, "a")  # from disk
    assert mgr.stats.loads["disk_reload"] == 1
    assert_pool_holds(mgr, adapter_root, "a")


def test_no_spill_sends_evicted_adapters_to_disk(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=2, spill=False)
    load_all(mgr, adapter_root, "abc")
    assert tiers(mgr) == {"a": Tier.DISK, "b": Tier.DEVICE, "c": Tier.DEVICE}
    run_request(mgr, "a")
    assert mgr.stats.loads["disk_reload"] == 1 and mgr.stats.spill_refills == 0
    assert all(e.spilled is None for e in mgr._entries.values())
    assert_pool_holds(mgr, adapter_root, "a")


# ------------------------------------------------------------------------------------------------
# Unload
# ------------------------------------------------------------------------------------------------

def test_unload_while_reserved_defers_the_free_until_finish(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=2)
    load_all(mgr, adapter_root, "ab")
    mgr.reserve("a")
    slot = mgr.acquire("a")
    a_weights = {k: v[0].clone() for k, v in pool_blocks(mgr, "a").items()}
    mgr.unload("a")
    # Gone for new requests at once...
    assert not mgr.exists("a") and "a" not in tiers(mgr)
    with pytest.raises(AdapterNotFoundError):
        mgr.reserve("a")
    with pytest.raises(AdapterNotFoundError):
        mgr.ensure_available("a")
    with pytest.raises(AdapterNotFoundError):
        mgr.unload("a")
    # ... but the running request keeps its weights, even when room is needed.
    mgr.load("c", adapter_root / "c")  # evicts b, never the unloading a
    assert tiers(mgr) == {"b": Tier.HOST, "c": Tier.DEVICE}
    assert all(torch.equal(v[0], a_weights[k]) for k, v in pool_blocks(mgr, "a").items())
    assert mgr.stats.unloads == 0
    mgr.release("a")
    mgr.finish("a")
    assert mgr.stats.unloads == 1 and int(mgr.pool.slot_ranks[slot]) == 0
    assert mgr.pool_used_bytes == qv4_bytes(tiny_model_dir)  # only c left
    assert mgr.load("a", adapter_root / "a").tier == Tier.DEVICE


def test_loading_an_id_again_while_its_unload_is_pending_is_refused(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=2)
    load_all(mgr, adapter_root, "ab")
    mgr.reserve("a")
    mgr.acquire("a")
    mgr.unload("a")
    for folder in ("a", "b"):
        with pytest.raises(AdapterExistsError):
            mgr.load("a", adapter_root / folder)
    mgr.release("a")
    mgr.finish("a")
    assert mgr.load("a", adapter_root / "b").source == str((adapter_root / "b").resolve())
    assert_pool_holds(mgr, adapter_root, "a", folder="b")


@pytest.mark.parametrize("spill", [True, False])
def test_unload_while_the_prefetcher_writes_the_adapter(tiny_model_dir, adapter_root, monkeypatch, spill):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=2, spill=spill)
    load_all(mgr, adapter_root, "abc")  # a evicted by c: its extent spilled, or to disk
    assert tiers(mgr)["a"] == (Tier.HOST if spill else Tier.DISK)
    writing, release = threading.Event(), threading.Event()
    method = "write_extent" if spill else "write"
    real_write = getattr(mgr.pool, method)

    def slow_write(*args):
        writing.set()
        assert release.wait(10)
        real_write(*args)

    monkeypatch.setattr(mgr.pool, method, slow_write)
    assert mgr.reserve("a") is False  # the prefetcher starts bringing a in
    assert writing.wait(10)
    mgr.finish("a")  # the request is cancelled ...
    mgr.unload("a")  # ... and the adapter unloaded while its extent is being written
    release.set()
    assert mgr.prefetcher.drain()
    assert "a" not in mgr._entries and mgr.stats.unloads == 1
    used = {o for _, _, o in mgr.pool.allocator.extents()}
    assert used == {n for n, t in tiers(mgr).items() if t == Tier.DEVICE}
    assert all(o is None or o != "a" for o in mgr._slot_owner)


# ------------------------------------------------------------------------------------------------
# Loads and load failures
# ------------------------------------------------------------------------------------------------

def test_failed_load_changes_nothing(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=2)
    load_all(mgr, adapter_root, "ab")  # pool full: a successful load would evict one
    run_request(mgr, "b")
    before = mgr.list()
    with pytest.raises(AdapterFormatError, match="safetensors"):
        mgr.load("x", adapter_root / "corrupt")
    assert mgr.list() == before and not mgr.exists("x") and mgr.stats.device_evictions == 0
    assert mgr.stats.load_failures == 1 and mgr.stats.loads == {"api": 2}
    with pytest.raises(AdapterExistsError):
        mgr.load("a", adapter_root / "corrupt")
    assert mgr.list() == before and mgr.stats.load_failures == 1


@pytest.mark.parametrize("damage", ["corrupt", "gone"])
def test_background_reload_failure_fails_its_requests_only(tiny_model_dir, adapter_root, tmp_path, damage):
    shutil.copytree(adapter_root / "a", tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    good = weights.read_bytes()
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=2, extra_roots=(tmp_path,), spill=False)
    mgr.load("a", tmp_path / "a")
    load_all(mgr, adapter_root, "bc")  # a goes to disk
    assert tiers(mgr)["a"] == Tier.DISK
    if damage == "corrupt":
        weights.write_bytes(good[: len(good) // 3])
    else:
        shutil.rmtree(tmp_path / "a")
    mgr.reserve("a")
    assert mgr.prefetcher.drain()
    with pytest.raises(AdapterFormatError if damage == "corrupt" else AdapterNotFoundError):
        mgr.acquire("a")
    mgr.finish("a")
    assert run_request(mgr, "b") is not None  # every other adapter goes on
    if damage == "gone":
        return
    weights.write_bytes(good)  # repaired: the next request reads it again
    assert run_request(mgr, "a") is not None
    assert_pool_holds(mgr, tmp_path, "a")


def test_loading_the_same_folder_again_is_idempotent(tiny_model_dir, adapter_root, tmp_path):
    mgr, _ = make_manager(tiny_model_dir, adapter_root)
    first = mgr.load("a", adapter_root / "a")
    assert mgr.load("a", adapter_root / "a") == first
    # Another spelling of the same folder (and a symlink to it) is the same folder.
    assert mgr.load("a", adapter_root / "." / "b" / ".." / "a") == first
    link = tmp_path / "link-to-a"
    link.symlink_to(adapter_root / "a", target_is_directory=True)
    assert mgr.load("a", link) == first
    assert mgr.stats.loads == {"api": 1} and len(mgr.list()) == 1


def test_loading_another_folder_under_a_taken_id_is_already_exists(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root)
    mgr.load("a", adapter_root / "a")
    before = mgr.list()
    with pytest.raises(AdapterExistsError) as err:
        mgr.load("a", adapter_root / "b")
    assert err.value.field == "adapter_id"
    assert mgr.list() == before and mgr.stats.loads == {"api": 1}


def test_concurrent_loads_of_one_id_read_it_once(tiny_model_dir, adapter_root, monkeypatch):
    reads = []
    real_read = manager_module.read_adapter

    def slow_read(*args, **kwargs):
        reads.append(args[0])
        time.sleep(0.2)  # long enough that every thread arrives while the first one reads
        return real_read(*args, **kwargs)

    monkeypatch.setattr(manager_module, "read_adapter", slow_read)
    mgr, _ = make_manager(tiny_model_dir, adapter_root)
    n = 6
    barrier = threading.Barrier(n)
    results, errors = [], []

    def load():
        try:
            barrier.wait(timeout=10)
            results.append(mgr.load("a", adapter_root / "a"))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert len(reads) == 1 and mgr.stats.loads == {"api": 1}
    assert len(results) == n and all(r.adapter_id == "a" and r.tier == Tier.DEVICE for r in results)
    assert len(mgr.list()) == 1


def test_concurrent_on_demand_loads_read_once(tiny_model_dir, adapter_root, monkeypatch):
    reads = []
    real_read = manager_module.read_adapter

    def slow_read(*args, **kwargs):
        reads.append(args[0])
        time.sleep(0.2)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(manager_module, "read_adapter", slow_read)
    mgr, _ = make_manager(tiny_model_dir, adapter_root, on_demand=True)
    with pytest.raises(AdapterNotFoundError):
        mgr.ensure_available("no-such-adapter")
    with pytest.raises(AdapterNotFoundError):
        mgr.ensure_available("../a")
    barrier = threading.Barrier(4)
    errors = []

    def ensure():
        try:
            barrier.wait(timeout=10)
            mgr.ensure_available("b")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ensure) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and len(reads) == 1
    assert mgr.stats.loads == {"on_demand": 1} and tiers(mgr) == {"b": Tier.DEVICE}


def test_on_demand_load_registers_and_places(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=2, on_demand=True)
    with pytest.raises(AdapterNotFoundError):
        mgr.ensure_available("no-such-adapter")
    with pytest.raises(AdapterNotFoundError):
        mgr.ensure_available("../a")
    mgr.ensure_available("b")
    assert tiers(mgr) == {"b": Tier.DEVICE} and mgr.stats.loads == {"on_demand": 1}
    mgr.ensure_available("b")  # known: returns at once, reads nothing
    assert mgr.stats.load_count == 1


# ------------------------------------------------------------------------------------------------
# Slot reuse: no stale weights
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reuse_reference(tiny_model_dir, adapter_root):
    """PEFT's float32 logits for a fixed prompt, per REUSE_KINDS adapter, plus the base model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def hf():
        return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32,
                                                    attn_implementation="eager").eval()

    rng = random.Random(7)
    base = hf()
    tokens = [rng.randrange(base.config.vocab_size) for _ in range(9)]
    out = {}
    with torch.no_grad():
        out[None] = base(input_ids=torch.tensor([tokens])).logits[0]  # [L, vocab]
        for kind in REUSE_KINDS:
            peft = PeftModel.from_pretrained(hf(), str(adapter_root / kind)).eval()
            out[kind] = peft(input_ids=torch.tensor([tokens])).logits[0]
    return tokens, out


@pytest.mark.parametrize("kind", REUSE_KINDS)
def test_reused_pool_memory_holds_no_stale_weights(tiny_model_dir, adapter_root, reuse_reference, kind):
    tokens, want = reuse_reference
    loaded = load_model(tiny_model_dir, torch.float32, "cpu")
    probe = LoraManager(LoraConfig(adapter_memory="16MiB", allowed_roots=(str(adapter_root),)),
                        loaded.model, torch.float32, "cpu")
    all_bytes = probe.load("all", adapter_root / "all_r8_rslora").nbytes  # rank 8, every projection
    probe.close()
    # A pool that holds exactly that one adapter, filled with garbage first: the kernels must
    # read nothing outside each adapter's own blocks.
    mgr, loaded = make_manager(tiny_model_dir, adapter_root, memory=all_bytes)
    mgr.pool.tensor.normal_(0, 3.0)
    mgr.load("all", adapter_root / "all_r8_rslora")
    run_request(mgr, "all")
    mgr.load(kind, adapter_root / kind)  # evicts "all" and takes (part of) its memory
    assert mgr.stats.device_evictions == 1 and tiers(mgr) == {"all": Tier.HOST, kind: Tier.DEVICE}
    mgr.reserve(kind)
    slot = mgr.acquire(kind)

    # One batch: the adapter's row and a base row with the same prompt.
    arch = loaded.arch
    kv = KVCache.allocate(arch.num_layers, 16, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim,
                          torch.float32, "cpu")
    seqs = [PagedSeq(list(tokens)), PagedSeq(list(tokens))]
    batch, rows = make_step(BlockPool(16, BLOCK_SIZE, seed=1), [(s, len(tokens)) for s in seqs])
    token_slots = torch.tensor([slot] * len(tokens) + [-1] * len(tokens), dtype=torch.int64)  # [T]
    batch.lora = mgr.build_lora_batch(token_slots, torch.tensor([slot, -1]))
    ours = loaded.model(batch, kv)  # [2L, vocab]
    n = len(tokens)
    torch.testing.assert_close(ours[:n], want[kind], atol=5e-4, rtol=0)
    torch.testing.assert_close(ours[n:], want[None], atol=5e-4, rtol=0)
    assert (want[kind] - want[None]).abs().max() > 1.0  # the adapter does change the logits


def test_unloading_an_evicted_adapter_still_serves_the_requests_it_accepted(tiny_model_dir, adapter_root,
                                                                              monkeypatch):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=2)
    load_all(mgr, adapter_root, "abc")  # a evicted to disk
    queued = []
    monkeypatch.setattr(mgr.prefetcher, "request", queued.append)  # hold the prefetch back
    assert mgr.reserve("a") is False
    mgr.unload("a")  # a request still waits for a: it must be brought in for it
    monkeypatch.undo()
    for adapter_id in queued:
        mgr.prefetcher.request(adapter_id)
    assert mgr.prefetcher.drain()
    assert mgr.acquire("a") is not None and not mgr.exists("a")
    assert_pool_holds(mgr, adapter_root, "a")
    mgr.release("a")
    mgr.finish("a")
    assert "a" not in mgr._entries and mgr.stats.unloads == 1


def test_an_adapter_brought_in_for_a_waiting_request_is_not_evicted_before_it_runs(tiny_model_dir, adapter_root):
    # Room for one adapter, two waiting requests on two adapters: without the protection of a
    # freshly placed adapter, each load would evict the other before the scheduler admits either.
    mgr, _ = make_manager(tiny_model_dir, adapter_root, fit=1)
    load_all(mgr, adapter_root, "abc")  # c resident, a and b on disk
    assert mgr.reserve("a") is False and mgr.reserve("b") is False
    assert mgr.prefetcher.drain()
    time.sleep(0.2)  # b is blocked for room, retried every 50 ms: it must not evict a
    assert tiers(mgr)["a"] == Tier.DEVICE and tiers(mgr)["b"] != Tier.DEVICE
    assert mgr.acquire("a") is not None
    mgr.release("a")
    mgr.finish("a")  # a ran: now b may take its place
    deadline = time.monotonic() + 10
    while mgr.acquire("b") is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tiers(mgr)["b"] == Tier.DEVICE
