"""Crash and restart of a real `loraplex serve` process with --state-dir: adapters are loaded through
the API (two pinned, one loaded then unloaded), 32 client streams keep generating with them, the
process is killed with SIGKILL, the clients see UNAVAILABLE, a new process starts on the same
ports and state dir, the clients' retries succeed, every adapter loaded through the API and every
pin is back (and the unloaded one is not), and the state dir holds no partial file.

The clients retry with a plain bounded loop written here (the client library's own retry policy
is not what is under test).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import defaultdict

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.api.pb.loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.s3_server import free_port
from tests.fixtures.serve_process import start_serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STREAMS = 32
RETRY_FOR = 180.0  # a client gives a request up after retrying this long
# Reconnect quickly once the server is back (gRPC's default backoff grows to minutes).
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 500)]
ADAPTERS = {"poet": True, "chef": True, "bard": False, "sage": False}  # id -> pinned


def serve_argv(model, state, lib, port, http_port) -> list[str]:
    return [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(model), "--port", str(port),
            "--http-port", str(http_port), "--dtype", "float32", "--device", "cpu", "--num-kv-blocks", "512",
            "--max-model-len", "256", "--max-num-seqs", "32", "--max-lora-rank", "8", "--state-dir", str(state),
            "--allowed-adapter-root", str(lib), "--drain-timeout", "1"]


class Client(threading.Thread):
    """Generates in a loop; each request is retried on UNAVAILABLE until it succeeds (bounded)."""

    def __init__(self, index: int, address: str, adapter_ids: list[str], stop: threading.Event):
        super().__init__(daemon=True)
        self.index, self.address, self.adapter_ids, self.stop = index, address, adapter_ids, stop
        self.successes: list[float] = []  # monotonic end times
        self.codes: dict[grpc.StatusCode, int] = defaultdict(int)
        self.failure: str | None = None

    def run(self) -> None:
        with grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            k = 0
            while not self.stop.is_set() and self.failure is None:
                adapter_id = self.adapter_ids[(self.index + k) % len(self.adapter_ids)]
                k += 1
                self._one(stub, adapter_id)

    def _one(self, stub, adapter_id: str) -> None:
        deadline = time.monotonic() + RETRY_FOR
        while True:
            try:
                tokens = [t for chunk in stub.GenerateStream(pb.GenerateRequest(
                    adapter_id=adapter_id, prompt=f"client {self.index} says", sampling=pb.SamplingParams(
                        max_new_tokens=6, temperature=0.0, ignore_eos=True)), timeout=60) for t in chunk.token_ids]
                if len(tokens) != 6:
                    self.failure = f"{adapter_id}: {len(tokens)} tokens"
                self.successes.append(time.monotonic())
                return
            except grpc.RpcError as err:
                self.codes[err.code()] += 1
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    self.failure = f"{adapter_id}: {err.code()} {err.details()}"
                    return
                if time.monotonic() > deadline or self.stop.is_set():
                    self.failure = self.failure or f"{adapter_id}: still UNAVAILABLE after {RETRY_FOR}s"
                    return
                time.sleep(0.1)


def greedy_outputs(address: str) -> dict[str, list[int]]:
    """Each adapter's greedy tokens for one prompt, alone on the server (batch of one)."""
    with grpc.insecure_channel(address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        return {i: list(stub.Generate(pb.GenerateRequest(adapter_id=i, prompt="The weights are", sampling=pb.SamplingParams(
            max_new_tokens=8, temperature=0.0, ignore_eos=True)), timeout=60).token_ids) for i in ADAPTERS}


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def stop_process(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    proc.stderr.close()


def test_sigkill_under_load_and_restart_brings_every_adapter_and_pin_back(tiny_model_dir, tmp_path):
    lib, state = tmp_path / "lib", tmp_path / "state"
    for i, name in enumerate(list(ADAPTERS) + ["gone"]):
        make_peft_adapter(tiny_model_dir, lib / name, "qv_r4" if i % 2 else "patterns_r6", seed=80 + i)
    port, http_port = free_port(), free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    argv = serve_argv(tiny_model_dir, state, lib, port, http_port)
    proc, address, log = start_serve(argv, env)
    stop = threading.Event()
    clients: list[Client] = []
    try:
        reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
        reader.start()
        with grpc.insecure_channel(address) as ch:
            admin = adapters_pb2_grpc.AdaptersStub(ch)
            for adapter_id, pinned in list(ADAPTERS.items()) + [("gone", False)]:
                admin.LoadAdapter(apb.LoadAdapterRequest(adapter_id=adapter_id, path=str(lib / adapter_id),
                                                         pinned=pinned), timeout=60)
            admin.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="gone"), timeout=60)
            before = {a.adapter_id: (a.source, a.pinned, a.max_rank)
                      for a in admin.ListAdapters(apb.ListAdaptersRequest(), timeout=60).adapters}
        assert set(before) == set(ADAPTERS)
        outputs = greedy_outputs(address)
        assert len({tuple(v) for v in outputs.values()}) > 1  # the adapters differ: the check below can fail

        ids = [""] + list(ADAPTERS)  # the base model and every adapter
        clients = [Client(i, address, ids, stop) for i in range(STREAMS)]
        for c in clients:
            c.start()
        wait_for(lambda: sum(len(c.successes) for c in clients) >= 2 * STREAMS, 180, "traffic before the kill")

        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        t_kill = time.monotonic()
        wait_for(lambda: sum(c.codes[grpc.StatusCode.UNAVAILABLE] for c in clients) >= STREAMS, 60,
                 "clients to see UNAVAILABLE")
        stop_process(proc)

        proc, address2, log = start_serve(argv, env)  # same ports, same state dir
        assert address2 == address
        reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
        reader.start()
        t_restart = time.monotonic()
        # Every client's retries get through: a success after the restart, none given up.
        wait_for(lambda: all(c.failure or (c.successes and c.successes[-1] > t_restart) for c in clients), 240,
                 "every client to succeed after the restart")
        stop.set()
        for c in clients:
            c.join(timeout=90)
        failures = [c.failure for c in clients if c.failure]
        assert not failures, failures
        assert all(any(t > t_restart for t in c.successes) for c in clients)
        assert sum(c.codes[grpc.StatusCode.UNAVAILABLE] for c in clients) >= STREAMS
        assert t_restart > t_kill

        with grpc.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            after = {a.adapter_id: a for a in adapters_pb2_grpc.AdaptersStub(ch).ListAdapters(
                apb.ListAdaptersRequest(), timeout=60).adapters}
        assert {i: (a.source, a.pinned, a.max_rank) for i, a in after.items()} == before  # "gone" stays gone
        assert all(a.state == apb.ADAPTER_STATE_READY for a in after.values())
        assert greedy_outputs(address) == outputs  # the same weights, whole
        # No partial state: the state dir holds the one complete file, nothing half-written.
        assert sorted(p.name for p in state.iterdir()) == ["state.json"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(log[-50:])
    finally:
        stop.set()
        stop_process(proc)
