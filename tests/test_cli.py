"""The `loraplex` command: client subcommands against an in-process server, flag validation, and
`loraplex serve` as a real process (health, generate, SIGTERM)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex import cli
from loraplex.api.pb.loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.config import EngineConfig, LoraConfig
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, build_lora_manager, start_engine
from tests.fixtures.serve_process import start_serve
from tests.fixtures.adapters import make_peft_adapter

pytestmark = pytest.mark.timeout(300)

ENGINE = EngineConfig(block_size=16, num_kv_blocks=64, max_num_seqs=8, max_model_len=256)
SCRIPT = Path(sys.executable).parent / "loraplex"  # the console script of the editable install


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    srv = ServerThread(start_engine(loaded, ENGINE)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as ch:
        yield generation_pb2_grpc.GenerationStub(ch)


class _Recorder:
    """Stands in for sys.stdout and remembers each write (streaming = many writes, each flushed)."""

    def __init__(self):
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, s: str) -> int:
        self.writes.append(s)
        return len(s)

    def flush(self) -> None:
        self.flushes += 1


def test_generate_streams_the_completion(server, stub, monkeypatch):
    expected = stub.Generate(pb.GenerateRequest(
        prompt="The quick brown fox", sampling=pb.SamplingParams(max_new_tokens=12, temperature=0.0)))
    assert expected.text
    out = _Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    rc = cli.main(["generate", "The quick brown fox", "--server", server.address,
                   "--max-new-tokens", "12", "--temperature", "0"])
    assert rc == 0
    assert "".join(out.writes) == expected.text + "\n"
    assert len(out.writes) > 2 and out.flushes >= len(out.writes) - 1  # token by token


def test_generate_chat_uses_messages(server, stub, capsys):
    expected = stub.Generate(pb.GenerateRequest(
        messages=pb.Messages(messages=[pb.Message(role="user", content="What is two plus two?")]),
        sampling=pb.SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)))
    plain = stub.Generate(pb.GenerateRequest(
        prompt="What is two plus two?", sampling=pb.SamplingParams(max_new_tokens=10, temperature=0.0,
                                                                  ignore_eos=True)))
    assert expected.text != plain.text  # the template changes the prompt, hence the answer
    assert cli.main(["generate", "What is two plus two?", "--chat", "--server", server.address,
                     "--max-new-tokens", "10", "--temperature", "0"]) in (0,)
    # ignore_eos is not a CLI flag: compare up to what the CLI got (it may stop at EOS earlier).
    printed = capsys.readouterr().out
    assert printed.endswith("\n") and expected.text.startswith(printed[:-1])
    assert printed[:-1]


def test_generate_errors_exit_1_with_status(server, capsys):
    assert cli.main(["generate", "hi", "--server", server.address, "--temperature", "-1"]) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "sampling.temperature" in err
    assert cli.main(["generate", "hi", "--server", server.address, "--adapter", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_generate_unreachable_server(capsys):
    assert cli.main(["generate", "hi", "--server", "127.0.0.1:1", "--timeout", "3"]) == 1
    assert re.search(r"error: (UNAVAILABLE|DEADLINE_EXCEEDED)", capsys.readouterr().err)


def test_info(server, capsys, tiny_model_dir):
    assert cli.main(["info", "--server", server.address]) == 0
    out = capsys.readouterr().out
    assert "architecture: LlamaForCausalLM" in out
    assert f"model_path: {tiny_model_dir}" in out
    assert "max_model_len: 256" in out


def test_adapters_commands_without_a_lora_manager_report_unimplemented(server, capsys):
    for argv in (["adapters", "list"], ["adapters", "load", "poet", "/tmp/poet", "--pinned"],
                 ["adapters", "unload", "poet"]):
        assert cli.main(argv + ["--server", server.address]) == 1
        assert "UNIMPLEMENTED" in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("cli_adapters")
    make_peft_adapter(tiny_model_dir, root / "poet", "patterns_r6", seed=1)
    make_peft_adapter(tiny_model_dir, root / "chef", "qv_r4", seed=2)
    return root


@pytest.fixture(scope="module")
def lora_server(tiny_model_dir, adapter_root):
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    manager = build_lora_manager(loaded, LoraConfig(max_loras=2, max_lora_rank=8, max_cpu_loras=4,
                                                    allowed_roots=(str(adapter_root),)))
    srv = ServerThread(start_engine(loaded, ENGINE, manager)).start()
    yield srv
    srv.stop()


def test_adapters_load_list_generate_unload(lora_server, adapter_root, capsys):
    addr = ["--server", lora_server.address]
    assert cli.main(["adapters", "load", "poet", str(adapter_root / "poet"), "--pinned", *addr]) == 0
    line = capsys.readouterr().out
    assert line.startswith("poet\ttier=device\trank=2-6\t") and "pinned=true" in line
    assert f"source={(adapter_root / 'poet').resolve()}" in line
    assert "modules=q_proj,k_proj,o_proj,down_proj" in line
    assert cli.main(["adapters", "load", "chef", str(adapter_root / "chef"), *addr]) == 0
    capsys.readouterr()

    assert cli.main(["generate", "Once upon a time", "--adapter", "poet", "--max-new-tokens", "6",
                     "--temperature", "0", *addr]) == 0
    with grpc.insecure_channel(lora_server.address) as ch:
        expected = generation_pb2_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(
            adapter_id="poet", prompt="Once upon a time",
            sampling=pb.SamplingParams(max_new_tokens=6, temperature=0.0)))
    assert capsys.readouterr().out == expected.text + "\n"

    assert cli.main(["adapters", "list", *addr]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["chef", "poet"]  # sorted by id
    assert "tier=device" in lines[1] and "rank=4" in lines[0]

    assert cli.main(["adapters", "unload", "chef", *addr]) == 0
    assert capsys.readouterr().out == "unloaded chef\n"
    assert cli.main(["adapters", "list", *addr]) == 0
    assert [ln.split("\t")[0] for ln in capsys.readouterr().out.splitlines()] == ["poet"]


def test_adapters_errors_exit_1_with_status(lora_server, adapter_root, tmp_path, capsys):
    addr = ["--server", lora_server.address]
    assert cli.main(["adapters", "load", "../x", str(adapter_root / "chef"), *addr]) == 1
    assert "INVALID_ARGUMENT: adapter_id:" in capsys.readouterr().err
    assert cli.main(["adapters", "load", "x", str(tmp_path), *addr]) == 1  # outside the roots
    assert "INVALID_ARGUMENT: path:" in capsys.readouterr().err
    assert cli.main(["adapters", "unload", "never-loaded", *addr]) == 1
    assert "NOT_FOUND: adapter_id:" in capsys.readouterr().err


BAD_SERVE_FLAGS = [
    (["--port", "70000"], "port"),
    (["--port", "abc"], "--port"),
    (["--http-port", "70000"], "http_port"),
    (["--port", "9123", "--http-port", "9123"], "http_port"),
    (["--generation-config", "/no/such/folder"], "generation_config"),
    (["--block-size", "0"], "block_size"),
    (["--num-kv-blocks", "-5"], "num_kv_blocks"),
    (["--max-num-seqs", "0"], "max_num_seqs"),
    (["--max-waiting", "0"], "max_waiting"),
    (["--max-model-len", "0"], "max_model_len"),
    (["--dtype", "float8"], "--dtype"),
    (["--device", "tpu"], "--device"),
    (["--shutdown-grace", "-1"], "drain_timeout_seconds"),
    (["--drain-timeout", "-1"], "drain_timeout_seconds"),
    (["--model", "/no/such/folder"], "model"),
    (["--max-message-bytes", "0"], "max_message_bytes"),
    (["--max-loras", "0"], "max_loras"),
    (["--max-lora-rank", "0"], "max_lora_rank"),
    (["--max-cpu-loras", "0"], "max_cpu_loras"),
    (["--adapter-memory", "lots"], "adapter_memory"),
    (["--adapter-memory", "0"], "adapter_memory"),
    (["--adapter-starvation-steps", "0"], "adapter_starvation_steps"),
    (["--max-adapter-bytes", "0"], "max_adapter_bytes"),
    (["--adapter-root", "/no/such/folder"], "adapter_root"),
    (["--allowed-adapter-root", "/no/such/folder"], "allowed_roots"),
    (["--adapter-root", "s3://Bad_Bucket/x"], "adapter_root"),
    (["--allowed-adapter-root", "s3://bucket-ok/a/../b"], "allowed_roots"),
    (["--adapter-cache-size", "0.5"], "adapter_cache_size"),
    (["--adapter", "poet"], "ID=PATH"),
    (["--adapter", "poet=/no/such/folder"], "adapter"),
]


@pytest.mark.parametrize("flags,name", BAD_SERVE_FLAGS, ids=[" ".join(f) for f, _ in BAD_SERVE_FLAGS])
def test_bad_serve_flags_exit_nonzero_with_a_message(flags, name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "loraplex serve: error:" in err and name in err, err


def test_cli_default_message_size_matches_the_server():
    from loraplex.api.grpc_server import DEFAULT_MAX_MESSAGE_BYTES

    assert cli.DEFAULT_MAX_MESSAGE_BYTES == DEFAULT_MAX_MESSAGE_BYTES


def test_console_script_rejects_bad_flags():
    res = subprocess.run([str(SCRIPT), "serve", "--max-waiting", "0"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert "max_waiting: must be >= 1" in res.stderr


def test_serve_process_end_to_end(tiny_model_dir, adapter_root, tmp_path):
    """`loraplex serve` in its own process: start-up adapters loaded, SERVING after load, answers
    (with an adapter too, one loaded on demand from --adapter-root), exits 0 on SIGTERM."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    ondemand = tmp_path / "root"
    ondemand.mkdir()
    os.symlink(adapter_root / "chef", ondemand / "chef-od")  # a link inside the root, to a root
    proc, address, log = start_serve(
        [str(SCRIPT), "serve", "--model", str(tiny_model_dir), "--port", "0", "--http-port", "0", "--dtype", "float32",
         "--device", "cpu", "--num-kv-blocks", "64", "--max-model-len", "256", "--shutdown-grace", "1",
         "--adapter", f"poet={adapter_root / 'poet'}", "--adapter-root", str(ondemand),
         "--allowed-adapter-root", str(adapter_root), "--max-loras", "2", "--max-lora-rank", "8"], env)
    try:
        with grpc.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            resp = generation_pb2_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(
                prompt="hello", sampling=pb.SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)))
            assert len(resp.token_ids) == 5
            adapters = adapters_pb2_grpc.AdaptersStub(ch).ListAdapters(apb.ListAdaptersRequest()).adapters
            assert [(a.adapter_id, a.source, a.max_rank) for a in adapters] == \
                [("poet", str((adapter_root / "poet").resolve()), 6)]
            for adapter_id in ("poet", "chef-od"):
                resp = generation_pb2_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(
                    prompt="hello", adapter_id=adapter_id,
                    sampling=pb.SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)))
                assert len(resp.token_ids) == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_serve_with_an_unusable_model_folder_exits_1(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    rc = cli.main(["serve", "--model", str(tmp_path), "--port", "0", "--http-port", "0", "--dtype", "float32",
                   "--device", "cpu"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "loraplex serve: error:" in err and "architectures" in err, err


def test_serve_stops_when_a_start_up_adapter_is_unusable(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    rc = cli.main(["serve", "--model", str(tiny_model_dir), "--port", "0", "--http-port", "0", "--dtype", "float32",
                   "--device", "cpu", "--num-kv-blocks", "16", "--adapter", f"bad={bad}"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "loraplex serve: error: adapter bad=" in err and "use_dora" in err, err
