"""The `loraplex` command.

    loraplex serve [--model PATH] [--host H] [--port P] [--http-port P | --no-http] [--dtype D] [--device D]
                   [--generation-config auto|neutral|FOLDER] [engine flags]
                   [--adapter-root DIR] [--allowed-adapter-root DIR]... [--adapter ID=PATH]...
                   [--adapter-memory BYTES|FRACTION] [--max-loras N] [--max-lora-rank R] [--max-cpu-loras N]
                   [--no-spill-evicted]
                   [--max-adapter-bytes B] [--state-dir DIR] [--adapter-cache-dir DIR] [--adapter-cache-size B]
                   [--drain-timeout SECONDS]
                   [--admin-token-file F] [--generation-token-file F] [--tls-cert F --tls-key F]
                   [--tls-client-ca F] [request limit flags]
    loraplex generate "prompt" [--server HOST:PORT] [--adapter ID] [--max-new-tokens N]
                               [--temperature T] [--chat]      # streams the completion to stdout
    (every client command also takes [--token T | --token-file F] [--tls-ca F [--tls-cert F --tls-key F]])
    loraplex info [--server HOST:PORT]
    loraplex adapters load ID PATH [--pinned] | unload ID | list   [--server HOST:PORT]
    loraplex convert-default [--cache-dir DIR]

Flag values are checked by the frozen config dataclasses; a bad one stops with its message and
exit status 2 before anything is loaded. Client commands exit 1 on an RPC error, printing its status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

DEFAULT_SERVER = "127.0.0.1:50051"
# Same value as loraplex.api.grpc_server.DEFAULT_MAX_MESSAGE_BYTES; not imported so that
# `loraplex --help` does not pay for importing grpc.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


# --- serve ---------------------------------------------------------------------------------------
def _add_serve(sub) -> None:
    from loraplex.config import KV_CACHE_DTYPES, EngineConfig, LoraConfig, RequestLimits, ServerConfig

    eng, srv, lora, lim = EngineConfig(), ServerConfig(), LoraConfig(), RequestLimits()
    p = sub.add_parser("serve", help="run the server (gRPC + OpenAI-compatible HTTP)",
                       description="Load a model and serve it over gRPC (health and reflection on) and "
                                   "over the OpenAI-compatible HTTP API.")
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default=srv.host, help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=srv.port, help="port, 0 = any free one (default %(default)s)")
    p.add_argument("--http-port", type=int, default=srv.http_port,
                   help="port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, ...) on --host, 0 = any free one (default %(default)s)")
    p.add_argument("--served-model-name", nargs="+", default=[], metavar="NAME",
                   help="name(s) the OpenAI API's `model` field accepts for the base model, the first "
                        "listed by GET /v1/models (default: the model folder's name)")
    p.add_argument("--no-http", dest="http", action="store_false",
                   help="serve gRPC only: no OpenAI-compatible HTTP API")
    p.add_argument("--generation-config", default=srv.generation_config, metavar="auto|neutral|FOLDER",
                   help="sampling defaults for requests that leave temperature/top_p/top_k/"
                        "repetition_penalty unset: auto = the model folder's generation_config.json, "
                        "neutral (or vllm) = temperature 1, top_p 1, no top_k, no penalty; or a folder "
                        "holding a generation_config.json (default %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight/compute dtype (auto: bfloat16)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when available, else cpu")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "nf4", "fp4", "int8"],
                   help="bitsandbytes quantization of the base projections (embeddings/lm_head stay "
                        "unquantized); auto: nf4 on CUDA, none on CPU (saves memory there but is not "
                        "reliably faster than bfloat16; see benchmarks/results/quantize_cpu.md). A folder saved "
                        "already bitsandbytes-quantized uses its own method (auto or that method)")
    p.add_argument("--quant-compute-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the 4-bit matmuls (auto: --dtype)")
    p.add_argument("--double-quant", action="store_true",
                   help="4-bit: also quantize the block scales (~0.4 bit per weight less)")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="with --quantize nf4|fp4: also keep the embedding table and lm_head (tied or not) "
                        "in 4 bits (SmolLM2-135M: whole base 0.42x -> under 0.3x of float16). Off by default "
                        "because transformers/PEFT keep embeddings and lm_head in 16 bits: outputs move "
                        "further from theirs")
    p.add_argument("--num-kv-blocks", type=int, default=eng.num_kv_blocks, help="KV cache size in blocks")
    p.add_argument("--block-size", type=int, default=eng.block_size, help="tokens per KV block")
    p.add_argument("--kv-cache-memory", default=None, metavar="BYTES",
                   help="KV cache size in bytes (4GiB, 512MB) instead of --num-kv-blocks: as many blocks "
                        "as fit, so --kv-cache-dtype int8 holds ~1.9x the tokens in the same memory")
    p.add_argument("--kv-cache-dtype", default=eng.kv_cache_dtype, choices=list(KV_CACHE_DTYPES),
                   help="KV cache element type: auto = the model's dtype; int8 = int8 codes with a float32 "
                        "scale per token and kv head (0.53x the bytes of bfloat16 on the default model; "
                        "attention over long contexts reads less)")
    p.add_argument("--max-num-seqs", type=int, default=eng.max_num_seqs, help="sequences per step")
    p.add_argument("--max-num-batched-tokens", type=int, default=eng.max_num_batched_tokens,
                   help="tokens per step (decode tokens + prefill chunks)")
    p.add_argument("--max-model-len", type=int, default=eng.max_model_len,
                   help="prompt + generated tokens (capped by the model's own limit)")
    p.add_argument("--max-new-tokens-cap", type=int, default=eng.max_new_tokens_cap,
                   help="largest max_new_tokens a request may ask for")
    p.add_argument("--max-waiting", type=int, default=eng.max_waiting,
                   help="waiting queue bound; beyond it requests get RESOURCE_EXHAUSTED")
    p.add_argument("--adapter-starvation-steps", type=int, default=eng.adapter_starvation_steps,
                   help="a request passed over this many steps while its adapter loads stops later "
                        "adapter requests from overtaking it")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay base-model decode steps from CUDA graphs captured per batch-size bucket "
                        "(CUDA only; refused on CPU)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="recompute every prompt: no sharing of KV blocks between requests with the "
                        "same leading tokens and adapter (on by default)")
    p.add_argument("--drain-timeout", "--shutdown-grace", dest="drain_timeout", type=float,
                   default=srv.drain_timeout_seconds, metavar="SECONDS",
                   help="on SIGTERM/SIGINT: health NOT_SERVING and new requests UNAVAILABLE at once; "
                        "requests in flight may finish for this long, the rest then end with UNAVAILABLE "
                        "(--shutdown-grace is the old name) (default %(default)s)")
    so = p.add_argument_group("structured output (JSON schema, regex, choice, grammar constraints)")
    so.add_argument("--structured-output-compile-timeout", type=float,
                    default=eng.structured_output_compile_timeout, metavar="SECONDS",
                    help="a constraint that does not compile within this time is refused (INVALID_ARGUMENT / "
                         "HTTP 400); default %(default)s")
    so.add_argument("--structured-output-max-bytes", type=int, default=eng.structured_output_max_bytes,
                    help="largest schema / regex / grammar / choice list accepted, in bytes (default %(default)s)")
    so.add_argument("--structured-output-cache-size", type=int, default=eng.structured_output_cache_size,
                    help="compiled constraints kept (LRU), keyed by the constraint (default %(default)s)")
    so.add_argument("--no-structured-output-overlap", dest="structured_output_overlap", action="store_false",
                    help="compute the allowed-token masks on the engine thread instead of in a worker "
                         "thread overlapped with the forward")
    p.add_argument("--cache-dir", help="where the default model is converted to (default ~/.cache/loraplex)")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest gRPC message received or sent (default %(default)s)")
    a = p.add_argument_group("LoRA adapters")
    a.add_argument("--adapter-root", metavar="DIR|s3://BUCKET/PREFIX",
                   help="folder (or S3 prefix) of adapter folders: a request for adapter ID loads DIR/ID "
                        "on demand")
    a.add_argument("--allowed-adapter-root", metavar="DIR|s3://BUCKET/PREFIX", action="append", default=[],
                   help="LoadAdapter may also read folders (or S3 prefixes) under this one (repeatable)")
    a.add_argument("--adapter-cache-dir", metavar="DIR", default=lora.adapter_cache_dir,
                   help="where adapters from s3:// are downloaded to (default ~/.cache/loraplex/adapters)")
    a.add_argument("--adapter-cache-size", metavar="BYTES", default=lora.adapter_cache_size,
                   help="most bytes the download cache holds; least recently used adapters go first "
                        "(default %(default)s)")
    a.add_argument("--state-dir", metavar="DIR", default=lora.state_dir,
                   help="record adapters loaded and pinned through the API in DIR/state.json and load "
                        "them again at start-up (default: not recorded)")
    a.add_argument("--adapter", metavar="ID=PATH", action="append", default=[],
                   help="load the PEFT folder PATH as adapter ID at start-up (repeatable); "
                        "a failure stops start-up")
    a.add_argument("--adapter-memory", default=lora.adapter_memory,
                   help="size of the adapter memory pool: bytes (2GiB, 512MB) or a fraction of the "
                        "memory free at start-up (0.2); each adapter takes its real size "
                        "(default %(default)s)")
    a.add_argument("--max-loras", type=int, default=lora.max_loras,
                   help="optional cap on adapters resident at once (default: no cap; memory bounds it)")
    a.add_argument("--max-lora-rank", type=int, default=lora.max_lora_rank,
                   help="largest adapter rank accepted (default %(default)s)")
    a.add_argument("--max-cpu-loras", type=int, default=lora.max_cpu_loras,
                   help="adapter copies kept in host memory outside the pool (CUDA: the host tier; "
                        "CPU: adapters read while the pool had no room, and evicted ones) "
                        "(default %(default)s)")
    a.add_argument("--no-spill-evicted", dest="spill_evicted", action="store_false",
                   help="CPU: read an evicted adapter again from disk when it is next used, instead "
                        "of keeping its pool extent as a host copy (counted in --max-cpu-loras)")
    a.add_argument("--max-adapter-bytes", type=int, default=lora.max_adapter_bytes,
                   help="largest adapter file accepted (default %(default)s)")
    a.add_argument("--max-mixture-adapters", type=int, default=lora.max_mixture_adapters,
                   help="most adapters one request may mix (GenerateRequest.adapters / HTTP \"adapters\") "
                        "(default %(default)s)")
    s = p.add_argument_group("security (see README: Running it exposed safely)")
    s.add_argument("--admin-token-file", metavar="FILE",
                   help="file holding the bearer token LoadAdapter/UnloadAdapter require "
                        "(`authorization: Bearer <token>` metadata)")
    s.add_argument("--admin-token", metavar="TOKEN",
                   help="the admin token itself; visible to every local user in `ps`: prefer --admin-token-file")
    s.add_argument("--generation-token-file", metavar="FILE",
                   help="file holding the bearer token Generate/GenerateStream/GetModelInfo/ListAdapters "
                        "require (the admin token is accepted too); default: those calls are open")
    s.add_argument("--generation-token", metavar="TOKEN",
                   help="the generation token itself; visible in `ps`: prefer --generation-token-file")
    s.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate chain (needs --tls-key)")
    s.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", metavar="FILE",
                   help="require every client to present a certificate signed by this PEM CA (mutual TLS)")
    r = p.add_argument_group("request limits (a request over one gets INVALID_ARGUMENT, a full server "
                             "RESOURCE_EXHAUSTED)")
    r.add_argument("--max-prompt-chars", type=int, default=lim.max_prompt_chars,
                   help="characters of prompt text or message contents, checked before tokenizing "
                        "(default 0 = 32 x max-model-len)")
    r.add_argument("--max-messages", type=int, default=lim.max_messages,
                   help="messages in one chat request (default %(default)s)")
    r.add_argument("--max-stop-strings", type=int, default=lim.max_stop_strings,
                   help="stop strings per request (default %(default)s)")
    r.add_argument("--max-stop-chars", type=int, default=lim.max_stop_chars,
                   help="characters in one stop string (default %(default)s)")
    r.add_argument("--max-request-id-chars", type=int, default=lim.max_request_id_chars,
                   help="characters in a client-chosen request_id (default %(default)s)")
    r.add_argument("--max-concurrent-requests", type=int, default=lim.max_concurrent_requests,
                   help="Generate/GenerateStream calls in progress server-wide (default %(default)s)")
    r.add_argument("--max-streams-per-connection", type=int, default=lim.max_streams_per_connection,
                   help="HTTP/2 streams one client connection may hold open; more wait on the client "
                        "(default %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default=srv.log_format, choices=["text", "json"],
                   help="log lines (one per finished request among them) as text or JSON objects")
    m = p.add_argument_group("metrics")
    m.add_argument("--metrics-port", type=int, default=srv.metrics_port,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off; 0 = any free port)")
    m.add_argument("--metrics-top-adapters", type=int, default=srv.metrics_top_adapters,
                   help="adapters that get their own `adapter` label, the first N to finish a request; "
                        "the rest count under adapter=\"other\" (default %(default)s)")
    p.set_defaults(func=_serve, parser=p)


def _preloads(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """`--adapter ID=PATH` values -> ((ID, PATH), ...); the folders must exist."""
    out = []
    for spec in specs:
        adapter_id, sep, path = spec.partition("=")
        if not sep or not adapter_id or not path:
            raise ValueError(f"adapter: expected ID=PATH, got {spec!r}")
        if not os.path.isdir(path):
            raise ValueError(f"adapter: {adapter_id}={path}: {path} is not a folder")
        out.append((adapter_id, path))
    return tuple(out)


def _lora_config(args):
    from loraplex.config import LoraConfig

    from loraplex.lora.s3_source import is_s3_url

    for name, value in [("adapter_root", args.adapter_root)] + [
            ("allowed_roots", r) for r in args.allowed_adapter_root]:
        if value is not None and not is_s3_url(value) and not os.path.isdir(value):
            raise ValueError(f"{name}: {value} is not a folder")
    return LoraConfig(adapter_memory=args.adapter_memory, max_loras=args.max_loras,
                      max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
                      spill_evicted=args.spill_evicted,
                      adapter_root=args.adapter_root, allowed_roots=tuple(args.allowed_adapter_root),
                      max_adapter_bytes=args.max_adapter_bytes, preload=_preloads(args.adapter),
                      state_dir=args.state_dir, adapter_cache_dir=args.adapter_cache_dir,
                      adapter_cache_size=args.adapter_cache_size,
                      max_mixture_adapters=args.max_mixture_adapters)


def read_token_file(name: str, path: str) -> str:
    """The token in `path`, surrounding whitespace (a trailing newline) stripped; never echoed."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read(64 * 1024).strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{name}: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    if not token:
        raise ValueError(f"{name}: {path} is empty")
    return token


