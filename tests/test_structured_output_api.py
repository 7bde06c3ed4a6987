"""Structured output through both front doors, on an in-process server with the tiny random Llama
and one adapter: gRPC `structured_output` (every kind), the OpenAI client's `response_format`
and vLLM's `guided_*` / `structured_outputs` in extra_body, on /v1/completions and
/v1/chat/completions, streamed and not; bad input -> INVALID_ARGUMENT / 400 naming the field, with
the server still serving. Outputs are checked with jsonschema / re.fullmatch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import jsonschema
import openai
import pytest
import torch

from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.config import EngineConfig, LoraConfig
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, build_lora_manager, start_engine
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.json_schemas import CHOICES, REGEXES, SCHEMAS

pytestmark = pytest.mark.timeout(300)

ENGINE = EngineConfig(block_size=16, num_kv_blocks=200, max_num_seqs=32, max_num_batched_tokens=256,
                      max_model_len=256, max_new_tokens_cap=200, max_waiting=64,
                      structured_output_max_bytes=4096)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory):
    lib = tmp_path_factory.mktemp("so_api")
    make_peft_adapter(tiny_model_dir, lib / "qv", "qv_r4", seed=5)
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    manager = build_lora_manager(loaded, LoraConfig(max_loras=2, max_lora_rank=8, allowed_roots=(str(lib),)))
    manager.load("qv", lib / "qv")
    server = ServerThread(start_engine(loaded, ENGINE, manager), http_port=0).start()
    with grpc.insecure_channel(server.address) as ch:
        yield SimpleNamespace(url=server.http_url, model=Path(tiny_model_dir).name,
                              grpc=generation_pb2_grpc.GenerationStub(ch), engine=server.server.runtime.engine)
    server.stop()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def grpc_gen(srv, so: pb.StructuredOutput, adapter_id: str = "", temperature: float = 0.0, seed: int = 0,
             max_new_tokens: int = 160, stream: bool = False):
    req = pb.GenerateRequest(prompt=PROMPT, adapter_id=adapter_id, structured_output=so,
                             sampling=pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                        seed=seed))
    if not stream:
        r = srv.grpc.Generate(req)
        return r.text, r.finish_reason
    chunks = list(srv.grpc.GenerateStream(req))
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


# --- gRPC ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter_id", ["", "qv"])
@pytest.mark.parametrize("name", ["tool_call", "extraction", "array_of_objects", "nullable"])
def test_grpc_json_schema(srv, name, adapter_id):
    text, reason = grpc_gen(srv, pb.StructuredOutput(json_schema=json.dumps(SCHEMAS[name])), adapter_id,
                            temperature=0.9, seed=7)
    jsonschema.validate(json.loads(text), SCHEMAS[name])
    assert reason in (pb.FINISH_REASON_GRAMMAR, pb.FINISH_REASON_EOS)


def test_grpc_regex_choice_grammar_json_object_streamed(srv):
    text, reason = grpc_gen(srv, pb.StructuredOutput(regex=REGEXES["phone"]), stream=True)
    assert re.fullmatch(REGEXES["phone"], text) and reason == pb.FINISH_REASON_GRAMMAR
    text, reason = grpc_gen(srv, pb.StructuredOutput(choice=pb.Choices(choices=CHOICES["cities"])), "qv")
    assert text in CHOICES["cities"] and reason == pb.FINISH_REASON_GRAMMAR
    grammar = 'start: "(" expr ")"\nexpr: NUM | NUM "+" NUM\nNUM: /[0-9]{1,3}/'
    text, reason = grpc_gen(srv, pb.StructuredOutput(grammar=grammar))
    assert re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})?\)", text) and reason == pb.FINISH_REASON_GRAMMAR
    # Any JSON object: a random model's keys and strings are unbounded, so only the shape of what
    # it wrote so far can be checked when max_new_tokens cuts it.
    text, reason = grpc_gen(srv, pb.StructuredOutput(json_object=True), max_new_tokens=30)
    assert text.startswith("{")
    if reason != pb.FINISH_REASON_LENGTH:
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("so, field, reason", [
    (pb.StructuredOutput(json_schema='{"type": "frob"}'), "structured_output.json_schema", "frob"),
    (pb.StructuredOutput(json_schema="{oops"), "structured_output.json_schema", "not valid JSON"),
    (pb.StructuredOutput(regex="a(b"), "structured_output.regex", "regular expression"),
    (pb.StructuredOutput(choice=pb.Choices()), "structured_output.choice.choices", "at least one"),
    (pb.StructuredOutput(grammar="start: nope"), "structured_output.grammar", "nope"),
    (pb.StructuredOutput(json_object=False), "structured_output.json_object", "true"),
    (pb.StructuredOutput(), "structured_output", "set one of"),
    (pb.StructuredOutput(regex="a" * 5000), "structured_output.regex", "structured-output-max-bytes"),
])
def test_grpc_bad_constraint_is_invalid_argument(srv, so, field, reason):
    with pytest.raises(grpc.RpcError) as exc:
        grpc_gen(srv, so)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(field + ":") and reason in exc.value.details(), exc.value.details()
    # and the server goes on serving
    text, _ = grpc_gen(srv, pb.StructuredOutput(choice=pb.Choices(choices=["a", "b"])))
    assert text in ("a", "b")


# --- OpenAI HTTP ---------------------------------------------------------------------------------
def test_chat_response_format_json_schema(srv, client):
    schema = SCHEMAS["enum_in_object"]
    r = client.chat.completions.create(
        model="qv", messages=[{"role": "user", "content": "classify: great!"}], max_tokens=100, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    assert r.choices[0].finish_reason == "stop"


def test_completions_response_format_and_guided_fields(srv, client):
    r = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=100, temperature=1.0, seed=3, n=3,
                                  extra_body={"guided_json": SCHEMAS["flat_person"]})
    for c in r.choices:
        jsonschema.validate(json.loads(c.text), SCHEMAS["flat_person"])
    r = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=40, temperature=0,
                                  extra_body={"guided_regex": REGEXES["hex"]})
    assert re.fullmatch(REGEXES["hex"], r.choices[0].text)
    r = client.completions.create(model="qv", prompt=PROMPT, max_tokens=40, temperature=0,
                                  extra_body={"guided_choice": CHOICES["sentiment"]})
    assert r.choices[0].text in CHOICES["sentiment"] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=40, temperature=0,
                                  extra_body={"guided_grammar": 'start: "x" ("y" | "z")'})
    assert r.choices[0].text in ("xy", "xz")
    r = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=40, temperature=0,
                                  extra_body={"structured_outputs": {"regex": REGEXES["word_digits"]}})
    assert re.fullmatch(REGEXES["word_digits"], r.choices[0].text)


def test_chat_stream_guided_json_and_json_object(srv, client):
    schema = SCHEMAS["tool_call"]
    stream = client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": "call"}],
                                            max_tokens=150, temperature=0, stream=True,
                                            extra_body={"guided_json": json.dumps(schema)})
    parts, reasons = [], []
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
    jsonschema.validate(json.loads("".join(parts)), schema)
    assert reasons[-1] == "stop"
    r = client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": "json"}],
                                       max_tokens=20, temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": "yes"}, "guided_choice"),
    ({"guided_json": {"type": "array", "uniqueItems": True}}, "guided_json"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"guided_grammar": "x" * 5000}, "guided_grammar"),
])
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_http_bad_constraint_is_400_naming_the_field(srv, extra, param, route):
    body = {"model": srv.model, "max_tokens": 8, **extra}
    body.update({"prompt": PROMPT} if route == "completions" else {"messages": [{"role": "user", "content": "x"}]})
    r = httpx.post(f"{srv.url}/v1/{'completions' if route == 'completions' else 'chat/completions'}", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "INVALID_ARGUMENT", err


def test_slow_compile_is_refused_in_bounded_time_and_others_go_on(srv, client, monkeypatch):
    """A compile slower than the timeout: that request gets 400 within about the timeout, while an
    unconstrained request sent at the same time completes normally (compiles never run on the
    engine thread or the event loop)."""
    import threading
    import time

    from loraplex.engine.structured import compiler

    real = compiler.compile_constraint

    def slow(vocab, c):
        if c.text == "slow[0-9]":
            time.sleep(2.0)
        return real(vocab, c)

    monkeypatch.setattr(compiler, "compile_constraint", slow)
    monkeypatch.setattr(srv.engine.grammars, "timeout_s", 0.3)
    out = {}

    def constrained():
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json={"model": srv.model, "prompt": PROMPT, "max_tokens": 8,
                                                          "guided_regex": "slow[0-9]"}, timeout=30)
        out["slow"] = (r, time.monotonic() - t0)

    th = threading.Thread(target=constrained)
    th.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    free = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    free_s = time.monotonic() - t0
    th.join(30)
    r, slow_s = out["slow"]
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex", r.text
    assert "compile-timeout" in r.json()["error"]["message"]
    assert slow_s < 1.9  # refused at the timeout (0.3 s), not after the 2 s compile
    assert free.choices[0].finish_reason == "length" and free.usage.completion_tokens == 12
    assert free_s < 1.9, free_s  # not held up by the 2 s compile
