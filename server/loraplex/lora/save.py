"""Write parsed adapter weights back as a PEFT folder that PEFT (and read_adapter) loads as the same update.

Every module is written as plain LoRA with its scale folded into B (B' = scale * B) and
lora_alpha = r per module, so PEFT's scaling is exactly 1; modules of different ranks get a
rank_pattern / alpha_pattern entry keyed by their full module name. target_modules lists the
full module names, so exactly the adapted modules are wrapped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from loraplex.atomic_dir import atomic_folder
from .peft_format import CONFIG_NAME, SAFETENSORS_NAME, AdapterWeights
from .target_match import module_order, projection_key


def adapter_files(weights: AdapterWeights, base_model: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json dict, tensors by PEFT name)."""
    keys = sorted(weights.modules, key=module_order)
    r = max(weights.modules[k].rank for k in keys)
    rank_pattern, alpha_pattern, tensors = {}, {}, {}
    for key in keys:
        m = weights.modules[key]
        name = projection_key(*key)
        if m.rank != r:
            # pattern keys are regexes to PEFT: escape the dots
            rank_pattern[re.escape(name)] = m.rank
            alpha_pattern[re.escape(name)] = m.rank
        a = m.A.float().contiguous()  # [r, in]
        b = (m.B.float() * m.scale).contiguous()  # [out, r], the scale folded in
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "use_rslora": False,
        "target_modules": [projection_key(*k) for k in keys], "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "base_model_name_or_path": base_model or None,
    }
    return config, tensors


def save_adapter(weights: AdapterWeights, path: str | os.PathLike[str], overwrite: bool = False,
                 base_model: str = "") -> Path:
    """Write `weights` as a PEFT folder at `path`, atomically; returns the folder."""
    import safetensors.torch

    config, tensors = adapter_files(weights, base_model)
    with atomic_folder(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        safetensors.torch.save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
    return Path(path)
