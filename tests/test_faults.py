"""Fault injection, end to end through gRPC on the tiny random Llama (issue 6, item 3).

- A step that fails while it is scheduled, while its ForwardBatch is built, or in the model forward
  fails exactly the requests in it (INTERNAL naming the request id), frees their KV blocks and
  adapter reservations; a request waiting behind them and later ones complete with the same tokens
  as without the fault.
- Out of memory while an adapter is read from its folder or copied to the host tier (LoadAdapter and
  the on-demand path of Generate) is RESOURCE_EXHAUSTED and changes nothing; out of memory while it
  is copied into a device slot (at admission, in the engine thread) fails that request only and
  leaves no slot assigned. The same adapter works afterwards, with the right weights.
- A client that goes away mid-request (channel closed, call cancelled) is aborted within a few
  steps, its KV blocks freed, while other streams go on.
- SIGTERM on a real `loraplex serve` process drains: health NOT_SERVING, new calls UNAVAILABLE, the
  running stream finishes normally within the grace period, exit status 0.

Already covered elsewhere (not repeated here): a failing model runner at the engine level
(test_engine.py::test_exception_in_a_step_fails_only_its_requests), `stream.cancel()` and a passed
deadline freeing KV (test_grpc_server.py), in-process graceful shutdown cancelling past the grace
(test_grpc_server.py::test_health_lifecycle_and_graceful_shutdown), plain SIGTERM exit 0
(test_cli.py::test_serve_process_end_to_end), failed (corrupt) loads changing nothing.

Requests that must still be in flight when something happens to them run on a model runner slowed
by a fixed sleep per step, so outcomes do not depend on this machine's speed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import loraplex.lora.manager as manager_module
from loraplex.api.pb.loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.config import EngineConfig, LoraConfig
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, build_lora_manager, start_engine
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.engine_run import slow_steps
from tests.fixtures.serve_process import start_serve

pytestmark = pytest.mark.timeout(180)

# max_num_seqs=2: with A and B running, C must wait.
ENGINE = EngineConfig(block_size=16, num_kv_blocks=128, max_num_seqs=2, max_num_batched_tokens=256,
                      max_model_len=512, max_new_tokens_cap=1000, max_waiting=64)
OOM_ERRORS = {"MemoryError": MemoryError, "torch.OutOfMemoryError": torch.OutOfMemoryError}


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_model_dir):
    top = tmp_path_factory.mktemp("fault_adapters")
    d = SimpleNamespace(library=top / "library", ondemand=top / "ondemand")
    make_peft_adapter(tiny_model_dir, d.library / "poet", "patterns_r6", seed=11)
    shutil.copytree(d.library / "poet", d.ondemand / "od-poet")
    return d


@pytest.fixture(scope="module")
def srv(tiny_model_dir, dirs):
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    manager = build_lora_manager(loaded, LoraConfig(
        max_loras=2, max_lora_rank=8, max_cpu_loras=4, adapter_root=str(dirs.ondemand),
        allowed_roots=(str(dirs.library),)))
    server = ServerThread(start_engine(loaded, ENGINE, manager)).start()
    with grpc.insecure_channel(server.address) as ch:
        yield SimpleNamespace(server=server, address=server.address, channel=ch,
                              gen=generation_pb2_grpc.GenerationStub(ch),
                              adapters=adapters_pb2_grpc.AdaptersStub(ch),
                              engine=server.server.runtime.engine, manager=manager)
    server.stop()


# --- helpers -------------------------------------------------------------------------------------
def greedy_req(prompt: str, n: int, adapter_id: str = "", request_id: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, adapter_id=adapter_id, request_id=request_id,
                              sampling=pb.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))


def tokens(stub, prompt: str, n: int, adapter_id: str = "") -> list[int]:
    resp = stub.Generate(greedy_req(prompt, n, adapter_id), timeout=60)
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH and len(resp.token_ids) == n
    return list(resp.token_ids)


def wait_for(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def wait_idle(engine, timeout: float = 20.0):
    wait_for(lambda: (lambda st: st.kv_blocks_used == st.num_running == st.num_waiting == 0)(engine.stats()),
             timeout, "an idle engine")
    return engine.stats()


def assert_no_leaked_blocks(engine) -> None:
    """Every used KV block belongs to a request still in flight (read between two steps)."""
    with engine._step_lock:
        live = list(engine._live.values())
        assert engine.stats().kv_blocks_used == sum(len(s.block_table) for s in live)


def listed(s) -> dict[str, apb.AdapterInfo]:
    return {a.adapter_id: a for a in s.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}


def manager_state(m) -> tuple:
    """What a failed load must leave exactly as it was: ids, tiers, slots, ranks, pool extents."""
    with m._lock:
        return (sorted((e.adapter_id, e.slot, e.offset, e.resident, e.host is not None, e.in_flight,
                        e.slot_users, e.pinned) for e in m._entries.values()),
                list(m._slot_owner), m.pool.slot_ranks.tolist(), m.pool.allocator.extents(),
                m.pool_used_bytes)


def stable_listing(s) -> dict:
    """ListAdapters without last_used (a read of the listing does not use an adapter, but a
    reference generation before the snapshot may still be settling)."""
    out = {}
    for k, a in listed(s).items():
        a.last_used_unix_seconds = 0
        out[k] = a
    return out


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value


# --- (a)/(b) an exception while building or running a step -----------------------------------------
def _inject(monkeypatch, engine, stage: str, doomed: set[str]) -> list[set[str]]:
    """Make the step holding any `doomed` request fail at `stage`; returns the failed steps' ids."""
    failed_steps: list[set[str]] = []

    def check(ids: set[str], exc: Exception) -> None:
        if ids & doomed:
            failed_steps.append(ids)
            raise exc

    if stage == "schedule":  # the scheduler admitted the batch, then broke
        schedule = engine.scheduler.schedule

        def bad_schedule():
            batch = schedule()
            check({s.request_id for s in batch.seqs}, RuntimeError("injected scheduler failure"))
            return batch

        monkeypatch.setattr(engine.scheduler, "schedule", bad_schedule)
    elif stage == "prepare":  # building the flat ForwardBatch
        prepare = engine.runner.prepare

        def bad_prepare(seqs, num_new_tokens):
            check({s.request_id for s in seqs}, RuntimeError("injected batch-build failure"))
            return prepare(seqs, num_new_tokens)

        monkeypatch.setattr(engine.runner, "prepare", bad_prepare)
    elif stage == "forward":  # inside the model call, after the batch was built
        prepare, model = engine.runner.prepare, engine.runner.model
        current: list[set[str]] = [set()]

        def recording_prepare(seqs, num_new_tokens):
            current[0] = {s.request_id for s in seqs}
            return prepare(seqs, num_new_tokens)

        def bad_model(batch, kv, **kw):
            out = model(batch, kv, **kw)  # the KV cache is written: the fault comes late in the forward
            check(current[0], torch.OutOfMemoryError("injected out of memory in the forward"))
            return out

        monkeypatch.setattr(engine.runner, "prepare", recording_prepare)
        monkeypatch.setattr(engine.runner, "model", bad_model)
    else:
        raise ValueError(stage)
    return failed_steps


