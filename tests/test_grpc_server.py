"""The gRPC API end to end: an in-process server on the tiny random Llama, real gRPC clients.

Where a test needs a request to still be running when something happens to it (cancel, deadline,
shutdown, a full queue), the engine's model runner is slowed by a fixed sleep per step, so the
outcome does not depend on how fast this machine decodes.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from loraplex.api import convert
from loraplex.api.pb.loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2 as pb, generation_pb2_grpc
from loraplex.config import EngineConfig
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, start_engine
from tests.fixtures import engine_run
from tests.fixtures.engine_run import wait_idle

pytestmark = pytest.mark.timeout(300)

ENGINE = EngineConfig(block_size=16, num_kv_blocks=160, max_num_seqs=32, max_num_batched_tokens=256,
                      max_model_len=256, max_new_tokens_cap=1000, max_waiting=64)
STEP_DELAY = 0.01  # seconds added to each engine step by `slow_steps`


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def server(loaded):
    srv = ServerThread(start_engine(loaded, ENGINE)).start()
    yield srv
    srv.stop(grace_seconds=0.0)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return generation_pb2_grpc.GenerationStub(channel)


@pytest.fixture
def engine(server):
    return server.server.runtime.engine


def slow_steps(monkeypatch, engine, delay: float = STEP_DELAY) -> None:
    engine_run.slow_steps(monkeypatch, engine, delay)


def greedy(n: int, **kw) -> pb.SamplingParams:
    return pb.SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def cancelled_count(engine) -> int:
    return engine.stats().finished_total.get("cancelled", 0)


# --- generation ----------------------------------------------------------------------------------
def test_unary_generate(stub, loaded):
    req = pb.GenerateRequest(prompt="The quick brown fox", sampling=greedy(12, ignore_eos=True),
                             request_id="unary-1")
    resp = stub.Generate(req)
    assert resp.request_id == "unary-1"
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(resp.token_ids) == 12
    assert resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens == len(loaded.tokenizer.encode("The quick brown fox"))
    assert resp.text == loaded.tokenizer.decode(list(resp.token_ids), skip_special_tokens=True)
    t = resp.timings
    assert 0 <= t.queue_seconds <= t.time_to_first_token_seconds <= t.total_seconds


def test_server_assigns_distinct_request_ids(stub):
    ids = {stub.Generate(pb.GenerateRequest(prompt="hello", sampling=greedy(1))).request_id for _ in range(3)}
    assert len(ids) == 3 and "" not in ids


def test_stream_concatenates_to_unary(stub):
    req = pb.GenerateRequest(prompt="Once upon a time there was", sampling=greedy(30, ignore_eos=True))
    unary = stub.Generate(req)
    chunks = list(stub.GenerateStream(req))
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    *body, last = chunks
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in body)
    assert all(not c.HasField("usage") for c in body)
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 30
    assert last.usage.prompt_tokens == unary.usage.prompt_tokens
    assert last.timings.total_seconds > 0


def test_stop_string_ends_generation(stub):
    base = stub.Generate(pb.GenerateRequest(prompt="The weather today", sampling=greedy(24, ignore_eos=True)))
    stop = base.text[len(base.text) // 2:][:3]  # a piece from the middle of the greedy completion
    assert stop.strip(), base.text
    resp = stub.Generate(pb.GenerateRequest(prompt="The weather today",
                                            sampling=greedy(24, ignore_eos=True, stop=[stop])))
    assert resp.finish_reason == pb.FINISH_REASON_STOP
    assert resp.text == base.text[: base.text.index(stop)]


def test_messages_use_the_chat_template(stub, loaded):
    conversation = [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "What is the capital of France?"}]
    rendered = loaded.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = loaded.tokenizer.encode(rendered, add_special_tokens=False)
    msgs = pb.Messages(messages=[pb.Message(role=m["role"], content=m["content"]) for m in conversation])
    via_messages = stub.Generate(pb.GenerateRequest(messages=msgs, sampling=greedy(10, ignore_eos=True)))
    via_ids = stub.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids),
                                               sampling=greedy(10, ignore_eos=True)))
    assert via_messages.usage.prompt_tokens == len(ids)
    assert list(via_messages.token_ids) == list(via_ids.token_ids)


def test_greedy_matches_transformers_generate(stub, loaded, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for prompt in ("The quick brown fox jumps", "What is two plus two? It is"):
        ids = torch.tensor([loaded.tokenizer.encode(prompt)])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
        expected = out[0, ids.shape[1]:].tolist()
        resp = stub.Generate(pb.GenerateRequest(prompt=prompt, sampling=greedy(20)))
        assert list(resp.token_ids) == expected, prompt


def test_32_concurrent_requests_all_complete(stub, engine):
    def call(i: int):
        return stub.Generate(pb.GenerateRequest(prompt=f"Request number {i} says",
                                                sampling=greedy(8 + i % 5, ignore_eos=True)))

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(call, range(32)))
    for i, r in enumerate(responses):
        assert r.finish_reason == pb.FINISH_REASON_LENGTH
        assert len(r.token_ids) == r.usage.completion_tokens == 8 + i % 5
    # Batched greedy decoding gives each request what it gets alone.
    for i in (0, 17, 31):
        assert list(call(i).token_ids) == list(responses[i].token_ids)
    wait_idle(engine)


def test_client_cancel_mid_stream_frees_kv(stub, engine, monkeypatch):
    slow_steps(monkeypatch, engine)
    before = cancelled_count(engine)
    stream = stub.GenerateStream(pb.GenerateRequest(prompt="A long story", sampling=greedy(200, ignore_eos=True)))
    received = [next(stream) for _ in range(3)]
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in received)
    assert engine.stats().kv_blocks_used > 0
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    wait_idle(engine, timeout=5)
    assert cancelled_count(engine) == before + 1


def test_deadline_exceeded_aborts_and_frees_kv(stub, engine, monkeypatch):
    slow_steps(monkeypatch, engine)  # 200 tokens take >= 2 s; the deadline is 0.3 s
    before = cancelled_count(engine)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="A long story", sampling=greedy(200, ignore_eos=True)),
                      timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(engine, timeout=5)
    assert cancelled_count(engine) == before + 1


# --- errors --------------------------------------------------------------------------------------
BAD_REQUESTS = {
    "empty prompt": (pb.GenerateRequest(prompt=""), "prompt"),
    "no input": (pb.GenerateRequest(), "input"),
    "text longer than context": (pb.GenerateRequest(prompt="the quick brown fox " * 200), "prompt"),
    "ids longer than context": (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5] * 256)),
                                "prompt_token_ids.ids"),
    "empty token ids": (pb.GenerateRequest(prompt_token_ids=pb.TokenIds()), "prompt_token_ids.ids"),
    "token id out of vocab": (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[3, 512])),
                              "prompt_token_ids.ids"),
    "no messages": (pb.GenerateRequest(messages=pb.Messages()), "messages"),
    "unknown role": (pb.GenerateRequest(messages=pb.Messages(messages=[
        pb.Message(role="user", content="hi"), pb.Message(role="robot", content="beep")])), "messages[1].role"),
    "max_new_tokens 0": (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_new_tokens=0)),
                         "sampling.max_new_tokens"),
    "max_new_tokens negative": (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_new_tokens=-4)),
                                "sampling.max_new_tokens"),
    "max_new_tokens above cap": (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_new_tokens=1001)),
                                 "sampling.max_new_tokens"),
    "temperature negative": (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=-0.5)),
                             "sampling.temperature"),
    "temperature nan": (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=math.nan)),
                        "sampling.temperature"),
    "temperature inf": (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=math.inf)),
                        "sampling.temperature"),
    "top_p 0": (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=0.0)), "sampling.top_p"),
    "top_p above 1": (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p"),
    "top_k negative": (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_k=-1)), "sampling.top_k"),
    "repetition_penalty 0": (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(repetition_penalty=0.0)),
                             "sampling.repetition_penalty"),
    "empty stop string": (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=["ok", ""])),
                          "sampling.stop"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_bad_input_is_invalid_argument_naming_the_field(stub, case, streaming):
    req, field = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as err:
        if streaming:
            list(stub.GenerateStream(req))
        else:
            stub.Generate(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(f"{field}: "), err.value.details()


def test_prompt_that_just_fits_is_accepted(stub):
    resp = stub.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5] * 255), sampling=greedy(4)))
    assert resp.usage.prompt_tokens == 255
    assert resp.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert len(resp.token_ids) == 1  # the context is full after one token


def test_unset_sampling_uses_documented_defaults():
    sp = convert.sampling_from_proto(pb.SamplingParams(), max_new_tokens_cap=1000)
    assert (sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k, sp.repetition_penalty, sp.seed) == \
        (64, 1.0, 1.0, 0, 1.0, None)
    assert convert.sampling_from_proto(pb.SamplingParams(temperature=0.0), 1000).greedy


def test_seeded_sampling_is_reproducible(stub):
    req = pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(
        max_new_tokens=16, temperature=1.0, seed=1234, ignore_eos=True))
    a, b = stub.Generate(req), stub.Generate(req)
    assert list(a.token_ids) == list(b.token_ids)


def test_unknown_adapter_is_not_found(stub):
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(pb.GenerateRequest(adapter_id="no-such-adapter", prompt="hi"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-adapter" in err.value.details()


def test_adapters_service_without_a_lora_manager_is_unimplemented_with_a_message(channel):
    # This server runs start_engine(loaded, ENGINE) with no LoRA manager (`loraplex serve` always
    # has one; tests/test_adapters_api.py covers the service with it).
    stub = adapters_pb2_grpc.AdaptersStub(channel)
    calls = [(stub.ListAdapters, adapters_pb2.ListAdaptersRequest()),
             (stub.LoadAdapter, adapters_pb2.LoadAdapterRequest(adapter_id="a", path="/tmp/a")),
             (stub.UnloadAdapter, adapters_pb2.UnloadAdapterRequest(adapter_id="a"))]
    for method, req in calls:
        with pytest.raises(grpc.RpcError) as err:
            method(req)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "not enabled on this server" in err.value.details()


def test_adapter_info_to_proto():
    from loraplex.lora.manager import AdapterInfo, Tier

    info = AdapterInfo(adapter_id="poet", source="/srv/adapters/poet", target_modules=("q_proj", "v_proj"),
                       min_rank=4, max_rank=8, nbytes=12345, tier=Tier.HOST, requests_in_flight=2,
                       last_used=1700000000.5, pinned=True)
    p = convert.adapter_info_to_proto(info)
    assert (p.adapter_id, p.source, list(p.target_modules), p.min_rank, p.max_rank, p.bytes) == \
        ("poet", "/srv/adapters/poet", ["q_proj", "v_proj"], 4, 8, 12345)
    assert p.tier == adapters_pb2.ADAPTER_TIER_HOST
    assert (p.requests_in_flight, p.last_used_unix_seconds, p.pinned) == (2, 1700000000.5, True)
    assert convert.adapter_info_to_proto(
        AdapterInfo("x", "/x", (), 1, 1, 1, Tier.DEVICE, 0, 0.0, False)).tier == adapters_pb2.ADAPTER_TIER_DEVICE


# --- health, reflection, model info --------------------------------------------------------------
def test_health_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "loraplex.v1.Generation", "loraplex.v1.Adapters"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_services(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"loraplex.v1.Generation", "loraplex.v1.Adapters", "grpc.health.v1.Health"} <= services
    fd = db.FindFileContainingSymbol("loraplex.v1.GenerateRequest")
    assert fd.name == "loraplex/v1/generation.proto"


def test_get_model_info(stub, loaded, tiny_model_dir):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_path == str(tiny_model_dir)
    assert info.model_name == tiny_model_dir.name
    assert info.architecture == "LlamaForCausalLM"
    assert (info.dtype, info.device, info.quantization) == ("float32", "cpu", "none")
    assert info.max_model_len == 256
    assert info.vocab_size == loaded.arch.vocab_size == 512
    assert info.max_new_tokens_cap == 1000
    n_params = sum(p.numel() for p in loaded.model.parameters())
    assert info.base_weight_bytes == 4 * n_params
    assert info.loraplex_version
    assert set(info.eos_token_ids) == {0, 2}
    from loraplex.model.kv_cache import KVCache

    arch = loaded.arch
    assert (info.kv_cache_dtype, info.kv_cache_tokens) == ("float32", ENGINE.num_kv_blocks * ENGINE.block_size)
    assert info.kv_cache_bytes == ENGINE.num_kv_blocks * KVCache.bytes_per_block(
        arch.num_layers, ENGINE.block_size, arch.num_kv_heads, arch.head_dim, torch.float32)


# --- queue bound and life cycle (servers of their own) ---------------------------------------------
def test_queue_overflow_is_resource_exhausted(loaded, monkeypatch):
    cfg = EngineConfig(block_size=16, num_kv_blocks=64, max_num_seqs=1, max_model_len=256, max_waiting=1)
    runtime = start_engine(loaded, cfg)
    slow_steps(monkeypatch, runtime.engine)  # each accepted request holds the engine >= 0.3 s
    with ServerThread(runtime) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        req = pb.GenerateRequest(prompt="hi", sampling=greedy(30, ignore_eos=True))
        futures = [stub.Generate.future(req) for _ in range(6)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "queue is full" in err.details()
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1, codes
        assert codes.count(grpc.StatusCode.OK) >= 1, codes
        wait_idle(runtime.engine)


def test_health_lifecycle_and_graceful_shutdown(loaded, monkeypatch):
    srv = ServerThread(None).start()  # listening, model "still loading"
    try:
        with grpc.insecure_channel(srv.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = generation_pb2_grpc.GenerationStub(ch)
            for service in ("", "loraplex.v1.Generation"):
                assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                    health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(pb.GenerateRequest(prompt="hi"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

            runtime = start_engine(loaded, ENGINE)
            srv.attach(runtime)
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
                health_pb2.HealthCheckResponse.SERVING

            watch = health.Watch(health_pb2.HealthCheckRequest(service="loraplex.v1.Generation"))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            slow_steps(monkeypatch, runtime.engine)  # 200 tokens >= 2 s, far beyond the grace
            inflight = stub.Generate.future(pb.GenerateRequest(prompt="A long story",
                                                               sampling=greedy(200, ignore_eos=True)))
            deadline = time.monotonic() + 10
            while runtime.engine.stats().num_running == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            stopper = threading.Thread(target=srv.stop, kwargs={"grace_seconds": 0.3})
            stopper.start()
            # Shutdown flips health first, while in-flight requests drain.
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # The in-flight request is ended by the engine when the drain timeout passes and
            # answered with UNAVAILABLE (retry elsewhere), not left hanging.
            with pytest.raises(grpc.RpcError) as ended:
                inflight.result(timeout=30)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "drain timeout" in ended.value.details()
            stopper.join(timeout=30)
            assert not stopper.is_alive()
            assert runtime.engine.stats().kv_blocks_used == 0
    finally:
        srv.stop()
