"""LoraManager bookkeeping on the tiny Llama model: device slots, host tier, loads and unloads.

Each test builds its own model + manager (the manager installs LoraWeights into the model's
projections) over a shared folder of PEFT adapters with random weights. The engine's calls are
simulated directly: reserve (submit) -> acquire (admission) -> release (leaves the batch) ->
finish (request done).

The slot-reuse test runs the model: an adapter that targets fewer modules (or smaller ranks) than
the slot's previous all-linear owner must give PEFT's logits, which fails if any stale weight of
the previous owner survives in the slot.
"""

from __future__ import annotations

import random
import shutil
import threading
import time

import pytest
import torch

from loraplex.config import LoraConfig
from loraplex.engine.errors import AdapterNotFoundError
from loraplex.lora import manager as manager_module
from loraplex.lora.errors import AdapterCapacityError, AdapterExistsError
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


def make_manager(model_dir, root, max_loras=2, max_cpu_loras=8, on_demand=False, extra_roots=()):
    loaded = load_model(model_dir, torch.float32, "cpu")
    config = LoraConfig(max_loras=max_loras, max_lora_rank=16, max_cpu_loras=max_cpu_loras,
                        adapter_root=str(root) if on_demand else None,
                        allowed_roots=(() if on_demand else (str(root),)) + tuple(map(str, extra_roots)))
    return LoraManager(config, loaded.model, torch.float32, "cpu"), loaded


def run_request(mgr, adapter_id) -> int:
    """A request that gets admitted, runs and finishes: reserve, acquire, release, finish."""
    mgr.reserve(adapter_id)
    slot = mgr.acquire(adapter_id)
    assert slot is not None, f"no slot for {adapter_id}"
    mgr.release(adapter_id)
    mgr.finish(adapter_id)
    return slot


def tiers(mgr) -> dict[str, Tier]:
    return {info.adapter_id: info.tier for info in mgr.list()}


def slot_owners(mgr) -> list[str | None]:
    return list(mgr._slot_owner)


def load_all(mgr, root, names, pinned=()):
    for name in names:
        mgr.load(name, root / name, pinned=name in pinned)


# ------------------------------------------------------------------------------------------------
# Device slots
# ------------------------------------------------------------------------------------------------

def test_device_eviction_takes_the_least_recently_used_slot(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=3)
    load_all(mgr, adapter_root, "abcd")
    slots = {name: run_request(mgr, name) for name in "abc"}
    assert sorted(slots.values()) == [0, 1, 2] and mgr.stats.device_evictions == 0
    assert run_request(mgr, "a") == slots["a"]  # a hit; a becomes the most recent
    assert mgr.stats.hits == 1
    # Use order now b, c, a: d takes b's slot.
    assert run_request(mgr, "d") == slots["b"]
    assert tiers(mgr) == {"a": Tier.DEVICE, "b": Tier.HOST, "c": Tier.DEVICE, "d": Tier.DEVICE}
    # Then c is the oldest: b comes back into c's slot.
    assert run_request(mgr, "b") == slots["c"]
    assert tiers(mgr)["c"] == Tier.HOST
    assert mgr.stats.device_evictions == 2
    assert int(mgr.slot_ranks[slots["c"]]) == 4  # b's rank, written with its weights


def test_pinned_adapter_is_never_evicted(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=2)
    load_all(mgr, adapter_root, "pabc", pinned="p")
    p_slot = run_request(mgr, "p")  # p is now the least recently used, but pinned
    run_request(mgr, "a")
    run_request(mgr, "b")  # evicts a, not p
    assert tiers(mgr)["a"] == Tier.HOST
    run_request(mgr, "c")  # evicts b, not p
    assert tiers(mgr) == {"p": Tier.DEVICE, "a": Tier.HOST, "b": Tier.HOST, "c": Tier.DEVICE}
    assert slot_owners(mgr)[p_slot] == "p"
    # Pinning a too would leave no slot for unpinned adapters (c could never run again): refused,
    # and nothing changes.
    before = mgr.list()
    with pytest.raises(AdapterCapacityError, match="pinned"):
        mgr.load("a", adapter_root / "a", pinned=True)
    assert mgr.list() == before and not dict((i.adapter_id, i.pinned) for i in before)["a"]


def test_slot_in_use_is_never_evicted(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=2)
    load_all(mgr, adapter_root, "abc")
    mgr.reserve("a")
    a_slot = mgr.acquire("a")  # a keeps running: the least recently used, but busy
    b_slot = run_request(mgr, "b")
    assert run_request(mgr, "c") == b_slot
    assert slot_owners(mgr)[a_slot] == "a" and tiers(mgr)["b"] == Tier.HOST
    mgr.release("a")
    mgr.finish("a")


