"""Property-based tests (hypothesis): random and boundary values in every request field, random
bytes in adapter folders. Only documented statuses come back, and the server stays healthy.

One in-process server on the tiny random Llama, with a LoRA manager (an adapter root holding one
good adapter, so random adapter ids can hit, miss, or try to escape). max_new_tokens_cap is small so
that every accepted request is cheap; a request asking for more is INVALID_ARGUMENT like any other
bad field.
"""

from __future__ import annotations

import itertools
import os
import json
import math
import shutil
import struct
import time
from types import SimpleNamespace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from loraplex.api.pb.loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.config import EngineConfig, LoraConfig
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, build_lora_manager, start_engine
from tests.fixtures.adapters import make_peft_adapter

pytestmark = pytest.mark.timeout(300)

CAP = 6  # max_new_tokens_cap: accepted requests generate at most this many tokens
ENGINE = EngineConfig(block_size=16, num_kv_blocks=128, max_num_seqs=16, max_num_batched_tokens=256,
                      max_model_len=128, max_new_tokens_cap=CAP, max_waiting=64)
GENERATE_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                  grpc.StatusCode.RESOURCE_EXHAUSTED}
LOAD_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
NORMAL_FINISH = {pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP}
SETTINGS = settings(max_examples=int(os.environ.get("LORAPLEX_PROP_EXAMPLES", "60")), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
INT32 = (-2**31, 2**31 - 1)
UINT32_MAX = 2**32 - 1


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory):
    top = tmp_path_factory.mktemp("prop_adapters")
    root, fuzz = top / "root", top / "fuzz"
    good = make_peft_adapter(tiny_model_dir, root / "good", "qv_r4", seed=7)
    fuzz.mkdir()
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    manager = build_lora_manager(loaded, LoraConfig(
        max_loras=2, max_lora_rank=8, max_cpu_loras=8, adapter_root=str(root),
        allowed_roots=(str(fuzz),), max_adapter_bytes=64 * 1024))
    server = ServerThread(start_engine(loaded, ENGINE, manager)).start()
    with grpc.insecure_channel(server.address) as ch:
        yield SimpleNamespace(gen=generation_pb2_grpc.GenerationStub(ch),
                              adapters=adapters_pb2_grpc.AdaptersStub(ch),
                              health=health_pb2_grpc.HealthStub(ch),
                              engine=server.server.runtime.engine, vocab=loaded.arch.vocab_size,
                              good=good, fuzz=fuzz, ids=itertools.count())
    server.stop()


# --- strategies ----------------------------------------------------------------------------------
# Protobuf strings are UTF-8: no lone surrogates. Everything else (NUL, RTL marks, emoji) goes.
TEXT = st.characters(blacklist_categories=("Cs",))


def texts(max_size: int = 64) -> st.SearchStrategy[str]:
    return st.text(TEXT, max_size=max_size)


def huge(c: str = "x") -> st.SearchStrategy[str]:
    return st.sampled_from([1_000, 20_000, 200_000]).map(lambda n: c * n)


ADAPTER_IDS = st.one_of(
    st.sampled_from(["", "good", "missing", "../x", "..", ".", ".hidden", "a/b", "/etc", "good/..",
                     "x" * 128, "x" * 129, "é", "good\x00", " good"]),
    texts(40), huge("a"))
FLOATS32 = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-45, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan,
                     0.9999999, 1.0000001, 2.0]),
    st.floats(width=32, allow_nan=True, allow_infinity=True))
INT32S = st.one_of(st.sampled_from([INT32[0], -1, 0, 1, 2, CAP, CAP + 1, INT32[1]]), st.integers(*INT32))
TOKEN_IDS = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 600), st.just(UINT32_MAX),
                      st.integers(0, UINT32_MAX))
ROLES = st.one_of(st.sampled_from(["system", "user", "assistant", "", "tool", "USER"]), texts(10))


def _chance(draw, p: float) -> bool:
    # True with probability ~p. Written so that hypothesis' favourite draw (0) means False: its
    # simplest examples are then valid requests, not all-wild ones.
    return draw(st.integers(0, 999)) >= 1000 * (1 - p)


