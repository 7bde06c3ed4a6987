"""bitsandbytes quantization of the base model's projections (q/k/v/o, gate/up/down).

What is quantized: only each Projection's `.base` (an nn.Linear) becomes a bitsandbytes layer —
Linear4bit (nf4 / fp4, optional double quantization of the block scales) or Linear8bitLt (int8,
LLM.int8() with outlier threshold 6.0, transformers' default). Embeddings, norms and lm_head stay
in the model dtype, as transformers' BitsAndBytesConfig does by default (lm_head is skipped there),
unless QuantSpec.embeddings (--quantize-embeddings, 4-bit only) also keeps the embedding table in
4 bits (quantized_embedding.py; a tied lm_head reads the same 4-bit table, an untied one becomes a
Linear4bit).
The LoRA path is untouched: Projection.forward computes y = base(x) and adds the LoRA delta from x.
bitsandbytes layers return the dtype of their input (Linear4bit casts x to the compute dtype and
the result back), so y keeps the model dtype that the LoRA pool is stored in.

Quantization happens at load time, layer by layer (see loader.py): each projection's float weight
is read from the checkpoint, quantized, and the float copy dropped, so the full-precision model is
never resident. Which methods run depends on the platform: `quantization_for(platform)` probes
bitsandbytes once with a tiny layer (bitsandbytes >= 0.48 runs all of nf4/fp4/int8 on CPU; a
machine without bitsandbytes can only run "none"). `check_available` stops start-up with a message
listing what is available instead of failing at the first forward.

A folder saved already quantized (transformers + BitsAndBytesConfig) is not re-quantized: its layers
are built from the saved tensors (prequantized.py) and its method replaces --quantize auto.
`float16_weight_bytes(model)` is what the loaded base weights would take in float16 (ModelInfo).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

METHODS = ("none", "nf4", "fp4", "int8")  # what --quantize accepts besides "auto"
_FOUR_BIT = ("nf4", "fp4")
_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# LLM.int8(): activations columns with |x| above this go through a float16 matmul (transformers' default).
INT8_THRESHOLD = 6.0


class QuantizationUnavailableError(ValueError):
    """The requested --quantize method cannot run on this machine (the message lists what can).
    A ValueError, so start-up code that reports bad flags as usage errors reports this one too."""


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: method in METHODS; compute_dtype for 4-bit matmuls (None = model dtype)."""

    method: str = "none"
    compute_dtype: torch.dtype | None = None
    double_quant: bool = False  # 4-bit only: quantize the per-block absmax scales too (QLoRA)
    # int8 only: LLM.int8() sends activation columns with |x| > threshold through a float16 matmul.
    # Those columns are picked per call from the whole flat batch, so with a threshold > 0 a
    # sequence's logits depend (slightly) on what else is in the batch; 0.0 = pure int8, batch-independent.
    int8_threshold: float = INT8_THRESHOLD
    # The raw --quantize value ("auto" or a method) when built from flags; "" = `method` was asked for
    # (a spec built in code). A folder that is already quantized compares it with its own method
    # (prequantized.py): "auto" takes the folder's, another method is refused.
    requested: str = field(default="", compare=False)
    # True when the weights came quantized in the folder (prequantized.py), not quantized at load.
    prequantized: bool = field(default=False, compare=False)
    # 4-bit only: also the embedding table (and lm_head: tied, the same 4-bit table; untied, its own
    # Linear4bit), quantized at load like the projections (quantized_embedding.py).
    embeddings: bool = False

    def __post_init__(self) -> None:
        if self.requested not in ("", "auto", *METHODS):
            raise ValueError(f"quantize: unknown value {self.requested!r}; expected auto or one of {list(METHODS)}")
        if self.method not in METHODS:
            raise ValueError(f"quantize: unknown method {self.method!r}; expected one of {list(METHODS)}")
        if self.compute_dtype is not None and self.compute_dtype not in _COMPUTE_DTYPES.values():
            raise ValueError(f"quant_compute_dtype: {self.compute_dtype} is not one of {list(_COMPUTE_DTYPES)}")
        if self.int8_threshold < 0:
            raise ValueError(f"int8_threshold: must be >= 0, got {self.int8_threshold}")
        if self.embeddings and self.method not in _FOUR_BIT:
            raise ValueError(f"quantize_embeddings: needs a 4-bit method (--quantize nf4 or fp4), but the base "
                             f"is quantized with {self.method!r}" + (f" (--quantize {self.requested})"
                                                                     if self.requested else ""))

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def compute_dtype_from_name(name: str) -> torch.dtype | None:
    """'auto' -> None (the model dtype); else the torch dtype of that name."""
    if name == "auto":
        return None
    if name not in _COMPUTE_DTYPES:
        raise ValueError(f"quant_compute_dtype: unknown value {name!r}; expected auto or one of {list(_COMPUTE_DTYPES)}")
    return _COMPUTE_DTYPES[name]


