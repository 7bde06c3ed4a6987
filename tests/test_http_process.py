"""`loraplex serve` as a real process, spoken to with curl over its OpenAI-compatible HTTP port
and with gRPC next to it: the flags (--http-port, --no-http, --generation-config), the model's
sampling defaults, and a clean SIGTERM with both doors open."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.serve_process import http_url, start_serve

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")]

SERVE = [sys.executable, "-m", "loraplex.cli", "serve", "--port", "0", "--dtype", "float32", "--device", "cpu",
         "--num-kv-blocks", "64", "--max-model-len", "256", "--shutdown-grace", "1"]


def curl(*args: str) -> tuple[int, str]:
    """(HTTP status, body) of a curl call."""
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


@pytest.fixture(scope="module")
def model_with_defaults(tmp_path_factory, tiny_model_dir):
    """The tiny model with a generation_config.json that asks for greedy decoding."""
    folder = tmp_path_factory.mktemp("greedy_model") / "tiny-greedy"
    shutil.copytree(tiny_model_dir, folder)
    cfg_path = folder / "generation_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg.update(temperature=0.0, top_p=0.9, top_k=20, repetition_penalty=1.0)
    cfg_path.write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def server(model_with_defaults, tmp_path_factory):
    root = tmp_path_factory.mktemp("http_root")
    make_peft_adapter(model_with_defaults, root / "poet", "qv_r4", seed=3)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc, address, log = start_serve(SERVE + ["--model", str(model_with_defaults), "--http-port", "0",
                                              "--adapter-root", str(root), "--max-lora-rank", "8"], env)
    try:
        yield proc, address, http_url(log), log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_curl_against_a_real_server(server, model_with_defaults):
    proc, address, url, _ = server
    model = model_with_defaults.name
    assert curl(f"{url}/health") == (200, '{"status":"serving"}')
    status, body = curl(f"{url}/v1/models")
    models = json.loads(body)["data"]
    assert status == 200 and models[0]["id"] == model
    assert models[0]["sampling_defaults"] == {"temperature": 0.0, "top_p": pytest.approx(0.9), "top_k": 20,
                                              "repetition_penalty": 1.0,
                                              "source": str(model_with_defaults / "generation_config.json")}
    with grpc.insecure_channel(address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.sampling_defaults.temperature == 0.0 and info.sampling_defaults.top_k == 20
        # No sampling fields: the model's generation_config.json makes it greedy, over both doors.
        want = stub.Generate(pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(
            max_new_tokens=8, ignore_eos=True)))
        again = stub.Generate(pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(
            max_new_tokens=8, temperature=0, top_p=0.9, top_k=20, ignore_eos=True)))
        assert want.text == again.text
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True})
    status, out = curl(f"{url}/v1/completions", "-H", "Content-Type: application/json", "-d", body)
    assert status == 200 and json.loads(out)["choices"][0]["text"] == want.text

    chat = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 5,
                       "stream": True, "stream_options": {"include_usage": True}})
    status, out = curl("-N", f"{url}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", chat)
    events = [e for e in out.split("\n\n") if e.strip()]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["usage"]["completion_tokens"] <= 5

    # The adapter under --adapter-root loads on first use.
    status, out = curl(f"{url}/v1/completions", "-d", json.dumps({"model": "poet", "prompt": "Hi", "max_tokens": 3}))
    assert status == 200, out
    status, out = curl(f"{url}/v1/completions", "-d", json.dumps({"model": "nobody", "prompt": "Hi"}))
    assert status == 404 and json.loads(out)["error"]["param"] == "model"
    status, out = curl(f"{url}/v1/completions", "-d", "{oops")
    assert status == 400 and json.loads(out)["error"]["type"] == "invalid_request_error"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_no_http_serves_grpc_only(tiny_model_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc, address, log = start_serve(SERVE + ["--model", str(tiny_model_dir), "--no-http"], env)
    try:
        assert not any("OpenAI-compatible HTTP" in line for line in log)
        with grpc.insecure_channel(address) as ch:
            info = generation_pb2_grpc.GenerationStub(ch).GetModelInfo(pb.GetModelInfoRequest())
            assert info.sampling_defaults.source == "neutral" and info.sampling_defaults.temperature == 1.0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_a_taken_http_port_stops_start_up_at_once(tiny_model_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = subprocess.run(SERVE + ["--model", str(tiny_model_dir), "--http-port", str(port)],
                             capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (--http-port)" in res.stderr, res.stderr
    assert "loading" not in res.stderr  # before the model load


def test_served_model_name(tiny_model_dir):
    """--served-model-name: the names `model` accepts for the base; the first is listed and echoed;
    the folder's own name is then unknown (404), as in vLLM."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc, _, log = start_serve(SERVE + ["--model", str(tiny_model_dir), "--http-port", "0",
                                        "--served-model-name", "team/llm-v2", "llm"], env)
    try:
        url = http_url(log)
        status, body = curl(f"{url}/v1/models")
        assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["team/llm-v2"]
        for name in ("team/llm-v2", "llm"):
            status, body = curl(f"{url}/v1/completions", "-H", "Content-Type: application/json", "-d",
                                json.dumps({"model": name, "prompt": "hi", "max_tokens": 2}))
            assert status == 200 and json.loads(body)["model"] == name, body
        status, body = curl(f"{url}/v1/completions", "-H", "Content-Type: application/json", "-d",
                            json.dumps({"model": Path(tiny_model_dir).name, "prompt": "hi", "max_tokens": 2}))
        assert status == 404 and json.loads(body)["error"]["param"] == "model", body
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
