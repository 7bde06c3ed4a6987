"""Folders that transformers saved already quantized with bitsandbytes (nf4, fp4, int8), loaded as they are.

`model.save_pretrained()` on a model loaded with `BitsAndBytesConfig` writes the quantized tensors
themselves plus a `quantization_config` in config.json. Per quantized projection the checkpoint holds:

    4-bit:  {p}.weight                                    packed 4-bit codes, [(out*in+1)//2, 1] uint8
            {p}.weight.absmax                             per-64-weight block scales (uint8 when nested)
            {p}.weight.quant_map                          the 16-value code table (nf4 / fp4)
            {p}.weight.nested_absmax, .nested_quant_map   double quantization only: the scales' own state
            {p}.weight.quant_state.bitsandbytes__{nf4|fp4} the non-tensor fields (shape, dtype, blocksize)
                                                          packed as bytes
    int8:   {p}.weight [out, in] int8, {p}.SCB [out] float32 row scales, {p}.weight_format (0 = row-major)

and the float tensors of everything else (embeddings, norms, lm_head, and the projections named in
llm_int8_skip_modules). Those tensors become bitsandbytes layers through bitsandbytes' own public
constructors (Params4bit.from_prequantized + QuantState.from_dict; Int8Params with CB/SCB) — the same
calls transformers makes — so the weights are used bit for bit: no dequantization, no float copy.

Which projection is quantized is read from the checkpoint tensors and cross-checked with
llm_int8_skip_modules (matched as transformers matches it), so a folder that disagrees with its own
config is refused instead of half-loaded. Only the projections may be quantized: a folder whose
lm_head or embeddings are quantized is refused naming the tensor.

Flags vs folder: the folder's method wins. `--quantize auto` or the folder's own method uses it; any
other method (none included: a quantized folder cannot be dequantized here) stops start-up with a
message. The 4-bit compute dtype is the folder's bnb_4bit_compute_dtype unless --quant-compute-dtype
names one; int8's outlier threshold is the folder's llm_int8_threshold (as transformers does).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loraplex.model.quantize import QuantSpec, check_available

_FOUR_BIT = ("nf4", "fp4")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Pieces of one projection that are not the weight itself: 4-bit quant state, int8 scales.
_QUANT_PIECES = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                 "SCB", "weight_format")
_QUANT_STATE_PREFIX = "weight.quant_state."  # + bitsandbytes__nf4 / bitsandbytes__fp4
_ALL_SUFFIXES = tuple("." + p for p in _QUANT_PIECES) + (".weight.quant_state.",)


class PrequantizedConflictError(ValueError):
    """--quantize asks for something a quantized folder cannot give (a ValueError: a usage error)."""


@dataclass(frozen=True)
class FolderQuantization:
    """The bitsandbytes quantization_config of a folder, validated."""

    method: str  # nf4 | fp4 | int8
    compute_dtype: torch.dtype  # 4-bit matmul dtype the folder was saved with
    double_quant: bool  # 4-bit: absmax scales quantized too (nested_* tensors)
    int8_threshold: float  # LLM.int8() outlier threshold
    skip_modules: tuple[str, ...] | None  # llm_int8_skip_modules; None = transformers' default (lm_head)
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in (*_FOUR_BIT, "int8"):
            raise ValueError(f"quantization_config: method {self.method!r} is not nf4, fp4 or int8")
        if self.int8_threshold < 0:
            raise ValueError(f"quantization_config: llm_int8_threshold must be >= 0, got {self.int8_threshold}")

    @classmethod
    def from_config(cls, qc: object, where: str) -> "FolderQuantization":
        """Parse config.json's quantization_config; refuse anything but bitsandbytes 4-bit / 8-bit."""
        if not isinstance(qc, dict):
            raise ValueError(f"{where}: quantization_config must be an object, got {type(qc).__name__}")
        method = qc.get("quant_method", "bitsandbytes")  # very old bnb folders did not write it
        if method != "bitsandbytes":
            raise ValueError(
                f"{where}: quantization_config has quant_method {method!r}, which loraplex cannot load: only "
                "bitsandbytes-quantized folders (nf4, fp4, int8) are supported; load the float checkpoint "
                "and pass --quantize nf4|fp4|int8 to quantize it at load time")
        four, eight = bool(qc.get("load_in_4bit")), bool(qc.get("load_in_8bit"))
        if four == eight:
            raise ValueError(f"{where}: quantization_config must set exactly one of load_in_4bit / load_in_8bit "
                             f"(load_in_4bit={four}, load_in_8bit={eight})")
        if eight and qc.get("llm_int8_has_fp16_weight"):
            raise ValueError(f"{where}: quantization_config llm_int8_has_fp16_weight=true (float weights kept "
                             "for training) is not supported: the folder holds no int8 weights")
        method = qc.get("bnb_4bit_quant_type", "fp4") if four else "int8"  # fp4: bitsandbytes' default
        if method not in (*_FOUR_BIT, "int8"):
            raise ValueError(f"{where}: quantization_config bnb_4bit_quant_type {method!r} is not nf4 or fp4")
        compute_name = qc.get("bnb_4bit_compute_dtype") or "float32"  # BitsAndBytesConfig's default
        compute_name = str(compute_name).removeprefix("torch.")
        if compute_name not in _DTYPES:
            raise ValueError(f"{where}: quantization_config bnb_4bit_compute_dtype {compute_name!r} is not one "
                             f"of {list(_DTYPES)}")
        skip = qc.get("llm_int8_skip_modules")
        if skip is not None and (not isinstance(skip, list) or not all(isinstance(s, str) for s in skip)):
            raise ValueError(f"{where}: quantization_config llm_int8_skip_modules must be a list of names")
        return cls(method=method, compute_dtype=_DTYPES[compute_name],
                   double_quant=four and bool(qc.get("bnb_4bit_use_double_quant")),
                   int8_threshold=float(qc.get("llm_int8_threshold", 6.0)),
                   skip_modules=None if skip is None else tuple(skip), raw=qc)

    def skips(self, module_name: str) -> bool:
        """Whether llm_int8_skip_modules keeps `module_name` unquantized, matched as transformers 5 does
        (quantizers_utils.should_convert_module): a pattern matches from the start of the name up to a
        module boundary, as a regex with the same boundary, or as a suffix of the name."""
        if self.skip_modules is None:
            return False  # transformers' default list holds only lm_head / tied outputs: no projection
        boundary = r"(?:(?<=\.)|(?=\.|$))"
        return any(re.match(rf"(?:{p}){boundary}", module_name) or module_name.endswith(p)
                   for p in self.skip_modules)