def _token(args, name: str) -> str | None:
    """--NAME-token or --NAME-token-file (not both) -> the token or None."""
    value, path = getattr(args, f"{name}_token"), getattr(args, f"{name}_token_file")
    if value is not None and path is not None:
        raise ValueError(f"{name}_token: give --{name}-token or --{name}-token-file, not both")
    return read_token_file(f"{name}_token_file", path) if path is not None else value


def _security_configs(args):
    from loraplex.config import AuthConfig, RequestLimits, TlsConfig

    auth = AuthConfig(admin_token=_token(args, "admin"), generation_token=_token(args, "generation"))
    tls = TlsConfig(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)
    limits = RequestLimits(max_prompt_chars=args.max_prompt_chars, max_messages=args.max_messages,
                           max_stop_strings=args.max_stop_strings, max_stop_chars=args.max_stop_chars,
                           max_request_id_chars=args.max_request_id_chars,
                           max_concurrent_requests=args.max_concurrent_requests,
                           max_streams_per_connection=args.max_streams_per_connection)
    return auth, tls, limits


def _server_config(args):
    from loraplex.config import EngineConfig, ModelConfig, ServerConfig

    auth, tls, limits = _security_configs(args)
    return ServerConfig(
        host=args.host, port=args.port, drain_timeout_seconds=args.drain_timeout,
        http_port=args.http_port if args.http else None, generation_config=args.generation_config,
        served_model_names=tuple(args.served_model_name),
        max_message_bytes=args.max_message_bytes, auth=auth, tls=tls, limits=limits,
        metrics_port=args.metrics_port, metrics_top_adapters=args.metrics_top_adapters,
        log_format=args.log_format,
        model=ModelConfig(path=args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir,
                          quantize=args.quantize, quant_compute_dtype=args.quant_compute_dtype,
                          double_quant=args.double_quant, quantize_embeddings=args.quantize_embeddings),
        engine=EngineConfig(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                            kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=args.kv_cache_memory,
                            max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.max_num_batched_tokens,
                            max_model_len=args.max_model_len, max_new_tokens_cap=args.max_new_tokens_cap,
                            max_waiting=args.max_waiting,
                            adapter_starvation_steps=args.adapter_starvation_steps,
                            enable_prefix_caching=args.prefix_caching,
                            structured_output_compile_timeout=args.structured_output_compile_timeout,
                            structured_output_max_bytes=args.structured_output_max_bytes,
                            structured_output_cache_size=args.structured_output_cache_size,
                            structured_output_overlap=args.structured_output_overlap,
                            cuda_graphs=args.cuda_graphs),
        lora=_lora_config(args),
    )