def _platform_of(device: torch.device | str) -> str:
    return torch.device(device).type


@functools.lru_cache(maxsize=None)
def quantization_for(platform: str) -> tuple[str, ...]:
    """Methods that run on `platform` ('cpu' | 'cuda'), probed once with a tiny layer forward."""
    available = ["none"]
    if platform == "cuda" and not torch.cuda.is_available():
        return tuple(available)
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # not installed (the GPU image ships without it), or a broken binary
        return tuple(available)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 64, generator=gen)  # [out, in]: one 64-element 4-bit block per row
    x = torch.randn(2, 64, generator=gen)
    for method in METHODS[1:]:
        try:
            layer = quantize_linear(weight, None, QuantSpec(method, torch.float32), platform)
            with torch.no_grad():
                y = layer(x.to(platform))
            if y.shape == (2, 128) and torch.isfinite(y).all():
                available.append(method)
        except Exception:  # the backend has no kernel for this method here
            continue
    return tuple(available)


def resolve_method(requested: str, device: torch.device | str) -> str:
    """'auto' -> nf4 on CUDA when available; none on CPU: there quantization saves memory (nf4 base
    weights 0.42x of float16 on the default model) but was not reliably faster than bfloat16 (AMX)
    and changes the model's greedy outputs, so it is opt-in (benchmarks/results/quantize_cpu.md).
    Anything else is checked and returned."""
    platform = _platform_of(device)
    if requested == "auto":
        return "nf4" if platform == "cuda" and "nf4" in quantization_for(platform) else "none"
    check_available(requested, platform)
    return requested


def check_available(method: str, platform: str) -> None:
    """Raise ValueError for an unknown method, QuantizationUnavailableError if it cannot run here."""
    if method not in METHODS:
        raise ValueError(f"quantize: unknown method {method!r}; expected auto or one of {list(METHODS)}")
    if method == "none":
        return  # runs everywhere; no need to import and probe bitsandbytes (seconds)
    available = quantization_for(platform)
    if method not in available:
        hint = "" if len(available) > 1 else " (is bitsandbytes installed? `pip install bitsandbytes`)"
        raise QuantizationUnavailableError(
            f"quantize={method!r} cannot run on {platform}; available here: {list(available)}{hint}")


def spec_from_config(model_config, device: torch.device | str) -> QuantSpec:
    """QuantSpec for a ModelConfig (quantize, quant_compute_dtype, double_quant) on `device`:
    'auto' resolved, availability checked (QuantizationUnavailableError lists what runs here)."""
    method = resolve_method(model_config.quantize, device)
    return QuantSpec(method, compute_dtype_from_name(model_config.quant_compute_dtype),
                     double_quant=model_config.double_quant and method in _FOUR_BIT,
                     requested=model_config.quantize,
                     embeddings=model_config.quantize_embeddings)


def memory_summary(loaded) -> str:
    """One start-up log line: method, resident base weight bytes and the float16 equivalent."""
    resident, fp16 = quantized_bytes(loaded.model), float16_weight_bytes(loaded.model)
    source = " (quantized in the folder)" if loaded.quant.prequantized else ""
    source += " + 4-bit embeddings" if loaded.quant.embeddings else ""
    return (f"quantize={loaded.quant.method}{source}: base weights {resident / 2**20:.1f} MiB resident "
            f"({resident / fp16:.2f}x of {fp16 / 2**20:.1f} MiB in float16)")


@torch.no_grad()
def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec,
                    device: torch.device | str) -> nn.Module:
    """A bitsandbytes layer on `device` computing x @ weight.T + bias, weight [out, in] (any float dtype).

    The float `weight` is only read; the caller drops it afterwards, so peak extra memory is this
    one layer's float copy.
    """
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    device = torch.device(device)
    if weight.dtype == torch.float64:  # bitsandbytes quantizes 16/32-bit floats only
        weight = weight.float()
    if spec.method in _FOUR_BIT:
        compute = spec.compute_dtype or weight.dtype
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute,
                                  compress_statistics=spec.double_quant, quant_type=spec.method,
                                  device="meta")
        # Params4bit quantizes when moved to a real device; bitsandbytes wants a 16/32-bit input.
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=spec.method,
                                         compress_statistics=spec.double_quant).to(device)
    elif spec.method == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                    threshold=spec.int8_threshold, device="meta")
        # Int8Params quantizes (row-wise absmax -> CB int8 + SCB scales) when moved to the device.
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False,
                                         has_fp16_weights=False).to(device)
    else:
        raise ValueError(f"quantize_linear: method {spec.method!r} is not a quantization")
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device), requires_grad=False)
    return layer.eval()


