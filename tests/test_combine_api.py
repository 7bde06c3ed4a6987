"""CombineAdapters, SaveAdapter and per-request mixtures (GenerateRequest.adapters), end to end over
gRPC on an in-process server (tiny random Llama, random PEFT adapters).

- A mixture request gives the same greedy tokens as the `cat` combination of the same adapters
  and weights, and is served in the same batch as single-adapter requests.
- SaveAdapter writes a PEFT folder that PEFT loads as the same update (delta == ours, float32)
  and that LoadAdapter serves with the same greedy tokens.
- Bad input names the field with the right status, and registers / writes nothing.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch

from loraplex.api.pb.loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.client import combine_request
from loraplex.config import EngineConfig, LoraConfig
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, build_lora_manager, start_engine
from tests.fixtures.adapters import make_peft_adapter

pytestmark = pytest.mark.timeout(300)

ENGINE = EngineConfig(block_size=16, num_kv_blocks=128, max_num_seqs=16, max_num_batched_tokens=256,
                      max_model_len=128, max_new_tokens_cap=64, max_waiting=64)
MAX_RANK = 16
PROMPT = "Once upon a time there was"


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("combine_api")
    lib = root / "library"
    for name, kind, seed in (("qa", "qv_r4", 21), ("qb", "qv_r4", 22), ("pat", "patterns_r6", 23),
                             ("big", "all_r8_rslora", 24)):
        make_peft_adapter(tiny_model_dir, lib / name, kind, seed=seed)
    (root / "out").mkdir()
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    lora = LoraConfig(max_lora_rank=MAX_RANK, allowed_roots=(str(lib), str(root / "out")), max_mixture_adapters=3)
    server = ServerThread(start_engine(loaded, ENGINE, build_lora_manager(loaded, lora)), http_port=0).start()
    with grpc.insecure_channel(server.address) as ch:
        s = SimpleNamespace(gen=generation_pb2_grpc.GenerationStub(ch), adapters=adapters_pb2_grpc.AdaptersStub(ch),
                            manager=server.server.runtime.lora_manager, root=root, lib=lib, base=tiny_model_dir,
                            http=server.http_url, model=tiny_model_dir.name, address=server.address)
        for name in ("qa", "qb", "pat", "big"):
            s.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id=name, path=str(lib / name)))
        yield s
    server.stop()


def greedy(s, adapter_id: str = "", adapters=(), n: int = 8) -> list[int]:
    req = pb.GenerateRequest(adapter_id=adapter_id, prompt=PROMPT,
                             sampling=pb.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))
    for a, w in adapters:
        req.adapters.add(adapter_id=a, weight=w)
    resp = s.gen.Generate(req)
    assert len(resp.token_ids) == n
    return list(resp.token_ids)


def listed(s) -> dict[str, apb.AdapterInfo]:
    return {a.adapter_id: a for a in s.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def rpc_error(call, req) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(req)
    return err.value


def test_mixture_equals_cat_combination_in_one_batch(srv):
    parts = [("qa", 0.8), ("pat", 0.5), ("qb", -0.3)]
    info = srv.adapters.CombineAdapters(combine_request("cat3", parts, "cat")).adapter
    assert list(info.combined_from) == ["qa", "pat", "qb"] and info.combine_method == "cat"
    assert info.max_rank == 4 + 6 + 4
    want = greedy(srv, "cat3")
    assert want != greedy(srv, "qa") and want != greedy(srv)
    # Concurrent: mixture rows share steps with single-adapter and base rows.
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(greedy, srv, "", parts), pool.submit(greedy, srv, "qa"),
                   pool.submit(greedy, srv, "", parts), pool.submit(greedy, srv)]
        got = [f.result() for f in futures]
    assert got[0] == got[2] == want
    assert got[1] == greedy(srv, "qa") and got[3] == greedy(srv)
    # Built once for the same content, and never listed.
    assert srv.manager.stats.loads.get("mixture") == 1
    assert not any(k.startswith("~") for k in listed(srv))
    srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="cat3"))


def test_save_adapter_round_trip(srv):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    srv.adapters.CombineAdapters(combine_request("tied", [("qa", 0.6), ("qb", 0.9)], "ties", density=0.5))
    out = srv.root / "out" / "tied"
    path = srv.adapters.SaveAdapter(apb.SaveAdapterRequest(adapter_id="tied", path=str(out))).path
    assert Path(path) == out.resolve() and tree(out) == ["adapter_config.json", "adapter_model.safetensors"]
    # PEFT reads it as the same update.
    ours = srv.manager.weights("tied")
    base = AutoModelForCausalLM.from_pretrained(str(srv.base), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out))
    checked = 0
    for key, mod in model.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            parts = key.split(".")
            m = ours.modules[(int(parts[2]), parts[-1])]
            torch.testing.assert_close(mod.get_delta_weight("default"), (m.B @ m.A) * m.scale, atol=1e-6, rtol=0)
            checked += 1
    assert checked == len(ours.modules) > 0
    # Served from the folder: the same tokens.
    srv.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id="tied-saved", path=str(out)))
    assert greedy(srv, "tied-saved") == greedy(srv, "tied")
    # No overwrite unless asked; with overwrite the folder is replaced whole.
    err = rpc_error(srv.adapters.SaveAdapter, apb.SaveAdapterRequest(adapter_id="qa", path=str(out)))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and err.details().startswith("path:")
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"]
    srv.adapters.SaveAdapter(apb.SaveAdapterRequest(adapter_id="pat", path=str(out), overwrite=True))
    assert tree(srv.root / "out") == ["tied", "tied/adapter_config.json", "tied/adapter_model.safetensors"]
    for name in ("tied", "tied-saved"):
        srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=name))


def _mix(parts, adapter_id=""):
    req = pb.GenerateRequest(adapter_id=adapter_id, prompt=PROMPT, sampling=pb.SamplingParams(max_new_tokens=2))
    for a, w in parts:
        req.adapters.add(adapter_id=a, weight=w)
    return req


@pytest.mark.parametrize("kind,req,code,field", [
    ("gen", _mix([("qa", 1.0)], adapter_id="qb"), "INVALID_ARGUMENT", "adapters"),
    ("gen", _mix([("qa", 1.0)] * 4), "INVALID_ARGUMENT", "adapters"),  # > --max-mixture-adapters 3
    ("gen", _mix([("qa", 1.0), ("nope", 1.0)]), "NOT_FOUND", "adapters[1].adapter_id"),
    ("gen", _mix([("qa", 1.0), ("qb", math.nan)]), "INVALID_ARGUMENT", "adapters[1].weight"),
    ("gen", _mix([("big", 1.0), ("pat", 1.0), ("qa", 1.0)]), "INVALID_ARGUMENT", "adapters"),  # rank 18 > 16
    ("combine", combine_request("x", [("qa", 1.0), ("pat", 1.0)], "linear"), "INVALID_ARGUMENT", "adapters"),
    ("combine", combine_request("x", [("qa", 1.0), ("qb", 1.0)], "svd", svd_rank=9), "INVALID_ARGUMENT", "svd_rank"),
    ("combine", combine_request("x", [("qa", 1.0), ("qb", -1.0)], "ties", density=0.5), "INVALID_ARGUMENT",
     "adapters[1].weight"),
    ("combine", combine_request("x", [("qa", 1.0), ("qb", 1.0)], "dare_linear"), "INVALID_ARGUMENT", "density"),
    ("combine", combine_request("x", [("qa", 1.0), ("nope", 1.0)], "cat"), "NOT_FOUND", "adapter_id"),
    ("combine", combine_request("qa", [("qa", 1.0), ("qb", 1.0)], "cat"), "ALREADY_EXISTS", "adapter_id"),
    ("combine", combine_request("x", [], "cat"), "INVALID_ARGUMENT", "adapters"),
    ("combine", combine_request("x", [("qa", 1.0)], "average"), "INVALID_ARGUMENT", "method"),
    ("save", apb.SaveAdapterRequest(adapter_id="qa", path="/tmp/elsewhere/qa"), "INVALID_ARGUMENT", "path"),
    ("save", apb.SaveAdapterRequest(adapter_id="nope", path="OUT/nope"), "NOT_FOUND", "adapter_id"),
])
def test_bad_input_changes_nothing(srv, kind, req, code, field):
    before, files = listed(srv), tree(srv.root)
    loads = dict(srv.manager.stats.loads)
    if kind == "save" and req.path.startswith("OUT/"):
        req.path = str(srv.root / "out" / req.path[4:])
    call = {"gen": srv.gen.Generate, "combine": srv.adapters.CombineAdapters, "save": srv.adapters.SaveAdapter}[kind]
    err = rpc_error(call, req)
    assert err.code().name == code and err.details().startswith(field + ":"), err.details()
    assert listed(srv).keys() == before.keys() and tree(srv.root) == files
    assert srv.manager.stats.loads.get("mixture") == loads.get("mixture")
    assert srv.manager.stats.loads.get("combine") == loads.get("combine")


def test_http_mixture_and_combine_route(srv):
    import httpx

    parts = [("qa", 0.7), ("qb", 0.2)]
    body = {"model": srv.model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "adapters": [{"adapter_id": a, "weight": w} for a, w in parts]}
    with httpx.Client(base_url=srv.http, timeout=60) as http:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
        r = http.post("/v1/combine_lora_adapters", json={
            "lora_name": "cat-http", "method": "cat", "adapters": [{"lora_name": a, "weight": w} for a, w in parts]})
        assert r.status_code == 200, r.text
        assert r.json()["combined_from"] == ["qa", "qb"] and r.json()["max_rank"] == 8
        r = http.post("/v1/completions", json={**body, "model": "cat-http", "adapters": None})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == text
        req = _mix(parts)
        req.sampling.CopyFrom(pb.SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
        assert srv.gen.Generate(req).text == text
        # Errors: 400/404 naming the field, nothing registered.
        before = listed(srv).keys()
        r = http.post("/v1/completions", json={**body, "model": "qa"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "adapters"
        r = http.post("/v1/chat/completions", json={"model": srv.model, "messages": [{"role": "user", "content": "hi"}],
                                                    "adapters": [{"adapter_id": "nope", "weight": 1}]})
        assert r.status_code == 404 and r.json()["error"]["message"].startswith("adapters[0].adapter_id:")
        r = http.post("/v1/combine_lora_adapters", json={"lora_name": "x", "method": "svd", "svd_rank": 9,
                                                          "adapters": [{"lora_name": "qa"}, {"lora_name": "qb"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "svd_rank", r.text
        assert listed(srv).keys() == before
    srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="cat-http"))


def test_cli_combine_and_save(srv, capsys):
    from loraplex.cli import main

    addr = ["--server", srv.address]
    assert main(["adapters", "combine", "lin-cli", "qa=1", "qb=0.5", "--method", "linear", *addr]) == 0
    assert capsys.readouterr().out.startswith("lin-cli\t")
    assert listed(srv)["lin-cli"].combine_method == "linear"
    out = srv.root / "out" / "lin-cli"
    assert main(["adapters", "save", "lin-cli", str(out), *addr]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert main(["adapters", "save", "lin-cli", str(out), *addr]) == 1  # exists: refused without --force
    assert "ALREADY_EXISTS" in capsys.readouterr().err
    assert main(["adapters", "combine", "bad", "qa=x", *addr]) == 2
    assert "bad" not in listed(srv)
    srv.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="lin-cli"))


def test_combine_and_save_are_admin_calls():
    from loraplex.api.auth import ADMIN, TokenAuthInterceptor

    for method in ("CombineAdapters", "SaveAdapter"):
        assert TokenAuthInterceptor.access(f"/loraplex.v1.Adapters/{method}") == ADMIN
