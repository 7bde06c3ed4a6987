"""The checked-in stubs under server/loraplex/api/pb/ match what scripts/gen_proto.py generates."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen_proto.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gen_proto", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_checked_in_stubs_are_current():
    res = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"stale stubs:\n{res.stdout}\n{res.stderr}"


def test_check_detects_a_stale_stub(tmp_path, capsys):
    gen = _load_script()
    copy = tmp_path / "pb"
    shutil.copytree(gen.OUT_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert gen.check(copy) == 0
    stub = copy / "loraplex" / "v1" / "generation_pb2.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    assert gen.check(copy) == 1
    assert "edited by hand" in capsys.readouterr().out
    stub.unlink()
    assert gen.check(copy) == 1


def test_stubs_import_as_loraplex_api_pb():
    from loraplex.api.pb.loraplex.v1 import adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

    # Names as reflection / grpcurl show them.
    assert generation_pb2.DESCRIPTOR.name == "loraplex/v1/generation.proto"
    assert generation_pb2.DESCRIPTOR.package == "loraplex.v1"
    assert set(generation_pb2.DESCRIPTOR.services_by_name) == {"Generation"}
    assert hasattr(generation_pb2_grpc, "GenerationServicer")
    assert hasattr(adapters_pb2_grpc, "AdaptersStub")
    # `optional` scalars distinguish "unset" from zero (temperature 0 = greedy).
    sp = generation_pb2.SamplingParams()
    assert not sp.HasField("temperature")
    sp.temperature = 0.0
    assert sp.HasField("temperature")
