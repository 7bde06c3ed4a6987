"""The gRPC server: Generation + Adapters services, grpc.health.v1 and server reflection.

Life cycle (serve.py drives it):
    server = GrpcServer(host, port); await server.start()   # listening; health NOT_SERVING
    await server.attach(Runtime(loaded, engine))            # model loaded + warmed up: SERVING
    await server.shutdown(grace)                            # NOT_SERVING, drain, stop

Starting to listen before the model is loaded lets orchestrators see the process (health answers
NOT_SERVING, Generate answers UNAVAILABLE) instead of a refused connection.

Protection (see README "Running it exposed safely"): bearer tokens checked by api/auth.py, TLS from
api/tls.py (a TLS file that cannot be used stops start-up here), request limits: message size (grpc
answers RESOURCE_EXHAUSTED itself), HTTP/2 streams per connection, generation RPCs in progress
server-wide (api/concurrency.py), per-field bounds checked in convert.py.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_reflection.v1alpha import reflection

from loraplex.api.adapters_servicer import AdaptersServicer
from loraplex.api.auth import TokenAuthInterceptor
from loraplex.api.concurrency import ConcurrencyLimitInterceptor
from loraplex.api.generation_servicer import GenerationServicer, Runtime
from loraplex.api.health import Health
from loraplex.api.pb.loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from loraplex.api.tls import server_credentials
from loraplex.config import DEFAULT_MAX_MESSAGE_BYTES, AuthConfig, RequestLimits, TlsConfig

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "GrpcServer", "SERVICE_NAMES"]

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
)


class GrpcServer:
    """Create and use it inside the event loop that will run it (grpc.aio binds to that loop)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *,
                 limits: RequestLimits | None = None, auth: AuthConfig | None = None,
                 tls: TlsConfig | None = None):
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes: must be >= 1, got {max_message_bytes}")
        limits = limits or RequestLimits()
        auth = auth or AuthConfig()
        tls = tls or TlsConfig()
        # Read before anything listens: a TLS file that cannot be used stops start-up (ValueError).
        credentials = server_credentials(tls) if tls.enabled else None
        self.concurrency = ConcurrencyLimitInterceptor(limits.max_concurrent_requests)
        # Authentication first: a refused call never takes a generation place.
        interceptors = ([TokenAuthInterceptor(auth)] if auth.enabled else []) + [self.concurrency]
        self._server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ])
        self.generation = GenerationServicer(limits=limits)
        self.adapters = AdaptersServicer()
        self.health = Health()
        generation_pb2_grpc.add_GenerationServicer_to_server(self.generation, self._server)
        adapters_pb2_grpc.add_AdaptersServicer_to_server(self.adapters, self._server)
        self.health.add_to_server(self._server)
        reflection.enable_server_reflection(
            SERVICE_NAMES + (grpc_health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        self.host = host
        self.tls = tls.enabled
        if not auth.enabled and not _is_loopback(host):
            log.warning("listening on %s without --admin-token: anyone who can reach it may load and "
                        "unload adapters (see README, Running it exposed safely)", host)
        if auth.enabled and not tls.enabled and not _is_loopback(host):
            log.warning("listening on %s without TLS: bearer tokens cross the network in plaintext "
                        "(use --tls-cert/--tls-key)", host)
        try:
            if credentials is not None:
                self.port = self._server.add_secure_port(f"{host}:{port}", credentials)
            else:
                self.port = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as err:  # grpc raises on a port it cannot bind
            raise OSError(f"cannot listen on {host}:{port}: {err}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self._stopped = False

    @property
    def active_generation_requests(self) -> int:
        return self.concurrency.active

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def runtime(self) -> Runtime | None:
        return self.generation.runtime

    async def start(self) -> None:
        # grpc_health starts with "" SERVING; nothing is served until attach().
        await self.health.set_serving(False)
        await self._server.start()
        log.info("listening on %s", self.address)

    async def attach(self, runtime: Runtime) -> None:
        """Start serving `runtime` (its engine started and warmed up)."""
        self.generation.runtime = runtime
        self.adapters.runtime = runtime
        self.concurrency.metrics = runtime.metrics
        await self.health.set_serving(True)

    async def shutdown(self, grace_seconds: float) -> None:
        """Health NOT_SERVING, then let in-flight requests finish for up to `grace_seconds` (the
        engine cancels the rest: each such RPC ends with UNAVAILABLE, api/generation.py), then stop
        listening. New requests meanwhile get UNAVAILABLE (engine.accepting is False)."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.begin_shutdown()
        engine = self.runtime.engine if self.runtime is not None else None
        # Keep listening while the engine drains: probes read NOT_SERVING and new requests get
        # UNAVAILABLE from the engine, not a refused connection (nor grpc core's CANCELLED for a
        # call caught by the listener closing). Then stop, leaving the final responses of the
        # requests the engine ended a second to go out.
        if engine is not None:
            await asyncio.to_thread(engine.shutdown, grace_seconds)
        await self._server.stop(1.0)
        log.info("server stopped")

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")
