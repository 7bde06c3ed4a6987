"""Drain on SIGTERM, on a real `loraplex serve` process: grpc.health turns NOT_SERVING and HTTP
/health 503 at once; new requests (gRPC Generate, LoadAdapter, HTTP completions) are refused with
UNAVAILABLE / 503; requests in flight that can finish within --drain-timeout finish normally; the
ones still running when it passes end with UNAVAILABLE naming the drain timeout; the process exits
0 soon after. Engine steps are slowed by a fixed delay in the child (tests/fixtures/slow_steps), so
"short" and "long" do not depend on this machine's speed.
(tests/test_faults.py checks the other side: a stream that fits the timeout is not cut short.)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.api.pb.loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.serve_process import http_url, start_serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DRAIN = 5.0
STEP_DELAY = 0.03  # >= 30 ms a step: a 480-token stream takes >= 14 s, far past DRAIN
SLOW = str(Path(__file__).parent / "fixtures" / "slow_steps")


def test_sigterm_drains_then_cancels_with_unavailable(tiny_model_dir, tmp_path):
    make_peft_adapter(tiny_model_dir, tmp_path / "lib" / "poet", "qv_r4", seed=7)
    env = dict(os.environ, HF_HUB_OFFLINE="1", LORAPLEX_TEST_STEP_DELAY=str(STEP_DELAY),
               PYTHONPATH=os.pathsep.join([SLOW] + sys.path))
    proc, address, log = start_serve(
        [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(tiny_model_dir), "--port", "0",
         "--http-port", "0", "--dtype", "float32", "--device", "cpu", "--num-kv-blocks", "256",
         "--max-model-len", "512", "--max-new-tokens-cap", "500", "--drain-timeout", str(DRAIN),
         "--allowed-adapter-root", str(tmp_path / "lib"), "--max-lora-rank", "8"], env)
    url = http_url(log)
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    reader.start()
    results: dict[str, object] = {}
    started = threading.Barrier(7)
    try:
        with grpc.insecure_channel(address) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

            def stream(name: str, n: int) -> None:
                tokens = []
                try:
                    it = stub.GenerateStream(pb.GenerateRequest(prompt="Once upon a time", request_id=name,
                                                                sampling=pb.SamplingParams(max_new_tokens=n, temperature=0.0,
                                                                                           ignore_eos=True)), timeout=120)
                    first = next(it)
                    tokens += first.token_ids
                    started.wait(timeout=60)
                    last = first
                    for last in it:
                        tokens += last.token_ids
                    results[name] = ("ok", len(tokens), last.finish_reason, time.monotonic())
                except grpc.RpcError as err:
                    results[name] = (err.code(), len(tokens), err.details(), time.monotonic())

            threads = [threading.Thread(target=stream, args=(f"long{i}", 480)) for i in range(3)]
            threads += [threading.Thread(target=stream, args=(f"short{i}", 6)) for i in range(3)]
            for t in threads:
                t.start()
            started.wait(timeout=60)  # every stream has its first token: all six are in flight
            t_term = time.monotonic()
            proc.send_signal(signal.SIGTERM)

            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert time.monotonic() - t_term < 2.0  # at once, not at the drain's end
            watch.cancel()
            r = httpx.get(f"{url}/health", timeout=10)
            assert r.status_code == 503, r.text
            r = httpx.post(f"{url}/v1/completions", json={"model": "x", "prompt": "hi", "max_tokens": 2}, timeout=10)
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error", r.text
            with pytest.raises(grpc.RpcError) as exc:
                stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in exc.value.details()
            with pytest.raises(grpc.RpcError) as exc:
                adapters_pb2_grpc.AdaptersStub(ch).LoadAdapter(apb.LoadAdapterRequest(
                    adapter_id="poet", path=str(tmp_path / "lib" / "poet")), timeout=10)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in exc.value.details()
            for t in threads:
                t.join(timeout=60)

        for i in range(3):  # in flight and short: finished, whole
            status, n, reason, _ = results[f"short{i}"]
            assert (status, n, reason) == ("ok", 6, pb.FINISH_REASON_LENGTH), results[f"short{i}"]
        for i in range(3):  # still running when the drain timeout passed: UNAVAILABLE, part-way
            status, n, details, t_end = results[f"long{i}"]
            assert status == grpc.StatusCode.UNAVAILABLE, results[f"long{i}"]
            assert "drain timeout" in details and 1 <= n < 480, results[f"long{i}"]
            assert DRAIN - 0.5 <= t_end - t_term < DRAIN + 10, t_end - t_term
        assert proc.wait(timeout=30) == 0, "".join(log)
        assert time.monotonic() - t_term < DRAIN + 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
