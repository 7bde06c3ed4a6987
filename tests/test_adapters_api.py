"""The Adapters service and adapter use through Generate, end to end: an in-process server on the
tiny random Llama with a LoRA manager, real gRPC clients, PEFT adapters with random weights.

Two servers, each on its own copy of the model (a LoraManager installs its slot tensors into the
model's projections, so two managers cannot share one model):
- `srv`: max_loras=2 device slots, max_lora_rank=6; LoadAdapter may read under `library` (an
  allowed root) and `ondemand` (the --adapter-root, also used for on-demand loads). Nothing else
  is a root; `outside` holds adapters a client must not be able to reach.
- `small`: max_loras=2 (two adapters resident at most), adapter root only: the pool overflows.

Where a request must still be running when something happens to it (unload), the engine's model
runner is slowed by a fixed sleep per step, so the outcome does not depend on this machine's speed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
from safetensors.torch import load_file

from loraplex.api.pb.loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.config import EngineConfig, LoraConfig
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, build_lora_manager, start_engine
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.engine_run import slow_steps
from tests.fixtures.tiny_models import make_tiny_model

pytestmark = pytest.mark.timeout(300)

ENGINE = EngineConfig(block_size=16, num_kv_blocks=256, max_num_seqs=32, max_num_batched_tokens=256,
                      max_model_len=256, max_new_tokens_cap=512, max_waiting=128)
MAX_RANK = 6
# Every kind of rank <= MAX_RANK (all_r8_rslora, rank 8, is the "rank too high" case).
KINDS = ("qv_r4", "patterns_r6", "regex_mlp_r5", "layer1_r3", "adalora")
PROMPTS = ("The quick brown fox", "Once upon a time there was", "What is two plus two? It is")


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_model_dir):
    top = tmp_path_factory.mktemp("adapters")
    d = SimpleNamespace(library=top / "library", ondemand=top / "ondemand", ondemand_small=top / "small",
                        outside=top / "outside")
    for i, kind in enumerate(KINDS + ("all_r8_rslora",)):
        make_peft_adapter(tiny_model_dir, d.library / kind, kind, seed=i)
    make_peft_adapter(tiny_model_dir, d.outside / "qv_r4", "qv_r4", seed=99)

    # Corrupt / hostile folders inside the allowed root.
    dora = shutil.copytree(d.library / "qv_r4", d.library / "dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    truncated = shutil.copytree(d.library / "qv_r4", d.library / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    other_base = make_tiny_model(top / "other_base", hidden_size=32, intermediate_size=96)
    make_peft_adapter(other_base, d.library / "other_base", "qv_r4", seed=5)
    os.symlink(d.outside / "qv_r4", d.library / "link_out")  # folder symlink leaving the roots
    file_link = d.library / "file_link"  # a folder inside whose weights file points outside
    file_link.mkdir()
    shutil.copy(d.library / "qv_r4" / "adapter_config.json", file_link)
    os.symlink(d.outside / "qv_r4" / "adapter_model.safetensors", file_link / "adapter_model.safetensors")

    # The --adapter-root of `srv`: od-qv has the same weights as library/qv_r4.
    shutil.copytree(d.library / "qv_r4", d.ondemand / "od-qv")
    shutil.copytree(d.library / "dora", d.ondemand / "od-dora")
    os.symlink(d.outside / "qv_r4", d.ondemand / "od-link")
    # The --adapter-root of `small`.
    for kind in KINDS[:3]:
        shutil.copytree(d.library / kind, d.ondemand_small / kind)
    return d


def _serve(tiny_model_dir, lora: LoraConfig) -> ServerThread:
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    return ServerThread(start_engine(loaded, ENGINE, build_lora_manager(loaded, lora))).start()


@pytest.fixture(scope="module")
def srv(tiny_model_dir, dirs):
    server = _serve(tiny_model_dir, LoraConfig(
        max_loras=2, max_lora_rank=MAX_RANK, max_cpu_loras=32, adapter_root=str(dirs.ondemand),
        allowed_roots=(str(dirs.library),)))
    with grpc.insecure_channel(server.address) as ch:
        yield SimpleNamespace(server=server, gen=generation_pb2_grpc.GenerationStub(ch),
                              adapters=adapters_pb2_grpc.AdaptersStub(ch),
                              engine=server.server.runtime.engine,
                              manager=server.server.runtime.lora_manager)
    server.stop()


@pytest.fixture(scope="module")
def small(tiny_model_dir, dirs):
    # Evicted adapters go to disk (no CPU spill): these tests are about reading them again.
    server = _serve(tiny_model_dir, LoraConfig(max_loras=2, max_lora_rank=MAX_RANK, max_cpu_loras=2,
                                               spill_evicted=False, adapter_root=str(dirs.ondemand_small)))
    with grpc.insecure_channel(server.address) as ch:
        yield SimpleNamespace(gen=generation_pb2_grpc.GenerationStub(ch),
                              adapters=adapters_pb2_grpc.AdaptersStub(ch),
                              manager=server.server.runtime.lora_manager)
    server.stop()


# --- helpers -------------------------------------------------------------------------------------
def greedy_req(adapter_id: str, prompt: str = PROMPTS[0], n: int = 10) -> pb.GenerateRequest:
    return pb.GenerateRequest(adapter_id=adapter_id, prompt=prompt,
                              sampling=pb.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))


def tokens(stub, adapter_id: str, prompt: str = PROMPTS[0], n: int = 10) -> list[int]:
    resp = stub.Generate(greedy_req(adapter_id, prompt, n))
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH and len(resp.token_ids) == n
    return list(resp.token_ids)


def load(s, adapter_id: str, path, pinned: bool = False) -> apb.AdapterInfo:
    return s.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id=adapter_id, path=str(path),
                                                         pinned=pinned)).adapter


def listed(s) -> dict[str, apb.AdapterInfo]:
    resp = s.adapters.ListAdapters(apb.ListAdaptersRequest())
    ids = [a.adapter_id for a in resp.adapters]
    assert ids == sorted(ids)  # the proto promises order by id
    return {a.adapter_id: a for a in resp.adapters}


def rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    return err.value


# --- load / list / generate / unload -------------------------------------------------------------
def test_load_list_generate(srv, dirs):
    before = time.time()
    info = load(srv, "poet", dirs.library / "qv_r4")
    saved = load_file(dirs.library / "qv_r4" / "adapter_model.safetensors")
    expected_bytes = 4 * sum(t.numel() for t in saved.values())
    assert (info.adapter_id, info.source, list(info.target_modules)) == \
        ("poet", str((dirs.library / "qv_r4").resolve()), ["q_proj", "v_proj"])
    assert (info.min_rank, info.max_rank, info.bytes) == (4, 4, expected_bytes)  # float32 serving dtype
    assert (info.tier, info.requests_in_flight, info.last_used_unix_seconds, info.pinned) == \
        (apb.ADAPTER_TIER_DEVICE, 0, 0.0, False)  # straight into the adapter pool
    assert listed(srv)["poet"] == info

    patterns = load(srv, "patterns", dirs.library / "patterns_r6", pinned=True)
    assert (patterns.min_rank, patterns.max_rank, patterns.pinned) == (2, 6, True)  # rank_pattern k_proj: 2
    assert list(patterns.target_modules) == ["q_proj", "k_proj", "o_proj", "down_proj"]

    base = tokens(srv.gen, "")
    with_poet = tokens(srv.gen, "poet")
    assert with_poet != base  # random, non-zero adapter weights change the greedy tokens
    now = listed(srv)["poet"]
    assert now.tier == apb.ADAPTER_TIER_DEVICE and now.requests_in_flight == 0
    assert before <= now.last_used_unix_seconds <= time.time()
    assert tokens(srv.gen, "poet") == with_poet  # deterministic
    # Streaming gives the same tokens.
    assert [t for c in srv.gen.GenerateStream(greedy_req("poet")) for t in c.token_ids] == with_poet

    # Same id, same folder again: idempotent OK (and may add the pin); another folder: ALREADY_EXISTS.
    again = load(srv, "poet", dirs.library / "qv_r4")
    assert (again.adapter_id, again.source, again.bytes) == (info.adapter_id, info.source, info.bytes)
    snapshot = listed(srv)
    err = rpc_error(load, srv, "poet", dirs.library / "layer1_r3")
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and err.details().startswith("adapter_id: ")
    assert listed(srv) == snapshot
    assert tokens(srv.gen, "poet") == with_poet
    for adapter_id in ("poet", "patterns"):
        srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=adapter_id))
    assert not {"poet", "patterns"} & set(listed(srv))


def test_unload_while_streaming_drains_then_frees(srv, dirs, monkeypatch):
    folder = dirs.library / "patterns_r6"
    load(srv, "story", folder)
    n = 60
    reference = tokens(srv.gen, "story", PROMPTS[1], n)
    unloads_before = srv.manager.stats.unloads

    slow_steps(monkeypatch, srv.engine, 0.04)  # 60 tokens take >= 2.4 s
    stream = srv.gen.GenerateStream(greedy_req("story", PROMPTS[1], n))
    got = [t for _ in range(3) for t in next(stream).token_ids]
    assert listed(srv)["story"].requests_in_flight == 1

    srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="story"))
    err = rpc_error(srv.gen.Generate, greedy_req("story"))  # new requests: NOT_FOUND at once
    assert err.code() == grpc.StatusCode.NOT_FOUND and "story" in err.details()
    assert err.details().startswith("adapter_id: ")
    assert "story" not in listed(srv)
    # Reloading the id while its old weights still serve a request is refused (the running stream
    # keeps its device slot); nothing changes.
    err = rpc_error(load, srv, "story", folder)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "being unloaded" in err.details()
    assert "story" not in listed(srv)
    assert srv.engine.stats().num_running == 1  # all of that happened while the stream ran

    chunks = list(stream)
    got += [t for c in chunks for t in c.token_ids]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert got == reference  # the running request finished normally, on its adapter
    # Its finish freed the adapter (the final event is sent after the manager's finish()).
    assert srv.manager.stats.unloads == unloads_before + 1
    assert "story" not in listed(srv)
    err = rpc_error(srv.adapters.UnloadAdapter, apb.UnloadAdapterRequest(adapter_id="story"))
    assert err.code() == grpc.StatusCode.NOT_FOUND

    # Reload after the drain: the same adapter again.
    monkeypatch.undo()
    assert load(srv, "story", folder).tier == apb.ADAPTER_TIER_DEVICE
    assert tokens(srv.gen, "story", PROMPTS[1], n) == reference
    srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="story"))


def test_device_eviction_under_pressure(srv, dirs):
    """5 adapters, 2 device slots, requests across all of them at once: every request completes and
    gets exactly the tokens it gets alone."""
    ids = [f"ev-{k}" for k in KINDS]
    for adapter_id, kind in zip(ids, KINDS):
        load(srv, adapter_id, dirs.library / kind)
    jobs = [(a, p) for a in ids + [""] for p in PROMPTS[:2]]
    evictions = srv.manager.stats.device_evictions
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: tokens(srv.gen, *j), jobs))
    assert srv.manager.stats.device_evictions >= evictions + len(ids) - 2
    alone = [tokens(srv.gen, *j) for j in jobs]
    assert together == alone
    assert len({tuple(t) for t in alone}) == len(jobs)  # every adapter changes the output
    for adapter_id in ids:
        assert listed(srv)[adapter_id].requests_in_flight == 0
        srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=adapter_id))


# --- on-demand loading and the host tier ---------------------------------------------------------
def test_on_demand_loading_from_the_adapter_root(srv, dirs):
    assert "od-qv" not in listed(srv)
    got = tokens(srv.gen, "od-qv")
    info = listed(srv)["od-qv"]
    assert info.source == str((dirs.ondemand / "od-qv").resolve())
    assert info.tier == apb.ADAPTER_TIER_DEVICE and not info.pinned
    load(srv, "same-as-od", dirs.library / "qv_r4")  # the same weights, loaded explicitly
    assert tokens(srv.gen, "same-as-od") == got
    srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="same-as-od"))

    snapshot = listed(srv)
    err = rpc_error(srv.gen.Generate, greedy_req("od-missing"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and err.details().startswith("adapter_id: ")
    assert "od-missing" in err.details()
    err = rpc_error(srv.gen.Generate, greedy_req("od-dora"))  # exists, but not servable
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("adapter_id: ") and "use_dora" in err.details()
    err = rpc_error(lambda r: list(srv.gen.GenerateStream(r)), greedy_req("od-link"))  # symlink out
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("adapter_id: ") and "outside" in err.details()
    assert listed(srv) == snapshot


def test_pool_overflow_evicts_to_disk_and_reloads(small):
    """At most two adapters resident (--max-loras 2): using a third evicts the least recently used
    idle one to DISK; using it again reads it back transparently, with the same tokens."""
    first = {k: tokens(small.gen, k) for k in KINDS[:3]}
    tiers = {k: a.tier for k, a in listed(small).items()}
    assert tiers[KINDS[0]] == apb.ADAPTER_TIER_DISK, tiers
    assert tiers[KINDS[2]] == apb.ADAPTER_TIER_DEVICE and tiers[KINDS[1]] == apb.ADAPTER_TIER_DEVICE
    reloads = small.manager.stats.loads.get("disk_reload", 0)
    assert tokens(small.gen, KINDS[0]) == first[KINDS[0]]
    assert small.manager.stats.loads["disk_reload"] == reloads + 1
    assert listed(small)[KINDS[0]].tier == apb.ADAPTER_TIER_DEVICE
    assert listed(small)[KINDS[1]].tier == apb.ADAPTER_TIER_DISK  # now the least recently used
    for k in KINDS[:3]:  # round robin: every use of an evicted adapter is a reload, all correct
        assert tokens(small.gen, k) == first[k]
    assert small.manager.stats.device_evictions >= 4


def test_more_busy_adapters_than_room_wait_and_all_complete(small):
    """Three adapters at once where two fit: requests for the third wait (the prefetcher brings it
    in when one goes idle) and every request completes with the right tokens."""
    first = {k: tokens(small.gen, k, n=30) for k in KINDS[:3]}
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda k: (k, tokens(small.gen, k, n=30)), [k for k in KINDS[:3] for _ in range(2)]))
    for k, got in results:
        assert got == first[k]


@pytest.mark.parametrize("damage", ["corrupt", "gone"])
def test_evicted_adapter_whose_folder_breaks_fails_only_its_requests(small, dirs, damage):
    """An adapter evicted from the pool is read again by the prefetcher when a request names it:
    if its file became corrupt meanwhile the request gets INVALID_ARGUMENT, if its folder is gone
    NOT_FOUND; requests for the other adapters go on, and a repaired folder serves again."""
    name = f"fragile-{damage}"
    folder = shutil.copytree(dirs.library / KINDS[0], dirs.ondemand_small / name)
    want = tokens(small.gen, name)  # read on demand, into the pool
    for kind in KINDS[1:3]:  # two others take both places: the fragile adapter goes to disk
        tokens(small.gen, kind)
    assert listed(small)[name].tier == apb.ADAPTER_TIER_DISK
    weights = folder / "adapter_model.safetensors"
    good = weights.read_bytes()
    if damage == "corrupt":
        weights.write_bytes(good[: len(good) // 3])
    else:
        shutil.rmtree(folder)
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(small.gen.Generate, greedy_req(name))
        other = pool.submit(tokens, small.gen, KINDS[1])
        err = bad.exception(timeout=60)
        assert len(other.result(timeout=60)) == 10
    assert isinstance(err, grpc.RpcError), err
    code = grpc.StatusCode.INVALID_ARGUMENT if damage == "corrupt" else grpc.StatusCode.NOT_FOUND
    assert err.code() == code and err.details().startswith("adapter_id:"), (err.code(), err.details())
    folder.mkdir(exist_ok=True)
    shutil.copytree(dirs.library / KINDS[0], folder, dirs_exist_ok=True)
    assert tokens(small.gen, name) == want
    small.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=name))
    shutil.rmtree(folder)


# --- hostile and corrupt input -------------------------------------------------------------------
def _bad_loads(d) -> dict[str, tuple[str, Path | str, grpc.StatusCode, tuple[str, ...]]]:
    """case -> (adapter_id, path, code, what the details must name)."""
    ok = d.library / "qv_r4"
    inval = grpc.StatusCode.INVALID_ARGUMENT
    return {
        "id ../x": ("../x", ok, inval, ("adapter_id",)),
        "id a/b": ("a/b", ok, inval, ("adapter_id",)),
        "id .hidden": (".hidden", ok, inval, ("adapter_id",)),
        "id empty": ("", ok, inval, ("adapter_id",)),
        "path outside the roots": ("x1", d.outside / "qv_r4", inval, ("path", "outside")),
        "path escaping with ..": ("x2", d.library / ".." / "outside" / "qv_r4", inval, ("path", "outside")),
        "symlink leaving the root": ("x3", d.library / "link_out", inval, ("path", "outside")),
        "weights file symlinked outside": ("x4", d.library / "file_link", inval,
                                           ("path", "adapter_model.safetensors", "symlink")),
        "truncated safetensors": ("x5", d.library / "truncated", inval, ("path", "adapter_model.safetensors")),
        "made for another base": ("x6", d.library / "other_base", inval, ("path", "lora_A", "shape")),
        "rank above max_lora_rank": ("x7", d.library / "all_r8_rslora", inval, ("path", "max_rank=6")),
        "DoRA": ("x8", d.library / "dora", inval, ("path", "use_dora")),
        "a file, not a folder": ("x9", d.library / "qv_r4" / "adapter_config.json", inval,
                                 ("path", "not a folder")),
        "empty path": ("x10", "", inval, ("path",)),
        "missing folder": ("x11", d.library / "nope", grpc.StatusCode.NOT_FOUND, ("path",)),
    }


BAD_LOAD_CASES = sorted(_bad_loads(SimpleNamespace(library=Path("l"), outside=Path("o"))))


@pytest.mark.parametrize("case", BAD_LOAD_CASES)
def test_bad_load_is_refused_and_changes_nothing(srv, dirs, case):
    adapter_id, path, code, names = _bad_loads(dirs)[case]
    snapshot = listed(srv)
    err = rpc_error(load, srv, adapter_id, path)
    assert err.code() == code, err.details()
    assert err.details().startswith(f"{names[0]}: "), err.details()
    for name in names[1:]:
        assert name in err.details(), err.details()
    assert listed(srv) == snapshot


@pytest.mark.parametrize("adapter_id", ["../x", "a/b", ".hidden", "..", "x/../../etc"])
def test_generate_with_a_path_like_adapter_id_is_invalid_argument(srv, adapter_id):
    snapshot = listed(srv)
    for call in (srv.gen.Generate, lambda r: list(srv.gen.GenerateStream(r))):
        err = rpc_error(call, greedy_req(adapter_id))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert err.details().startswith("adapter_id: "), err.details()
    assert listed(srv) == snapshot


def test_unload_errors(srv):
    err = rpc_error(srv.adapters.UnloadAdapter, apb.UnloadAdapterRequest(adapter_id="never-loaded"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and err.details().startswith("adapter_id: ")
    err = rpc_error(srv.adapters.UnloadAdapter, apb.UnloadAdapterRequest(adapter_id="../x"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("adapter_id: ")
