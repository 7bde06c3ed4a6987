"""The persistent adapter registry (--state-dir, lora/registry.py): API loads, unloads and pins are
recorded (only once they succeeded) and replayed by the next server on the same state dir; a
recorded adapter whose source vanished or left the roots is listed as FAILED and never stops
start-up; a corrupt or unknown-version file is moved aside; an interrupted write leaves the old
state. Servers are in-process (ServerThread) on the tiny random Llama, spoken to over gRPC/HTTP.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from types import SimpleNamespace

import grpc
import httpx
import pytest
import torch

from loraplex.api.pb.loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.config import EngineConfig, LoraConfig
from loraplex.lora import durable
from loraplex.lora.errors import AdapterStateError
from loraplex.lora.registry import FORMAT, VERSION, Record, Registry
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, build_lora_manager, start_engine
from tests.fixtures.adapters import make_peft_adapter

pytestmark = pytest.mark.timeout(300)

ENGINE = EngineConfig(block_size=16, num_kv_blocks=64, max_num_seqs=8, max_model_len=256)


@pytest.fixture(scope="module")
def lib(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("registry_lib")
    for i, (name, kind) in enumerate([("a", "qv_r4"), ("b", "patterns_r6"), ("c", "qv_r4"), ("flagged", "qv_r4")]):
        make_peft_adapter(tiny_model_dir, root / "library" / name, kind, seed=60 + i)
    shutil.copytree(root / "library" / "a", root / "ondemand" / "od")
    bad = shutil.copytree(root / "library" / "a", root / "library" / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return root


class Server(SimpleNamespace):
    def stop(self):
        self.channel.close()
        self.thread.stop()


def start(tiny_model_dir, lib, state_dir, **kw) -> Server:
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    config = LoraConfig(max_lora_rank=8, allowed_roots=(str(lib / "library"),), adapter_root=str(lib / "ondemand"),
                        preload=(("flagged", str(lib / "library" / "flagged")),), state_dir=str(state_dir), **kw)
    thread = ServerThread(start_engine(loaded, ENGINE, build_lora_manager(loaded, config)), http_port=0).start()
    channel = grpc.insecure_channel(thread.address)
    return Server(thread=thread, channel=channel, gen=generation_pb2_grpc.GenerationStub(channel),
                  adapters=adapters_pb2_grpc.AdaptersStub(channel), manager=thread.server.runtime.lora_manager,
                  http=thread.http_url)


def listed(srv) -> dict[str, apb.AdapterInfo]:
    return {a.adapter_id: a for a in srv.adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=60).adapters}


def load(srv, adapter_id, path, pinned=False):
    return srv.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id=adapter_id, path=str(path), pinned=pinned),
                                    timeout=60)


def greedy(srv, adapter_id) -> list[int]:
    return list(srv.gen.Generate(pb.GenerateRequest(adapter_id=adapter_id, prompt="Once upon a time", sampling=pb.SamplingParams(
        max_new_tokens=10, temperature=0.0, ignore_eos=True)), timeout=60).token_ids)


def recorded(state_dir) -> dict:
    return json.loads((state_dir / "state.json").read_text())


def test_loads_unloads_and_pins_are_recorded_and_replayed(tiny_model_dir, lib, tmp_path):
    state = tmp_path / "state"
    srv = start(tiny_model_dir, lib, state)
    try:
        assert recorded(state) == {"format": FORMAT, "version": VERSION, "adapters": []}  # flags: not recorded
        load(srv, "a", lib / "library" / "a")
        load(srv, "b", lib / "library" / "b", pinned=True)
        load(srv, "c", lib / "library" / "c")
        load(srv, "a", lib / "library" / "a", pinned=True)  # a pin on a loaded adapter
        srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="c"), timeout=60)
        with pytest.raises(grpc.RpcError) as exc:  # a failed load records nothing
            load(srv, "bad", lib / "library" / "bad")
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(greedy(srv, "od")) == 10  # on demand from --adapter-root: not recorded either
        before = {i: greedy(srv, i) for i in ("a", "b", "flagged")}
        lib_real = (lib / "library").resolve()
        assert recorded(state)["adapters"] == [
            {"adapter_id": "a", "source": str(lib_real / "a"), "pinned": True},
            {"adapter_id": "b", "source": str(lib_real / "b"), "pinned": True}]
    finally:
        srv.stop()
    srv = start(tiny_model_dir, lib, state)
    try:
        now = listed(srv)
        assert sorted(now) == ["a", "b", "flagged"]
        assert all(a.state == apb.ADAPTER_STATE_READY and not a.error for a in now.values())
        assert (now["a"].pinned, now["b"].pinned, now["flagged"].pinned) == (True, True, False)
        assert {i: greedy(srv, i) for i in before} == before  # the same weights serve again
        assert before["a"] != before["b"]
        assert sorted(p.name for p in state.iterdir()) == ["state.json"]  # no temp file left
    finally:
        srv.stop()


def test_a_vanished_source_is_listed_failed_and_never_stops_start_up(tiny_model_dir, lib, tmp_path, caplog):
    state = tmp_path / "state"
    gone = shutil.copytree(lib / "library" / "a", lib / "library" / "gone")
    records = [Record("kept", str(lib / "library" / "c"), True), Record("gone", str(gone), False),
               Record("escaped", str(tmp_path), False), Record("s3", "s3://some-bucket/x", False)]
    Registry(state).save(lambda: records)
    shutil.rmtree(gone)
    caplog.set_level(logging.WARNING, logger="loraplex.lora.manager")
    srv = start(tiny_model_dir, lib, state)
    try:
        now = listed(srv)
        assert now["kept"].state == apb.ADAPTER_STATE_READY and now["kept"].pinned
        for adapter_id in ("gone", "escaped", "s3"):
            assert now[adapter_id].state == apb.ADAPTER_STATE_FAILED, now[adapter_id]
            assert now[adapter_id].tier == apb.ADAPTER_TIER_UNSPECIFIED
            assert any(adapter_id in r.getMessage() and "could not be loaded again" in r.getMessage()
                       for r in caplog.records)
        assert "is not a folder" in now["gone"].error
        assert "outside the configured adapter roots" in now["escaped"].error
        from loraplex.client import Client

        with Client(srv.thread.address) as c:  # the Python client shows the same
            typed = {a.adapter_id: a for a in c.list_adapters()}
        assert typed["kept"].state == "ready" and typed["gone"].state == "failed"
        assert typed["gone"].error == now["gone"].error
        with pytest.raises(grpc.RpcError) as exc:  # a failed adapter serves nothing
            greedy(srv, "gone")
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        models = {m["id"] for m in httpx.get(f"{srv.http}/v1/models", timeout=30).json()["data"]}
        assert "kept" in models and not models & {"gone", "escaped", "s3"}
        # Still recorded (its folder may come back), until it is unloaded or loaded again.
        assert {r["adapter_id"] for r in recorded(state)["adapters"]} == {"kept", "gone", "escaped", "s3"}
        srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="escaped"), timeout=60)
        shutil.copytree(lib / "library" / "a", gone)
        assert load(srv, "gone", gone).adapter.state == apb.ADAPTER_STATE_READY
        assert listed(srv)["gone"].state == apb.ADAPTER_STATE_READY
        assert {r["adapter_id"] for r in recorded(state)["adapters"]} == {"kept", "gone", "s3"}
    finally:
        srv.stop()
        shutil.rmtree(gone, ignore_errors=True)


@pytest.mark.parametrize("content", [b"{not json", b'{"format": "other", "version": 1, "adapters": []}',
                                     json.dumps({"format": FORMAT, "version": VERSION + 1, "adapters": []}).encode(),
                                     json.dumps({"format": FORMAT, "version": VERSION, "adapters": [{"adapter_id": 1}]}).encode(),
                                     b"\xff\xfe"])
def test_a_corrupt_state_file_is_moved_aside(tmp_path, caplog, content):
    (tmp_path / "state.json").write_bytes(content)
    caplog.set_level(logging.ERROR, logger="loraplex.lora.registry")
    assert Registry(tmp_path).read() == []
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("state.json.corrupt-")]
    assert aside.read_bytes() == content and not (tmp_path / "state.json").exists()
    [line] = [r.getMessage() for r in caplog.records]
    assert "unusable" in line and str(aside) in line


def test_an_interrupted_write_leaves_the_previous_state(tmp_path, monkeypatch):
    reg = Registry(tmp_path)
    reg.save(lambda: [Record("a", "/x/a", False)])
    old = (tmp_path / "state.json").read_bytes()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "replace", crash)
    with pytest.raises(OSError):
        reg.save(lambda: [Record("a", "/x/a", False), Record("b", "/x/b", True)])
    monkeypatch.undo()
    assert (tmp_path / "state.json").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    # A temp file a killed process left behind is deleted at the next start, and never read.
    (tmp_path / f"state.json{durable.TMP_MARK}123-abcd").write_text("{partial")
    assert Registry(tmp_path).read() == [Record("a", "/x/a", False)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_registry_write_failure_is_reported(tiny_model_dir, lib, tmp_path, monkeypatch):
    srv = start(tiny_model_dir, lib, tmp_path / "state")
    try:
        def full(snapshot):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(srv.manager.registry, "save", full)
        with pytest.raises(grpc.RpcError) as exc:
            load(srv, "a", lib / "library" / "a")
        assert exc.value.code() == grpc.StatusCode.INTERNAL
        assert exc.value.details().startswith("path: state_dir: the change was applied but could not be recorded")
        with pytest.raises(AdapterStateError):
            srv.manager.unload("a")
    finally:
        srv.stop()


def test_pin_and_unpin_are_recorded_and_replayed(tiny_model_dir, lib, tmp_path):
    """PinAdapter pins an API-loaded adapter (into the pool, never evicted) and unpins it; each
    change is recorded in --state-dir and comes back after a restart."""
    from loraplex.client import Client, LoraplexError

    state = tmp_path / "state"
    srv = start(tiny_model_dir, lib, state)
    try:
        load(srv, "a", lib / "library" / "a")
        before = greedy(srv, "a")
        with Client(srv.thread.address) as c:
            assert c.pin_adapter("a").pinned
            assert c.pin_adapter("a").pinned  # again: no change
            assert listed(srv)["a"].tier == apb.ADAPTER_TIER_DEVICE  # in the pool, and stays there
            assert recorded(state)["adapters"] == [{"adapter_id": "a", "source": str(lib / "library" / "a"),
                                                    "pinned": True}]
            with pytest.raises(LoraplexError) as exc:
                c.pin_adapter("never-loaded")
            assert exc.value.code == "NOT_FOUND"
            with pytest.raises(LoraplexError) as exc:
                c.pin_adapter("../escape")
            assert exc.value.code == "INVALID_ARGUMENT"
    finally:
        srv.stop()
    srv = start(tiny_model_dir, lib, state)
    try:
        assert listed(srv)["a"].pinned and greedy(srv, "a") == before
        out = subprocess.run([sys.executable, "-m", "loraplex.cli", "adapters", "pin", "a", "--unpin",
                              "--server", srv.thread.address], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "pinned=false" in out.stdout, out.stdout + out.stderr
        assert not listed(srv)["a"].pinned
        assert recorded(state)["adapters"][0]["pinned"] is False
    finally:
        srv.stop()
    srv = start(tiny_model_dir, lib, state)
    try:
        assert not listed(srv)["a"].pinned
    finally:
        srv.stop()
