"""The OpenAI-compatible HTTP server: uvicorn serving api/http/app.py on the event loop of the gRPC
server, in the same process, over the same runtime.

Life cycle (serve.py drives it, next to GrpcServer's):
    http = HttpServer(host, port, slots=grpc_server.concurrency.slots, ...)  # binds now
    await http.start()            # listening; /health 503 "loading"
    http.attach(runtime)          # /health 200; routes serve
    http.begin_shutdown()         # /health 503 while the engine drains
    await http.stop()             # stop listening, close connections

The socket is bound in the constructor (a taken port fails start-up at once, with OSError, before
the model load) and handed to uvicorn, which therefore never calls sys.exit on a bind error.
uvicorn's own signal handlers are left out: serve.py's handle SIGTERM/SIGINT for both doors. Its
access log is off (the request log has one line per finished request, whichever door it came by).
TLS: the gRPC server's certificate and key (and client CA for mutual TLS) serve HTTPS too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn

from loraplex.api.concurrency import GenerationSlots
from loraplex.api.http.app import OpenAIApp
from loraplex.config import DEFAULT_MAX_MESSAGE_BYTES, AuthConfig, RequestLimits, TlsConfig

log = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    def capture_signals(self):  # serve.py owns the signals of the process
        return contextlib.nullcontext()


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old ones TIME_WAIT
        sock.bind(infos[0][4])
        sock.listen(2048)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port} (--http-port): {err.strerror or err}") from None
    sock.setblocking(False)
    return sock


class HttpServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, slots: GenerationSlots,
                 limits: RequestLimits | None = None, auth: AuthConfig | None = None,
                 tls: TlsConfig | None = None, max_body_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 served_model_names: tuple[str, ...] = ()):
        limits = limits or RequestLimits()
        tls = tls or TlsConfig()
        self.openai = OpenAIApp(slots=slots, auth_config=auth, limits=limits, max_body_bytes=max_body_bytes,
                                served_model_names=served_model_names)
        self.host = host
        self.tls = tls.enabled
        self._socket = _bind(host, port)
        self.port = self._socket.getsockname()[1]
        kwargs = {}
        if tls.enabled:
            kwargs = dict(ssl_certfile=tls.cert, ssl_keyfile=tls.key)
            if tls.client_ca:
                kwargs.update(ssl_ca_certs=tls.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self._config = uvicorn.Config(
            self.openai.app, loop="none", http="httptools", lifespan="off", log_config=None,
            access_log=False, server_header=False, timeout_graceful_shutdown=1,
            # HTTP/1.1 keep-alive: an idle client connection is closed after this long.
            timeout_keep_alive=30, **kwargs)
        self._server = _Uvicorn(self._config)
        self._task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the HTTP server on {self.address} stopped at start-up")
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible HTTP on %s", self.url)

    def attach(self, runtime) -> None:
        self.openai.runtime = runtime
        self.openai.serving = True

    def begin_shutdown(self) -> None:
        self.openai.serving = False

    async def stop(self) -> None:
        self.openai.serving = False
        if self._task is None:
            self._socket.close()
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=5)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - stopping whatever happens
            self._server.force_exit = True
            self._task.cancel()
        self._socket.close()
