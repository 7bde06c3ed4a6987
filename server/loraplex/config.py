"""Frozen, validated configuration. Built from CLI flags in cli.py; no env-var globals."""

from __future__ import annotations

from dataclasses import dataclass, field
import os
import re
from typing import Callable


# Kept in step with loraplex.model.quantize.METHODS (not imported: config stays free of torch).
QUANTIZE_CHOICES = ("auto", "none", "nf4", "fp4", "int8")
# The KV cache's element type: auto = the model's dtype; int8 = codes with a float32 scale per
# slot and kv head (model/kv_quant.py): 0.53x the bytes of bfloat16 on the default model.
KV_CACHE_DTYPES = ("auto", "int8")


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # HF folder; None = embedded default model (SmolLM2-135M-Instruct)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 on CPU and CUDA)
    device: str = "auto"  # auto | cpu | cuda
    cache_dir: str | None = None  # where the default model is converted to; None = ~/.cache/loraplex
    # bitsandbytes quantization of the base projections: auto (nf4 on CUDA, none on CPU where bf16
    # matmuls are faster), none, nf4, fp4, int8. Whether the method runs here is checked at start-up
    # (model/quantize.py check_available), not here: a config may be built on another machine.
    quantize: str = "auto"
    quant_compute_dtype: str = "auto"  # 4-bit matmul dtype: auto (= dtype) | float32 | bfloat16 | float16
    double_quant: bool = False  # 4-bit: also quantize the block scales (~0.4 bit/param less)
    # 4-bit only: keep the embedding table (and lm_head, tied or not) in 4 bits too. Off by default:
    # transformers/PEFT keep them in 16 bits (model/quantized_embedding.py).
    quantize_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: unknown value {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: unknown value {self.device!r}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize: unknown value {self.quantize!r}; available: {list(QUANTIZE_CHOICES)}")
        if self.quant_compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"quant_compute_dtype: unknown value {self.quant_compute_dtype!r}; "
                             "available: ['auto', 'float32', 'bfloat16', 'float16']")
        if self.double_quant and self.quantize not in ("auto", "nf4", "fp4"):
            raise ValueError(f"double_quant: only applies to 4-bit quantization (nf4, fp4), not {self.quantize!r}")
        if self.quantize_embeddings and self.quantize not in ("nf4", "fp4"):
            raise ValueError(f"quantize_embeddings: needs a 4-bit method, --quantize nf4 or fp4 (got "
                             f"{self.quantize!r}); the embedding table is kept in the projections' 4-bit format")


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int = 2048  # KV cache size in blocks (all sequences share them)
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES
    # KV cache size in bytes ("4GiB", "512MB"), instead of num_kv_blocks: as many blocks as fit, so
    # an int8 cache holds ~1.9x the tokens of a bfloat16 one in the same memory. None = num_kv_blocks.
    kv_cache_memory: str | None = None
    max_num_seqs: int = 64  # sequences in one step (running batch)
    max_num_batched_tokens: int = 512  # per-step token budget: decode tokens + prefill chunks
    max_model_len: int = 2048  # prompt + generated tokens, capped by the model's own limit
    max_new_tokens_cap: int = 2048  # requests asking for more get INVALID_ARGUMENT
    max_waiting: int = 256  # waiting queue bound; beyond it RESOURCE_EXHAUSTED
    # Starvation bound of adapter-aware admission (engine/scheduler.py): a request passed over
    # this many steps because its adapter is not in memory stops every later adapter request
    # from being admitted ahead of it.
    adapter_starvation_steps: int = 64
    # Automatic prefix caching (engine/block_manager.py): full KV blocks are shared between
    # requests with the same leading tokens and the same adapter weights (--no-prefix-caching).
    enable_prefix_caching: bool = True
    # Structured output (engine/structured/): a schema / regex / grammar that does not compile
    # within this many seconds is refused (INVALID_ARGUMENT), as is one longer than max_bytes;
    # compiled grammars are kept in an LRU of cache_size entries keyed by the constraint.
    structured_output_compile_timeout: float = 10.0
    structured_output_max_bytes: int = 64 * 1024
    structured_output_cache_size: int = 256
    # Compute the allowed-token masks in a worker thread while the forward runs (False: after it,
    # on the engine thread).
    structured_output_overlap: bool = True
    # Pure base-model decode steps replayed from CUDA graphs, one per batch-size bucket
    # (model/decode_graphs.py; --cuda-graphs). Refused at start-up unless the model is on CUDA.
    cuda_graphs: bool = False

    def kv_blocks(self, bytes_per_block: int) -> int:
        """Blocks of the KV cache: kv_cache_memory // bytes_per_block when that is set (at least
        one block must fit), else num_kv_blocks."""
        if self.kv_cache_memory is None:
            return self.num_kv_blocks
        nbytes = parse_memory(self.kv_cache_memory, "kv_cache_memory")[0]
        if nbytes < bytes_per_block:
            raise ValueError(f"kv_cache_memory: {self.kv_cache_memory} holds no KV block ({bytes_per_block} bytes "
                             f"each with block_size {self.block_size} and kv_cache_dtype {self.kv_cache_dtype})")
        return nbytes // bytes_per_block

    def __post_init__(self) -> None:
        for name in ("block_size", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens",
                     "max_model_len", "max_new_tokens_cap", "max_waiting", "adapter_starvation_steps",
                     "structured_output_max_bytes", "structured_output_cache_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_memory is not None and parse_memory(self.kv_cache_memory, "kv_cache_memory")[0] is None:
            raise ValueError(f"kv_cache_memory: expected bytes (e.g. 4GiB, 512MB), got {self.kv_cache_memory!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: unknown value {self.kv_cache_dtype!r}; available: {list(KV_CACHE_DTYPES)}")
        if not self.structured_output_compile_timeout > 0:
            raise ValueError(f"structured_output_compile_timeout: must be > 0 seconds, got "
                             f"{self.structured_output_compile_timeout}")


# Requests carry prompts (token ids, chat histories) of at most max_model_len tokens and responses
# their completions: 16 MiB is far above either, yet bounds what one client can make us buffer.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# A prompt's text is refused before tokenizing when it has more than this many characters per
# token of max_model_len (when RequestLimits.max_prompt_chars is 0 = auto). English averages ~4
# characters per token and whitespace-heavy code rarely reaches 10: 32 never refuses a prompt that
# would fit, yet a 16 MiB string is refused without paying for its tokenization.
AUTO_PROMPT_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one Generate request checked before any work (each breach: INVALID_ARGUMENT naming
    the field), and on how many generation RPCs run at once (breach: RESOURCE_EXHAUSTED)."""

    max_prompt_chars: int = 0  # prompt text / all message contents; 0 = auto (32 x max_model_len)
    max_messages: int = 1024  # messages in one chat
    max_stop_strings: int = 16  # sampling.stop entries; every one is searched after every token
    max_stop_chars: int = 256  # characters in one stop string
    max_request_id_chars: int = 256  # client-chosen request ids end up in logs and metrics
    # Generate/GenerateStream RPCs in progress server-wide (queued, running or still being
    # converted); the engine's max_waiting bounds its queue, this bounds everything before it.
    max_concurrent_requests: int = 512
    # HTTP/2 streams one connection may hold open; further calls wait on the client's side.
    max_streams_per_connection: int = 128

    def __post_init__(self) -> None:
        if self.max_prompt_chars < 0:
            raise ValueError(f"max_prompt_chars: must be >= 0 (0 = auto), got {self.max_prompt_chars}")
        for name in ("max_messages", "max_stop_strings", "max_stop_chars", "max_request_id_chars",
                     "max_concurrent_requests", "max_streams_per_connection"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    def prompt_chars(self, max_model_len: int) -> int:
        """The prompt character limit in force for a server of `max_model_len` tokens."""
        return self.max_prompt_chars or AUTO_PROMPT_CHARS_PER_TOKEN * max_model_len


def _check_token(name: str, token: str | None) -> None:
    # The message never shows the token: a config error may end up in a log.
    if token is None:
        return
    if not token:
        raise ValueError(f"{name}: must not be empty")
    # gRPC metadata values must be printable ASCII; a space would split "Bearer <token>".
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ValueError(f"{name}: must be printable ASCII without spaces")
    if len(token) < 16:
        raise ValueError(f"{name}: must have at least 16 characters (e.g. `openssl rand -hex 32`)")


@dataclass(frozen=True)
class AuthConfig:
    """Bearer tokens (`authorization: Bearer <token>` metadata). repr=False: a config printed to a
    log or a traceback never shows them."""

    admin_token: str | None = field(default=None, repr=False)  # LoadAdapter / UnloadAdapter
    generation_token: str | None = field(default=None, repr=False)  # Generation + ListAdapters

    def __post_init__(self) -> None:
        _check_token("admin_token", self.admin_token)
        _check_token("generation_token", self.generation_token)

    @property
    def enabled(self) -> bool:
        return self.admin_token is not None or self.generation_token is not None


@dataclass(frozen=True)
class TlsConfig:
    """PEM files; whether they exist and parse is checked at start-up (api/tls.py)."""

    cert: str | None = None  # server certificate chain
    key: str | None = None  # its private key
    client_ca: str | None = None  # set: every client must present a certificate signed by it

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls_cert and tls_key: give both or neither")
        if self.client_ca is not None and self.cert is None:
            raise ValueError("tls_client_ca: needs tls_cert and tls_key (client certificates only exist over TLS)")
        for name in ("cert", "key", "client_ca"):
            if getattr(self, name) == "":
                raise ValueError(f"tls_{name}: must not be empty")

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    # SIGTERM/SIGINT: seconds in-flight requests may finish before the rest are cancelled.
    drain_timeout_seconds: float = 10.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # largest gRPC message received or sent
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    lora: "LoraConfig" = field(default_factory=lambda: LoraConfig())
    metrics_port: int | None = None  # Prometheus http://host:PORT/metrics; None = off, 0 = any free port
    # OpenAI-compatible HTTP (api/http/) on the same host; None = off (`--no-http`), 0 = any free port.
    http_port: int | None = 8000
    # Names the OpenAI `model` field accepts for the base model (vLLM's --served-model-name); the
    # first is the one GET /v1/models lists and responses echo. () = the model folder's name.
    served_model_names: tuple[str, ...] = ()
    # Sampling defaults: "auto" (the model folder's generation_config.json), "neutral" (or "vllm":
    # SamplingParams' own), or a folder holding a generation_config.json (model/generation_config.py).
    generation_config: str = "auto"
    metrics_top_adapters: int = 10  # adapters with their own `adapter` label; the rest count as "other"
    log_format: str = "text"  # text | json: every log line, incl. one per finished request
    limits: RequestLimits = field(default_factory=RequestLimits)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)

    def __post_init__(self) -> None:
        if not (0 <= self.port < 65536):
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not (0 <= self.metrics_port < 65536):
            raise ValueError(f"metrics_port: must be in [0, 65535], got {self.metrics_port}")
        if self.http_port is not None and not (0 <= self.http_port < 65536):
            raise ValueError(f"http_port: must be in [0, 65535], got {self.http_port}")
        if self.http_port is not None and self.http_port != 0 and self.http_port == self.port:
            raise ValueError(f"http_port: {self.http_port} is the gRPC port too; choose another (or --no-http)")
        if any(not n or n != n.strip() for n in self.served_model_names):
            raise ValueError(f"served_model_names: names must be non-empty without surrounding spaces, "
                             f"got {list(self.served_model_names)}")
        if not self.generation_config:
            raise ValueError("generation_config: must not be empty (auto, neutral or a folder)")
        if self.metrics_top_adapters < 0:
            raise ValueError(f"metrics_top_adapters: must be >= 0, got {self.metrics_top_adapters}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format: expected text or json, got {self.log_format!r}")
        if self.drain_timeout_seconds < 0:
            raise ValueError(f"drain_timeout_seconds: must be >= 0, got {self.drain_timeout_seconds}")
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes: must be >= 1, got {self.max_message_bytes}")


_MEMORY_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str, name: str = "adapter_memory") -> tuple[int | None, float | None]:
    """"2GiB" / "512MB" / "1000000" -> (bytes, None); "0.25" (a fraction in (0, 1)) -> (None, 0.25).
    `name`: the setting's, for the error message."""
    raw = str(text).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)", raw)
    if m is None or m.group(2).upper() not in _MEMORY_UNITS:
        raise ValueError(f"{name}: expected bytes (e.g. 2GiB, 512MB) or a fraction of free "
                         f"memory in (0, 1), got {text!r}")
    value, unit = float(m.group(1)), m.group(2).upper()
    if not unit and 0 < value < 1:
        return None, value
    n = int(value * _MEMORY_UNITS[unit])
    if n < 1:
        raise ValueError(f"{name}: must be more than 0 bytes, got {text!r}")
    return n, None