def read_folder_quantization(path: Path) -> FolderQuantization | None:
    """The folder's quantization, or None for a float checkpoint (no quantization_config)."""
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg.get("quantization_config")
    return None if qc is None else FolderQuantization.from_config(qc, str(path / "config.json"))


def spec_for_folder(folder: FolderQuantization, requested: QuantSpec, device: torch.device | str,
                    where: Path) -> QuantSpec:
    """The QuantSpec a quantized folder loads with, given what the flags asked for.

    `requested.requested` is the raw --quantize value ("auto" or a method); a spec built in code
    (requested "") asks for its own method. Refuses a different method, or double quantization the
    folder does not have; checks that the folder's method runs on `device`."""
    asked = requested.requested or requested.method
    if asked not in ("auto", folder.method):
        raise PrequantizedConflictError(
            f"{where}: the folder is already quantized with bitsandbytes {folder.method} (config.json "
            f"quantization_config) but --quantize {asked} was asked; a quantized folder is used as it "
            f"is: pass --quantize auto or {folder.method}, or load the float checkpoint to use {asked}")
    if requested.double_quant and not folder.double_quant:
        raise PrequantizedConflictError(
            f"{where}: --double-quant was asked but the folder was saved without double quantization "
            "(bnb_4bit_use_double_quant=false); drop --double-quant to use the folder as it is")
    check_available(folder.method, torch.device(device).type)
    return QuantSpec(folder.method, requested.compute_dtype or folder.compute_dtype,
                     double_quant=folder.double_quant, int8_threshold=folder.int8_threshold,
                     requested=requested.requested, prequantized=True)