@pytest.mark.parametrize("stage", ["schedule", "prepare", "forward"])
def test_a_failing_step_fails_only_its_requests(srv, dirs, monkeypatch, stage):
    engine, prompts = srv.engine, ("The quick brown fox", "Once upon a time", "What is two plus two")
    srv.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id="poet", path=str(dirs.library / "poet")))
    ref_c = tokens(srv.gen, prompts[2], 40)
    ref_d = tokens(srv.gen, prompts[0], 8, adapter_id="poet")
    errors_before = engine.stats().finished_total["error"]
    wait_idle(engine)

    rid = {k: f"{stage}-{k}-{time.monotonic_ns()}" for k in "abcd"}
    failed_steps = _inject(monkeypatch, engine, stage, {rid["a"], rid["b"]})
    slow_steps(monkeypatch, engine, 0.02)  # C (40 tokens) is still running when A/B have failed
    with ThreadPoolExecutor(3) as pool:
        # Hold the step loop so A, B and C reach the same step: A and B are admitted together
        # (max_num_seqs=2), C waits behind them.
        with engine._step_lock:
            fut_a = pool.submit(lambda: list(srv.gen.GenerateStream(
                greedy_req(prompts[0], 30, "poet", rid["a"]), timeout=60)))
            wait_for(lambda: engine.stats().num_waiting == 1, what="A queued")
            fut_b = pool.submit(srv.gen.Generate, greedy_req(prompts[1], 30, "", rid["b"]), timeout=60)
            wait_for(lambda: engine.stats().num_waiting == 2, what="B queued")
            fut_c = pool.submit(srv.gen.Generate, greedy_req(prompts[2], 40, "", rid["c"]), timeout=60)
            wait_for(lambda: engine.stats().num_waiting == 3, what="C queued")
        for key, fut in (("a", fut_a), ("b", fut_b)):
            err = fut.exception(timeout=60)
            assert isinstance(err, grpc.RpcError), f"{key}: {err!r}"
            assert err.code() == grpc.StatusCode.INTERNAL, err.details()
            assert rid[key] in err.details() and "injected" in err.details(), err.details()
        assert failed_steps == [{rid["a"], rid["b"]}]  # one step failed, holding exactly A and B
        assert engine.stats().finished_total["error"] == errors_before + 2
        assert_no_leaked_blocks(engine)  # A's and B's blocks went back while C runs
        assert listed(srv)["poet"].requests_in_flight == 0  # A's adapter reservation was returned
        resp_c = fut_c.result(timeout=60)
    assert resp_c.finish_reason == pb.FINISH_REASON_LENGTH and list(resp_c.token_ids) == ref_c
    resp_d = srv.gen.Generate(greedy_req(prompts[0], 8, "poet", rid["d"]), timeout=60)  # a later request
    assert list(resp_d.token_ids) == ref_d
    st = wait_idle(engine)
    assert st.finished_total["error"] == errors_before + 2
    with srv.manager._lock:
        assert srv.manager._entries["poet"].slot_users == 0


