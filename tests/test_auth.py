"""Bearer-token authentication (api/auth.py) end to end: in-process servers on the tiny random
Llama, real gRPC clients, every protected call with no, a wrong and the right token.

- `secured`: admin AND generation tokens, with a LoRA manager (LoadAdapter really loads).
- `admin_only` / `generation_only` / `open_server`: one token or none, no LoRA manager; an
  Adapters call that passes authentication then answers UNIMPLEMENTED ("no LoRA manager"), which
  tells "let through" from "refused" without loading anything.

A header that is not a Bearer credential ("Basic x") counts as no token: UNAUTHENTICATED.
"""

from __future__ import annotations

import hmac
from types import SimpleNamespace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex import cli
from loraplex.api import auth as auth_mod
from loraplex.api.auth import TokenAuthInterceptor, bearer_token, token_matches
from loraplex.api.pb.loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.config import AuthConfig, EngineConfig, LoraConfig, ServerConfig
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, build_lora_manager, start_engine
from tests.fixtures.adapters import make_peft_adapter

pytestmark = pytest.mark.timeout(120)

ENGINE = EngineConfig(block_size=16, num_kv_blocks=64, max_num_seqs=8, max_model_len=128,
                      max_new_tokens_cap=64)
ADMIN = "admin-7f3c9a1e5b2d4c6f8a0e"
GEN = "gen-2b4d6f8a0c1e3a5c7e9b"
WRONG = "wrong-0123456789abcdef0123"
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


def _md(token: str | None, scheme: str = "Bearer"):
    return None if token is None else (("authorization", f"{scheme} {token}"),)


def _gen_req() -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="hello world",
                              sampling=pb.SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))


def _stubs(address: str):
    ch = grpc.insecure_channel(address)
    return ch, SimpleNamespace(gen=generation_pb2_grpc.GenerationStub(ch),
                               adapters=adapters_pb2_grpc.AdaptersStub(ch),
                               health=health_pb2_grpc.HealthStub(ch))


def _code(fn, *args, **kwargs):
    try:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):  # a server stream: errors surface while reading
            result = list(result)
        return grpc.StatusCode.OK, result
    except grpc.RpcError as err:
        return err.code(), err.details()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("auth_adapters")
    make_peft_adapter(tiny_model_dir, root / "qv", "qv_r4", seed=3)
    return root


def _server(tiny_model_dir, auth: AuthConfig, lora: LoraConfig | None = None):
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    manager = build_lora_manager(loaded, lora) if lora is not None else None
    return ServerThread(start_engine(loaded, ENGINE, manager), auth=auth).start()


@pytest.fixture(scope="module")
def secured(tiny_model_dir, adapter_dir):
    srv = _server(tiny_model_dir, AuthConfig(admin_token=ADMIN, generation_token=GEN),
                  LoraConfig(max_loras=2, max_lora_rank=4, max_cpu_loras=4, allowed_roots=(str(adapter_dir),)))
    ch, stubs = _stubs(srv.address)
    stubs.address = srv.address
    yield stubs
    ch.close()
    srv.stop()


@pytest.fixture(scope="module", params=["admin_only", "generation_only", "open"])
def partial(request, tiny_model_dir):
    tokens = {"admin_only": AuthConfig(admin_token=ADMIN), "generation_only": AuthConfig(generation_token=GEN),
              "open": AuthConfig()}[request.param]
    srv = _server(tiny_model_dir, tokens)
    ch, stubs = _stubs(srv.address)
    yield request.param, stubs
    ch.close()
    srv.stop()


# --- admin calls on the secured server ------------------------------------------------------------
def test_load_adapter_needs_the_admin_token(secured, adapter_dir):
    req = apb.LoadAdapterRequest(adapter_id="qv-load", path=str(adapter_dir / "qv"))
    assert _code(secured.adapters.LoadAdapter, req)[0] == UNAUTH
    assert _code(secured.adapters.LoadAdapter, req, metadata=_md(WRONG))[0] == DENIED
    # The generation token does not open admin calls.
    assert _code(secured.adapters.LoadAdapter, req, metadata=_md(GEN))[0] == DENIED
    names = [a.adapter_id for a in secured.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=_md(GEN)).adapters]
    assert "qv-load" not in names  # nothing was loaded by the refused calls
    code, resp = _code(secured.adapters.LoadAdapter, req, metadata=_md(ADMIN))
    assert code == grpc.StatusCode.OK and resp.adapter.adapter_id == "qv-load" and resp.adapter.max_rank == 4


