"""TLS (api/tls.py): a CA, a server certificate for 127.0.0.1 and a client certificate are made
on the spot with `cryptography`; in-process servers on the tiny random Llama.

- `tls_server`: server certificate only. A client trusting the CA generates; a plaintext client
  and a client trusting another CA fail.
- `mtls_server`: --tls-client-ca as well: a client without a certificate, or with one from another
  CA, is refused in the handshake; one with a certificate from the CA generates.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from loraplex import cli
from loraplex.api.grpc_server import GrpcServer
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.api.tls import TlsFileError, channel_credentials
from loraplex.config import AuthConfig, EngineConfig, TlsConfig
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, start_engine

pytestmark = pytest.mark.timeout(120)

ENGINE = EngineConfig(block_size=16, num_kv_blocks=64, max_num_seqs=4, max_model_len=128, max_new_tokens_cap=32)
TOKEN = "tls-token-0123456789abcdef"


# --- certificates --------------------------------------------------------------------------------
def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: x509.Name | None, issuer_key, *, ca: bool = False,
          ip: str | None = None, client: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    if ip is not None:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)),
                                                         x509.DNSName("localhost")]), critical=False)
    if not ca:
        usage = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key) -> tuple[str, str]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def _make_ca(folder: Path, name: str):
    key = _key()
    cert = _cert(f"{name} CA", key, None, key, ca=True)
    path, _ = _write(folder, name, cert, key)
    return SimpleNamespace(cert=cert, key=key, path=path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca = _make_ca(d, "ca"), _make_ca(d, "other")
    server_key, client_key, rogue_key = _key(), _key(), _key()
    server = _write(d, "server", _cert("loraplex", server_key, ca.cert.subject, ca.key, ip="127.0.0.1"),
                    server_key)
    client = _write(d, "client", _cert("client", client_key, ca.cert.subject, ca.key, client=True), client_key)
    rogue = _write(d, "rogue", _cert("rogue", rogue_key, other_ca.cert.subject, other_ca.key, client=True),
                   rogue_key)
    return SimpleNamespace(dir=d, ca=ca.path, other_ca=other_ca.path, server=server, client=client, rogue=rogue)


def _serve(tiny_model_dir, tls: TlsConfig, **kwargs) -> ServerThread:
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    return ServerThread(start_engine(loaded, ENGINE), tls=tls, **kwargs).start()


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir, pki):
    srv = _serve(tiny_model_dir, TlsConfig(cert=pki.server[0], key=pki.server[1]))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mtls_server(tiny_model_dir, pki):
    srv = _serve(tiny_model_dir, TlsConfig(cert=pki.server[0], key=pki.server[1], client_ca=pki.ca),
                 auth=AuthConfig(generation_token=TOKEN))
    yield srv
    srv.stop()


def _generate(channel, metadata=None) -> pb.GenerateResponse:
    req = pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_new_tokens=4, temperature=0.0,
                                                                        ignore_eos=True))
    return generation_pb2_grpc.GenerationStub(channel).Generate(req, timeout=10, metadata=metadata)


def _fails(channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        _generate(channel)
    return info.value.code()


# --- round trips ---------------------------------------------------------------------------------
def test_generate_over_tls_with_the_ca(tls_server, pki):
    assert tls_server.server.tls
    with grpc.secure_channel(tls_server.address, channel_credentials(pki.ca)) as ch:
        resp = _generate(ch)
    assert len(resp.token_ids) == 4


def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_server):
    with grpc.insecure_channel(tls_server.address) as ch:
        assert _fails(ch) == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_is_refused(tls_server, pki):
    with grpc.secure_channel(tls_server.address, channel_credentials(pki.other_ca)) as ch:
        assert _fails(ch) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_ca(mtls_server, pki):
    md = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.secure_channel(mtls_server.address, channel_credentials(pki.ca)) as ch:
        assert _fails(ch) == grpc.StatusCode.UNAVAILABLE  # no certificate: handshake refused
    with grpc.secure_channel(mtls_server.address, channel_credentials(pki.ca, *pki.rogue)) as ch:
        assert _fails(ch) == grpc.StatusCode.UNAVAILABLE  # certificate from another CA
    with grpc.secure_channel(mtls_server.address, channel_credentials(pki.ca, *pki.client)) as ch:
        assert len(_generate(ch, metadata=md).token_ids) == 4
        with pytest.raises(grpc.RpcError) as info:  # TLS does not replace the token
            _generate(ch)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cli_client_over_mutual_tls(mtls_server, pki, capsys):
    flags = ["--server", mtls_server.address, "--tls-ca", pki.ca, "--tls-cert", pki.client[0],
             "--tls-key", pki.client[1], "--token", TOKEN]
    assert cli.main(["info", *flags]) == 0
    assert "max_model_len: 128" in capsys.readouterr().out
    assert cli.main(["info", "--server", mtls_server.address, "--tls-ca", pki.ca, "--token", TOKEN]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


# --- configuration -------------------------------------------------------------------------------
def test_cli_parses_the_tls_flags(pki):
    args = cli.build_parser().parse_args(["serve", "--tls-cert", pki.server[0], "--tls-key", pki.server[1],
                                          "--tls-client-ca", pki.ca])
    assert cli._server_config(args).tls == TlsConfig(cert=pki.server[0], key=pki.server[1], client_ca=pki.ca)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cert="a.crt"), "give both or neither"),
    (dict(key="a.key"), "give both or neither"),
    (dict(client_ca="ca.crt"), "needs tls_cert"),
])
def test_incomplete_tls_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TlsConfig(**kwargs)


def test_a_missing_or_bad_cert_file_stops_start_up_with_a_clear_message(pki, tmp_path):
    missing = str(tmp_path / "missing.crt")
    with pytest.raises(TlsFileError, match=f"tls_cert: cannot read {missing}"):
        GrpcServer(tls=TlsConfig(cert=missing, key=pki.server[1]))
    with pytest.raises(TlsFileError, match="tls_key: .* holds no PEM PRIVATE KEY block"):
        GrpcServer(tls=TlsConfig(cert=pki.server[0], key=pki.server[0]))  # a certificate given as key
    with pytest.raises(TlsFileError, match="tls_client_ca: .* is a folder"):
        GrpcServer(tls=TlsConfig(cert=pki.server[0], key=pki.server[1], client_ca=str(tmp_path)))


def test_serve_with_a_missing_cert_exits_1_before_loading_the_model(tmp_path, capsys, pki):
    missing = str(tmp_path / "missing.crt")
    # A model folder that does not hold a model: start-up must stop on the certificate first.
    code = cli.main(["serve", "--model", str(tmp_path), "--port", "0", "--http-port", "0", "--tls-cert", missing,
                     "--tls-key", pki.server[1]])
    assert code == 1
    assert f"tls_cert: cannot read {missing}" in capsys.readouterr().err