def check_checkpoint_keys(names: list[str], projections: set[str]) -> None:
    """Refuse quantization state on anything but a projection (e.g. a quantized lm_head), before
    reading any tensor: our lm_head and embeddings are float modules."""
    for name in names:
        for suffix in _ALL_SUFFIXES:
            owner, sep, _ = name.partition(suffix)
            if sep and owner not in projections:
                raise ValueError(
                    f"quantized tensor {name!r}: {owner} is quantized in this checkpoint, but loraplex keeps "
                    "only the q/k/v/o and gate/up/down projections quantized; save the folder with "
                    f"llm_int8_skip_modules including {owner.rpartition('.')[2]!r}")


def projection_piece(name: str, projections: set[str]) -> tuple[str, str] | None:
    """Split a checkpoint name into (projection name, piece) — e.g. ('model.layers.0.mlp.up_proj',
    'weight.absmax') — or None when it does not belong to a projection."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in projections:
            return prefix, ".".join(parts[i:])
    return None


def is_known_piece(piece: str) -> bool:
    return piece in ("weight", "bias", *_QUANT_PIECES) or piece.startswith(_QUANT_STATE_PREFIX)


@torch.no_grad()
def build_layer(name: str, pieces: dict[str, torch.Tensor], shape: tuple[int, int], has_bias: bool,
                spec: QuantSpec, folder: FolderQuantization, dtype: torch.dtype,
                device: torch.device) -> nn.Module:
    """The base layer of projection `name` ([out, in] = shape) from its checkpoint pieces.

    The quantized tensors become the layer's storage as they are (moved to `device` if needed)."""
    out_features, in_features = shape
    bias = pieces.get("bias")
    if has_bias != (bias is not None):
        raise ValueError(f"{name}.bias: {'missing' if has_bias else 'unexpected'} in checkpoint")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{name}.bias: shape {tuple(bias.shape)}, expected {(out_features,)}")
    state_keys = [k for k in pieces if k.startswith(_QUANT_STATE_PREFIX)]
    kind = "4bit" if state_keys else "int8" if "SCB" in pieces else "float"
    skipped = folder.skips(name)
    if skipped and kind != "float":
        raise ValueError(f"{name}: quantized ({kind}) in the checkpoint although llm_int8_skip_modules "
                         f"{list(folder.skip_modules or ())} names it")
    if not skipped and kind == "float":
        raise ValueError(f"{name}: float weights in a {folder.method} checkpoint although "
                         "llm_int8_skip_modules does not name it (folder inconsistent with its config)")
    if kind == "float":
        weight = pieces["weight"]
        if tuple(weight.shape) != shape:
            raise ValueError(f"{name}.weight: shape {tuple(weight.shape)}, expected {shape}")
        layer = nn.Linear(in_features, out_features, bias=has_bias, dtype=dtype, device=device)
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer.requires_grad_(False)
    if kind == "4bit":
        layer = _linear4bit(name, pieces, state_keys, shape, spec, folder, device)
    else:
        layer = _linear8bit(name, pieces, shape, spec, folder, device)
    if bias is not None:
        # Linear4bit / Linear8bitLt add the bias in the input's dtype: keep it in the model dtype.
        layer.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
    return layer.eval()


