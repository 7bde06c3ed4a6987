"""Logprobs, top_logprobs, logit_bias, echo and best_of, end to end.

The reference is Hugging Face transformers in float64 on the tiny random Llama: for the tokens our
engine generated, one forward over prompt + generated gives log_softmax at every position; our
logprobs (the raw model distribution) must equal it, whatever the sampling knobs were. logit_bias
is checked against a float64 greedy loop that adds the bias before its argmax. The HTTP front is
checked against the gRPC one (same engine) and against the OpenAI wire formats.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import openai
import pytest
import torch

from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.api.token_text import TokenText
from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.logprobs import gather_logprobs
from loraplex.engine.request import InvalidRequestError, Request, SamplingParams
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, start_engine
from tests.fixtures.collector import Collector

pytestmark = pytest.mark.timeout(300)

PROMPTS = ["The quick brown fox", "Once upon a time there was", "1 2 3 4"]
ENGINE = EngineConfig(block_size=8, num_kv_blocks=128, max_num_seqs=16, max_num_batched_tokens=64,
                      max_model_len=128, max_new_tokens_cap=64)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, torch.float32, "cpu")


@pytest.fixture(scope="module")
def hf64(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()


def reference_logprobs(hf64, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated), V] float64 log_softmax of the model at each generated position."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = hf64(ids).logits[0, len(prompt) - 1:-1]  # [G, V]
    return torch.log_softmax(logits, dim=-1)


def run(loaded, requests: list[Request]) -> dict:
    engine = Engine(loaded, ENGINE)
    engine.start()
    try:
        col = Collector()
        for r in requests:
            engine.submit(r, col)
        col.wait([r.request_id for r in requests], timeout=120)
        return dict(col.events)
    finally:
        engine.shutdown(1)


# --- engine ---------------------------------------------------------------------------------------
def test_gather_logprobs_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3  # [S, V]
    tokens = [3, 17, 0, 49]
    got = gather_logprobs(logits, tokens, [2, None, 0, 5])
    ref = torch.log_softmax(logits.double(), -1)
    assert got[1] is None and got[2].top == ()
    for i in (0, 2, 3):
        assert got[i].token_id == tokens[i]
        assert got[i].logprob == pytest.approx(ref[i, tokens[i]].item(), abs=1e-5)
    top = torch.topk(ref[3], 5)
    assert [t for t, _ in got[3].top] == top.indices.tolist()
    assert [v for _, v in got[3].top] == pytest.approx(top.values.tolist(), abs=1e-5)


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.0),
    # Sampled, with every knob that changes the sampling distribution: logprobs stay the raw model's.
    dict(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5,
         frequency_penalty=0.5, seed=1234),
])
def test_engine_logprobs_equal_transformers_float64(loaded, hf64, sampling):
    tok = loaded.tokenizer
    reqs = [Request(f"r{i}", tok.encode(p), SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=5,
                                                           **sampling)) for i, p in enumerate(PROMPTS)]
    # A neighbour without logprobs in the same batch reports none.
    reqs.append(Request("plain", tok.encode(PROMPTS[0]), SamplingParams(max_new_tokens=10, ignore_eos=True)))
    outs = run(loaded, reqs)
    assert all(not o.logprobs for o in outs["plain"])
    for r in reqs[:-1]:
        events = outs[r.request_id]
        generated = [t for o in events for t in o.new_token_ids]
        lps = [lp for o in events for lp in o.logprobs]
        assert len(lps) == len(generated) == 10
        ref = reference_logprobs(hf64, r.prompt_token_ids, generated)
        for pos, lp in enumerate(lps):
            assert lp.token_id == generated[pos]
            assert lp.logprob == pytest.approx(ref[pos, generated[pos]].item(), abs=1e-4)
            top = torch.topk(ref[pos], 5)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert all(a >= b for (_, a), (_, b) in zip(lp.top, lp.top[1:]))


def test_logit_bias_equals_float64_reference(loaded, hf64):
    tok = loaded.tokenizer
    prompt = tok.encode(PROMPTS[1])
    vocab = loaded.arch.vocab_size
    g = torch.Generator().manual_seed(7)
    # Biases large enough to change the greedy path of a random model, on random tokens.
    ids = torch.randperm(vocab, generator=g)[:40].tolist()
    values = (torch.rand(40, generator=g) * 10 - 2).tolist()
    bias = tuple(sorted(zip(ids, values)))
    outs = run(loaded, [Request("b", prompt, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True,
                                                            logit_bias=bias)),
                        Request("u", prompt, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))])
    got = [t for o in outs["b"] for t in o.new_token_ids]
    plain = [t for o in outs["u"] for t in o.new_token_ids]
    add = torch.zeros(vocab, dtype=torch.float64)
    add[torch.tensor(ids)] = torch.tensor(values, dtype=torch.float64)
    seq, want = list(prompt), []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(torch.argmax(hf64(torch.tensor([seq])).logits[0, -1] + add))
            want.append(nxt)
            seq.append(nxt)
    assert got == want
    assert got != plain  # the bias did change the output
    assert set(got) & set(ids)


def test_logit_bias_100_forces_and_minus_100_bans(loaded):
    tok = loaded.tokenizer
    prompt = tok.encode(PROMPTS[0])
    outs = run(loaded, [Request("plain", prompt, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)),
                        Request("force", prompt, SamplingParams(max_new_tokens=6, temperature=0.9, seed=3,
                                                                ignore_eos=True, logit_bias=((123, 100.0),)))])
    plain = [t for o in outs["plain"] for t in o.new_token_ids]
    assert [t for o in outs["force"] for t in o.new_token_ids] == [123] * 6
    banned = tuple((t, -100.0) for t in set(plain))
    outs = run(loaded, [Request("ban", prompt, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True,
                                                              logit_bias=banned))])
    assert not set(t for o in outs["ban"] for t in o.new_token_ids) & set(plain)


@pytest.mark.parametrize("kw, field", [
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"),
    (dict(logit_bias=((5, 101.0),)), "logit_bias"), (dict(logit_bias=((5, math.nan),)), "logit_bias"),
    (dict(logit_bias=((-1, 1.0),)), "logit_bias"),
])
def test_sampling_params_refuse(kw, field):
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(**kw)
    assert exc.value.field == field


def test_engine_refuses_bias_outside_vocab(loaded):
    engine = Engine(loaded, ENGINE)
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        engine.submit(Request("x", [1, 2], SamplingParams(logit_bias=((loaded.arch.vocab_size, 1.0),))),
                      lambda out: None)


def test_token_text_bytes_reassemble_the_text(loaded):
    tt = TokenText(loaded.tokenizer)
    text = "Héllo wörld — 日本語\n  x"
    ids = loaded.tokenizer.encode(text)
    assert b"".join(tt.bytes(i) for i in ids).decode("utf-8") == loaded.tokenizer.decode(ids)


# --- the two front doors -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(tiny_model_dir, loaded):
    server = ServerThread(start_engine(loaded, ENGINE), http_port=0).start()
    with grpc.insecure_channel(server.address) as ch:
        yield SimpleNamespace(url=server.http_url, grpc_address=server.address, model=Path(tiny_model_dir).name,
                              tokenizer=loaded.tokenizer,
                              grpc=generation_pb2_grpc.GenerationStub(ch), vocab=loaded.arch.vocab_size)
    server.stop()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def grpc_logprobs(srv, prompt: str, n: int, k: int, **sampling) -> pb.GenerateResponse:
    return srv.grpc.Generate(pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(
        max_new_tokens=n, ignore_eos=True, logprobs=k, **sampling)))


def test_grpc_logprobs_unary_and_stream(srv, hf64):
    got = grpc_logprobs(srv, PROMPTS[0], 8, 3, temperature=0.0)
    assert len(got.logprobs) == len(got.token_ids) == 8
    ref = reference_logprobs(hf64, srv.tokenizer.encode(PROMPTS[0]), list(got.token_ids))
    tt = TokenText(srv.tokenizer)
    for pos, lp in enumerate(got.logprobs):
        assert lp.token_id == got.token_ids[pos] and lp.token == tt.text(lp.token_id)
        assert lp.logprob == pytest.approx(ref[pos, lp.token_id].item(), abs=1e-4)
        assert [t.token_id for t in lp.top_logprobs] == torch.topk(ref[pos], 3).indices.tolist()
        assert all(t.token == tt.text(t.token_id) for t in lp.top_logprobs)
    chunks = list(srv.grpc.GenerateStream(pb.GenerateRequest(prompt=PROMPTS[0], sampling=pb.SamplingParams(
        max_new_tokens=8, ignore_eos=True, logprobs=3, temperature=0.0))))
    streamed = [lp for c in chunks for lp in c.logprobs]
    assert [c.token_ids for c in chunks if c.token_ids] and len(streamed) == len(got.logprobs)
    # Equal up to float noise: the second call reads the prompt's K/V from the prefix cache.
    for a, b in zip(got.logprobs, streamed):
        assert (a.token_id, a.token) == (b.token_id, b.token)
        assert [(t.token_id, t.token) for t in a.top_logprobs] == [(t.token_id, t.token) for t in b.top_logprobs]
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
        assert [t.logprob for t in b.top_logprobs] == pytest.approx([t.logprob for t in a.top_logprobs], abs=1e-4)
    # Not asked: none.
    plain = srv.grpc.Generate(pb.GenerateRequest(prompt=PROMPTS[0], sampling=pb.SamplingParams(
        max_new_tokens=4, temperature=0.0)))
    assert not plain.logprobs


def test_grpc_logit_bias_and_errors(srv):
    forced = srv.grpc.Generate(pb.GenerateRequest(prompt=PROMPTS[0], sampling=pb.SamplingParams(
        max_new_tokens=3, ignore_eos=True, temperature=0.0, logit_bias={77: 100.0})))
    assert list(forced.token_ids) == [77] * 3
    for sampling, field in [(pb.SamplingParams(logprobs=21), "sampling.logprobs"),
                            (pb.SamplingParams(logit_bias={5: 500.0}), "sampling.logit_bias"),
                            (pb.SamplingParams(logit_bias={srv.vocab + 1: 1.0}), "logit_bias")]:
        with pytest.raises(grpc.RpcError) as exc:
            srv.grpc.Generate(pb.GenerateRequest(prompt="hi", sampling=sampling))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.details().startswith(field), exc.value.details()


def test_completions_logprobs_format_equals_grpc(srv, client):
    want = grpc_logprobs(srv, PROMPTS[1], 8, 2, temperature=0.0)
    got = client.completions.create(model=srv.model, prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    tt = TokenText(srv.tokenizer)
    assert lp.tokens == [tt.text(t) for t in want.token_ids]
    assert lp.token_logprobs == pytest.approx([x.logprob for x in want.logprobs], abs=1e-4)
    for entry, ref in zip(lp.top_logprobs, want.logprobs):
        expected = {t.token: t.logprob for t in ref.top_logprobs}
        expected.setdefault(ref.token, ref.logprob)  # the sampled token is always included
        assert entry == pytest.approx(expected, abs=1e-4)
    text = got.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert "".join(lp.tokens) == text


def test_completions_stream_logprobs_equal_unary(srv):
    body = {"model": srv.model, "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0, "logprobs": 1,
            "ignore_eos": True}
    unary = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                if lp:
                    for key in merged:
                        merged[key] += lp[key]
    # Equal up to float noise: the second call reads the prompt's K/V from the prefix cache.
    assert merged["tokens"] == unary["tokens"] and merged["text_offset"] == unary["text_offset"]
    assert merged["token_logprobs"] == pytest.approx(unary["token_logprobs"], abs=1e-4)
    assert [sorted(t) for t in merged["top_logprobs"]] == [sorted(t) for t in unary["top_logprobs"]]


def test_chat_logprobs_unary_and_stream(srv, client):
    messages = [{"role": "user", "content": "Name a colour."}]
    got = client.chat.completions.create(model=srv.model, messages=messages, max_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=4, extra_body={"ignore_eos": True})
    content = got.choices[0].logprobs.content
    assert len(content) == 8 and all(len(c.top_logprobs) == 4 for c in content)
    raw = b"".join(bytes(c.bytes) for c in content)
    assert raw.decode("utf-8", errors="replace") == got.choices[0].message.content
    for c in content:
        assert c.top_logprobs[0].logprob >= c.logprob - 1e-6  # greedy: the top one was chosen
        assert c.token == bytes(c.bytes).decode("utf-8", errors="replace")
    streamed = []
    for chunk in client.chat.completions.create(model=srv.model, messages=messages, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=4, stream=True,
                                                extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    # Equal up to float noise: the second call reads the prompt's K/V from the prefix cache.
    assert [c.bytes for c in streamed] == [c.bytes for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)
    assert [[t.bytes for t in c.top_logprobs] for c in streamed] == [[t.bytes for t in c.top_logprobs]
                                                                      for c in content]
    plain = client.chat.completions.create(model=srv.model, messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_http_logit_bias(srv, client):
    got = client.completions.create(model=srv.model, prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                    logit_bias={"99": 100}, extra_body={"ignore_eos": True})
    want = srv.grpc.Generate(pb.GenerateRequest(prompt=PROMPTS[0], sampling=pb.SamplingParams(
        max_new_tokens=4, ignore_eos=True, temperature=0.0, logit_bias={99: 100.0})))
    assert got.choices[0].text == want.text and list(want.token_ids) == [99] * 4


def test_echo_puts_the_prompt_first(srv, client):
    plain = client.completions.create(model=srv.model, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    echoed = client.completions.create(model=srv.model, prompt=PROMPTS[0], max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[0] + plain.choices[0].text
    text = ""
    for chunk in client.completions.create(model=srv.model, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                           echo=True, stream=True):
        text += chunk.choices[0].text if chunk.choices else ""
    assert text == echoed.choices[0].text


def test_best_of_returns_the_highest_total_logprob(srv, client):
    """best_of=4, n=2 with a seed generates exactly the choices of n=4 with that seed (choice i
    samples with seed + i) and returns the two with the highest total logprob, in order."""
    common = dict(model=srv.model, prompt=PROMPTS[1], max_tokens=6, temperature=1.0, seed=11, logprobs=0,
                  extra_body={"ignore_eos": True})
    all4 = client.completions.create(n=4, **common)
    totals = [sum(c.logprobs.token_logprobs) for c in all4.choices]
    assert len(set(c.text for c in all4.choices)) > 1  # the candidates differ
    best = sorted(sorted(range(4), key=lambda i: -totals[i])[:2])
    got = client.completions.create(n=2, best_of=4, **common)
    assert [c.text for c in got.choices] == [all4.choices[i].text for i in best]
    assert [c.index for c in got.choices] == [0, 1]
    assert got.usage.completion_tokens == 24  # every generated candidate counts
    # Without logprobs asked, the answer carries none (they were computed for the choice only).
    bare = client.completions.create(n=1, best_of=3, model=srv.model, prompt=PROMPTS[1], max_tokens=4, seed=5)
    assert bare.choices[0].logprobs is None


@pytest.mark.parametrize("route, extra, param", [
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"echo": True, "logprobs": 1}, "echo"),
    ("completions", {"n": 2, "best_of": 1}, "best_of"),
    ("completions", {"best_of": 2, "stream": True}, "best_of"),
    ("completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": "x"}}, "logit_bias"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": 3}, "logprobs"),
])
def test_field_errors(srv, route, extra, param):
    if route == "chat":
        url, body = "/v1/chat/completions", {"model": srv.model, "messages": [{"role": "user", "content": "hi"}]}
    else:
        url, body = "/v1/completions", {"model": srv.model, "prompt": "hi"}
    r = httpx.post(srv.url + url, json={**body, **extra}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_python_client_logprobs_and_logit_bias(srv):
    from loraplex.client import Client

    want = grpc_logprobs(srv, PROMPTS[0], 5, 2, temperature=0.0)
    with Client(srv.grpc_address) as c:
        got = c.generate(PROMPTS[0], max_new_tokens=5, temperature=0, ignore_eos=True, logprobs=2)
        assert [lp.token_id for lp in got.logprobs] == list(got.token_ids) == list(want.token_ids)
        assert [lp.logprob for lp in got.logprobs] == pytest.approx([x.logprob for x in want.logprobs], abs=1e-4)
        assert all(len(lp.top) == 2 for lp in got.logprobs)
        streamed = [lp for chunk in c.stream(PROMPTS[0], max_new_tokens=5, temperature=0, ignore_eos=True,
                                             logprobs=2) for lp in chunk.logprobs]
        assert [lp.token_id for lp in streamed] == list(want.token_ids)
        forced = c.generate(PROMPTS[0], max_new_tokens=3, temperature=0, ignore_eos=True, logit_bias={42: 100})
        assert forced.token_ids == (42, 42, 42)