def test_acquire_returns_none_when_every_slot_is_busy(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=2)
    load_all(mgr, adapter_root, "abc")
    for name in ("a", "a", "b"):  # two sequences run on a, one on b
        mgr.reserve(name)
    a_slot = mgr.acquire("a")
    assert mgr.acquire("a") == a_slot  # second sequence of a: same slot, a hit
    b_slot = mgr.acquire("b")
    ranks_before = mgr.slot_ranks.clone()
    mgr.reserve("c")
    assert mgr.acquire("c") is None  # "not now": nothing changed
    assert slot_owners(mgr)[a_slot] == "a" and slot_owners(mgr)[b_slot] == "b"
    assert torch.equal(mgr.slot_ranks, ranks_before)
    assert tiers(mgr)["c"] == Tier.HOST and mgr.stats.device_evictions == 0
    mgr.release("a")  # one sequence of a left; a is still busy
    assert mgr.acquire("c") is None
    mgr.release("a")
    assert mgr.acquire("c") == a_slot  # a is idle now and the only candidate
    assert tiers(mgr)["a"] == Tier.HOST and mgr.stats.device_evictions == 1


# ------------------------------------------------------------------------------------------------
# Unload
# ------------------------------------------------------------------------------------------------

def test_unload_while_reserved_defers_the_free_until_finish(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=2)
    load_all(mgr, adapter_root, "abcd")
    mgr.reserve("a")
    slot = mgr.acquire("a")
    q = mgr._modules[(0, "q_proj")]
    a_weights = q.A[slot].clone()
    assert a_weights.abs().sum() > 0

    mgr.unload("a")
    # Gone for new requests at once...
    assert not mgr.exists("a") and "a" not in tiers(mgr)
    with pytest.raises(AdapterNotFoundError):
        mgr.reserve("a")
    with pytest.raises(AdapterNotFoundError):
        mgr.ensure_available("a")
    with pytest.raises(AdapterNotFoundError):
        mgr.unload("a")  # a second unload of the same id
    # ... but the running request keeps its slot and weights.
    assert mgr.stats.unloads == 0
    assert slot_owners(mgr)[slot] == "a" and int(mgr.slot_ranks[slot]) == 4
    assert torch.equal(q.A[slot], a_weights)
    other = run_request(mgr, "b")  # takes the other slot
    assert run_request(mgr, "c") == other  # evicts b: a's slot is still in use
    mgr.release("a")
    assert mgr.stats.unloads == 0  # released the slot but the request has not finished
    mgr.finish("a")
    assert mgr.stats.unloads == 1
    assert slot_owners(mgr)[slot] is None and int(mgr.slot_ranks[slot]) == 0
    assert run_request(mgr, "d") == slot  # a free slot now: no eviction needed
    assert mgr.stats.device_evictions == 1
    # The id can be registered again once it is gone.
    assert mgr.load("a", adapter_root / "a").tier == Tier.HOST


def test_unload_of_an_idle_adapter_frees_at_once(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=2)
    load_all(mgr, adapter_root, "ab")
    slot = run_request(mgr, "a")
    mgr.unload("a")
    assert tiers(mgr) == {"b": Tier.HOST} and mgr.stats.unloads == 1
    assert slot_owners(mgr)[slot] is None and int(mgr.slot_ranks[slot]) == 0
    with pytest.raises(AdapterNotFoundError):
        mgr.unload("never-loaded")


def test_loading_an_id_again_while_its_unload_is_pending_keeps_the_running_slot(tiny_model_dir, adapter_root):
    # The old request still runs on the slot; a new entry under the same id would share the id's
    # release/finish calls with it, and freeing the old slot would hand a running sequence's slot
    # to another adapter. The load is refused until the old requests are done.
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=2)
    load_all(mgr, adapter_root, "ab")
    mgr.reserve("a")
    slot = mgr.acquire("a")
    mgr.unload("a")
    for folder in ("a", "b"):
        with pytest.raises(AdapterExistsError):
            mgr.load("a", adapter_root / folder)
    assert slot_owners(mgr)[slot] == "a" and int(mgr.slot_ranks[slot]) == 4
    assert not mgr.exists("a")
    mgr.release("a")
    mgr.finish("a")
    assert mgr.load("a", adapter_root / "b").source == str((adapter_root / "b").resolve())
    mgr.reserve("a")
    assert mgr.acquire("a") is not None
    assert {i.adapter_id: i.requests_in_flight for i in mgr.list()} == {"a": 1, "b": 0}


