"""Load an HF Llama-family folder (config.json + safetensors + tokenizer) into our own model.

The model is built on the meta device (no memory, no random init), materialised once in the
target dtype/device, and then filled tensor by tensor straight from the memory-mapped
safetensors files, so peak memory is one model plus one tensor, never two models.
Loading is strict: a checkpoint tensor we have no place for, or a parameter the checkpoint does
not provide, is an error naming the tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from loraplex.model.arch import ArchConfig
from loraplex.model.linear import Projection
from loraplex.model.llama import LlamaForCausalLM

# Checkpoint tensors that carry no weights of ours (old HF exports saved RoPE buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaForCausalLM
    arch: ArchConfig
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    path: Path
    dtype: torch.dtype

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


@torch.no_grad()
def load_weights(model: LlamaForCausalLM, files: list[Path]) -> None:
    """Copy every checkpoint tensor into its parameter (casting dtype, moving device) in place."""
    targets = checkpoint_targets(model)
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
    missing = sorted(set(targets) - seen)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"missing weight(s) {missing[:5]}{more} in checkpoint")


def build_empty_model(arch: ArchConfig, dtype: torch.dtype, device: torch.device | str) -> LlamaForCausalLM:
    """Our model with uninitialised parameters on `device` (no random init, one allocation)."""
    model = LlamaForCausalLM(arch, dtype=dtype, device="meta")
    model.to_empty(device=device)
    model.rebuild_buffers()
    return model


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> LoadedModel:
    """Load the HF folder at `path` as our LlamaForCausalLM in `dtype` on `device`."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: must be a floating point dtype, got {dtype}")
    arch = read_arch(path)
    files = safetensors_files(path)
    model = build_empty_model(arch, dtype, device)
    load_weights(model, files)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return LoadedModel(model=model, arch=arch, tokenizer=tokenizer, path=path, dtype=dtype)