def test_unload_adapter_needs_the_admin_token(secured, adapter_dir):
    secured.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id="qv-unload", path=str(adapter_dir / "qv")),
                                 metadata=_md(ADMIN))
    req = apb.UnloadAdapterRequest(adapter_id="qv-unload")
    assert _code(secured.adapters.UnloadAdapter, req)[0] == UNAUTH
    assert _code(secured.adapters.UnloadAdapter, req, metadata=_md(WRONG))[0] == DENIED
    assert _code(secured.adapters.UnloadAdapter, req, metadata=_md(GEN))[0] == DENIED
    listed = secured.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=_md(ADMIN)).adapters
    assert "qv-unload" in [a.adapter_id for a in listed]
    assert _code(secured.adapters.UnloadAdapter, req, metadata=_md(ADMIN))[0] == grpc.StatusCode.OK
    listed = secured.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=_md(ADMIN)).adapters
    assert "qv-unload" not in [a.adapter_id for a in listed]


# --- generation-token calls on the secured server -------------------------------------------------
CALLS = {
    "Generate": lambda s, md: s.gen.Generate(_gen_req(), metadata=md),
    "GenerateStream": lambda s, md: s.gen.GenerateStream(_gen_req(), metadata=md),
    "GetModelInfo": lambda s, md: s.gen.GetModelInfo(pb.GetModelInfoRequest(), metadata=md),
    "ListAdapters": lambda s, md: s.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=md),
}


def _check_result(name: str, result) -> None:
    if name == "Generate":
        assert len(result.token_ids) == 3
    elif name == "GenerateStream":
        assert sum(len(c.token_ids) for c in result) == 3 and result[-1].finish_reason
    elif name == "GetModelInfo":
        assert result.max_model_len == 128
    else:
        assert isinstance(result, apb.ListAdaptersResponse)


@pytest.mark.parametrize("name", list(CALLS))
def test_generation_calls_need_the_generation_or_admin_token(secured, name):
    call = CALLS[name]
    code, details = _code(call, secured, None)
    assert code == UNAUTH and "authorization" in details
    code, details = _code(call, secured, _md(WRONG))
    assert code == DENIED and WRONG not in details  # never echo what was sent
    for token in (GEN, ADMIN):
        code, result = _code(call, secured, _md(token))
        assert code == grpc.StatusCode.OK, (token, result)
        _check_result(name, result)


@pytest.mark.parametrize("header", [f"Basic {GEN}", GEN, "Bearer", "Bearer    ", f"Token {GEN}"])
def test_a_header_that_is_not_a_bearer_token_is_unauthenticated(secured, header):
    code, _ = _code(secured.gen.GetModelInfo, pb.GetModelInfoRequest(), metadata=(("authorization", header),))
    assert code == UNAUTH


def test_the_scheme_is_case_insensitive(secured):
    info = secured.gen.GetModelInfo(pb.GetModelInfoRequest(), metadata=_md(GEN, scheme="bearer"))
    assert info.max_model_len == 128


def test_a_token_differing_only_in_its_last_character_is_denied(secured):
    code, details = _code(secured.gen.GetModelInfo, pb.GetModelInfoRequest(), metadata=_md(GEN[:-1] + "x"))
    assert code == DENIED and GEN[:-1] not in details


def test_health_and_reflection_stay_open(secured):
    resp = secured.health.Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


# --- servers with one token or none --------------------------------------------------------------
def test_partial_configurations(partial):
    kind, s = partial
    load = apb.LoadAdapterRequest(adapter_id="x", path="/nonexistent")
    unimpl = grpc.StatusCode.UNIMPLEMENTED  # let through: the server has no LoRA manager
    # Admin calls: the admin token, else the generation token, else open.
    admin_token = {"admin_only": ADMIN, "generation_only": GEN, "open": None}[kind]
    for call in (lambda md: s.adapters.LoadAdapter(load, metadata=md),
                 lambda md: s.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="x"), metadata=md)):
        if admin_token is None:
            assert _code(call, None)[0] == unimpl
            assert _code(call, _md(WRONG))[0] == unimpl  # no token configured: any header is ignored
        else:
            assert _code(call, None)[0] == UNAUTH
            assert _code(call, _md(WRONG))[0] == DENIED
            assert _code(call, _md(admin_token))[0] == unimpl
    # Generation calls: open unless a generation token is set.
    code, resp = _code(s.gen.Generate, _gen_req())
    if kind == "generation_only":
        assert code == UNAUTH
        assert _code(s.gen.Generate, _gen_req(), metadata=_md(ADMIN))[0] == DENIED
        code, resp = _code(s.gen.Generate, _gen_req(), metadata=_md(GEN))
    assert code == grpc.StatusCode.OK and len(resp.token_ids) == 3