VALID_STOP = st.lists(texts(5).filter(bool), max_size=3)
WILD_STOP = st.one_of(
    st.lists(st.one_of(texts(8), st.just("")), max_size=8),
    st.lists(texts(3), min_size=30, max_size=300),  # many
    st.lists(huge("z"), min_size=1, max_size=2))  # long
SEEDS = st.one_of(st.sampled_from([0, 2**64 - 1]), st.integers(0, 2**64 - 1))
# field -> (valid values, random and boundary values)
SAMPLING_FIELDS = {
    "max_new_tokens": (st.integers(1, CAP), INT32S),
    "temperature": (st.floats(0, 2), FLOATS32),
    "top_p": (st.floats(0.01, 1), FLOATS32),
    "top_k": (st.integers(0, 100), INT32S),
    "repetition_penalty": (st.floats(0.5, 2), FLOATS32),
    "seed": (SEEDS, SEEDS),
}
FIELDS = ("adapter_id", "request_id", "input", "sampling", "stop") + tuple(SAMPLING_FIELDS)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    """A request whose fields in `wild` take random and boundary values, the others valid ones:
    exactly one wild field (each field gets its turn), a few, or most of them."""
    mode = draw(st.sampled_from(["one", "few", "most"]))
    if mode == "one":
        wild = {draw(st.sampled_from(FIELDS))}
    else:
        wild = {f for f in FIELDS if _chance(draw, 0.25 if mode == "few" else 0.8)}

    def pick(field, valid, wild_values):
        return draw(wild_values if field in wild else valid)

    req = pb.GenerateRequest(
        adapter_id=pick("adapter_id", st.sampled_from(["", "good"]), ADAPTER_IDS),
        request_id=pick("request_id", st.one_of(st.just(""), texts(20)), st.one_of(texts(20), huge("r"))))
    w = "input" in wild
    which = draw(st.sampled_from(["none", "prompt", "tokens", "messages"] if w else ["prompt", "tokens", "messages"]))
    if which == "prompt":
        req.prompt = draw(st.one_of(st.just(""), texts(200), huge("ab ")) if w else texts(50).filter(bool))
    elif which == "tokens":
        req.prompt_token_ids.SetInParent()  # set, even when empty
        req.prompt_token_ids.ids.extend(draw(st.one_of(
            st.lists(TOKEN_IDS, max_size=20),
            st.sampled_from([200, 127, 128]).map(lambda n: [5] * n))  # around max_model_len
            if w else st.lists(st.integers(0, 500), min_size=1, max_size=20)))
    elif which == "messages":
        req.messages.SetInParent()
        msgs = draw(st.lists(st.tuples(ROLES, st.one_of(texts(100), huge("m"))), max_size=4) if w else
                    st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), texts(30)),
                             min_size=1, max_size=3))
        for role, content in msgs:
            req.messages.messages.add(role=role, content=content)
    if "sampling" in wild and draw(st.booleans()):
        return req  # sampling unset: all defaults (max_new_tokens 64 > CAP: INVALID_ARGUMENT)
    sp = req.sampling
    for name, (valid, wild_values) in SAMPLING_FIELDS.items():
        # Unset max_new_tokens means 64, above CAP: only a wild request leaves it out.
        if name in wild or name == "max_new_tokens" or draw(st.booleans()):
            if name in wild and name != "max_new_tokens" and draw(st.booleans()):
                continue  # unset
            setattr(sp, name, pick(name, valid, wild_values))
    sp.stop.extend(pick("stop", VALID_STOP, WILD_STOP))
    sp.ignore_eos = draw(st.booleans())
    return req


# --- helpers -------------------------------------------------------------------------------------
def call(fn, req):
    try:
        return grpc.StatusCode.OK, fn(req, timeout=60), ""
    except grpc.RpcError as err:
        return err.code(), None, err.details() or ""


def check_response(req: pb.GenerateRequest, tokens: list[int], finish, vocab: int) -> None:
    limit = req.sampling.max_new_tokens if req.sampling.HasField("max_new_tokens") else 64
    assert 1 <= len(tokens) <= min(limit, CAP), (len(tokens), limit)
    assert all(0 <= t < vocab for t in tokens)
    assert finish in NORMAL_FINISH, finish


def listed(s) -> list:
    return list(s.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters)


