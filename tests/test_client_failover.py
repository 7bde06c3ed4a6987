"""loraplex.client failover (loraplex/failover.py): a call refused with UNAVAILABLE goes to the next
target under a bounded policy; a stream that already delivered tokens is never replayed.

Policy: pure bookkeeping (Attempts) and a stub gRPC server that refuses a set number of calls.
For real: three `loraplex serve` processes on loopback -- a dead address in the list, a replica
draining on SIGTERM (it answers UNAVAILABLE while an old stream finishes), a replica SIGKILLed in
the middle of a stream -- each request followed by id through the replicas' own request logs.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from concurrent import futures

import grpc
import pytest

from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.client import Client, LoraplexError, RetryPolicy
from loraplex.failover import NO_RETRY, Attempts, Targets, parse_targets
from tests.fixtures import scale_out as so

pytestmark = pytest.mark.timeout(300)


# --- the policy alone ---------------------------------------------------------------------------
def test_attempts_rotate_back_off_and_stop():
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.1, max_backoff=0.3, multiplier=2.0)
    targets = Targets(["a", "b"])
    att = Attempts(policy, targets, timeout=None, rng=random.Random(0))
    seen = [att.target]
    waits = []
    while (wait := att.after_failure("UNAVAILABLE")) is not None:
        seen.append(att.target)
        waits.append(wait)
    assert seen == ["a", "b", "a", "b", "a"] and att.count == 5
    assert waits[0] == 0.0  # a target not tried yet: no wait
    for n, w in enumerate(waits[1:], start=1):  # already tried: full jitter under the bound
        assert 0.0 <= w <= policy.backoff_bound(n)
    assert [policy.backoff_bound(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, 0.3]
    assert targets.current == 1  # sticky: the next call starts after the target that failed last
    # Other statuses are answers, not outages.
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "INTERNAL"):
        assert Attempts(policy, Targets(["a", "b"]), None).after_failure(code) is None
    # The deadline bounds waits: none that would end past it.
    slow = RetryPolicy(max_attempts=10, initial_backoff=5.0, max_backoff=5.0)
    att = Attempts(slow, Targets(["only"]), timeout=0.5, rng=random.Random(1))
    stops = [att.after_failure("UNAVAILABLE") for _ in range(10)]
    assert all(s is None or s < 0.5 for s in stops) and None in stops
    assert Attempts(NO_RETRY, Targets(["a", "b"]), None).after_failure("UNAVAILABLE") is None
    assert parse_targets("a:1, b:2") == ("a:1", "b:2") and parse_targets(["x:1"]) == ("x:1",)
    with pytest.raises(ValueError):
        parse_targets(" , ")
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


class Refusing(generation_pb2_grpc.GenerationServicer):
    """Refuses the first `refuse` calls with UNAVAILABLE, then answers; records every call."""

    def __init__(self, refuse: int, code=grpc.StatusCode.UNAVAILABLE, cut_streams: bool = False):
        self.refuse, self.code, self.cut_streams = refuse, code, cut_streams
        self.calls: list[tuple[float, dict]] = []

    def Generate(self, request, context):
        self.calls.append((time.monotonic(), dict(context.invocation_metadata())))
        if len(self.calls) <= self.refuse:
            context.abort(self.code, "draining")
        return pb.GenerateResponse(request_id=request.request_id, text="ok")

    def GenerateStream(self, request, context):
        self.calls.append((time.monotonic(), dict(context.invocation_metadata())))
        if len(self.calls) <= self.refuse:
            context.abort(self.code, "draining")
        yield pb.GenerateStreamResponse(request_id=request.request_id, text="o")
        if self.cut_streams:  # a replica that goes away after the first token
            context.abort(grpc.StatusCode.UNAVAILABLE, "gone")
        yield pb.GenerateStreamResponse(request_id=request.request_id, text="k",
                                        finish_reason=pb.FINISH_REASON_LENGTH)


def stub_server(servicer):
    server = grpc.server(futures.ThreadPoolExecutor(4))
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_one_target_retries_with_backoff_and_sends_the_header():
    servicer = Refusing(refuse=2)
    server, address = stub_server(servicer)
    try:
        policy = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=0.2)
        with Client(address, retry=policy, timeout=30) as c:
            assert c.generate("Hi", adapter="sql", request_id="r1").text == "ok"
            assert len(servicer.calls) == 3
            assert all(md.get("x-adapter-id") == "sql" for _, md in servicer.calls)
            gaps = [b[0] - a[0] for a, b in zip(servicer.calls, servicer.calls[1:])]
            assert all(g <= 0.2 + 0.15 for g in gaps), gaps  # waits drawn from [0, 0.2]
            servicer.calls.clear()
            servicer.refuse = 5  # more refusals than attempts: the last error, saying where it was tried
            with pytest.raises(LoraplexError) as info:
                c.generate("Hi")
            assert info.value.code == "UNAVAILABLE" and "3 attempts" in info.value.details
            assert len(servicer.calls) == 3 and "x-adapter-id" not in servicer.calls[0][1]  # base: no header
            servicer.calls.clear()
            servicer.refuse = 1
            assert "".join(ch.text for ch in c.stream("Hi", adapter="a")) == "ok"  # refused before any chunk
            assert len(servicer.calls) == 2
    finally:
        server.stop(0)


def test_other_statuses_are_not_retried():
    servicer = Refusing(refuse=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    server, address = stub_server(servicer)
    try:
        with Client([address, address], timeout=30) as c:
            with pytest.raises(LoraplexError) as info:
                c.generate("Hi")
            assert info.value.code == "RESOURCE_EXHAUSTED" and len(servicer.calls) == 1
    finally:
        server.stop(0)


def test_async_client_retries_and_never_replays_a_started_stream():
    import asyncio

    from loraplex.client import AsyncClient

    servicer = Refusing(refuse=1)
    server, address = stub_server(servicer)

    async def scenario():
        async with AsyncClient([address, address], timeout=30,
                               retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.01)) as c:
            assert (await c.generate("Hi", adapter="sql")).text == "ok"
            assert len(servicer.calls) == 2 and servicer.calls[1][1].get("x-adapter-id") == "sql"
            servicer.calls.clear()
            servicer.refuse, servicer.cut_streams = 0, True
            seen = []
            with pytest.raises(LoraplexError) as info:
                async for chunk in c.stream("Hi"):
                    seen.append(chunk.text)
            assert seen == ["o"] and info.value.code == "UNAVAILABLE" and "not retried" in info.value.details
            assert len(servicer.calls) == 1  # not sent again

    try:
        asyncio.run(scenario())
        servicer.calls.clear()
        with Client(address, timeout=30) as c:  # the same for the blocking client
            with pytest.raises(LoraplexError) as info:
                list(c.stream("Hi"))
            assert "not retried" in info.value.details and len(servicer.calls) == 1
    finally:
        server.stop(0)


# --- real replicas ------------------------------------------------------------------------------
LONG = 1000  # tokens of the streams that must still be running when a replica is stopped


@pytest.fixture(scope="module")
def replicas(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failover")
    (tmp / "adapters").mkdir()
    reps = so.start_replicas(tiny_model_dir, tmp / "adapters", 3, tmp, extra=(
        "--max-model-len", "1200", "--num-kv-blocks", "160", "--shutdown-grace", "60", "--no-http"))
    yield reps
    for r in reps:
        r.stop(signal.SIGKILL)


def ids(replica: so.Replica) -> set[str]:
    return {row["request_id"] for row in replica.finished()}


@pytest.mark.slow
def test_dead_target_is_skipped_and_the_client_sticks(replicas):
    _, b, _ = replicas
    dead = f"127.0.0.1:{so.free_port()}"  # nothing listens there
    with Client([dead, b.grpc], timeout=60) as c:
        out = c.generate("Hello", max_new_tokens=3, ignore_eos=True, request_id="skip-dead")
        assert out.usage.completion_tokens == 3
        assert c._targets.current == 1  # later calls go straight to the live one
        c.generate("Hello", max_new_tokens=1, request_id="skip-dead-2")
    deadline = time.monotonic() + 10
    while not {"skip-dead", "skip-dead-2"} <= ids(b):
        assert time.monotonic() < deadline, "the live replica did not log the requests"
        time.sleep(0.1)


@pytest.mark.slow
def test_cli_takes_several_servers(replicas):
    """`loraplex generate --server dead,live`: the CLI is built on the client, failover included."""
    import os
    import subprocess
    import sys

    _, b, _ = replicas
    dead = f"127.0.0.1:{so.free_port()}"
    out = subprocess.run([sys.executable, "-m", "loraplex.cli", "generate", "Hello", "--server", f"{dead},{b.grpc}",
                          "--max-new-tokens", "3"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
def test_draining_replica_refuses_and_the_call_moves_on(replicas):
    a, b, _ = replicas
    with Client(a.grpc, timeout=120) as direct:
        stream = direct.stream("Once upon a time", max_new_tokens=LONG, ignore_eos=True, request_id="old")
        next(stream)  # running on a
        a.proc.send_signal(signal.SIGTERM)  # drain: health NOT_SERVING, new calls UNAVAILABLE
        probe = Client(a.grpc, retry=NO_RETRY, timeout=10)
        deadline = time.monotonic() + 20
        while True:  # wait until a refuses (the signal is handled on its event loop)
            try:
                probe.generate("x", max_new_tokens=1)
            except LoraplexError as err:
                assert err.code == "UNAVAILABLE", err
                break
            assert time.monotonic() < deadline, "the draining replica kept accepting calls"
        probe.close()
        with Client([a.grpc, b.grpc], timeout=60) as c:
            out = c.generate("Hello", max_new_tokens=3, ignore_eos=True, request_id="moved")
            assert out.usage.completion_tokens == 3
        stream.close()  # cancel the old stream: a's drain ends
    assert a.proc.wait(60) == 0
    assert "moved" in ids(b) and "moved" not in ids(a)


@pytest.mark.slow
def test_stream_with_tokens_is_not_replayed(replicas):
    _, b, c_rep = replicas
    with Client([c_rep.grpc, b.grpc], timeout=60) as c:
        stream = c.stream("Once upon a time", max_new_tokens=LONG, ignore_eos=True, request_id="cut")
        first = next(stream)
        assert first.request_id == "cut"
        c_rep.proc.send_signal(signal.SIGKILL)
        with pytest.raises(LoraplexError) as info:
            for _ in stream:
                pass
        assert info.value.code in ("UNAVAILABLE", "INTERNAL", "UNKNOWN"), info.value
        assert "not retried" in info.value.details
    time.sleep(0.5)
    assert "cut" not in ids(b)  # never replayed on the other replica
    assert b.proc.poll() is None
