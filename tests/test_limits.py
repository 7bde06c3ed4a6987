"""Every request limit through gRPC on the tiny random Llama: one test per limit checks the status
a breach gets (and the field or setting its message names), then that the server still serves.

Servers (each on its own copy of the model):
- `srv`: small limits everywhere, a LoRA manager with 2 device slots, 2 host slots and an adapter
  file size limit between the sizes of two test adapters.
- `queue_srv`: 1 running sequence, 1 waiting: the third request finds the queue full.
- `stream_srv`: 1 HTTP/2 stream per connection.
Where requests must still be running when the limit is hit, every engine step is slowed by a fixed
sleep, so outcomes do not depend on this machine's speed.

Breach -> status, as tested:
  gRPC message over max_message_bytes          RESOURCE_EXHAUSTED (grpc itself)
  prompt tokens >= max_model_len               INVALID_ARGUMENT  prompt_token_ids.ids / prompt
  prompt text / message content chars          INVALID_ARGUMENT  prompt / messages (before tokenizing)
  messages per chat                            INVALID_ARGUMENT  messages
  max_new_tokens above the cap                 INVALID_ARGUMENT  sampling.max_new_tokens
  stop strings: count / length                 INVALID_ARGUMENT  sampling.stop / sampling.stop[i]
  request_id length                            INVALID_ARGUMENT  request_id
  generation RPCs in progress                  RESOURCE_EXHAUSTED (max_concurrent_requests)
  waiting queue                                RESOURCE_EXHAUSTED (max_waiting)
  pinned adapters (device tier)                RESOURCE_EXHAUSTED (pinned)
  pinned load, pool full of adapters in use    RESOURCE_EXHAUSTED (adapter_memory)
  adapter file size                            INVALID_ARGUMENT  path (max_bytes)
  streams per connection                       no error: further calls wait on the client
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
import torch

from loraplex.api.pb.loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.config import EngineConfig, LoraConfig, RequestLimits
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, build_lora_manager, start_engine
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures import engine_run

pytestmark = pytest.mark.timeout(120)

MAX_MODEL_LEN = 64
ENGINE = EngineConfig(block_size=16, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=128,
                      max_model_len=MAX_MODEL_LEN, max_new_tokens_cap=16, max_waiting=8)
LIMITS = RequestLimits(max_prompt_chars=300, max_messages=3, max_stop_strings=2, max_stop_chars=8,
                       max_request_id_chars=16, max_concurrent_requests=2)
MAX_MESSAGE_BYTES = 4096
STEP_DELAY = 0.05
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


def greedy(n: int = 3, **kwargs) -> pb.GenerateRequest:
    if not {"prompt", "prompt_token_ids", "messages"} & kwargs.keys():
        kwargs["prompt"] = "hello world"
    return pb.GenerateRequest(sampling=pb.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True),
                              **kwargs)


def status(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        fn(*args, **kwargs)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details()


def still_serves(s) -> None:
    assert len(s.gen.Generate(greedy(3), timeout=30).token_ids) == 3


def slow_steps(monkeypatch, engine) -> None:
    engine_run.slow_steps(monkeypatch, engine, STEP_DELAY)


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _server(tiny_model_dir, engine: EngineConfig, lora: LoraConfig | None = None, **kwargs):
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    manager = build_lora_manager(loaded, lora) if lora is not None else None
    srv = ServerThread(start_engine(loaded, engine, manager), **kwargs).start()
    ch = grpc.insecure_channel(srv.address)
    return srv, ch, SimpleNamespace(srv=srv, gen=generation_pb2_grpc.GenerationStub(ch),
                                    adapters=adapters_pb2_grpc.AdaptersStub(ch),
                                    runtime=srv.server.runtime, address=srv.address)


@pytest.fixture(scope="module")
def lib(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("limit_adapters")
    make_peft_adapter(tiny_model_dir, d / "small", "layer1_r3", seed=1)  # 2 modules of one layer
    make_peft_adapter(tiny_model_dir, d / "large", "qv_r4", seed=2)  # 2 modules of every layer
    return d


@pytest.fixture(scope="module")
def s(tiny_model_dir, lib):
    small_bytes = (lib / "small" / "adapter_model.safetensors").stat().st_size
    assert (lib / "large" / "adapter_model.safetensors").stat().st_size > small_bytes
    lora = LoraConfig(max_loras=2, max_lora_rank=4, max_cpu_loras=2, allowed_roots=(str(lib),),
                      max_adapter_bytes=small_bytes)
    srv, ch, stubs = _server(tiny_model_dir, ENGINE, lora, max_message_bytes=MAX_MESSAGE_BYTES, limits=LIMITS)
    yield stubs
    ch.close()
    srv.stop()


# --- per-request limits (INVALID_ARGUMENT / RESOURCE_EXHAUSTED for the message size) --------------
def test_message_over_max_message_bytes_is_resource_exhausted(s):
    code, details = status(s.gen.Generate, greedy(prompt="a" * (MAX_MESSAGE_BYTES + 100)))
    assert code == EXHAUSTED and "larger than max" in details
    still_serves(s)


def test_prompt_tokens_beyond_max_model_len(s):
    code, details = status(s.gen.Generate, greedy(prompt_token_ids=pb.TokenIds(ids=[5] * MAX_MODEL_LEN)))
    assert code == INVALID and details.startswith("prompt_token_ids.ids:") and "max_model_len" in details
    still_serves(s)


def test_prompt_chars_are_refused_before_tokenizing(s, monkeypatch):
    tokenizer = s.runtime.loaded.tokenizer
    calls = []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    code, details = status(s.gen.Generate, greedy(prompt="x" * (LIMITS.max_prompt_chars + 1)))
    assert code == INVALID and details.startswith("prompt:") and "max_prompt_chars" in details
    assert calls == []  # refused on its length, never tokenized
    still_serves(s)
    assert calls  # the same tokenizer does run for a request within the limit


def test_message_contents_count_against_max_prompt_chars(s):
    req = greedy(messages=pb.Messages())
    for text in ("a" * 200, "b" * 101):
        req.messages.messages.add(role="user", content=text)
    code, details = status(s.gen.Generate, req)
    assert code == INVALID and details.startswith("messages:") and "max_prompt_chars" in details
    still_serves(s)


def test_too_many_messages(s):
    req = greedy(messages=pb.Messages())
    for _ in range(LIMITS.max_messages + 1):
        req.messages.messages.add(role="user", content="hi")
    code, details = status(s.gen.GenerateStream(req).__next__)
    assert code == INVALID and details.startswith("messages:") and "max_messages" in details
    still_serves(s)


def test_max_new_tokens_above_the_cap(s):
    code, details = status(s.gen.Generate, greedy(ENGINE.max_new_tokens_cap + 1))
    assert code == INVALID and details.startswith("sampling.max_new_tokens:")
    still_serves(s)


def test_too_many_stop_strings(s):
    req = greedy()
    req.sampling.stop.extend(["a", "b", "c"])
    code, details = status(s.gen.Generate, req)
    assert code == INVALID and details.startswith("sampling.stop:") and "max_stop_strings" in details
    still_serves(s)


def test_stop_string_too_long(s):
    req = greedy()
    req.sampling.stop.extend(["ok", "x" * (LIMITS.max_stop_chars + 1)])
    code, details = status(s.gen.Generate, req)
    assert code == INVALID and details.startswith("sampling.stop[1]:") and "max_stop_chars" in details
    still_serves(s)


def test_request_id_too_long(s):
    code, details = status(s.gen.Generate, greedy(request_id="r" * (LIMITS.max_request_id_chars + 1)))
    assert code == INVALID and details.startswith("request_id:")
    resp = s.gen.Generate(greedy(request_id="r" * LIMITS.max_request_id_chars))
    assert resp.request_id == "r" * LIMITS.max_request_id_chars


# --- capacity limits (RESOURCE_EXHAUSTED) ---------------------------------------------------------
def test_concurrent_generation_requests(s, monkeypatch):
    slow_steps(monkeypatch, s.runtime.engine)
    streams = [s.gen.GenerateStream(greedy(16)) for _ in range(LIMITS.max_concurrent_requests)]
    for st in streams:
        next(st)  # running: each holds its place
    assert s.srv.server.active_generation_requests == LIMITS.max_concurrent_requests
    code, details = status(s.gen.Generate, greedy(3))
    assert code == EXHAUSTED and "max_concurrent_requests" in details
    for st in streams:
        st.cancel()  # cancelled RPCs give their places back
    wait_for(lambda: s.srv.server.active_generation_requests == 0)
    monkeypatch.undo()
    # Refused RPCs give theirs back too: more invalid requests than places, then a valid one.
    for _ in range(LIMITS.max_concurrent_requests + 2):
        assert status(s.gen.Generate, greedy(ENGINE.max_new_tokens_cap + 1))[0] == INVALID
    # (the client may see the status a moment before the handler's `finally` has run)
    wait_for(lambda: s.srv.server.active_generation_requests == 0, timeout=5)
    still_serves(s)


def test_pinned_adapters_beyond_the_device_tier(s, lib):
    assert status(s.adapters.LoadAdapter, apb.LoadAdapterRequest(adapter_id="pin1", path=str(lib / "small"),
                                                                 pinned=True))[0] == grpc.StatusCode.OK
    try:
        code, details = status(s.adapters.LoadAdapter,
                               apb.LoadAdapterRequest(adapter_id="pin2", path=str(lib / "small"), pinned=True))
        assert code == EXHAUSTED and "pinned" in details
        still_serves(s)
    finally:
        s.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="pin1"))


def test_load_while_the_pool_is_full_of_adapters_in_use(s, lib, monkeypatch):
    for name in ("h1", "h2"):  # max_loras = 2: two adapters resident at most
        s.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id=name, path=str(lib / "small")))
    slow_steps(monkeypatch, s.runtime.engine)
    streams = [s.gen.GenerateStream(greedy(16, adapter_id=name)) for name in ("h1", "h2")]
    for stream in streams:
        next(stream)  # h1 and h2 in use: nothing in the pool can make room
    try:
        # A pinned load must fit now: refused, naming the flag to raise; nothing changes.
        code, details = status(s.adapters.LoadAdapter, apb.LoadAdapterRequest(
            adapter_id="h3", path=str(lib / "small"), pinned=True))
        assert code == EXHAUSTED and "adapter-memory" in details, details
        assert "h3" not in [a.adapter_id for a in s.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters]
        # An unpinned one is registered and waits in host memory for room.
        info = s.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id="h3", path=str(lib / "small"))).adapter
        assert info.tier == apb.ADAPTER_TIER_HOST
    finally:
        for stream in streams:
            stream.cancel()
    wait_for(lambda: s.srv.server.active_generation_requests == 0)
    monkeypatch.undo()
    assert s.gen.Generate(greedy(4, adapter_id="h3")).finish_reason  # idle now: h3 moves in
    tiers = {a.adapter_id: a.tier for a in s.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}
    # The one it evicted keeps its pool bytes on the host tier (CPU spill).
    assert tiers["h3"] == apb.ADAPTER_TIER_DEVICE and sorted(tiers.values()).count(apb.ADAPTER_TIER_HOST) == 1
    for name in ("h1", "h2", "h3"):
        s.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=name))
    still_serves(s)


def test_adapter_file_over_max_adapter_bytes(s, lib):
    code, details = status(s.adapters.LoadAdapter, apb.LoadAdapterRequest(adapter_id="big", path=str(lib / "large")))
    assert code == INVALID and details.startswith("path:") and "larger than" in details
    assert "big" not in [a.adapter_id for a in s.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters]
    still_serves(s)


def test_waiting_queue_full(tiny_model_dir, monkeypatch):
    engine = EngineConfig(block_size=16, num_kv_blocks=64, max_num_seqs=1, max_model_len=MAX_MODEL_LEN,
                          max_new_tokens_cap=16, max_waiting=1)
    srv, ch, q = _server(tiny_model_dir, engine)
    try:
        slow_steps(monkeypatch, q.runtime.engine)
        running = q.gen.GenerateStream(greedy(16))
        next(running)
        waiting = q.gen.GenerateStream(greedy(16))
        wait_for(lambda: q.runtime.engine.stats().num_waiting == 1)
        code, details = status(q.gen.Generate, greedy(3))
        assert code == EXHAUSTED and "waiting queue is full" in details
        running.cancel()
        waiting.cancel()
        wait_for(lambda: (lambda st: st.num_running + st.num_waiting == 0)(q.runtime.engine.stats()))
        monkeypatch.undo()
        still_serves(q)
    finally:
        ch.close()
        srv.stop()


def test_streams_per_connection_queue_on_the_client(tiny_model_dir, monkeypatch):
    """With one stream per connection, a second call on the same channel waits until the first
    ends; both succeed, they never run at the same time."""
    srv, ch, c = _server(tiny_model_dir, ENGINE, limits=RequestLimits(max_streams_per_connection=1))
    try:
        slow_steps(monkeypatch, c.runtime.engine)
        seen = []
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(c.gen.Generate, greedy(8), timeout=30) for _ in range(2)]
            while not all(f.done() for f in futures):
                seen.append(srv.server.active_generation_requests)
                time.sleep(0.01)
            assert [len(f.result().token_ids) for f in futures] == [8, 8]
        assert max(seen) == 1
    finally:
        ch.close()
        srv.stop()


# --- flags ---------------------------------------------------------------------------------------
def test_limit_flags_reach_the_config():
    from loraplex import cli

    args = cli.build_parser().parse_args([
        "serve", "--max-prompt-chars", "1000", "--max-messages", "5", "--max-stop-strings", "3",
        "--max-stop-chars", "7", "--max-request-id-chars", "9", "--max-concurrent-requests", "11",
        "--max-streams-per-connection", "13"])
    assert cli._server_config(args).limits == RequestLimits(
        max_prompt_chars=1000, max_messages=5, max_stop_strings=3, max_stop_chars=7, max_request_id_chars=9,
        max_concurrent_requests=11, max_streams_per_connection=13)
    assert RequestLimits().prompt_chars(2048) == 32 * 2048  # 0 = auto


@pytest.mark.parametrize("flag, name", [
    ("--max-prompt-chars=-1", "max_prompt_chars"), ("--max-messages=0", "max_messages"),
    ("--max-stop-strings=0", "max_stop_strings"), ("--max-stop-chars=0", "max_stop_chars"),
    ("--max-request-id-chars=0", "max_request_id_chars"),
    ("--max-concurrent-requests=0", "max_concurrent_requests"),
    ("--max-streams-per-connection=0", "max_streams_per_connection")])
def test_bad_limit_flags_exit_2_naming_the_setting(flag, name, capsys):
    from loraplex import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["serve", flag])
    assert info.value.code == 2 and name in capsys.readouterr().err
