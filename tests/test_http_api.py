"""The OpenAI-compatible HTTP front end to end, driven by the official `openai` client (sync, async,
streaming, errors) and raw httpx where the wire format itself is the point (SSE framing, malformed
bodies, disconnects). In-process servers on the tiny random Llama, gRPC and HTTP side by side over
one runtime: "two front doors, one house" is checked by asking both for the same greedy completion.

Where a request must still be running when something happens to it (a client disconnect, a full
server), the engine's model runner is slowed by a fixed sleep per step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import openai
import pytest
import torch

from prometheus_client import CollectorRegistry

from loraplex.api.metrics import LoraplexMetrics
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.api.request_log import RequestLogger
from loraplex.api.status import HTTP_STATUS
from loraplex.config import AuthConfig, EngineConfig, LoraConfig, RequestLimits
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, build_lora_manager, start_engine
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.engine_run import slow_steps, wait_idle

pytestmark = pytest.mark.timeout(300)

ENGINE = EngineConfig(block_size=16, num_kv_blocks=200, max_num_seqs=32, max_num_batched_tokens=256,
                      max_model_len=256, max_new_tokens_cap=200, max_waiting=64)
ADMIN = "admin-7f3c9a1e5b2d4c6f8a0e"
GEN = "gen-2b4d6f8a0c1e3a5c7e9b"
PROMPT = "The quick brown fox"
README = Path(__file__).resolve().parent.parent / "README.md"


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_model_dir):
    top = tmp_path_factory.mktemp("http_adapters")
    d = SimpleNamespace(library=top / "library", ondemand=top / "ondemand")
    make_peft_adapter(tiny_model_dir, d.library / "qv", "qv_r4", seed=1)
    make_peft_adapter(tiny_model_dir, d.ondemand / "od-mlp", "regex_mlp_r5", seed=2)
    return d


@pytest.fixture(scope="module")
def srv(tiny_model_dir, dirs):
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    manager = build_lora_manager(loaded, LoraConfig(max_loras=2, max_lora_rank=8, adapter_root=str(dirs.ondemand),
                                                    allowed_roots=(str(dirs.library),)))
    server = ServerThread(start_engine(loaded, ENGINE, manager), http_port=0,
                          max_message_bytes=256 * 1024).start()
    with grpc.insecure_channel(server.address) as ch:
        yield SimpleNamespace(server=server, url=server.http_url, model=Path(tiny_model_dir).name,
                              grpc=generation_pb2_grpc.GenerationStub(ch),
                              engine=server.server.runtime.engine, tokenizer=loaded.tokenizer)
    server.stop()


@pytest.fixture(scope="module")
def client(srv):
    # max_retries=0: a 429 or 503 must reach the test, not be retried away.
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def grpc_greedy(srv, n: int, adapter_id: str = "", **input_) -> pb.GenerateResponse:
    return srv.grpc.Generate(pb.GenerateRequest(adapter_id=adapter_id, sampling=pb.SamplingParams(
        max_new_tokens=n, temperature=0.0, ignore_eos=True), **input_))


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- generation: the same house behind both doors -------------------------------------------------
def test_completion_matches_grpc(srv, client):
    want = grpc_greedy(srv, 12, prompt=PROMPT)
    got = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.object == "text_completion" and got.model == srv.model and got.id.startswith("cmpl-")
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    assert got.usage.completion_tokens == 12
    assert got.usage.total_tokens == want.usage.prompt_tokens + 12
    assert got.usage.prompt_tokens_details.cached_tokens >= 0


def test_presence_and_frequency_penalties_as_over_grpc(srv, client):
    """The penalties change a greedy completion (the tiny model repeats itself) and the HTTP and
    gRPC doors give the same tokens for the same penalties."""
    plain = grpc_greedy(srv, 24, prompt=PROMPT)
    want = srv.grpc.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(
        max_new_tokens=24, temperature=0.0, ignore_eos=True, presence_penalty=1.5, frequency_penalty=2.0)))
    assert list(want.token_ids) != list(plain.token_ids)
    got = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                    presence_penalty=1.5, frequency_penalty=2.0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text


def test_chat_matches_grpc_messages(srv, client):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"}]
    want = grpc_greedy(srv, 10, messages=pb.Messages(messages=[pb.Message(**m) for m in messages]))
    got = client.chat.completions.create(model=srv.model, messages=messages, max_completion_tokens=10,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    # Text parts and the "developer" role (read as system) render the same conversation.
    parts = client.chat.completions.create(
        model=srv.model, max_tokens=10, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "developer", "content": [{"type": "text", "text": "Answer "},
                                                    {"type": "text", "text": "briefly."}]},
                  {"role": "user", "content": "Hi!"}])
    assert parts.choices[0].message.content == want.text


def test_chat_stream_with_usage(srv, client):
    kw = dict(model=srv.model, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=20,
              temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    *body, last = chunks
    assert all(c.usage is None for c in body)
    assert last.choices == [] and last.usage.completion_tokens == 20
    assert last.usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_stream_sse_framing(srv):
    body = {"model": srv.model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == grpc_greedy(srv, 8, prompt=PROMPT).text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_async_client_concurrent(srv):
    async def run():
        async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0) as aclient:
            prompts = ["one", "two two", "three three three", "four"]
            unary = await asyncio.gather(*[aclient.completions.create(
                model=srv.model, prompt=p, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
                for p in prompts])
            stream = await aclient.completions.create(model=srv.model, prompt=prompts[1], max_tokens=6,
                                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
            streamed = "".join([c.choices[0].text async for c in stream])
            return [u.choices[0].text for u in unary], streamed

    texts, streamed = asyncio.run(run())
    assert texts == [grpc_greedy(srv, 6, prompt=p).text for p in ["one", "two two", "three three three", "four"]]
    assert streamed == texts[1]


def test_n_choices_and_prompt_lists(srv, client):
    got = client.completions.create(model=srv.model, prompt=["one", "two two"], n=2, max_tokens=5, seed=7,
                                    temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert got.usage.completion_tokens == 20
    one = len(srv.tokenizer.encode("one"))
    assert got.usage.prompt_tokens == one + len(srv.tokenizer.encode("two two"))  # each prompt once
    again = client.completions.create(model=srv.model, prompt=["one", "two two"], n=2, max_tokens=5, seed=7,
                                      temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in got.choices]  # seeded: reproducible
    ids = srv.tokenizer.encode("one")
    by_ids = client.completions.create(model=srv.model, prompt=ids, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == grpc_greedy(srv, 5, prompt="one").text


def test_stop_and_sampling_extensions(srv, client):
    base = grpc_greedy(srv, 24, prompt="The weather today").text
    stop = base[len(base) // 2:][:3]
    assert stop.strip()
    got = client.completions.create(model=srv.model, prompt="The weather today", max_tokens=24, temperature=0,
                                    stop=stop, extra_body={"ignore_eos": True, "top_k": -1,
                                                           "repetition_penalty": 1.0})
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == base[: base.index(stop)]


# --- models and adapters --------------------------------------------------------------------------
def test_models_load_use_unload(srv, client, dirs):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == srv.model and "qv" not in ids
    r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "qv", "lora_path": str(dirs.library / "qv")})
    assert r.status_code == 200 and "qv" in r.text
    models = {m.id: m for m in client.models.list().data}
    assert models["qv"].parent == srv.model and models[srv.model].parent is None
    assert models[srv.model].model_extra["sampling_defaults"]["source"] == "neutral"
    assert client.models.retrieve("qv").parent == srv.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("never-loaded")
    want = grpc_greedy(srv, 10, adapter_id="qv", prompt=PROMPT)
    assert want.text != grpc_greedy(srv, 10, prompt=PROMPT).text  # the adapter changes the output
    got = client.completions.create(model="qv", prompt=PROMPT, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text and got.model == "qv"
    r = httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "qv"})
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="qv", prompt=PROMPT, max_tokens=2)
    assert exc.value.body["param"] == "model" and exc.value.body["code"] == "NOT_FOUND"


def test_adapter_root_loads_on_first_use(srv, client):
    want = grpc_greedy(srv, 8, prompt=PROMPT)  # base
    got = client.completions.create(model="od-mlp", prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text != want.text
    assert "od-mlp" in [m.id for m in client.models.list().data]


@pytest.mark.parametrize("body, status, param", [
    ({"lora_name": "x", "lora_path": "/nonexistent/elsewhere"}, 400, "lora_path"),
    ({"lora_name": "../up", "lora_path": "/tmp"}, 400, "lora_name"),
    ({"lora_name": "x"}, 400, "lora_path"),
    ({"lora_name": "x", "lora_path": "/tmp", "extra": 1}, 400, "extra"),
])
def test_load_adapter_errors(srv, body, status, param):
    r = httpx.post(srv.url + "/v1/load_lora_adapter", json=body)
    assert r.status_code == status, r.text
    assert error_of(r)["param"] == param


def test_unload_unknown_adapter_is_404(srv):
    r = httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "never-loaded"})
    assert r.status_code == 404 and error_of(r)["param"] == "lora_name"


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, param", [
    ({"frobnicate": 1}, "frobnicate"),
    ({"logprobs": 21}, "logprobs"),
    ({"echo": True, "logprobs": 0}, "echo"),
    ({"suffix": "x"}, "suffix"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": "lots"}, "frequency_penalty"),
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"seed": -1}, "seed"),
    ({"stop": [1]}, "stop"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "x" * 9000}, "prompt"),
    ({"model": 5}, "model"),
])
def test_completion_field_errors(srv, client, extra, param):
    with pytest.raises(openai.BadRequestError) as exc:  # extra_body overrides model / prompt too
        client.completions.create(model=srv.model, prompt=PROMPT, extra_body=extra)
    err = exc.value.body
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["code"] == "INVALID_ARGUMENT", err
    assert err["message"].startswith(param), err


@pytest.mark.parametrize("extra, param", [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": []}, "messages"),
])
def test_chat_field_errors(srv, extra, param):
    body = {"model": srv.model, "messages": [{"role": "user", "content": "hi"}], **extra}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param


def test_raw_body_errors(srv):
    url = srv.url + "/v1/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)["param"] == "body"
    r = httpx.post(url, json=[1, 2])
    assert r.status_code == 400 and error_of(r)["param"] == "body"
    r = httpx.post(url, content=b'{"model": "' + b"x" * (300 * 1024) + b'"}')  # over max_message_bytes
    assert r.status_code == 413 and error_of(r)["param"] == "body"
    r = httpx.get(url)
    assert r.status_code == 405 and error_of(r)["type"] == "invalid_request_error"
    r = httpx.get(srv.url + "/v1/nothing-here")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    assert httpx.get(srv.url + "/health").status_code == 200  # still serving everyone


# --- cancellation -----------------------------------------------------------------------------------
def _cancelled(engine) -> int:
    return engine.stats().finished_total.get("cancelled", 0)


def test_disconnect_mid_stream_cancels_and_frees_kv(srv, monkeypatch):
    slow_steps(monkeypatch, srv.engine, 0.02)
    before = _cancelled(srv.engine)
    body = {"model": srv.model, "prompt": PROMPT, "max_tokens": 150, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert srv.engine.stats().kv_blocks_used > 0
    # Closing the connection mid-stream: the request is aborted, not run to its 150 tokens.
    deadline = time.monotonic() + 10
    while _cancelled(srv.engine) == before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.02)
    wait_idle(srv.engine)


def test_disconnect_while_waiting_for_unary_cancels(srv, monkeypatch):
    slow_steps(monkeypatch, srv.engine, 0.02)
    before = _cancelled(srv.engine)
    body = {"model": srv.model, "prompt": PROMPT, "max_tokens": 150, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while _cancelled(srv.engine) == before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.02)
    wait_idle(srv.engine)


# --- auth, limits, health ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(tiny_model_dir, dirs):
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    manager = build_lora_manager(loaded, LoraConfig(max_loras=2, max_lora_rank=8,
                                                    allowed_roots=(str(dirs.library),)))
    metrics = LoraplexMetrics(CollectorRegistry())
    runtime = start_engine(loaded, ENGINE, manager, observers=[RequestLogger(), metrics], metrics=metrics)
    metrics.bind(runtime.engine, manager, loaded.model)
    server = ServerThread(runtime, http_port=0, auth=AuthConfig(admin_token=ADMIN, generation_token=GEN),
                          limits=RequestLimits(max_concurrent_requests=1)).start()
    with grpc.insecure_channel(server.address) as ch:
        yield SimpleNamespace(url=server.http_url, model=Path(tiny_model_dir).name, channel=ch,
                              engine=server.server.runtime.engine, metrics=metrics)
    server.stop()


def test_tokens_as_over_grpc(guarded):
    def oa(key):
        return openai.OpenAI(base_url=guarded.url + "/v1", api_key=key, max_retries=0)

    with pytest.raises(openai.PermissionDeniedError):
        oa("wrong-token-123456789").completions.create(model=guarded.model, prompt="x", max_tokens=1)
    r = httpx.post(guarded.url + "/v1/completions", json={"model": guarded.model, "prompt": "x"})
    assert r.status_code == 401 and error_of(r)["code"] == "UNAUTHENTICATED"
    for token in (GEN, ADMIN):
        assert oa(token).completions.create(model=guarded.model, prompt="x", max_tokens=1).choices
        assert oa(token).models.list().data[0].id == guarded.model
    body = {"lora_name": "qv", "lora_path": "/nonexistent"}
    r = httpx.post(guarded.url + "/v1/load_lora_adapter", json=body, headers={"authorization": f"Bearer {GEN}"})
    assert r.status_code == 403  # admin calls need the admin token
    r = httpx.post(guarded.url + "/v1/unload_lora_adapter", json={"lora_name": "qv"})
    assert r.status_code == 401
    assert httpx.get(guarded.url + "/health").status_code == 200  # open


def test_metrics_and_request_log_are_shared(guarded, caplog):
    def value(name, **labels):
        return guarded.metrics.registry.get_sample_value(name, labels) or 0.0

    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=GEN, max_retries=0)
    done, rejected = value("loraplex_requests_total", adapter="base", finish_reason="length"), \
        value("loraplex_requests_rejected_total", code="NOT_FOUND")
    with caplog.at_level(logging.INFO, logger="loraplex.requests"):
        out = client.completions.create(model=guarded.model, prompt="x", max_tokens=3, temperature=0,
                                        extra_body={"ignore_eos": True}, extra_headers={"x-request-id": "http-log-1"})
    assert out.id == "http-log-1"
    assert value("loraplex_requests_total", adapter="base", finish_reason="length") == done + 1
    assert any(getattr(r, "request", {}).get("request_id") == "http-log-1-0" for r in caplog.records)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nobody", prompt="x", max_tokens=1)
    assert value("loraplex_requests_rejected_total", code="NOT_FOUND") == rejected + 1


def test_concurrency_limit_shared_with_grpc(guarded, monkeypatch):
    slow_steps(monkeypatch, guarded.engine, 0.02)
    stub = generation_pb2_grpc.GenerationStub(guarded.channel)
    stream = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(
        max_new_tokens=100, temperature=0, ignore_eos=True)), metadata=(("authorization", f"Bearer {GEN}"),))
    next(stream)  # the one place is taken by gRPC
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=GEN, max_retries=0)
    with pytest.raises(openai.RateLimitError) as exc:
        client.completions.create(model=guarded.model, prompt="x", max_tokens=1)
    assert exc.value.body["code"] == "RESOURCE_EXHAUSTED"
    stream.cancel()
    wait_idle(guarded.engine)
    deadline = time.monotonic() + 5
    while True:  # the place comes back once the cancelled RPC's handler has unwound
        try:
            assert client.completions.create(model=guarded.model, prompt="x", max_tokens=1).choices
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_health_and_unavailable_while_loading():
    server = ServerThread(None, http_port=0).start()  # listening, no model yet
    try:
        r = httpx.get(server.http_url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(server.http_url + "/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 503 and error_of(r)["code"] == "UNAVAILABLE"
        assert r.headers["retry-after"]
    finally:
        server.stop()


# --- docs -------------------------------------------------------------------------------------------
def test_readme_status_table_matches_the_mapping():
    text = README.read_text()
    rows = re.findall(r"^\|\s*`([A-Z_]+)`\s*\|\s*(\d{3})\b", text, flags=re.M)
    assert rows, "README has no gRPC -> HTTP status table"
    table = {name: int(status) for name, status in rows}
    assert table == {code.name: status for code, status in HTTP_STATUS.items()}
