"""From a ServerConfig to a running server: load the model, build and warm up the engine, serve.

`serve(config)` is what `loraplex serve` runs: it listens first (health NOT_SERVING), loads the
model off the event loop so health checks keep being answered, attaches a LoRA manager (slot
tensors in every projection) and loads the `--adapter ID=PATH` adapters -- any of them failing
stops start-up --, warms up, flips to SERVING, and on SIGTERM/SIGINT shuts down gracefully
(health NOT_SERVING and new requests UNAVAILABLE at once, requests in flight finish for up to
drain_timeout_seconds, the rest end with UNAVAILABLE, stop, exit 0).

`ServerThread` runs a server for an already built Runtime on a private event loop in a background
thread: for tests and for embedding loraplex in another program.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from pathlib import Path

import torch

from loraplex.api.generation_servicer import Runtime
from loraplex.api.grpc_server import GrpcServer
from loraplex.config import (DEFAULT_MAX_MESSAGE_BYTES, AuthConfig, EngineConfig, LoraConfig, ModelConfig,
                             RequestLimits, ServerConfig, TlsConfig)

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA device is available")
    return name


def resolve_dtype(name: str) -> torch.dtype:
    # auto: bfloat16 on CPU (AMX makes it the fast CPU dtype) and on CUDA alike.
    return torch.bfloat16 if name == "auto" else _DTYPES[name]


def warn_emulated_bf16() -> None:
    """Say so when this CPU would run bfloat16 GEMMs emulated (AVX2 only: oneDNN can neither pack
    nor compute them natively, model/packed_linear.py) and our float32-math kernel cannot take
    over (model/widened_linear.py: no C compiler, or LORAPLEX_NATIVE_KERNELS=0 /
    LORAPLEX_WIDEN_BF16=0): there float32 decoded 8-64 sequences 1.3-5x faster than emulated
    bfloat16 (benchmarks/results/roofline_cpu.md), at twice the memory for weights, KV cache and
    adapters."""
    import os

    from loraplex.model.packed_linear import packing_available
    from loraplex.model.widened_linear import widening_wanted

    if packing_available():
        return
    if widening_wanted() and os.environ.get("LORAPLEX_WIDEN_BF16", "1") != "0":
        log.info("this CPU has no native bfloat16 matmul (no AVX-512 BF16/AMX): bfloat16 GEMMs run the "
                 "compiled float32-math kernel (model/widened_linear.py)")
        return
    log.warning("this CPU has no native bfloat16 matmul (no AVX-512/AMX) and the compiled float32-math "
                "kernel is off: bfloat16 GEMMs are emulated; --dtype float32 decodes batches of 8+ "
                "sequences faster here (1.3-5x measured) with twice the memory (benchmarks/results/roofline_cpu.md)")


def model_path(config: ModelConfig) -> Path:
    if config.path is not None:
        return Path(config.path)
    from loraplex.model.default_model import ensure_default_model

    return Path(ensure_default_model(config.cache_dir))


def load_runtime(config: ServerConfig, metrics=None) -> Runtime:
    """Load the model and its adapters, build the engine, warm it up and start its loop
    (blocking; minutes at most). Raises ValueError when a start-up adapter cannot be loaded.
    `metrics` (api.metrics.LoraplexMetrics) observes the engine and reads its state at scrape time."""
    from loraplex.api.request_log import RequestLogger
    from loraplex.model.loader import load_model
    from loraplex.model.quantize import memory_summary, spec_from_config

    device = resolve_device(config.model.device)
    dtype = resolve_dtype(config.model.dtype)
    # Resolves --quantize auto and stops start-up (QuantizationUnavailableError, a ValueError)
    # with the list of methods that run here, before any weight is read.
    quant = spec_from_config(config.model, device)
    path = model_path(config.model)
    log.info("loading %s (%s on %s, quantize=%s)", path, str(dtype).removeprefix("torch."), device, quant.method)
    if device == "cpu" and dtype == torch.bfloat16:
        warn_emulated_bf16()
    loaded = load_model(path, dtype=dtype, device=device, quant=quant)
    log.info("%s", memory_summary(loaded))
    manager = build_lora_manager(loaded, config.lora)
    observers = [RequestLogger()] + ([metrics] if metrics is not None else [])
    from loraplex.model.generation_config import resolve_sampling_defaults

    defaults = resolve_sampling_defaults(config.generation_config, path)
    log.info("sampling defaults (--generation-config %s): %s", config.generation_config,
             ", ".join(f"{k}={v}" for k, v in defaults.effective().items()) + f" from {defaults.source}")
    runtime = start_engine(loaded, config.engine, manager, observers=observers, metrics=metrics,
                           sampling_defaults=defaults)
    if metrics is not None:
        metrics.bind(runtime.engine, manager, loaded.model)
    return runtime


def _log_kernels(device) -> None:
    """Which kernels serve: the LoRA backend and, on CPU, whether the C kernels compiled (building
    them now, at start-up, rather than on the first request)."""
    from loraplex_kernels import get_backend, native

    line = f"kernels: LoRA backend {get_backend()}"
    if device.type == "cpu":
        line += "; " + native.describe()
    log.info(line)


def build_lora_manager(loaded, config: LoraConfig):
    """A LoraManager on `loaded`'s model, holding the config's start-up adapters."""
    from loraplex.engine.errors import OUT_OF_MEMORY
    from loraplex.lora.errors import AdapterError
    from loraplex.lora.manager import LoraManager
    from loraplex.lora.peft_format import AdapterFormatError

    device = next(loaded.model.parameters()).device
    _log_kernels(device)
    manager = LoraManager(config, loaded.model, loaded.dtype, device)
    log.info("LoRA: adapter memory pool of %.1f MiB (%s, --adapter-memory %s), adapters of rank <= %d, "
             "at most %d resident (%s); it holds adapters of this model: %s",
             manager.device_bytes / 2**20, manager.slot_dtype, config.adapter_memory, config.max_lora_rank,
             manager.pool.num_slots, "--max-loras" if config.max_loras else "table rows",
             manager.capacity_summary())
    for adapter_id, folder in config.preload:
        try:
            info = manager.load(adapter_id, folder, persist=False)
        except (AdapterError, AdapterFormatError, *OUT_OF_MEMORY) as err:
            raise ValueError(f"adapter {adapter_id}={folder}: {err}") from err
        log.info("adapter %s loaded from %s (rank %d-%d)", adapter_id, info.source, info.min_rank,
                 info.max_rank)
    manager.replay()  # --state-dir: the adapters loaded through the API before the restart
    return manager


def start_engine(loaded, config: EngineConfig, lora_manager=None, observers=(), metrics=None,
                 sampling_defaults=None) -> Runtime:
    """Build, warm up and start the engine; `lora_manager` None serves the base model only;
    `sampling_defaults` (model/generation_config.py) None = neutral."""
    from loraplex.engine.engine import Engine

    engine = Engine(loaded, config, lora_manager=lora_manager, observers=observers)
    kv, cfg = engine.runner.kv, engine.config
    log.info("KV cache: %d blocks of %d tokens (%d tokens), %.1f MiB in %s (%s)", cfg.num_kv_blocks, cfg.block_size,
             cfg.num_kv_blocks * cfg.block_size, kv.nbytes / 2**20, kv.dtype_name,
             f"--kv-cache-memory {cfg.kv_cache_memory}" if cfg.kv_cache_memory else "--num-kv-blocks")
    engine.warmup()
    engine.grammars.warm_up()  # structured output's tokenizer view (~1-3 s), in its own thread
    engine.start()
    return Runtime(loaded=loaded, engine=engine, lora_manager=lora_manager, metrics=metrics,
                   sampling_defaults=sampling_defaults)


def _in_daemon_thread(fn, *args) -> asyncio.Future:
    """Run fn(*args) in a daemon thread. Unlike asyncio.to_thread, a process asked to stop while
    this runs (a model load, a default-model conversion) can exit without waiting for it."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop is gone: nobody waits any more

    threading.Thread(target=run, name="loraplex-load", daemon=True).start()
    return future