# ------------------------------------------------------------------------------------------------
# Host tier
# ------------------------------------------------------------------------------------------------

def test_host_tier_limit_drops_the_lru_idle_adapter_and_reloads_it(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=1, max_cpu_loras=2)
    load_all(mgr, adapter_root, "ab")
    mgr.load("c", adapter_root / "c")  # host tier full: a, the least recently used, goes to disk
    assert tiers(mgr) == {"a": Tier.DISK, "b": Tier.HOST, "c": Tier.HOST}
    assert mgr.stats.host_evictions == 1
    assert mgr.exists("a")  # still registered...
    with pytest.raises(AdapterNotFoundError):
        mgr.reserve("a")  # ...but not servable until brought back

    mgr.ensure_available("a")  # reads a's folder again; b is now the LRU idle one
    assert tiers(mgr) == {"a": Tier.HOST, "b": Tier.DISK, "c": Tier.HOST}
    assert mgr.stats.loads == {"api": 3, "disk_reload": 1} and mgr.stats.host_evictions == 2
    slot = run_request(mgr, "a")
    # The reloaded weights are a's, not whatever the slot or the host tier held before.
    want = read_adapter(adapter_root / "a", mgr.base_shapes, 16)
    for (layer, name), module in want.modules.items():
        w = mgr._modules[(layer, name)]
        assert torch.equal(w.A[slot, :module.rank], module.A)
        assert torch.equal(w.B[slot, :, :module.rank], module.B)
        assert float(w.scales[slot]) == pytest.approx(module.scale)


def test_an_adapter_brought_back_from_disk_is_not_the_next_host_victim(tiny_model_dir, adapter_root):
    # ensure_available runs just before the request reserves the adapter; if the reload kept its
    # old timestamp, any other load in between would drop it straight back to disk.
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=1, max_cpu_loras=2)
    load_all(mgr, adapter_root, "abc")  # a -> disk
    mgr.ensure_available("a")  # b -> disk; c is now the least recently loaded or used
    mgr.load("d", adapter_root / "d")
    assert tiers(mgr) == {"a": Tier.HOST, "b": Tier.DISK, "c": Tier.DISK, "d": Tier.HOST}


def test_host_tier_never_drops_pinned_or_in_flight_adapters(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=2, max_cpu_loras=2)
    load_all(mgr, adapter_root, "ab", pinned="a")
    mgr.reserve("b")  # waiting request: b must stay on the host tier
    before = mgr.list()
    with pytest.raises(AdapterCapacityError):
        mgr.load("c", adapter_root / "c")
    assert mgr.list() == before and not mgr.exists("c")
    mgr.finish("b")
    mgr.load("c", adapter_root / "c")  # now b is idle and goes to disk, never the pinned a
    assert tiers(mgr) == {"a": Tier.HOST, "b": Tier.DISK, "c": Tier.HOST}


# ------------------------------------------------------------------------------------------------
# Loads
# ------------------------------------------------------------------------------------------------

def test_failed_load_changes_nothing(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=1, max_cpu_loras=2)
    load_all(mgr, adapter_root, "ab")  # host tier full: a successful load would drop a
    run_request(mgr, "b")
    before = mgr.list()
    with pytest.raises(AdapterFormatError, match="safetensors"):
        mgr.load("x", adapter_root / "corrupt")
    assert mgr.list() == before
    assert not mgr.exists("x") and mgr.stats.host_evictions == 0
    assert mgr.stats.load_failures == 1 and mgr.stats.loads == {"api": 2}
    # Under a taken id the load is refused before anything is read.
    with pytest.raises(AdapterExistsError):
        mgr.load("a", adapter_root / "corrupt")
    assert mgr.list() == before and mgr.stats.load_failures == 1


