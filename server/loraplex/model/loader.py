"""Load an HF Llama-family folder (config.json + safetensors + tokenizer) into our own model.

The model is built on the meta device (no memory, no random init), materialised once in the
target dtype/device, and then filled tensor by tensor straight from the memory-mapped
safetensors files, so peak memory is one model plus one tensor, never two models.
Loading is strict: a checkpoint tensor we have no place for, or a parameter the checkpoint does
not provide, is an error naming the tensor.

With a QuantSpec (quantize.py), each projection's `.base` is swapped for a shapes-only placeholder
before materialising, so its float weight is never allocated in the model; when the checkpoint
tensor(s) of a projection have been read, they are quantized into a bitsandbytes layer and the
float copy is dropped: peak memory is the quantized model plus one float layer.

With QuantSpec.embeddings (--quantize-embeddings, 4-bit), the embedding table (and an untied
lm_head) get the same treatment: a placeholder until their checkpoint tensor is read, then a 4-bit
table (quantized_embedding.py) / Linear4bit; their float copy is never resident either.

A folder saved already quantized by transformers + bitsandbytes (config.json has a
quantization_config) is loaded as it is (prequantized.py): the projections' quantized tensors are
collected while streaming the checkpoint and become bitsandbytes layers without dequantizing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from loraplex.model.arch import ArchConfig
from loraplex.model.linear import Projection
from loraplex.model.llama import LlamaForCausalLM
from loraplex.model.prequantized import (check_checkpoint_keys, install_layers, is_known_piece, projection_piece,
                                         read_folder_quantization, spec_for_folder)
from loraplex.model.quantize import QuantSpec, quantize_embedding, quantize_linear

# Checkpoint tensors that carry no weights of ours (old HF exports saved RoPE buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaForCausalLM
    arch: ArchConfig
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    path: Path
    dtype: torch.dtype
    quant: QuantSpec = QuantSpec()  # method "none": plain nn.Linear projections

    @property
    def device(self) -> torch.device:
        return self.model.device


def read_arch(path: str | Path) -> ArchConfig:
    """ArchConfig of the folder: config.json plus generation_config.json's eos ids if present."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found (not an HF model folder)")
    cfg = json.loads(config_file.read_text())
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else None
    return ArchConfig.from_hf_config(cfg, gen)


def safetensors_files(path: Path) -> list[Path]:
    """The weight files: those named by model.safetensors.index.json, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names missing shard(s): {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (other formats are not supported)")
    return files


def checkpoint_targets(model: LlamaForCausalLM) -> dict[str, nn.Parameter]:
    """HF tensor name -> our parameter. A Projection keeps its weight in `.base`; HF has no `.base`."""
    projections = {name for name, m in model.named_modules() if isinstance(m, Projection)}
    targets: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if module.endswith(".base") and module[: -len(".base")] in projections:
            name = f"{module[: -len('.base')]}.{leaf}"
        targets[name] = p
    return targets


class _PendingLinear(nn.Module):
    """Placeholder for a projection's base until its weight is read and quantized: holds no tensor,
    so materialising the model does not allocate the float weight (its shapes are checked below)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_shape = tuple(linear.weight.shape)  # [out, in]
        self.has_bias = linear.bias is not None
        self.pieces: dict[str, torch.Tensor] = {}  # "weight" / "bias" read so far

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("projection used before its weights were loaded")


class _PendingTable(nn.Module):
    """Placeholder for the embedding table / untied lm_head under --quantize-embeddings: holds no
    tensor until the checkpoint's is read and quantized (its float copy is then dropped)."""

    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__()
        self.weight_shape = shape  # [vocab, hidden]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("embedding / lm_head used before its weights were loaded")


_EMBED = "model.embed_tokens.weight"
_LM_HEAD = "lm_head.weight"


def _install_pending_tables(model: LlamaForCausalLM) -> dict[str, _PendingTable]:
    """Replace the embedding table (and an untied lm_head) by placeholders; checkpoint name -> placeholder."""
    arch = model.arch
    tables = {_EMBED: _PendingTable((arch.vocab_size, arch.hidden_size))}
    model.model.embed_tokens = tables[_EMBED]
    if model.lm_head is not None:  # tied: the lm_head IS the (4-bit) embedding table
        tables[_LM_HEAD] = _PendingTable((arch.vocab_size, arch.hidden_size))
        model.lm_head = tables[_LM_HEAD]
    return tables