def assert_healthy(s) -> None:
    deadline = time.monotonic() + 20
    while True:
        st_ = s.engine.stats()
        if st_.num_running == st_.num_waiting == st_.kv_blocks_used == 0:
            break
        assert time.monotonic() < deadline, f"engine not idle: {st_}"
        time.sleep(0.01)
    assert s.health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    resp = s.gen.Generate(pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(
        max_new_tokens=3, temperature=0.0, ignore_eos=True)), timeout=60)
    assert len(resp.token_ids) == 3 and resp.finish_reason == pb.FINISH_REASON_LENGTH


# --- request fields ------------------------------------------------------------------------------
def test_random_requests_get_only_documented_statuses(srv):
    seen: dict = {}

    @SETTINGS
    @given(req=generate_requests())
    def run(req):
        code, resp, details = call(srv.gen.Generate, req)
        assert code in GENERATE_CODES, (code, details)
        if code is grpc.StatusCode.OK:
            assert resp.request_id == (req.request_id or resp.request_id) and resp.request_id
            check_response(req, list(resp.token_ids), resp.finish_reason, srv.vocab)
            assert resp.usage.completion_tokens == len(resp.token_ids)
        elif code is grpc.StatusCode.INVALID_ARGUMENT:
            assert details and ":" in details, details  # names the field first
        # The same request streamed: the same status class.
        scode, chunks, sdetails = call(lambda r, timeout: list(srv.gen.GenerateStream(r, timeout=timeout)), req)
        assert scode in GENERATE_CODES, (scode, sdetails)
        if scode is grpc.StatusCode.OK:
            assert sum(c.finish_reason != pb.FINISH_REASON_UNSPECIFIED for c in chunks) == 1
            check_response(req, [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason, srv.vocab)
        if code is not grpc.StatusCode.RESOURCE_EXHAUSTED and scode is not grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert scode == code, (code, details, scode, sdetails)
        seen[code] = seen.get(code, 0) + 1

    run()
    print("generate statuses:", {c.name: n for c, n in seen.items()})
    # The strategies really reach both sides of validation.
    assert seen.get(grpc.StatusCode.OK, 0) >= 1 and seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) >= 1, seen
    assert_healthy(srv)