def test_failed_reload_from_disk_leaves_the_adapter_on_disk(tiny_model_dir, adapter_root, tmp_path):
    shutil.copytree(adapter_root / "a", tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    good = weights.read_bytes()
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=1, max_cpu_loras=2,
                          extra_roots=(tmp_path,))
    mgr.load("a", tmp_path / "a")
    load_all(mgr, adapter_root, "bc")  # a goes to disk
    weights.write_bytes(good[: len(good) // 3])  # the folder breaks while a is on disk
    before = mgr.list()
    assert {i.adapter_id: i.tier for i in before}["a"] == Tier.DISK
    with pytest.raises(AdapterFormatError):
        mgr.ensure_available("a")
    assert mgr.list() == before and mgr.stats.load_failures == 1
    assert mgr.stats.host_evictions == 1  # the failed read dropped nothing else to make room
    weights.write_bytes(good)
    mgr.ensure_available("a")
    assert tiers(mgr)["a"] == Tier.HOST


def test_loading_the_same_folder_again_is_idempotent(tiny_model_dir, adapter_root, tmp_path):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=2)
    first = mgr.load("a", adapter_root / "a")
    assert mgr.load("a", adapter_root / "a") == first
    # Another spelling of the same folder (and a symlink to it) is the same folder.
    assert mgr.load("a", adapter_root / "." / "b" / ".." / "a") == first
    link = tmp_path / "link-to-a"
    link.symlink_to(adapter_root / "a", target_is_directory=True)
    assert mgr.load("a", link) == first
    assert mgr.stats.loads == {"api": 1} and len(mgr.list()) == 1


def test_loading_another_folder_under_a_taken_id_is_already_exists(tiny_model_dir, adapter_root):
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=2)
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
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=2)
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
    assert len(results) == n and all(r.adapter_id == "a" and r.tier == Tier.HOST for r in results)
    assert len(mgr.list()) == 1


def test_concurrent_on_demand_loads_read_once(tiny_model_dir, adapter_root, monkeypatch):
    reads = []
    real_read = manager_module.read_adapter

    def slow_read(*args, **kwargs):
        reads.append(args[0])
        time.sleep(0.2)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(manager_module, "read_adapter", slow_read)
    mgr, _ = make_manager(tiny_model_dir, adapter_root, max_loras=2, on_demand=True)
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
    assert mgr.stats.loads == {"on_demand": 1} and tiers(mgr) == {"b": Tier.HOST}


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
def test_reused_slot_holds_no_stale_weights(tiny_model_dir, adapter_root, reuse_reference, kind):
    tokens, want = reuse_reference
    mgr, loaded = make_manager(tiny_model_dir, adapter_root, max_loras=1, max_cpu_loras=2)
    mgr.load("all", adapter_root / "all_r8_rslora")  # rank 8 on every projection of every layer
    mgr.load(kind, adapter_root / kind)
    assert run_request(mgr, "all") == 0
    mgr.reserve(kind)
    assert mgr.acquire(kind) == 0  # the same slot, evicted from "all"
    assert mgr.stats.device_evictions == 1

    # One batch: the adapter's row and a base row with the same prompt.
    arch = loaded.arch
    kv = KVCache.allocate(arch.num_layers, 16, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim,
                          torch.float32, "cpu")
    seqs = [PagedSeq(list(tokens)), PagedSeq(list(tokens))]
    batch, rows = make_step(BlockPool(16, BLOCK_SIZE, seed=1), [(s, len(tokens)) for s in seqs])
    token_slots = torch.tensor([0] * len(tokens) + [-1] * len(tokens), dtype=torch.int64)  # [T]
    batch.lora = mgr.build_lora_batch(token_slots, torch.tensor([0, -1]))
    ours = loaded.model(batch, kv)  # [2L, vocab]
    n = len(tokens)
    torch.testing.assert_close(ours[:n], want[kind], atol=5e-4, rtol=0)
    torch.testing.assert_close(ours[n:], want[None], atol=5e-4, rtol=0)
    assert (want[kind] - want[None]).abs().max() > 1.0  # the adapter does change the logits


def test_slot_writes_leave_no_rows_of_the_previous_adapter():
    """LoraWeights zeroes only the rows a previous adapter left beyond the new rank; whatever the
    sequence of writes, a slot holds exactly the last adapter (zeros beyond its rank)."""
    from loraplex.lora.layers import LoraWeights

    g = torch.Generator().manual_seed(0)
    w = LoraWeights(3, 16, 24, 40, torch.float32, "cpu")
    for r in (16, 4, 0, 8, 12, 2, 0, 0, 16):
        if r:
            A, B = torch.randn(r, 24, generator=g), torch.randn(40, r, generator=g)
            w.set_slot(1, A, B, 0.5)
            want_a = torch.cat([A, torch.zeros(16 - r, 24)])
            want_b = torch.cat([B, torch.zeros(40, 16 - r)], dim=1)
        else:
            w.clear_slot(1)
            want_a, want_b = torch.zeros(16, 24), torch.zeros(40, 16)
        assert torch.equal(w.A[1], want_a) and torch.equal(w.B[1], want_b), r
        assert float(w.scales[1]) == (0.5 if r else 0.0)
        assert torch.count_nonzero(w.A[0]) == torch.count_nonzero(w.A[2]) == 0  # neighbours untouched