def _read_table(name: str, tensor: torch.Tensor, shape: tuple[int, int], model: LlamaForCausalLM,
                quant: QuantSpec) -> None:
    """Quantize a pending table as soon as it is read: the embedding into a 4-bit table that also
    serves a tied lm_head, an untied lm_head into its own Linear4bit."""
    if tuple(tensor.shape) != shape:
        raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)}, expected {shape}")
    weight = tensor.to(model.dtype)  # the float values an unquantized model would hold
    if name == _EMBED:
        model.model.embed_tokens = quantize_embedding(weight, quant, model.device)
    else:
        model.lm_head = quantize_linear(weight, None, quant, model.device)


def _install_pending(model: LlamaForCausalLM) -> dict[str, tuple[Projection, _PendingLinear]]:
    """Replace every projection's base by a _PendingLinear; HF tensor prefix -> (projection, pending)."""
    pending = {}
    for name, m in model.named_modules():
        if isinstance(m, Projection):
            m.base = _PendingLinear(m.base)
            pending[name] = (m, m.base)
    return pending


@torch.no_grad()
def load_weights(model: LlamaForCausalLM, files: list[Path], quant: QuantSpec | None = None,
                 pending: dict[str, tuple[Projection, _PendingLinear]] | None = None,
                 prequantized: dict[str, dict[str, torch.Tensor]] | None = None,
                 tables: dict[str, _PendingTable] | None = None) -> None:
    """Copy every checkpoint tensor into its parameter (casting dtype, moving device) in place.

    With `pending` (from _install_pending), projection weights are quantized by `quant` instead:
    each projection becomes a bitsandbytes layer as soon as its weight (and bias) are read.
    With `prequantized` (a dict, filled here), the checkpoint is already quantized: every tensor of
    a pending projection (weight, bias, quant state) is kept as read, by projection then piece
    name, for prequantized.install_layers.
    With `tables` (from _install_pending_tables), the embedding / untied lm_head are quantized as read."""
    targets = checkpoint_targets(model)
    pending = pending or {}
    tables = tables or {}
    seen: set[str] = set()
    tied = model.arch.tie_word_embeddings
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if tied and name == "lm_head.weight":
                    # Tied checkpoints may still carry a copy; HF ties it to the embedding anyway.
                    continue
                if prequantized is not None and (hit := projection_piece(name, pending)) is not None:
                    if name in seen:
                        raise ValueError(f"weight {name!r} appears in more than one file")
                    if not is_known_piece(hit[1]):
                        raise ValueError(f"unexpected weight {name!r} in {file.name}: not a bitsandbytes "
                                         "weight, bias or quantization state")
                    prequantized.setdefault(hit[0], {})[hit[1]] = f.get_tensor(name)  # stays quantized
                    seen.add(name)
                    continue
                if name in tables:
                    if name in seen:
                        raise ValueError(f"weight {name!r} appears in more than one file")
                    _read_table(name, f.get_tensor(name), tables[name].weight_shape, model, quant)
                    seen.add(name)
                    continue
                prefix, _, leaf = name.rpartition(".")
                if prefix in pending and leaf in ("weight", "bias"):
                    if name in seen:
                        raise ValueError(f"weight {name!r} appears in more than one file")
                    _read_pending(name, f.get_tensor(name), *pending[prefix], model, quant)
                    seen.add(name)
                    continue
                target = targets.get(name)
                if target is None:
                    raise ValueError(f"unexpected weight {name!r} in {file.name}: no such parameter "
                                     f"in {model.arch.architecture}")
                if name in seen:
                    raise ValueError(f"weight {name!r} appears in more than one file")
                tensor = f.get_tensor(name)  # memory-mapped; one tensor alive at a time
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} in {file.name}, "
                                     f"expected {tuple(target.shape)}")
                target.copy_(tensor)  # casts to the model dtype and moves to its device
                seen.add(name)
    missing = sorted((set(targets) | _pending_names(pending) | set(tables)) - seen)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"missing weight(s) {missing[:5]}{more} in checkpoint")