@dataclass(frozen=True)
class LoraConfig:
    # Bytes of the adapter memory pool (lora/pool.py): "2GiB", "512MB", or a fraction of the
    # memory free at start-up ("0.2"). Adapters take their real size in it.
    adapter_memory: str = "1GiB"
    max_loras: int | None = None  # optional cap on adapters resident at once (vLLM's flag); None = no cap
    max_lora_rank: int = 64  # adapters of a larger rank are refused at load
    max_cpu_loras: int = 128  # host copies outside the pool (see lora/manager.py Tier.HOST)
    # CPU: an adapter evicted from the pool keeps its extent on the host tier (one of the
    # max_cpu_loras copies; all of them together at most the pool's size in bytes) and comes
    # back with one memcpy; False = read again from disk, for
    # hosts where memory is tighter than disk (rank-8 q/k/v/o: 10.5 ms against 0.7).
    spill_evicted: bool = True
    adapter_root: str | None = None  # on-demand loading of <root>/<adapter_id>
    allowed_roots: tuple[str, ...] = ()  # LoadAdapter paths must lie under one of these (or adapter_root)
    max_adapter_bytes: int = 2 * 1024**3  # largest adapter folder accepted
    # (adapter_id, folder) loaded at start-up (`serve --adapter ID=PATH`). The operator named these
    # folders, so each one is also an allowed root (for itself only: not its siblings).
    preload: tuple[tuple[str, str], ...] = ()
    max_mixture_adapters: int = 8  # longest GenerateRequest.adapters list (per-request mixtures)
    # Persistent adapter registry (lora/registry.py): adapters loaded/pinned through the API are
    # recorded in <state_dir>/state.json and loaded again at start-up. None = not recorded.
    state_dir: str | None = None
    # Adapters from s3:// roots are downloaded into this folder (lora/download_cache.py), which
    # holds at most adapter_cache_size bytes (least recently used copies not being read go first).
    adapter_cache_dir: str | None = None  # None = ~/.cache/loraplex/adapters
    adapter_cache_size: str = "10GiB"

    def __post_init__(self) -> None:
        from loraplex.lora.errors import AdapterPathError
        from loraplex.lora.s3_source import S3Url, is_s3_url

        for name, root in [("adapter_root", self.adapter_root)] + [("allowed_roots", r) for r in self.allowed_roots]:
            if root and is_s3_url(root):
                try:
                    S3Url.parse(root, name)
                except AdapterPathError as err:
                    raise ValueError(str(err)) from None
        try:
            cache_bytes = parse_memory(self.adapter_cache_size)[0]
        except ValueError:
            cache_bytes = None
        if cache_bytes is None:
            raise ValueError(f"adapter_cache_size: expected bytes (e.g. 10GiB, 512MB), got {self.adapter_cache_size!r}")
        if self.state_dir == "" or self.adapter_cache_dir == "":
            raise ValueError("state_dir / adapter_cache_dir: must not be empty")
        for name in ("max_lora_rank", "max_cpu_loras", "max_adapter_bytes", "max_mixture_adapters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_loras is not None and self.max_loras < 1:
            raise ValueError(f"max_loras: must be >= 1, got {self.max_loras}")
        parse_memory(self.adapter_memory)
        if any(not r for r in self.allowed_roots):
            raise ValueError("allowed_roots: an allowed root must not be empty")
        ids = [adapter_id for adapter_id, _ in self.preload]
        dup = next((i for i in ids if ids.count(i) > 1), None)
        if dup is not None:
            raise ValueError(f"preload: adapter id {dup!r} is given twice")
        if any(not path for _, path in self.preload):
            raise ValueError("preload: an adapter folder must not be empty")
        if len(self.preload) > self.max_cpu_loras:
            raise ValueError(f"preload: {len(self.preload)} adapters do not fit max_cpu_loras={self.max_cpu_loras}")

    def adapter_memory_bytes(self, available: Callable[[], int]) -> int:
        """The pool's size in bytes; `available()` is the memory free now (asked for a fraction only)."""
        nbytes, fraction = parse_memory(self.adapter_memory)
        return nbytes if nbytes is not None else int(available() * fraction)

    def cache_dir(self) -> str:
        """Where adapters from s3:// roots are downloaded to."""
        return self.adapter_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "loraplex", "adapters")

    @property
    def roots(self) -> tuple[str, ...]:
        """Folders LoadAdapter may read under: --adapter-root, --allowed-adapter-root, preloads."""
        return (((self.adapter_root,) if self.adapter_root else ()) + self.allowed_roots
                + tuple(path for _, path in self.preload))