@torch.no_grad()
def quantize_embedding(weight: torch.Tensor, spec: QuantSpec, device: torch.device | str) -> nn.Module:
    """The embedding table `weight` [vocab, hidden] in 4 bits (spec's quant type / double quant) on
    `device`; serves the lookups and, when tied, the lm_head (quantized_embedding.py)."""
    from loraplex.model.quantized_embedding import QuantizedEmbedding

    if spec.method not in _FOUR_BIT:
        raise ValueError(f"quantize_embeddings: needs a 4-bit method (nf4, fp4), not {spec.method!r}")
    return QuantizedEmbedding(weight, spec.method, spec.double_quant, device).eval()


def is_quantized(module: nn.Module) -> bool:
    import sys

    bnb = sys.modules.get("bitsandbytes")  # no import: a model without bnb layers never needs it
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The weight tensors a module keeps resident: parameters and bitsandbytes' quant state.
    Buffers (RoPE tables) are derived, not weights: not counted. A PackedLinear's weight is its
    packed oneDNN tensor (not a parameter)."""
    packed = getattr(module, "packed", None)
    if isinstance(packed, torch.Tensor):
        yield packed
    yield from module.parameters(recurse=False)
    weight = getattr(module, "weight", None)
    qs = getattr(weight, "quant_state", None)  # 4-bit: absmax [+ nested absmax/code], code
    while qs is not None:
        for name in ("absmax", "code"):
            t = getattr(qs, name, None)
            if isinstance(t, torch.Tensor):
                yield t
        qs = getattr(qs, "state2", None)  # double quantization: the scales' own quant state
    scb = getattr(weight, "SCB", None)  # int8: per-row scales
    if not isinstance(scb, torch.Tensor):
        # Linear8bitLt's first forward moves CB/SCB from the weight into module.state.
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if isinstance(scb, torch.Tensor):
        yield scb


def _tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        # meta tensors and oneDNN-packed ones (PackedLinear) expose no storage: count their elements
        opaque = t.device.type == "meta" or t.layout == torch._mkldnn
        key = id(t) if opaque else t.untyped_storage().data_ptr()
        if key in seen:  # tied weights / shared code tables count once
            continue
        seen.add(key)
        total += t.numel() * t.element_size() if opaque else t.untyped_storage().nbytes()
    return total


def projection_bytes(model: nn.Module) -> int:
    """Resident bytes of the projections' base layers (the part quantization applies to)."""
    from loraplex.model.linear import Projection

    return _tensor_bytes(t for m in model.modules() if isinstance(m, Projection)
                         for sub in m.base.modules() for t in _module_tensors(sub))


def quantized_bytes(model: nn.Module) -> int:
    """Resident bytes of all base-model weights (quantized projections + float embeddings/norms/lm_head).

    LoRA slot tensors (Projection.lora_weights) are not modules, so they are not counted."""
    return _tensor_bytes(t for m in model.modules() for t in _module_tensors(m))


def float16_bytes(arch, projections_only: bool = False) -> int:
    """Bytes the model's weights take in float16 (2 bytes per parameter), from its architecture."""
    from loraplex.model.linear import Projection
    from loraplex.model.llama import LlamaForCausalLM

    meta = LlamaForCausalLM(arch, dtype=torch.float16, device="meta")  # shapes only, no memory
    if projections_only:
        return sum(p.numel() * 2 for m in meta.modules() if isinstance(m, Projection) for p in m.base.parameters())
    return sum(p.numel() * 2 for p in meta.parameters())



def _logical_numel(param: torch.Tensor) -> int:
    """Weights a parameter stands for: a 4-bit weight by its quant_state.shape [out, in] (its storage
    packs two weights per byte), bfloat16 panels by their logical_shape; anything else (int8
    [out, in], float) by its own shape."""
    qs = getattr(param, "quant_state", None)
    shape = getattr(qs, "shape", None)
    if shape is None:  # bfloat16 panels (model/widened_linear.py): the weight's shape, not the padding
        shape = getattr(param, "logical_shape", None)
    return shape.numel() if shape is not None else param.numel()


def float16_weight_bytes(model: nn.Module) -> int:
    """Bytes the loaded model's base weights would take in float16: 2 bytes per parameter, quantized
    projections counted by their logical shape. Same value whatever the quantization (and equal to
    float16_bytes(arch)); tied weights count once; LoRA slots are not modules: not counted."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if getattr(m, "tied_copy", False):  # a packed copy of the tied embedding: same weights
            continue
        packed = getattr(m, "packed", None)  # PackedLinear: its weight is not a parameter
        tensors = ([packed] if isinstance(packed, torch.Tensor) else []) + list(m.parameters(recurse=False))
        for p in tensors:
            if id(p) not in seen:
                seen.add(id(p))
                total += _logical_numel(p)
    return total * 2
