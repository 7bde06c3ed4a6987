"""Fold an adapter into its base model: a standalone Hugging Face folder with W' = W + scale * B @ A.

    merge_adapter(base_dir, adapter_dir, out_dir, overwrite=False, dtype=None)   # `loraplex merge`

What PEFT's `merge_and_unload()` + `save_pretrained()` give, without loading the model: the base's
safetensors files are read one at a time; every adapted projection's weight is merged in float32
(the adapter read by peft_format.read_adapter, so LoRA, rsLoRA, rank/alpha patterns and AdaLoRA get
PEFT's scales) and every floating tensor is written in `dtype` (default: the base's own float dtype).
A bitsandbytes-quantized base (nf4, fp4, int8 folders) is dequantized first, with bitsandbytes'
own kernels, then merged and written in float (its quantization_config dropped), as PEFT's recipe
of merging into a dequantized base does.

The output folder gets every other file of the base (tokenizer files, generation_config.json,
chat template...) and its config.json (dtype updated, quantization_config removed). It is written
atomically (loraplex/atomic_dir.py): a failure or a crash leaves no half folder, and an existing folder
is replaced only with overwrite.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

from loraplex.atomic_dir import atomic_folder
from .peft_format import AdapterWeights, BaseShapes, read_adapter
from .target_match import PROJECTIONS, projection_key

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_INDEX = "model.safetensors.index.json"
_MAX_RANK = 1 << 16  # merging has no adapter pool: any rank the base's shapes allow


class MergeError(ValueError):
    """The base or adapter cannot be merged; `field` names what is wrong (base, adapter, dtype, out)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _progress(items: list, desc: str, enabled: bool) -> Iterable:
    """tqdm when it is installed (transformers depends on it), else a plain stderr counter."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        def plain():
            for i, item in enumerate(items, 1):
                yield item
                print(f"\r{desc}: {i}/{len(items)}", end="\n" if i == len(items) else "", file=sys.stderr,
                      flush=True)
        return plain()
    return tqdm(items, desc=desc, unit="tensor", file=sys.stderr)


Dequantize = Callable[[str, dict[str, torch.Tensor], tuple[int, int]], torch.Tensor]


def _dequantizer(base: Path) -> Dequantize | None:
    """For a bitsandbytes folder: (projection name, its checkpoint pieces, [out, in]) -> float32
    weight; None for a float folder."""
    from loraplex.model.prequantized import build_layer, read_folder_quantization
    from loraplex.model.quantize import QuantSpec

    folder = read_folder_quantization(base)
    if folder is None:
        return None
    spec = QuantSpec(folder.method, folder.compute_dtype, double_quant=folder.double_quant,
                     int8_threshold=folder.int8_threshold, prequantized=True)

    def dequantize(name: str, pieces: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        import bitsandbytes as bnb

        layer = build_layer(name, pieces, shape, "bias" in pieces, spec, folder, torch.float32, torch.device("cpu"))
        w = layer.weight
        if isinstance(layer, bnb.nn.Linear4bit):
            return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()  # [out, in]
        if isinstance(layer, bnb.nn.Linear8bitLt):
            return bnb.functional.int8_vectorwise_dequant(w.CB, w.SCB.float()).float()  # [out, in]
        return w.detach().float()

    return dequantize


def _projection_shapes(shapes: BaseShapes) -> dict[str, tuple[int, int]]:
    """Full projection name -> weight shape [out, in]."""
    return {projection_key(i, p): (shapes.features[p][1], shapes.features[p][0])
            for i in range(shapes.num_layers) for p in PROJECTIONS}


def _files(base: Path) -> list[Path]:
    from loraplex.model.loader import safetensors_files

    try:
        return safetensors_files(base)
    except (FileNotFoundError, ValueError) as e:
        raise MergeError("base", str(e)) from None


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, overwrite: bool = False,
                  dtype: str | None = None, progress: bool = True) -> Path:
    """Write base + adapter as one model folder at `out`; returns it. Raises MergeError,
    peft_format.AdapterFormatError (naming the adapter's field) or atomic_dir.FolderExistsError."""
    import safetensors.torch

    base, out = Path(base), Path(out)
    if not (base / "config.json").is_file():
        raise MergeError("base", f"{base} has no config.json")
    if dtype is not None and dtype not in _DTYPES:
        raise MergeError("dtype", f"must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if out.resolve() == base.resolve() or out.resolve() == Path(adapter).resolve():
        raise MergeError("out", "must differ from the base and adapter folders")
    config = json.loads((base / "config.json").read_text())
    try:
        shapes = BaseShapes.from_hf_config(config)
    except ValueError as e:
        raise MergeError("base", f"not a Llama-family config: {e}") from None
    weights = read_adapter(adapter, shapes, _MAX_RANK)  # refuses an adapter for another base (shapes)
    files = _files(base)
    dequantize = _dequantizer(base)
    proj_shapes = _projection_shapes(shapes)

    out_dtype = _DTYPES[dtype] if dtype else None
    with atomic_folder(out, overwrite=overwrite) as tmp:
        weight_map: dict[str, str] = {}
        for file in files:
            tensors = safetensors.torch.load_file(str(file))
            merged, chosen = _merge_file(tensors, weights, proj_shapes, dequantize, out_dtype, progress, file.name)
            out_dtype = out_dtype or chosen
            safetensors.torch.save_file(merged, str(tmp / file.name), metadata={"format": "pt"})
            weight_map.update({name: file.name for name in merged})
            del tensors, merged
        for item in base.iterdir():  # tokenizer, generation config, chat template, README...
            if item.is_file() and item.suffix != ".safetensors" and item.name not in ("config.json", _INDEX):
                shutil.copy2(item, tmp / item.name)
        if (base / _INDEX).is_file():
            (tmp / _INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))},
                                                 indent=2) + "\n")
        config.pop("quantization_config", None)
        name = str(out_dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = name
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _merge_file(tensors: dict[str, torch.Tensor], weights: AdapterWeights, proj_shapes: dict[str, tuple[int, int]],
                dequantize, out_dtype: torch.dtype | None, progress: bool,
                desc: str) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """One checkpoint file's tensors, merged (and dequantized) -> (tensors to write, the dtype used)."""
    from loraplex.model.prequantized import projection_piece

    projections = set(proj_shapes)
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        owner = projection_piece(name, projections)
        if owner is not None and owner[1] != "bias":
            pieces.setdefault(owner[0], {})[owner[1]] = t
        else:
            plain[name] = t
    if out_dtype is None:  # the base's own float dtype (of its float tensors)
        floats = [t.dtype for t in plain.values() if t.is_floating_point()]
        floats += [p["weight"].dtype for p in pieces.values() if p["weight"].is_floating_point()]
        out_dtype = max(set(floats), key=floats.count) if floats else torch.float32
    by_key = {projection_key(*k): m for k, m in weights.modules.items()}
    out: dict[str, torch.Tensor] = {}
    for name in _progress(sorted(pieces), f"merging {desc}", progress):
        p = pieces[name]
        if dequantize is not None:
            w = dequantize(name, dict(p, **({"bias": plain[name + ".bias"]} if name + ".bias" in plain else {})),
                           proj_shapes[name])
        else:
            w = p["weight"].float()  # [out, in]
        m = by_key.get(name)
        if m is not None:
            w = w + m.scale * (m.B.float() @ m.A.float())  # [out, r] @ [r, in], in float32
        out[name + ".weight"] = w.to(out_dtype).contiguous()
    for name, t in plain.items():
        out[name] = t.to(out_dtype).contiguous() if t.is_floating_point() else t
    return out, out_dtype
