"""Bearer-token authentication for the loraplex services: the rules (`accepted_for`,
`check_token`), shared by both front doors, and the grpc.aio server interceptor that applies them.

Who needs which token (`authorization: Bearer <token>` call metadata):

    method                                       admin token set    generation token set
    Adapters/LoadAdapter, Adapters/UnloadAdapter admin              generation (*)
    Adapters/CombineAdapters, Adapters/SaveAdapter
    Adapters/ListAdapters, Generation/*          -                  generation or admin
    grpc.health.v1.*, reflection                 open               open

The HTTP front applies the same table to its routes (`Authorization: Bearer <token>` header):
/v1/load_lora_adapter, /v1/unload_lora_adapter and /v1/combine_lora_adapters need admin, /v1/completions,
/v1/chat/completions and /v1/models generation, /health is open.

(*) Only when no admin token is set: the calls that change what is served are never less
protected than generation. With neither token set everything is open (local use).

Outcomes: no `authorization` metadata, or one that is not a Bearer credential (e.g. "Basic x"),
-> UNAUTHENTICATED (nothing was presented that could be checked); a Bearer token that matches none
of the accepted ones -> PERMISSION_DENIED. Tokens are compared with hmac.compare_digest against every
accepted token (no early exit), so the time taken tells nothing about how much of a guess was right;
no message ever contains what the client sent.
"""

from __future__ import annotations

import hmac
import logging
from typing import Awaitable, Callable, Sequence

import grpc

from loraplex.api.status import ApiError, Code
from loraplex.config import AuthConfig

log = logging.getLogger(__name__)

ADAPTERS_SERVICE = "/loraplex.v1.Adapters/"
GENERATION_SERVICE = "/loraplex.v1.Generation/"
ADMIN_METHODS = frozenset({ADAPTERS_SERVICE + m for m in (
    "LoadAdapter", "UnloadAdapter", "CombineAdapters", "SaveAdapter", "PinAdapter")})
# Read-only calls of the Adapters service; any other method there counts as admin (safe default
# for methods added later).
ADAPTERS_READ_METHODS = frozenset({ADAPTERS_SERVICE + "ListAdapters"})

_SCHEME = "bearer"  # RFC 7235: the scheme name is case-insensitive


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization` metadata entry if it is `Bearer <token>`, else None."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("ascii", errors="replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != _SCHEME:
            return None
        token = token.strip()
        return token or None
    return None


def token_matches(presented: str, accepted: Sequence[str]) -> bool:
    """True when `presented` equals one of `accepted`, in time independent of where they differ."""
    given = presented.encode("utf-8")
    ok = False
    for token in accepted:  # every one is compared: no early exit
        ok |= hmac.compare_digest(given, token.encode("utf-8"))
    return ok


# What an operation needs, the same for both front doors (the HTTP routes map to these too).
ADMIN, GENERATION, OPEN = "admin", "generation", "open"


def accepted_for(config: AuthConfig, access: str) -> tuple[str, ...] | None:
    """Tokens that open an operation of `access` (ADMIN, GENERATION, OPEN); None = open."""
    admin, generation = config.admin_token, config.generation_token
    if access == ADMIN:
        if admin is not None:
            return (admin,)
        return (generation,) if generation is not None else None
    if access == GENERATION:
        if generation is None:
            return None
        return (generation,) + ((admin,) if admin is not None else ())
    return None


def check_token(presented: str | None, accepted: tuple[str, ...] | None, what: str,
                how: str = "`authorization: Bearer <token>` metadata") -> None:
    """Raise ApiError UNAUTHENTICATED (no bearer credential presented) or PERMISSION_DENIED (a
    token that matches none of `accepted`); `what` names the operation in the message."""
    if accepted is None:
        return
    if presented is None:
        raise ApiError(Code.UNAUTHENTICATED, f"{what} needs {how}")
    if not token_matches(presented, accepted):
        log.warning("refused %s: wrong token", what)
        raise ApiError(Code.PERMISSION_DENIED, f"the token is not valid for {what}")


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls that lack the token their method needs (see the module docstring)."""

    def __init__(self, config: AuthConfig):
        self._config = config

    @staticmethod
    def access(method: str) -> str:
        """ADMIN, GENERATION or OPEN for a full gRPC method path."""
        if method.startswith(ADAPTERS_SERVICE) and method not in ADAPTERS_READ_METHODS:
            return ADMIN
        if method.startswith(GENERATION_SERVICE) or method in ADAPTERS_READ_METHODS:
            return GENERATION
        return OPEN  # health, reflection, unknown methods (grpc answers UNIMPLEMENTED)

    def accepted_tokens(self, method: str) -> tuple[str, ...] | None:
        """Tokens that open `method` (a full gRPC path); None = the method is open."""
        return accepted_for(self._config, self.access(method))

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        accepted = self.accepted_tokens(details.method)
        if accepted is None or handler is None:
            return handler
        try:
            check_token(bearer_token(details.invocation_metadata), accepted, details.method)
        except ApiError as err:
            return refusing_handler(handler, err.code, err.message)
        return handler


def refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
                     details: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary or streaming response) that fails with
    `code` before reading anything more of the call."""

    async def unary(_request, context: grpc.aio.ServicerContext):
        await context.abort(code, details)

    async def stream(_request, context: grpc.aio.ServicerContext):
        await context.abort(code, details)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)