def test_repeated_schedule_failures_fail_the_waiting_requests_too(srv, monkeypatch):
    """A scheduler that keeps failing must not keep requests waiting forever: the second failure in
    a row fails the waiting ones as well, and the engine serves again once it recovers."""
    engine = srv.engine
    wait_idle(engine)
    schedule, broken = engine.scheduler.schedule, [True]

    def bad_schedule():
        if broken[0]:
            raise RuntimeError("injected persistent scheduler failure")
        return schedule()

    monkeypatch.setattr(engine.scheduler, "schedule", bad_schedule)
    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(srv.gen.Generate, greedy_req("hello", 5, request_id=f"stuck-{i}"), timeout=60)
                for i in range(2)]
        for i, fut in enumerate(futs):
            err = fut.exception(timeout=60)
            assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INTERNAL
            assert f"stuck-{i}" in err.details() and "persistent scheduler failure" in err.details()
    broken[0] = False
    assert len(tokens(srv.gen, "hello", 5)) == 5
    wait_idle(engine)


def test_a_crash_while_taking_in_requests_fails_them_instead_of_losing_them(srv, monkeypatch):
    """A request the step loop takes out of its inbox but fails to queue (a crash in the scheduler's
    add) is in no queue: it must still get its finished event (INTERNAL), not hang its client."""
    engine = srv.engine
    wait_idle(engine)
    add = engine.scheduler.add

    def bad_add(seq, *args, **kwargs):
        if seq.request_id == "lost-in-drain":
            raise RuntimeError("injected failure while queueing")
        return add(seq, *args, **kwargs)

    monkeypatch.setattr(engine.scheduler, "add", bad_add)
    err = rpc_error(srv.gen.Generate, greedy_req("hello", 5, request_id="lost-in-drain"), timeout=30)
    assert err.code() == grpc.StatusCode.INTERNAL, err.details()
    assert "lost-in-drain" in err.details() and "injected failure while queueing" in err.details()
    assert "lost-in-drain" not in engine._live
    assert len(tokens(srv.gen, "hello", 5)) == 5  # the loop goes on
    wait_idle(engine)


# --- (c) out of memory while loading an adapter ----------------------------------------------------
def _oom_at(monkeypatch, stage: str, error: type[BaseException]) -> list[int]:
    calls = [0]

    def boom(*args, **kwargs):
        calls[0] += 1
        raise error("injected: cannot allocate 64 MiB")

    if stage == "read":  # reading + decoding the folder (safetensors -> float32 tensors)
        monkeypatch.setattr(manager_module, "read_adapter", boom)
    elif stage == "host":  # the cast / pinned copy into host memory (CUDA), before the pool
        monkeypatch.setattr(manager_module.LoraManager, "_to_host", boom)
    else:
        raise ValueError(stage)
    return calls


