"""The `x-adapter-id` header (api/affinity.py): a proxy routes on it, so the server refuses a request
whose header disagrees with the adapter it asks for, over gRPC (INVALID_ARGUMENT) and HTTP (400),
counts the refusal, and serves the request when they agree; loraplex.client sends it by itself.

In-process server on the tiny random Llama with one adapter under --adapter-root.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry

from loraplex.api.affinity import HEADER, check_adapter_header
from loraplex.api.metrics import LoraplexMetrics
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.api.status import ApiError
from loraplex.client import Client, LoraplexError
from loraplex.config import EngineConfig, LoraConfig
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, build_lora_manager, start_engine
from tests.fixtures.adapters import make_peft_adapter

pytestmark = pytest.mark.timeout(300)

ENGINE = EngineConfig(block_size=16, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=128,
                      max_model_len=128, max_new_tokens_cap=16, max_waiting=16)
ADAPTER = "poet"


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("header_adapters")
    make_peft_adapter(tiny_model_dir, root / ADAPTER, "qv_r4", seed=5)
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    manager = build_lora_manager(loaded, LoraConfig(max_lora_rank=8, adapter_root=str(root)))
    metrics = LoraplexMetrics(CollectorRegistry())
    runtime = start_engine(loaded, ENGINE, manager, observers=[metrics], metrics=metrics)
    metrics.bind(runtime.engine, manager, loaded.model)
    server = ServerThread(runtime, http_port=0).start()
    with grpc.insecure_channel(server.address) as ch:
        yield SimpleNamespace(server=server, url=server.http_url, model=Path(tiny_model_dir).name, metrics=metrics,
                              stub=generation_pb2_grpc.GenerationStub(ch))
    server.stop()


def rejected(srv) -> float:
    return srv.metrics.registry.get_sample_value("loraplex_requests_rejected_total",
                                                 {"code": "INVALID_ARGUMENT"}) or 0.0


def generate(srv, adapter_id: str, headers: list[str] | None):
    md = [(HEADER, v) for v in headers] if headers is not None else None
    return srv.stub.Generate(pb.GenerateRequest(adapter_id=adapter_id, prompt="Hello", sampling=pb.SamplingParams(
        max_new_tokens=2, temperature=0.0, ignore_eos=True)), metadata=md, timeout=60)


@pytest.mark.parametrize("adapter_id, headers", [(ADAPTER, [ADAPTER]), (ADAPTER, None), ("", None), ("", [""])])
def test_grpc_header_that_agrees_is_served(srv, adapter_id, headers):
    assert len(generate(srv, adapter_id, headers).token_ids) == 2


@pytest.mark.parametrize("adapter_id, headers, words", [
    (ADAPTER, ["other"], ["'other'", f"adapter '{ADAPTER}'"]),
    (ADAPTER, [""], ["''", f"adapter '{ADAPTER}'"]),
    ("", [ADAPTER], [f"'{ADAPTER}'", "the base model"]),
    (ADAPTER, [ADAPTER, ADAPTER], ["2 times"]),
])
def test_grpc_header_that_disagrees_is_refused_and_counted(srv, adapter_id, headers, words):
    before = rejected(srv)
    with pytest.raises(grpc.RpcError) as info:
        generate(srv, adapter_id, headers)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details()
    assert details.startswith(f"{HEADER}: ") and all(w in details for w in words), details
    assert rejected(srv) == before + 1
    assert len(generate(srv, adapter_id, None).token_ids) == 2  # the server goes on as before


def test_http_header(srv):
    body = {"model": ADAPTER, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        ok = http.post("/v1/completions", json=body, headers={HEADER: ADAPTER})
        assert ok.status_code == 200, ok.text
        for model, value in ((ADAPTER, "other"), (srv.model, ADAPTER), (srv.model, srv.model)):
            bad = http.post("/v1/completions", json=dict(body, model=model), headers={HEADER: value})
            err = bad.json()["error"]
            assert bad.status_code == 400 and err["param"] == HEADER and err["code"] == "INVALID_ARGUMENT", bad.text
            assert repr(value) in err["message"]
        chat = {"model": srv.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert http.post("/v1/chat/completions", json=chat, headers={HEADER: ""}).status_code == 200
        bad = http.post("/v1/chat/completions", json=chat, headers={HEADER: ADAPTER})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == HEADER


def test_client_sends_the_header(srv):
    """Through loraplex.client the header always agrees: both calls succeed; a call whose metadata
    claimed another adapter would fail (checked above), so the header really travels."""
    with Client(srv.server.address, timeout=60) as c:
        before = rejected(srv)
        assert len(c.generate("Hi", adapter=ADAPTER, max_new_tokens=2, ignore_eos=True).token_ids) == 2
        assert len(list(c.stream("Hi", adapter=ADAPTER, max_new_tokens=2, ignore_eos=True))) >= 1
        assert c.generate("Hi", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
        assert rejected(srv) == before
        with pytest.raises(LoraplexError) as info:  # the client's own header, wrong on purpose
            c._call(c._gen, "Generate", pb.GenerateRequest(adapter_id=ADAPTER, prompt="Hi"), None,
                    ((HEADER, "nope"),))
        assert info.value.code == "INVALID_ARGUMENT" and info.value.details.startswith(HEADER)


def test_check_function_alone():
    check_adapter_header([], "x")
    check_adapter_header(["x"], "x")
    check_adapter_header([""], "")
    for values, adapter in ((["y"], "x"), ([""], "x"), (["x"], ""), (["x", "x"], "x")):
        with pytest.raises(ApiError) as info:
            check_adapter_header(values, adapter)
        assert info.value.field == HEADER