def _serve(args) -> int:
    try:
        if args.model is not None and not os.path.isdir(args.model):
            raise ValueError(f"model: {args.model} is not a folder")
        if args.generation_config not in ("auto", "neutral", "vllm") and not os.path.isdir(args.generation_config):
            raise ValueError(f"generation_config: {args.generation_config} is neither auto, neutral nor a folder")
        config = _server_config(args)
    except ValueError as err:
        args.parser.error(str(err))  # exits 2 with the usage line and the message
    import asyncio

    from loraplex.model.quantize import resolve_method
    from loraplex.serve import resolve_device, serve

    try:
        # A --quantize method this machine cannot run is a usage error listing what can run.
        resolve_method(config.model.quantize, resolve_device(config.model.device))
    except ValueError as err:
        args.parser.error(str(err))
    from loraplex.api.request_log import configure_logging

    configure_logging(config.log_format, args.log_level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the server never fetches from a hub
    try:
        asyncio.run(serve(config))
    except (OSError, ValueError, RuntimeError) as err:
        # Cannot bind, the model folder is unusable or a start-up adapter cannot be loaded: one
        # line, not a traceback.
        logging.getLogger("loraplex").debug("serve failed", exc_info=True)
        print(f"loraplex serve: error: {err}", file=sys.stderr)
        return 1
    return 0


# --- clients (all through loraplex.client) ----------------------------------------------------
def _client(args):
    """A loraplex.client.Client for --server: TLS when --tls-ca is given (with a client
    certificate when --tls-cert/--tls-key are), plaintext otherwise; --token / --token-file."""
    from loraplex.client import Client

    if args.tls_ca is None and (args.tls_cert is not None or args.tls_key is not None):
        raise ValueError("--tls-cert/--tls-key need --tls-ca")
    if args.token is not None and args.token_file is not None:
        raise ValueError("give --token or --token-file, not both")
    token = read_token_file("token_file", args.token_file) if args.token_file is not None else args.token
    return Client(args.server, token=token or None, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                  tls_key=args.tls_key)


def _rpc_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print an RPC failure as `error: CODE: details` and exit 1."""

    def wrapper(args) -> int:
        from loraplex.client import LoraplexError

        try:
            return fn(args)
        except LoraplexError as err:
            print(f"error: {err.code}: {err.details}", file=sys.stderr)
            return 1
        except ValueError as err:  # a client flag (token file, TLS file) that cannot be used
            print(f"error: {err}", file=sys.stderr)
            return 2

    return wrapper


def _add_server_flag(p) -> None:
    p.add_argument("--server", default=DEFAULT_SERVER,
                   help="host:port of the server or of a proxy in front of replicas; several "
                        "(a:50051,b:50051) are tried in turn when one answers UNAVAILABLE "
                        "(default %(default)s)")
    p.add_argument("--token", help="bearer token to send (visible in `ps`: prefer --token-file)")
    p.add_argument("--token-file", metavar="FILE", help="file holding the bearer token to send")
    p.add_argument("--tls-ca", metavar="FILE", help="connect over TLS, trusting this PEM CA")
    p.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", metavar="FILE", help="private key (PEM) of --tls-cert")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion from a running server")
    p.add_argument("prompt")
    _add_server_flag(p)
    p.add_argument("--adapter", default="", help="adapter id (default: the base model)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy (server default 1.0)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message through the model's chat template")
    p.add_argument("--timeout", type=float, help="deadline in seconds")
    p.add_argument("-v", "--verbose", action="store_true", help="print finish reason and usage to stderr")
    p.set_defaults(func=_rpc_errors(_generate))


def _generate(args) -> int:
    sampling = {name: getattr(args, name) for name in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")}
    inputs = ({"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt})
    with _client(args) as client:
        last = None
        for chunk in client.stream(adapter=args.adapter, stop=args.stop, timeout=args.timeout, **inputs, **sampling):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()  # tokens appear as they come
            last = chunk
        sys.stdout.write("\n")
    if args.verbose and last is not None and last.usage is not None:
        print(f"[finish_reason={last.finish_reason} prompt_tokens={last.usage.prompt_tokens} "
              f"completion_tokens={last.usage.completion_tokens} "
              f"ttft={last.timings.time_to_first_token_seconds:.3f}s total={last.timings.total_seconds:.3f}s]",
              file=sys.stderr)
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show what a running server serves")
    _add_server_flag(p)
    p.set_defaults(func=_rpc_errors(_info))


def _info(args) -> int:
    with _client(args) as client:
        info = client.model_info().raw  # every field of ModelInfo, as the proto has them
    for field in info.DESCRIPTOR.fields:
        value = getattr(info, field.name)
        if field.is_repeated:
            value = ", ".join(map(str, value))
        elif field.message_type is not None:  # a nested message: its fields on one line
            value = ", ".join(f"{f.name}={getattr(value, f.name)}" for f in value.DESCRIPTOR.fields)
        print(f"{field.name}: {value}")
    return 0


def _add_adapters(sub) -> None:
    p = sub.add_parser("adapters", help="manage the adapters of a running server")
    asub = p.add_subparsers(dest="adapters_command", required=True)
    load = asub.add_parser("load", help="load a PEFT adapter folder (on the server's file system)")
    load.add_argument("adapter_id")
    load.add_argument("path")
    load.add_argument("--pinned", action="store_true", help="never evict it")
    unload = asub.add_parser("unload", help="unload an adapter")
    unload.add_argument("adapter_id")
    lst = asub.add_parser("list", help="list loaded adapters")
    combine = asub.add_parser("combine", help="build a new adapter from loaded ones (PEFT's add_weighted_adapter)")
    combine.add_argument("adapter_id", help="id of the new adapter")
    combine.add_argument("parts", nargs="+", metavar="ID=WEIGHT", help="a loaded adapter and its weight")
    combine.add_argument("--method", default="svd", help="linear, cat, svd, ties, ties_svd, dare_linear, "
                         "dare_linear_svd, dare_ties, dare_ties_svd, magnitude_prune, magnitude_prune_svd "
                         "(default %(default)s)")
    combine.add_argument("--density", type=float, help="fraction kept by the ties/dare/magnitude_prune methods")
    combine.add_argument("--svd-rank", type=int, help="rank of an svd result (default: the largest input rank)")
    combine.add_argument("--svd-clamp", type=float, help="quantile the svd factors are clamped to")
    combine.add_argument("--majority-sign-method", default="", help="total (default) or frequency")
    combine.add_argument("--seed", type=int, help="seed of the dare methods' random drop")
    combine.add_argument("--pinned", action="store_true", help="never evict it")
    save = asub.add_parser("save", help="write a loaded adapter as a PEFT folder (on the server's file system)")
    save.add_argument("adapter_id")
    save.add_argument("path", help="folder to create, under the server's allowed adapter roots")
    save.add_argument("--force", action="store_true", help="replace an existing folder")
    pin = asub.add_parser("pin", help="pin a loaded adapter in the adapter pool (or --unpin it)")
    pin.add_argument("adapter_id")
    pin.add_argument("--unpin", dest="pinned", action="store_false", help="make it evictable again")
    for q in (load, unload, lst, combine, save, pin):
        _add_server_flag(q)
    pin.set_defaults(func=_rpc_errors(_adapters_pin))
    combine.set_defaults(func=_rpc_errors(_adapters_combine))
    save.set_defaults(func=_rpc_errors(_adapters_save))
    load.set_defaults(func=_rpc_errors(_adapters_load))
    unload.set_defaults(func=_rpc_errors(_adapters_unload))
    lst.set_defaults(func=_rpc_errors(_adapters_list))


def _print_adapter(a) -> None:
    rank = str(a.max_rank) if a.min_rank == a.max_rank else f"{a.min_rank}-{a.max_rank}"
    print(f"{a.adapter_id}\ttier={a.tier}\trank={rank}\tbytes={a.bytes}\tin_flight={a.requests_in_flight}"
          f"\tpinned={str(a.pinned).lower()}\tmodules={','.join(a.target_modules)}\tsource={a.source}"
          + (f"\tstate=failed\terror={a.error}" if a.state == "failed" else ""))


def _adapters_load(args) -> int:
    with _client(args) as client:
        _print_adapter(client.load_adapter(args.adapter_id, args.path, pinned=args.pinned))
    return 0


def _adapters_unload(args) -> int:
    with _client(args) as client:
        client.unload_adapter(args.adapter_id)
    print(f"unloaded {args.adapter_id}")
    return 0


def _parts(specs: list[str]) -> list[tuple[str, float]]:
    parts = []
    for spec in specs:
        adapter_id, sep, weight = spec.rpartition("=")
        try:
            parts.append((adapter_id, float(weight)))
        except ValueError:
            sep = ""
        if not sep or not adapter_id:
            raise ValueError(f"adapters: {spec!r} is not ID=WEIGHT")
    return parts


def _adapters_combine(args) -> int:
    with _client(args) as client:
        _print_adapter(client.combine_adapters(
            args.adapter_id, _parts(args.parts), args.method, density=args.density, svd_rank=args.svd_rank,
            svd_clamp=args.svd_clamp, majority_sign_method=args.majority_sign_method, seed=args.seed,
            pinned=args.pinned))
    return 0


def _adapters_save(args) -> int:
    with _client(args) as client:
        print(client.save_adapter(args.adapter_id, args.path, overwrite=args.force))
    return 0


def _adapters_pin(args) -> int:
    with _client(args) as client:
        _print_adapter(client.pin_adapter(args.adapter_id, args.pinned))
    return 0


def _adapters_list(args) -> int:
    with _client(args) as client:
        for a in client.list_adapters():
            _print_adapter(a)
    return 0


# --- merge ---------------------------------------------------------------------------------------
def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold a PEFT adapter into its base model: a standalone HF model folder")
    p.add_argument("base", help="base model folder (float or bitsandbytes-quantized safetensors)")
    p.add_argument("adapter", help="PEFT adapter folder (LoRA, rsLoRA, rank/alpha patterns, AdaLoRA)")
    p.add_argument("out", help="folder to create")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the written weights (default: the base's own float dtype)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_merge)


def _merge(args) -> int:
    from loraplex.atomic_dir import FolderExistsError
    from loraplex.lora.merge import merge_adapter

    try:
        out = merge_adapter(args.base, args.adapter, args.out, overwrite=args.force, dtype=args.dtype,
                            progress=not args.quiet)
    except (ValueError, FolderExistsError) as err:  # MergeError, AdapterFormatError, an existing folder
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


# --- convert-default -----------------------------------------------------------------------------
def _add_convert_default(sub) -> None:
    p = sub.add_parser("convert-default",
                       help="convert the embedded SmolLM2-135M-Instruct GGUF into a safetensors folder")
    p.add_argument("--cache-dir", help="default ~/.cache/loraplex")
    p.set_defaults(func=_convert_default)


def _convert_default(args) -> int:
    from loraplex.model.default_model import ensure_default_model

    print(ensure_default_model(args.cache_dir))
    return 0


# --- entry point ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from loraplex import __version__

    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-LoRA LLM inference server.")
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_generate(sub)
    _add_info(sub)
    _add_adapters(sub)
    _add_merge(sub)
    _add_convert_default(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