def test_valid_boundary_requests_succeed(srv):
    """Requests valid in every field, at their boundaries, always succeed (so the test above cannot
    pass by refusing everything)."""

    @SETTINGS
    @given(ids=st.lists(st.integers(0, srv.vocab - 1), min_size=1, max_size=ENGINE.max_model_len - 1),
           n=st.integers(1, CAP), temperature=st.sampled_from([0.0, 1e-45, 1.0, 3.4e38]),
           top_p=st.sampled_from([1e-45, 0.5, 1.0]), top_k=st.sampled_from([0, 1, 2**31 - 1]),
           penalty=st.sampled_from([1e-45, 1.0, 3.4e38]), seed=st.integers(0, 2**64 - 1),
           stop=st.lists(texts(5).filter(bool), max_size=4), adapter=st.sampled_from(["", "good"]),
           stream=st.booleans())
    def run(ids, n, temperature, top_p, top_k, penalty, seed, stop, adapter, stream):
        req = pb.GenerateRequest(adapter_id=adapter, prompt_token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(
            max_new_tokens=n, temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=penalty,
            seed=seed, stop=stop))
        if stream:
            chunks = list(srv.gen.GenerateStream(req, timeout=60))
            tokens, finish = [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason
        else:
            resp = srv.gen.Generate(req, timeout=60)
            tokens, finish = list(resp.token_ids), resp.finish_reason
        if finish != pb.FINISH_REASON_STOP:  # a stop string may match before any text is returned
            check_response(req, tokens, finish, srv.vocab)

    run()
    assert_healthy(srv)


# Each field at its boundaries, one at a time, with the exact status (deterministic: the random
# tests above may not draw every edge in a given run).
INV, OK, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND
MAX_LEN = ENGINE.max_model_len


def _sp(**kw) -> dict:
    return {"sampling": dict({"max_new_tokens": 3, "temperature": 0.0}, **kw)}


BOUNDARY_CASES = {
    "adapter '' (base)": ({"adapter_id": ""}, OK, ""),
    "adapter good (on demand)": ({"adapter_id": "good"}, OK, ""),
    "adapter missing": ({"adapter_id": "missing"}, NF, "adapter_id"),
    "adapter ../x": ({"adapter_id": "../x"}, INV, "adapter_id"),
    "adapter a/b": ({"adapter_id": "a/b"}, INV, "adapter_id"),
    "adapter 128 chars": ({"adapter_id": "x" * 128}, NF, "adapter_id"),
    "adapter 129 chars": ({"adapter_id": "x" * 129}, INV, "adapter_id"),
    "adapter unicode": ({"adapter_id": "\u00e9\U0001F600"}, INV, "adapter_id"),
    "adapter NUL": ({"adapter_id": "good\x00"}, INV, "adapter_id"),
    "adapter huge": ({"adapter_id": "a" * 200_000}, INV, "adapter_id"),
    "adapter huge unicode": ({"adapter_id": "\U0001F600" * 20_000}, INV, "adapter_id"),
    "adapter huge with a slash": ({"adapter_id": "a/" * 20_000}, INV, "adapter_id"),
    "request_id unicode": ({"request_id": "\U0001F600\u202e"}, OK, ""),
    "request_id huge": ({"request_id": "r" * 100_000}, INV, "request_id"),
    "no input": ({"input": None}, INV, "input"),
    "empty prompt": ({"prompt": ""}, INV, "prompt"),
    "huge prompt": ({"prompt": "ab " * 300_000}, INV, "prompt"),
    "empty token ids": ({"ids": []}, INV, "prompt_token_ids"),
    "token id vocab-1": ({"ids": ["V-1"]}, OK, ""),
    "token id vocab": ({"ids": ["V"]}, INV, "prompt_token_ids"),
    "token id uint32 max": ({"ids": [UINT32_MAX]}, INV, "prompt_token_ids"),
    "prompt max_model_len-1": ({"ids": [5] * (MAX_LEN - 1)}, OK, ""),
    "prompt max_model_len": ({"ids": [5] * MAX_LEN}, INV, "prompt_token_ids"),
    "no messages": ({"messages": []}, INV, "messages"),
    "bad role": ({"messages": [("bogus", "hi")]}, INV, "messages[0].role"),
    "empty content": ({"messages": [("user", "")]}, OK, ""),
    "sampling unset": ({"sampling": None}, INV, "sampling.max_new_tokens"),
    "max_new_tokens 0": (_sp(max_new_tokens=0), INV, "sampling.max_new_tokens"),
    "max_new_tokens -2^31": (_sp(max_new_tokens=INT32[0]), INV, "sampling.max_new_tokens"),
    "max_new_tokens cap": (_sp(max_new_tokens=CAP), OK, ""),
    "max_new_tokens cap+1": (_sp(max_new_tokens=CAP + 1), INV, "sampling.max_new_tokens"),
    "max_new_tokens 2^31-1": (_sp(max_new_tokens=INT32[1]), INV, "sampling.max_new_tokens"),
    "temperature nan": (_sp(temperature=math.nan), INV, "sampling.temperature"),
    "temperature inf": (_sp(temperature=math.inf), INV, "sampling.temperature"),
    "temperature -tiny": (_sp(temperature=-1e-45), INV, "sampling.temperature"),
    "temperature tiny": (_sp(temperature=1e-45), OK, ""),
    "temperature float32 max": (_sp(temperature=3.4e38), OK, ""),
    "top_p 0": (_sp(temperature=1.0, top_p=0.0), INV, "sampling.top_p"),
    "top_p above 1": (_sp(temperature=1.0, top_p=1.0000001), INV, "sampling.top_p"),
    "top_p nan": (_sp(temperature=1.0, top_p=math.nan), INV, "sampling.top_p"),
    "top_p tiny": (_sp(temperature=1.0, top_p=1e-45), OK, ""),
    "top_k -1": (_sp(top_k=-1), INV, "sampling.top_k"),
    "top_k int32 max": (_sp(temperature=1.0, top_k=INT32[1]), OK, ""),
    "repetition_penalty 0": (_sp(repetition_penalty=0.0), INV, "sampling.repetition_penalty"),
    "repetition_penalty -inf": (_sp(repetition_penalty=-math.inf), INV, "sampling.repetition_penalty"),
    "repetition_penalty tiny": (_sp(temperature=1.0, repetition_penalty=1e-45), OK, ""),
    "repetition_penalty float32 max": (_sp(temperature=1.0, repetition_penalty=3.4e38), OK, ""),
    "seed uint64 max": (_sp(temperature=1.0, seed=2**64 - 1), OK, ""),
    "stop empty string": (_sp(stop=[""]), INV, "sampling.stop"),
    "stop huge": (_sp(stop=["z" * 100_000]), INV, "sampling.stop"),
    "stop many": (_sp(stop=["a"] * 10_000), INV, "sampling.stop"),
    "stop emoji": (_sp(stop=["\U0001F600"]), OK, ""),
}


def _boundary_request(spec: dict, vocab: int) -> pb.GenerateRequest:
    req = pb.GenerateRequest(adapter_id=spec.get("adapter_id", ""), request_id=spec.get("request_id", ""))
    if "ids" in spec:
        req.prompt_token_ids.SetInParent()
        req.prompt_token_ids.ids.extend(vocab - 1 if t == "V-1" else vocab if t == "V" else t for t in spec["ids"])
    elif "messages" in spec:
        req.messages.SetInParent()
        for role, content in spec["messages"]:
            req.messages.messages.add(role=role, content=content)
    elif "prompt" in spec:
        req.prompt = spec["prompt"]
    elif "input" not in spec:
        req.prompt = "hello"
    sampling = spec.get("sampling", {"max_new_tokens": 3, "temperature": 0.0})
    if sampling is not None:
        req.sampling.CopyFrom(pb.SamplingParams(**sampling))
    return req


@pytest.mark.parametrize("case", sorted(BOUNDARY_CASES))
def test_each_field_at_its_boundaries(srv, case):
    spec, code, field = BOUNDARY_CASES[case]
    req = _boundary_request(spec, srv.vocab)
    for fn in (srv.gen.Generate, lambda r, timeout: list(srv.gen.GenerateStream(r, timeout=timeout))):
        got, resp, details = call(fn, req)
        assert got == code, (got, details)
        if code is not OK:
            assert details.startswith(f"{field}"), details
        elif isinstance(resp, list):
            assert resp[-1].finish_reason in NORMAL_FINISH
        else:
            assert resp.finish_reason in NORMAL_FINISH and len(resp.token_ids) >= 1


def test_server_is_healthy_after_the_boundary_cases(srv):
    assert_healthy(srv)


# --- adapter files -------------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), texts(10)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts(8), inner, max_size=4)),
    max_leaves=10)