def _pending_names(pending: dict[str, tuple[Projection, _PendingLinear]]) -> set[str]:
    return {f"{prefix}.{leaf}" for prefix, (_, p) in pending.items()
            for leaf in (("weight", "bias") if p.has_bias else ("weight",))}


def _read_pending(name: str, tensor: torch.Tensor, proj: Projection, p: _PendingLinear,
                  model: LlamaForCausalLM, quant: QuantSpec) -> None:
    """Keep one tensor of a pending projection; quantize the projection once it is complete."""
    leaf = name.rpartition(".")[2]
    expected = p.weight_shape if leaf == "weight" else p.weight_shape[:1]
    if leaf == "bias" and not p.has_bias:
        raise ValueError(f"unexpected weight {name!r}: {model.arch.architecture} has no bias there")
    if tuple(tensor.shape) != expected:
        raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)}, expected {expected}")
    # Cast to the model dtype first: the same float values an unquantized model would hold.
    p.pieces[leaf] = tensor.to(model.dtype)
    if "weight" in p.pieces and (not p.has_bias or "bias" in p.pieces):
        proj.base = quantize_linear(p.pieces["weight"], p.pieces.get("bias"), quant, model.device)
        p.pieces.clear()  # drop the float copy: only the quantized layer stays


def _return_freed_memory() -> None:
    """Hand the float copies freed while quantizing back to the OS. Each one is a few MiB, below
    glibc's mmap threshold, so they live on the heap and glibc keeps them (measured on the default
    model: +435 MiB private RSS after an nf4 load, +164 MiB after malloc_trim). No-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _keys(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt", device="cpu") as f:
        return list(f.keys())


def build_empty_model(arch: ArchConfig, dtype: torch.dtype, device: torch.device | str) -> LlamaForCausalLM:
    """Our model with uninitialised parameters on `device` (no random init, one allocation)."""
    model = LlamaForCausalLM(arch, dtype=dtype, device="meta")
    model.to_empty(device=device)
    model.rebuild_buffers()
    return model


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", quant: QuantSpec | None = None) -> LoadedModel:
    """Load the HF folder at `path` as our LlamaForCausalLM in `dtype` on `device`.

    `quant` (method nf4|fp4|int8) quantizes the projections while loading; check the method with
    quantize.check_available first to get the message listing what runs on this machine.
    A folder already quantized with bitsandbytes is loaded as it is; `quant` must then ask for
    "auto" (`requested`; None means auto) or the folder's method (prequantized.spec_for_folder)."""
    from transformers import AutoTokenizer

    path = Path(path)
    quant = quant or QuantSpec(requested="auto")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: must be a floating point dtype, got {dtype}")
    arch = read_arch(path)
    folder = read_folder_quantization(path)  # None for a float checkpoint
    files = safetensors_files(path)
    if folder is not None:
        # Refuses a conflicting --quantize; the folder's embeddings are float: --quantize-embeddings
        # quantizes them at load (with the folder's 4-bit method; an int8 folder refuses it).
        quant = replace(spec_for_folder(folder, quant, device, path), embeddings=quant.embeddings)
        model = LlamaForCausalLM(arch, dtype=dtype, device="meta")
        pending = _install_pending(model)  # the projections' layers are built from the quantized tensors
        tables = _install_pending_tables(model) if quant.embeddings else None
        model.to_empty(device=device)
        model.rebuild_buffers()
        names = [n for file in files for n in _keys(file)]
        check_checkpoint_keys(names, set(pending))
        pieces: dict[str, dict[str, torch.Tensor]] = {}
        load_weights(model, files, quant, pending, prequantized=pieces, tables=tables)
        install_layers(pending, pieces, quant, folder, dtype, torch.device(device))
    elif quant.enabled:
        model = LlamaForCausalLM(arch, dtype=dtype, device="meta")
        pending = _install_pending(model)  # before to_empty: projection weights never allocated
        tables = _install_pending_tables(model) if quant.embeddings else None  # nor the embedding table
        model.to_empty(device=device)
        model.rebuild_buffers()
        load_weights(model, files, quant, pending, tables=tables)
        _return_freed_memory()
    else:
        model = build_empty_model(arch, dtype, device)
        load_weights(model, files)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return LoadedModel(model=model, arch=arch, tokenizer=tokenizer, path=path, dtype=dtype, quant=quant)