@pytest.mark.parametrize("error", sorted(OOM_ERRORS))
@pytest.mark.parametrize("stage", ["read", "host"])
@pytest.mark.parametrize("path", ["LoadAdapter", "on-demand Generate"])
def test_out_of_memory_while_loading_is_resource_exhausted_and_changes_nothing(srv, dirs, monkeypatch,
                                                                              stage, error, path):
    adapter_id = "oom-probe" if path == "LoadAdapter" else "od-poet"
    for a in listed(srv):  # a clean slate for this id (an earlier case may have loaded it)
        if a == adapter_id:
            srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=a))
    wait_idle(srv.engine)
    before_list, before_state = stable_listing(srv), manager_state(srv.manager)
    calls = _oom_at(monkeypatch, stage, OOM_ERRORS[error])
    load_req = apb.LoadAdapterRequest(adapter_id=adapter_id, path=str(dirs.library / "poet"))
    if path == "LoadAdapter":
        err = rpc_error(srv.adapters.LoadAdapter, load_req, timeout=60)
        field = "path"
    else:
        err = rpc_error(srv.gen.Generate, greedy_req("hello", 4, adapter_id), timeout=60)
        field = "adapter_id"
    assert calls[0] == 1  # the fault really was hit at this stage
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert err.details().startswith(f"{field}: out of memory"), err.details()
    assert "injected" in err.details()
    assert stable_listing(srv) == before_list
    assert manager_state(srv.manager) == before_state
    assert srv.engine.stats().num_waiting == 0
    monkeypatch.undo()
    if path == "LoadAdapter":  # the same adapter loads fine afterwards
        info = srv.adapters.LoadAdapter(load_req, timeout=60).adapter
        assert info.adapter_id == adapter_id and info.tier == apb.ADAPTER_TIER_DEVICE
    assert len(tokens(srv.gen, "hello", 4, adapter_id)) == 4
    srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=adapter_id))


@pytest.mark.parametrize("path", ["LoadAdapter", "on-demand Generate"])
def test_an_unexpected_error_while_loading_is_internal_with_a_message(srv, dirs, monkeypatch, path):
    """A bug in the load path (not a bad folder, not out of memory) is INTERNAL naming the error,
    not grpc's bare UNKNOWN, and changes nothing."""
    if "od-poet" in listed(srv):  # so that the Generate must read its folder
        srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="od-poet"))
    wait_idle(srv.engine)
    before_list, before_state = stable_listing(srv), manager_state(srv.manager)

    def broken(*args, **kwargs):
        raise KeyError("injected bug")

    monkeypatch.setattr(manager_module, "read_adapter", broken)
    if path == "LoadAdapter":
        err = rpc_error(srv.adapters.LoadAdapter, apb.LoadAdapterRequest(
            adapter_id="bug-probe", path=str(dirs.library / "poet")), timeout=60)
    else:
        err = rpc_error(srv.gen.Generate, greedy_req("hello", 4, "od-poet"), timeout=60)
    assert err.code() == grpc.StatusCode.INTERNAL, err.details()
    assert "KeyError" in err.details() and "injected bug" in err.details(), err.details()
    assert stable_listing(srv) == before_list and manager_state(srv.manager) == before_state