CONFIG_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
               "layers_to_transform", "layers_pattern", "peft_type", "bias", "use_dora", "fan_in_fan_out",
               "init_lora_weights", "modules_to_save", "init_r", "target_r", "task_type"]


@st.composite
def adapter_config(draw, good: dict) -> bytes:
    kind = draw(st.sampled_from(["good", "mutated", "dropped", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    cfg = dict(good)
    if kind == "mutated":
        for key in draw(st.lists(st.sampled_from(CONFIG_KEYS), min_size=1, max_size=3)):
            cfg[key] = draw(JSON_VALUES)
    elif kind == "dropped":
        for key in draw(st.lists(st.sampled_from(sorted(cfg)), min_size=1, max_size=3)):
            cfg.pop(key, None)
    return json.dumps(cfg).encode()  # may hold NaN / Infinity: Python's json reads them back


@st.composite
def adapter_weights(draw, good: bytes) -> bytes | None:
    kind = draw(st.sampled_from(["good", "missing", "empty", "bytes", "truncated", "flipped", "header",
                                 "huge_header"]))
    if kind == "missing":
        return None
    if kind == "empty":
        return b""
    if kind == "bytes":
        return draw(st.binary(max_size=400))
    if kind == "truncated":
        return good[:draw(st.integers(0, len(good) - 1))]
    if kind == "flipped":
        data = bytearray(good)
        for pos in draw(st.lists(st.integers(0, len(good) * 8 - 1), min_size=1, max_size=8)):
            data[pos // 8] ^= 1 << (pos % 8)
        return bytes(data)
    if kind == "header":  # bit flips confined to the JSON header: shapes, dtypes, offsets
        (n,) = struct.unpack("<Q", good[:8])
        data = bytearray(good)
        for pos in draw(st.lists(st.integers(64, (8 + n) * 8 - 1), min_size=1, max_size=4)):
            data[pos // 8] ^= 1 << (pos % 8)
        return bytes(data)
    if kind == "huge_header":  # a header length far beyond the file
        return struct.pack("<Q", draw(st.sampled_from([2**63 - 1, 2**32, len(good) * 10]))) + good[8:]
    return good


def test_random_adapter_files_are_refused_cleanly(srv):
    good_cfg = json.loads((srv.good / "adapter_config.json").read_text())
    good_bytes = (srv.good / "adapter_model.safetensors").read_bytes()
    outcomes: dict = {}

    @SETTINGS
    @given(cfg=st.one_of(adapter_config(good_cfg), st.none()), weights=adapter_weights(good_bytes),
           pinned=st.booleans())
    def run(cfg, weights, pinned):
        assume(not (cfg == json.dumps(good_cfg).encode() and weights == good_bytes))  # nothing to refuse
        adapter_id = f"fz-{next(srv.ids)}"
        folder = srv.fuzz / adapter_id
        folder.mkdir()
        try:
            if cfg is not None:
                (folder / "adapter_config.json").write_bytes(cfg)
            if weights is not None:
                (folder / "adapter_model.safetensors").write_bytes(weights)
            before = listed(srv)
            code, resp, details = call(srv.adapters.LoadAdapter,
                                       apb.LoadAdapterRequest(adapter_id=adapter_id, path=str(folder), pinned=pinned))
            outcomes[code] = outcomes.get(code, 0) + 1
            if code is grpc.StatusCode.OK:
                # A flipped bit in the tensor data is a valid adapter with other weights: it loads,
                # serves and unloads like any other.
                gen = srv.gen.Generate(pb.GenerateRequest(adapter_id=adapter_id, prompt="hi", sampling=pb.SamplingParams(
                    max_new_tokens=2, temperature=0.0, ignore_eos=True)), timeout=60)
                assert len(gen.token_ids) == 2
                srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=adapter_id))
            else:
                assert code in LOAD_CODES, (code, details)
                assert details.startswith("path: ") or details.startswith("pinned: "), details
            assert listed(srv) == before
        finally:
            shutil.rmtree(folder)

    run()
    print("load statuses:", {c.name: n for c, n in outcomes.items()})
    assert outcomes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) >= 10, outcomes
    assert_healthy(srv)


ADMIN_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_random_adapter_ids_and_paths_in_admin_calls(srv):
    paths = st.one_of(st.sampled_from(["", "/", "/etc/passwd", "/etc", ".", "..", str(srv.good),
                                       str(srv.good) + "/../good", str(srv.good) + "/adapter_config.json",
                                       str(srv.fuzz), str(srv.fuzz) + "/../root/good", str(srv.fuzz) + "/nope",
                                       str(srv.good) + "\x00"]),
                      texts(60), huge("p"))
    seen: dict = {}

    @SETTINGS
    @given(adapter_id=ADAPTER_IDS, path=paths, pinned=st.booleans())
    def run(adapter_id, path, pinned):
        before = listed(srv)
        code, resp, details = call(srv.adapters.LoadAdapter,
                                   apb.LoadAdapterRequest(adapter_id=adapter_id, path=path, pinned=pinned))
        seen[code] = seen.get(code, 0) + 1
        assert code in ADMIN_CODES, (code, details)
        if code is grpc.StatusCode.OK:
            if adapter_id not in {a.adapter_id for a in before}:
                srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=adapter_id))
        else:
            assert details.split(":")[0] in {"adapter_id", "path", "pinned"}, details
        assert listed(srv) == before or code is grpc.StatusCode.OK
        ucode, _, udetails = call(srv.adapters.UnloadAdapter, apb.UnloadAdapterRequest(adapter_id=adapter_id))
        if adapter_id in {a.adapter_id for a in before}:
            assert ucode is grpc.StatusCode.OK
            srv.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id=adapter_id, path=str(srv.good)))
        else:
            assert ucode in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}, (ucode, udetails)

    run()
    print("admin statuses:", {c.name: n for c, n in seen.items()})
    assert_healthy(srv)