async def serve(config: ServerConfig, max_message_bytes: int | None = None) -> None:
    """Run until SIGTERM/SIGINT. `max_message_bytes` overrides config.max_message_bytes."""
    max_bytes = config.max_message_bytes if max_message_bytes is None else max_message_bytes
    # Raises ValueError (before the model load) when a TLS file cannot be used.
    server = GrpcServer(config.host, config.port, max_bytes, limits=config.limits, auth=config.auth,
                        tls=config.tls)
    await server.start()
    http = None
    if config.http_port is not None:
        try:  # bound now: a taken port fails in a second, not after the model load
            http = _http_server(server, config.host, config.http_port, limits=config.limits,
                                auth=config.auth, tls=config.tls, max_body_bytes=max_bytes,
                                served_model_names=config.served_model_names)
            await http.start()
        except BaseException:
            await server.shutdown(0)
            raise
    metrics, metrics_http = None, None
    if config.metrics_port is not None:
        from loraplex.api.metrics import LoraplexMetrics, start_metrics_server

        metrics = LoraplexMetrics(top_adapters=config.metrics_top_adapters)
        try:  # before the model load: a taken port fails in a second, not after minutes
            metrics_http, _ = start_metrics_server(config.metrics_port, config.host, metrics.registry)
        except OSError:
            await server.shutdown(0)
            if http is not None:
                await http.stop()
            raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        load = _in_daemon_thread(load_runtime, config, metrics)
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait({load, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not load.done():
            # Signalled while loading: the load thread cannot be interrupted; stop listening now
            # (in `finally`) and let the process exit.
            log.info("shutdown requested while loading the model")
            return
        runtime = load.result()  # raises if loading failed
        await server.attach(runtime)
        if http is not None:
            http.attach(runtime)
        log.info("serving %s on %s (%s, %s)", runtime.loaded.path, server.address,
                 "TLS" if server.tls else "plaintext",
                 "bearer tokens" if config.auth.enabled else "no authentication")
        await waiter
        log.info("shutting down: draining for up to %.1fs (--drain-timeout)", config.drain_timeout_seconds)
    finally:
        if http is not None:
            http.begin_shutdown()  # /health 503 while the engine drains (server.shutdown)
        await server.shutdown(config.drain_timeout_seconds)
        if http is not None:
            await http.stop()
        if metrics_http is not None:
            metrics_http.shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _http_server(grpc_server: GrpcServer, host: str, port: int, **kwargs):
    """The OpenAI-compatible HTTP front, sharing the gRPC server's generation places."""
    from loraplex.api.http.server import HttpServer

    return HttpServer(host, port, slots=grpc_server.concurrency.slots, **kwargs)


class ServerThread:
    """A GrpcServer (and, with `http_port`, the OpenAI-compatible HttpServer) for `runtime` on
    its own event loop in a daemon thread.

        with ServerThread(runtime, http_port=0) as srv:
            channel = grpc.insecure_channel(srv.address)
            httpx.get(srv.http_url + "/v1/models")
    """

    def __init__(self, runtime: Runtime | None, host: str = "127.0.0.1", port: int = 0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *, limits: RequestLimits | None = None,
                 auth: AuthConfig | None = None, tls: TlsConfig | None = None, http_port: int | None = None):
        self._runtime = runtime
        self._args = (host, port, max_message_bytes)
        self._kwargs = dict(limits=limits, auth=auth, tls=tls)
        self._http_port = http_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loraplex-grpc", daemon=True)
        self.server: GrpcServer | None = None
        self.http = None  # api.http.server.HttpServer when http_port is not None

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def address(self) -> str:
        return self.server.address

    def start(self) -> "ServerThread":
        self._thread.start()

        async def _start() -> GrpcServer:
            server = GrpcServer(*self._args, **self._kwargs)
            await server.start()
            if self._http_port is not None:
                self.http = _http_server(server, self._args[0], self._http_port, max_body_bytes=self._args[2],
                                         **self._kwargs)
                await self.http.start()
            if self._runtime is not None:
                await server.attach(self._runtime)
                if self.http is not None:
                    self.http.attach(self._runtime)
            return server

        self.server = self._call(_start(), timeout=60)
        return self

    @property
    def http_url(self) -> str:
        return self.http.url

    def attach(self, runtime: Runtime) -> None:
        self._call(self.server.attach(runtime), timeout=60)
        if self.http is not None:
            self.http.attach(runtime)

    def stop(self, grace_seconds: float = 0.0) -> None:
        """Graceful shutdown (engine included), then the loop and its thread end."""
        if not self._thread.is_alive():
            return
        try:
            if self.http is not None:
                self.http.begin_shutdown()
            if self.server is not None:
                self._call(self.server.shutdown(grace_seconds), timeout=grace_seconds + 60)
            if self.http is not None:
                self._call(self.http.stop(), timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