# --- units ---------------------------------------------------------------------------------------
def test_comparison_uses_hmac_compare_digest_against_every_token(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_mod.hmac, "compare_digest", spy)
    assert token_matches(GEN, (GEN, ADMIN))
    # No early exit on a match: both accepted tokens were compared.
    assert calls == [(GEN.encode(), GEN.encode()), (GEN.encode(), ADMIN.encode())]
    assert not token_matches(WRONG, (GEN,))


def test_accepted_tokens_per_method():
    both = TokenAuthInterceptor(AuthConfig(admin_token=ADMIN, generation_token=GEN))
    assert both.accepted_tokens("/loraplex.v1.Adapters/LoadAdapter") == (ADMIN,)
    assert both.accepted_tokens("/loraplex.v1.Adapters/UnloadAdapter") == (ADMIN,)
    assert both.accepted_tokens("/loraplex.v1.Adapters/SomeFutureCall") == (ADMIN,)  # admin by default
    assert both.accepted_tokens("/loraplex.v1.Adapters/ListAdapters") == (GEN, ADMIN)
    assert both.accepted_tokens("/loraplex.v1.Generation/Generate") == (GEN, ADMIN)
    assert both.accepted_tokens("/grpc.health.v1.Health/Check") is None
    assert both.accepted_tokens("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None


def test_bearer_token_parsing():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x-other", "1"), ("authorization", "bEaReR  abc ")]) == "abc"
    assert bearer_token([("authorization", b"Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([]) is None and bearer_token(None) is None


# --- configuration and CLI ------------------------------------------------------------------------
def test_tokens_never_appear_in_a_config_repr():
    config = ServerConfig(auth=AuthConfig(admin_token=ADMIN, generation_token=GEN))
    assert ADMIN not in repr(config) and GEN not in repr(config)


@pytest.mark.parametrize("token, message", [("", "must not be empty"), ("short", "at least 16"),
                                            ("has space in it 12345", "printable ASCII")])
def test_bad_tokens_are_refused_without_echoing_them(token, message):
    with pytest.raises(ValueError, match=message) as info:
        AuthConfig(admin_token=token)
    assert not token or token not in str(info.value)


def test_cli_reads_token_files_stripped(tmp_path):
    (tmp_path / "admin").write_text(f"  {ADMIN}\n")
    (tmp_path / "gen").write_text(GEN + "\n")
    args = cli.build_parser().parse_args(["serve", "--admin-token-file", str(tmp_path / "admin"),
                                          "--generation-token-file", str(tmp_path / "gen")])
    config = cli._server_config(args)
    assert config.auth.admin_token == ADMIN and config.auth.generation_token == GEN


@pytest.mark.parametrize("flags, message", [
    (["--admin-token-file", "{empty}"], "is empty"),
    (["--admin-token-file", "{missing}"], "cannot read"),
    (["--admin-token", ADMIN, "--admin-token-file", "{token}"], "not both"),
    (["--generation-token", "short"], "at least 16"),
])
def test_cli_refuses_bad_token_flags(tmp_path, capsys, flags, message):
    (tmp_path / "empty").write_text(" \n")
    (tmp_path / "token").write_text(ADMIN)
    flags = [f.format(empty=tmp_path / "empty", missing=tmp_path / "missing", token=tmp_path / "token")
             for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and ADMIN not in err


def test_cli_client_commands_send_the_token(secured, tmp_path, capsys, adapter_dir):
    (tmp_path / "admin").write_text(ADMIN + "\n")
    (tmp_path / "gen").write_text(GEN + "\n")
    server = ["--server", secured.address]
    assert cli.main(["info", *server]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert cli.main(["info", *server, "--token", WRONG]) == 1
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err and WRONG not in err
    assert cli.main(["info", *server, "--token-file", str(tmp_path / "gen")]) == 0
    assert "max_model_len: 128" in capsys.readouterr().out
    assert cli.main(["adapters", "load", "qv-cli", str(adapter_dir / "qv"), *server,
                     "--token-file", str(tmp_path / "gen")]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert cli.main(["adapters", "load", "qv-cli", str(adapter_dir / "qv"), *server,
                     "--token-file", str(tmp_path / "admin")]) == 0
    assert cli.main(["adapters", "unload", "qv-cli", *server, "--token", ADMIN]) == 0
