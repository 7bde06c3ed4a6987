"""Server TLS credentials from PEM files (`--tls-cert`, `--tls-key`, optional `--tls-client-ca`).

The files are read once at start-up. grpc itself would only notice a bad file at the first
handshake (every client failing with a vague "handshake failed"), so a file that is missing,
unreadable or holds no PEM block stops start-up here with a message naming the flag and the file.
With a client CA, every client must present a certificate signed by it (mutual TLS); a client
without one is refused during the handshake.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from loraplex.config import TlsConfig

_MAX_PEM_BYTES = 1024 * 1024  # a certificate chain is a few KiB: a larger file is a wrong path


class TlsFileError(ValueError):
    """A TLS file cannot be used; the message names the flag and the file."""


def read_pem(flag: str, path: str, kind: str) -> bytes:
    """The bytes of the PEM file `path` given by `flag`, which must hold a `kind` block
    ("CERTIFICATE" or "PRIVATE KEY"; "RSA PRIVATE KEY" and "EC PRIVATE KEY" match the latter)."""
    p = Path(path)
    try:
        if p.stat().st_size > _MAX_PEM_BYTES:
            raise TlsFileError(f"{flag}: {path} is larger than {_MAX_PEM_BYTES} bytes; not a PEM file")
        data = p.read_bytes()
    except IsADirectoryError:
        raise TlsFileError(f"{flag}: {path} is a folder, not a PEM file") from None
    except OSError as err:
        raise TlsFileError(f"{flag}: cannot read {path}: {err.strerror or err}") from None
    if b"-----BEGIN " not in data or (kind.encode() + b"-----") not in data:
        raise TlsFileError(f"{flag}: {path} holds no PEM {kind} block")
    return data


def server_credentials(config: TlsConfig) -> grpc.ServerCredentials:
    """grpc credentials for `config` (which must be enabled); raises TlsFileError."""
    if not config.enabled:
        raise ValueError("server_credentials: TLS is not configured")
    cert = read_pem("tls_cert", config.cert, "CERTIFICATE")
    key = read_pem("tls_key", config.key, "PRIVATE KEY")
    client_ca = read_pem("tls_client_ca", config.client_ca, "CERTIFICATE") if config.client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def channel_credentials(ca: str | None = None, cert: str | None = None,
                        key: str | None = None) -> grpc.ChannelCredentials:
    """Client side: trust `ca` (None = the system roots), present `cert`/`key` when given."""
    if (cert is None) != (key is None):
        raise ValueError("tls client certificate and key: give both or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem("tls_ca", ca, "CERTIFICATE") if ca else None,
        private_key=read_pem("tls_key", key, "PRIVATE KEY") if key else None,
        certificate_chain=read_pem("tls_cert", cert, "CERTIFICATE") if cert else None)