@pytest.mark.parametrize("error", sorted(OOM_ERRORS))
@pytest.mark.parametrize("back_from", ["spill", "disk"])
def test_out_of_memory_while_writing_into_the_pool(srv, dirs, monkeypatch, error, back_from):
    """The pool write fails half way (after some modules are written): LoadAdapter gets
    RESOURCE_EXHAUSTED and the manager is as it was; when the background prefetcher hits it
    (bringing an evicted adapter back from its spilled extent, or from disk), the request that
    waits for the adapter fails with RESOURCE_EXHAUSTED, the others go on, and the next request
    writes the adapter afresh."""
    for a in listed(srv):
        srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=a))
    srv.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id="pool-ref", path=str(dirs.library / "poet")))
    ref = tokens(srv.gen, "The quick brown fox", 12, "pool-ref")
    srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="pool-ref"))
    wait_idle(srv.engine)
    mgr = srv.manager
    real_write = mgr.pool.write
    calls = [0]

    def half_then_boom(offset, layout, weights):
        calls[0] += 1
        blocks = dict(list(layout.blocks.items())[: len(layout.blocks) // 2])
        real_write(offset, type(layout)(blocks=blocks, elems=layout.elems, max_rank=layout.max_rank), weights)
        raise OOM_ERRORS[error]("injected pool write failure")

    # 1. LoadAdapter: refused, nothing changes.
    before_state, before_list = manager_state(mgr), stable_listing(srv)
    monkeypatch.setattr(mgr.pool, "write", half_then_boom)
    err = rpc_error(srv.adapters.LoadAdapter, apb.LoadAdapterRequest(
        adapter_id="pool-oom", path=str(dirs.library / "poet")), timeout=60)
    assert calls[0] == 1 and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "injected pool write failure" in err.details()
    assert manager_state(mgr) == before_state and stable_listing(srv) == before_list
    monkeypatch.undo()

    # 2. In the prefetcher: registered and evicted (its extent spilled to the host tier, or
    # dropped: to disk), then a request brings it back.
    srv.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id="pool-oom", path=str(dirs.library / "poet")))
    with mgr._lock:
        entry = mgr._entries["pool-oom"]
        mgr._evict(entry)
        assert entry.spilled is not None
        if back_from == "disk":
            entry.spilled = None
    wait_idle(srv.engine)
    before_state = manager_state(mgr)
    real_write_extent = mgr.pool.write_extent

    def half_extent_then_boom(offset, extent):
        calls[0] += 1
        real_write_extent(offset, extent[: extent.numel() // 2])
        raise OOM_ERRORS[error]("injected pool write failure")

    if back_from == "disk":
        monkeypatch.setattr(mgr.pool, "write", half_then_boom)
    else:
        monkeypatch.setattr(mgr.pool, "write_extent", half_extent_then_boom)
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(srv.gen.Generate, greedy_req("The quick brown fox", 12, "pool-oom", "pool-oom-req"),
                          timeout=60)
        base = pool.submit(srv.gen.Generate, greedy_req("Once upon a time", 12), timeout=60)
        err = bad.exception(timeout=60)
        assert base.result(timeout=60).finish_reason == pb.FINISH_REASON_LENGTH  # others go on
    assert calls[0] >= 2  # an admission check racing the failure may have asked for one retry
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert err.details().startswith("adapter_id: out of memory"), err.details()
    assert "injected pool write failure" in err.details()
    wait_idle(srv.engine)

    def without_host(state):  # the weights read for the failed write may stay in host memory
        return ([e[:4] + e[5:] for e in state[0]],) + state[1:]

    assert without_host(manager_state(mgr)) == without_host(before_state)
    monkeypatch.undo()
    assert tokens(srv.gen, "The quick brown fox", 12, "pool-oom") == ref
    srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="pool-oom"))


# --- (d) a client that goes away ---------------------------------------------------------------------
def test_client_disconnect_mid_stream_aborts_within_a_few_steps(srv, monkeypatch):
    engine = srv.engine
    wait_idle(engine)
    slow_steps(monkeypatch, engine, 0.03)  # 150 tokens take >= 4.5 s
    cancelled = engine.stats().finished_total["cancelled"]
    with ThreadPoolExecutor(1) as pool:
        # The survivor must outlive the leaver's abort by a margin: 150 tokens take >= 4.5 s
        # (60 did not always, once the engine's steps got faster: it had finished by then).
        other = pool.submit(lambda: list(srv.gen.GenerateStream(
            greedy_req("Once upon a time", 150, request_id="survivor"), timeout=60)))
        ch = grpc.insecure_channel(srv.address)
        stream = generation_pb2_grpc.GenerationStub(ch).GenerateStream(
            greedy_req("The quick brown fox", 150, request_id="leaver"), timeout=60)
        first = next(stream)
        assert first.request_id == "leaver" and len(first.token_ids) >= 1
        wait_for(lambda: "leaver" in engine._live, what="leaver running")
        steps_at_close = engine.stats().steps_total
        ch.close()  # the client goes away without cancelling first
        wait_for(lambda: "leaver" not in engine._live, timeout=10, what="leaver aborted")
        steps_to_abort = engine.stats().steps_total - steps_at_close
        assert steps_to_abort <= 3, steps_to_abort
        assert engine.stats().finished_total["cancelled"] == cancelled + 1
        assert_no_leaked_blocks(engine)
        assert "survivor" in engine._live  # the other stream goes on
        chunks = other.result(timeout=60)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(c.token_ids) for c in chunks) == 150
    wait_idle(engine)


