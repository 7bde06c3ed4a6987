"""The server side of the soak tool: random PEFT adapter folders, an in-process server whose engine
is audited, and the process's resident memory.

`write_adapters` writes PEFT's on-disk format directly (adapter_config.json +
adapter_model.safetensors with keys `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`,
...), with random, never-zero weights and mixed ranks and targets: dozens of folders take well
under a second on a tiny model, where building each with PEFT would load the base model every time.

`ServerAudit` is the server's own account of requests: every `engine.submit` that succeeded and
every finished event (an engine observer, called once per request by the engine), with its reason
and token count. The soak compares it with what each client saw (soak_driver.reconcile).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
_PARENT = {**{p: "self_attn" for p in ATTN}, **{p: "mlp" for p in MLP}}
# Target sets cycled over the adapters: attention-only, a pair, everything.
TARGET_SETS = (("q_proj", "v_proj"), ATTN, ATTN + MLP)


# --- adapter folders -----------------------------------------------------------------------------
def projection_shapes(model_dir: str | Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(num_layers, short name -> (in_features, out_features)) from a HF config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    feats = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
             "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    return cfg["num_hidden_layers"], feats


def write_adapter(folder: Path, num_layers: int, feats: dict[str, tuple[int, int]],
                  targets: tuple[str, ...], rank: int, alpha: float, gen: torch.Generator,
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    """One PEFT LoRA folder with random A ~ N(0, 1/in) and B ~ N(0, 0.02^2) (PEFT's zero B
    would make a no-op adapter)."""
    from safetensors.torch import save_file

    tensors = {}
    for layer in range(num_layers):
        for t in targets:
            d_in, d_out = feats[t]
            key = f"base_model.model.model.layers.{layer}.{_PARENT[t]}.{t}"
            a = torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)  # [r, in]
            b = torch.randn(d_out, rank, generator=gen) * 0.02  # [out, r]
            tensors[f"{key}.lora_A.weight"] = a.to(dtype).contiguous()
            tensors[f"{key}.lora_B.weight"] = b.to(dtype).contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none",
              "use_rslora": False, "fan_in_fan_out": False, "inference_mode": True}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def write_adapters(root: str | Path, ids: list[str], model_dir: str | Path, ranks: tuple[int, ...],
                   seed: int = 0) -> dict[str, Path]:
    """Folders root/<id> for `ids`, ranks and target sets cycled, each with its own weights and
    lora_alpha. Returns id -> folder."""
    num_layers, feats = projection_shapes(model_dir)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, aid in enumerate(ids):
        rank = ranks[i % len(ranks)]
        targets = TARGET_SETS[(i // len(ranks)) % len(TARGET_SETS)]
        out[aid] = write_adapter(Path(root) / aid, num_layers, feats, targets, rank, alpha=2.0 * rank + i % 3,
                                 gen=gen)
    return out


# --- the server's own account of requests ----------------------------------------------------------
@dataclass(frozen=True)
class ServerFinished:
    request_id: str
    adapter_id: str
    finish_reason: str  # FinishReason.value
    completion_tokens: int
    queue_s: float = 0.0  # the engine's timings: accepted -> first scheduled
    total_s: float = 0.0  # accepted -> finished


class ServerAudit:
    """Engine observer + submit recorder. Thread-safe: submit runs on the gRPC loop's thread,
    on_finish on the engine thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.submitted: list[str] = []
        self.finished: list[ServerFinished] = []

    def watch(self, engine: Any) -> None:
        """Record every successful engine.submit (an instance attribute shadows the method)."""
        submit = engine.submit

        def recorded_submit(request, callback):
            # Recorded before the call: the engine may finish the request (and call on_finish)
            # before submit returns; a submit that raises is taken back out.
            with self._lock:
                self.submitted.append(request.request_id)
            try:
                submit(request, callback)
            except BaseException:
                with self._lock:
                    self.submitted.remove(request.request_id)
                raise

        engine.submit = recorded_submit

    # EngineObserver
    def on_step(self, num_seqs: int, num_tokens: int, distinct_adapters: int) -> None:
        pass

    def on_finish(self, req) -> None:
        with self._lock:
            self.finished.append(ServerFinished(req.request_id, req.adapter_id, req.finish_reason.value,
                                                req.completion_tokens, req.timings.queue_seconds,
                                                req.timings.total_seconds))

    def snapshot(self, prefix: str = "") -> tuple[list[str], list[ServerFinished]]:
        """Submitted ids and finished events of requests whose id starts with `prefix`."""
        with self._lock:
            return ([r for r in self.submitted if r.startswith(prefix)],
                    [f for f in self.finished if f.request_id.startswith(prefix)])

    def reasons(self, prefix: str = "") -> dict[str, int]:
        return dict(Counter(f.finish_reason for f in self.snapshot(prefix)[1]))


# --- an in-process server --------------------------------------------------------------------------
@dataclass
class SpawnedServer:
    server: Any  # loraplex.serve.ServerThread
    engine: Any
    manager: Any
    audit: ServerAudit
    model_dir: Path
    info: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.server.address

    def stop(self) -> None:
        self.server.stop()


def spawn_server(model_dir: str | Path | None, engine_config: Any, lora_config: Any,
                 dtype: str = "bfloat16", cache_dir: str | None = None, auth: Any = None) -> SpawnedServer:
    """Load the model (None = the embedded default), attach a LoRA manager and an audited engine,
    serve on 127.0.0.1 (any free port) from a background thread. `auth`: a config.AuthConfig
    (None = every call open)."""
    from loraplex.config import ModelConfig
    from loraplex.model.loader import load_model
    from loraplex.serve import ServerThread, build_lora_manager, model_path, resolve_dtype, start_engine

    path = Path(model_dir) if model_dir is not None else model_path(ModelConfig(cache_dir=cache_dir))
    loaded = load_model(path, dtype=resolve_dtype(dtype), device="cpu")
    manager = build_lora_manager(loaded, lora_config)
    audit = ServerAudit()
    runtime = start_engine(loaded, engine_config, manager, observers=[audit])
    audit.watch(runtime.engine)
    server = ServerThread(runtime, **({"auth": auth} if auth is not None else {})).start()
    return SpawnedServer(server=server, engine=runtime.engine, manager=manager, audit=audit, model_dir=path,
                         info={"model": str(path), "dtype": str(loaded.dtype).removeprefix("torch.")})


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process on this machine (Linux /proc)."""
    resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