def _linear4bit(name: str, pieces: dict[str, torch.Tensor], state_keys: list[str], shape: tuple[int, int],
                spec: QuantSpec, folder: FolderQuantization, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    if len(state_keys) != 1 or state_keys[0].rpartition("__")[2] not in _FOUR_BIT:
        raise ValueError(f"{name}: expected one weight.quant_state.bitsandbytes__nf4|fp4 tensor, got {state_keys}")
    quant_type = state_keys[0].rpartition("__")[2]
    if quant_type != folder.method:
        raise ValueError(f"{name}: quantized with {quant_type} but quantization_config says {folder.method}")
    missing = [k for k in ("weight.absmax", "weight.quant_map") if k not in pieces]
    if folder.double_quant:
        missing += [k for k in ("weight.nested_absmax", "weight.nested_quant_map") if k not in pieces]
    if missing:
        raise ValueError(f"{name}: missing {', '.join(name + '.' + k for k in missing)} in checkpoint")
    data = pieces["weight"]  # packed codes: two 4-bit weights per byte of quant_storage
    # QuantState.from_dict takes the pieces without the "weight." prefix and unpacks the byte-packed
    # non-tensor fields (shape, dtype, blocksize, nested settings) itself.
    stats = {k.removeprefix("weight."): v for k, v in pieces.items() if k.startswith("weight.")}
    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compute_dtype=spec.compute_dtype,
                              quant_type=quant_type, quant_storage=data.dtype, device="meta")
    layer.weight = bnb.nn.Params4bit.from_prequantized(data=data, quantized_stats=stats, requires_grad=False,
                                                       device=device, module=layer)
    qs = layer.weight.quant_state
    if tuple(qs.shape) != shape:
        raise ValueError(f"{name}.weight: quantized shape {tuple(qs.shape)}, expected {shape}")
    if data.numel() * data.element_size() * 2 < shape[0] * shape[1]:
        raise ValueError(f"{name}.weight: {data.numel() * data.element_size()} bytes cannot hold {shape} 4-bit weights")
    if qs.nested != folder.double_quant:
        raise ValueError(f"{name}: double quantization {qs.nested} but quantization_config says {folder.double_quant}")
    return layer


def _linear8bit(name: str, pieces: dict[str, torch.Tensor], shape: tuple[int, int], spec: QuantSpec,
                folder: FolderQuantization, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    if folder.method != "int8":
        raise ValueError(f"{name}: int8 weights (SCB) in a {folder.method} checkpoint")
    weight, scb = pieces["weight"], pieces["SCB"]
    fmt = pieces.get("weight_format")
    if fmt is not None and int(fmt) != 0:
        # 0 = row-major; older bitsandbytes saved GPU-specific tile layouts (col_turing, col_ampere).
        raise ValueError(f"{name}.weight_format: {int(fmt)} is not row-major (0); re-save the folder with "
                         "bitsandbytes >= 0.45")
    if weight.dtype != torch.int8 or tuple(weight.shape) != shape:
        raise ValueError(f"{name}.weight: {weight.dtype} {tuple(weight.shape)}, expected torch.int8 {shape}")
    if tuple(scb.shape) != (shape[0],):
        raise ValueError(f"{name}.SCB: shape {tuple(scb.shape)}, expected {(shape[0],)}")
    layer = bnb.nn.Linear8bitLt(shape[1], shape[0], bias=False, has_fp16_weights=False,
                                threshold=spec.int8_threshold, device="meta")
    # An int8 tensor is taken as already quantized (Int8Params only quantizes float data on .to()).
    weight = weight.to(device)  # [out, in] int8
    layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight,
                                     SCB=scb.to(device=device, dtype=torch.float32))  # [out]
    return layer


def install_layers(pending: dict, pieces: dict[str, dict[str, torch.Tensor]], spec: QuantSpec,
                   folder: FolderQuantization, dtype: torch.dtype, device: torch.device) -> None:
    """Replace each pending projection's placeholder base (loader._PendingLinear: weight_shape,
    has_bias) by the layer its checkpoint pieces describe; `pieces` is emptied as it goes so each
    projection's tensors are referenced only by its layer."""
    for name, (proj, placeholder) in pending.items():
        proj.base = build_layer(name, pieces.pop(name, {}), placeholder.weight_shape, placeholder.has_bias,
                                spec, folder, dtype, torch.device(device))