def test_cancelled_unary_call_is_aborted(srv, monkeypatch):
    engine = srv.engine
    wait_idle(engine)
    slow_steps(monkeypatch, engine, 0.03)
    cancelled = engine.stats().finished_total["cancelled"]
    fut = srv.gen.Generate.future(greedy_req("The quick brown fox", 150, request_id="unary-leaver"), timeout=60)
    wait_for(lambda: engine.stats().num_running == 1 and engine.stats().kv_blocks_used > 0, what="running")
    assert fut.cancel()
    wait_for(lambda: engine.stats().finished_total["cancelled"] == cancelled + 1, timeout=10, what="abort")
    st = wait_idle(engine, timeout=10)
    assert st.kv_blocks_used == 0
    assert len(tokens(srv.gen, "hello", 3)) == 3


# --- (e) SIGTERM on a real server process ------------------------------------------------------------
GRACE = 60.0  # far above the stream's few seconds, even on a loaded machine


def test_sigterm_drains_a_real_server(tiny_model_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc, address, log = start_serve(
        [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(tiny_model_dir), "--port", "0",
         "--http-port", "0", "--dtype", "float32", "--device", "cpu", "--num-kv-blocks", "64", "--max-model-len", "512",
         "--max-new-tokens-cap", "500", "--shutdown-grace", str(GRACE)], env)
    try:
        reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)  # keep draining
        reader.start()

        with grpc.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = generation_pb2_grpc.GenerationStub(ch)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            # 300 tokens: seconds of decoding (>= 3 s here), far below the grace period.
            n = 300
            stream = stub.GenerateStream(pb.GenerateRequest(
                prompt="Once upon a time", request_id="drain-me", sampling=pb.SamplingParams(
                    max_new_tokens=n, temperature=0.0, ignore_eos=True)), timeout=60)
            chunks = [next(stream)]
            t_term = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # Health turns NOT_SERVING at once (seen on the open Watch; new calls cannot get in).
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()  # an open Watch would otherwise hold the server until its grace ends
            # While the stream drains the server still listens: a fresh Health.Check reads
            # NOT_SERVING and a new Generate is refused with UNAVAILABLE (fresh or open channel).
            with grpc.insecure_channel(address) as ch2:
                assert health_pb2_grpc.HealthStub(ch2).Check(health_pb2.HealthCheckRequest(), timeout=10).status \
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                err = rpc_error(generation_pb2_grpc.GenerationStub(ch2).Generate,
                                pb.GenerateRequest(prompt="hi"), timeout=10)
                assert err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details(), err.details()
            err = rpc_error(stub.Generate, pb.GenerateRequest(prompt="hi"), timeout=10)
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details(), err.details()
            chunks += list(stream)  # the running stream is not cut short
            t_done = time.monotonic()
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH, chunks[-1]
        assert sum(len(c.token_ids) for c in chunks) == n
        assert t_done - t_term < GRACE
        assert proc.wait(timeout=GRACE + 30) == 0, "".join(log)
        assert time.monotonic() - t_done < 15  # exited once drained, not at the grace's end
        reader.join(timeout=10)  # stderr is at EOF once the process is gone
        with grpc.insecure_channel(address) as ch3:  # once stopped: connection refused
            err = rpc_error(health_pb2_grpc.HealthStub(ch3).Check, health_pb2.HealthCheckRequest(), timeout=10)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        # The drain was real: the stream finished after the server began shutting down.
        text = "".join(log)
        began = text.find("shutting down")
        m = re.search(r"request finished id=drain-me .*reason=length", text)
        ended = m.start() if m else -1
        assert 0 <= began < ended, text[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
