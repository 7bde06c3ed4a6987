"""bfloat16 projections on CPUs without native bfloat16 math: float32 FMAs on widened weights.

On a CPU with AVX2 but neither AVX-512 BF16 nor AMX (where oneDNN's weight packing,
packed_linear.py, is unavailable too), torch's bfloat16 F.linear is emulated at ~20 GFLOP/s
against ~140 GFLOP/s for float32 on the same cores: a 32-sequence decode step of the default
model took ~500-800 ms in bfloat16 against ~150 ms in float32 (benchmarks/results/roofline_cpu.md).
The compiled kernels (loraplex_kernels/gemm_panels.c, gemm_bf16.c) widen the bfloat16 weights
to float32 as they read them (a shift: bfloat16 is the top half of a float32) and multiply in
float32, so bfloat16 keeps its half-size weights, KV cache and adapters and computes at (or,
with the panel layout, above) float32's speed.

`WidenedLinear` replaces a projection's nn.Linear: its weight re-laid out once into panels
(same values, same bytes), its bias the same Parameter. Its sums run in another order than
oneDNN's: an output can differ from torch's bfloat16 F.linear by one bfloat16 step (checked
against float64 in tests/test_widened_linear.py). float32 models are never touched (their
bit-parity with transformers stays).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.model.packed_linear import packing_available
from loraplex_kernels import gemm_native, native


@functools.cache
def widening_wanted() -> bool:
    """The kernel is built and torch's own bfloat16 GEMM is the emulated one: no oneDNN packing
    (AVX-512 BW/VL/DQ or AVX-NE-CONVERT) and no AVX-512 BF16 / AMX, which torch uses natively."""
    if not native.available() or packing_available():
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return not any(f in flags for f in ("avx512_bf16", "amx_bf16", "avx_ne_convert"))


class WidenedLinear(nn.Module):
    """y = x @ W.T + b for bfloat16 CPU input through the compiled float32-math kernels.

    packed=True (the projections, an untied lm_head): W is held as bfloat16 panels of 16 columns,
    k-major ([ceil(out/16), in rounded up to 8, 16], loraplex_kernels/gemm_panels.c), built once
    from the dense weight, which is then dropped: the same bytes (plus padding to whole panels),
    and 1.1-1.3x the row-major kernel's speed at every batch size on the dev box. packed=False
    (a tied lm_head, whose table the token lookup needs row-major): W is the dense Parameter
    itself, read through gemm_bf16.c. Other input (float32, another device) runs F.linear on the
    dense weight."""

    def __init__(self, linear: nn.Linear, pack: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        if w.dtype != torch.bfloat16 or w.device.type != "cpu":
            raise ValueError(f"WidenedLinear takes a bfloat16 CPU nn.Linear, got {w.dtype} on {w.device}")
        self.bias = linear.bias  # the same Parameter (or None)
        if pack:
            panels = gemm_native.pack_panels(w)
            panels.logical_shape = w.shape  # quantize.float16_weight_bytes: weights, not padding
            # A buffer so that resident-byte counts (api/metrics.py) see it; not in state_dict.
            self.register_buffer("packed", panels, persistent=False)
            self.weight = None
        else:
            self.packed = None
            self.weight = linear.weight  # the same Parameter (a tied embedding table)

    def unpacked_weight(self) -> torch.Tensor:
        """The dense [out, in] weight (exact: the panels hold the same values)."""
        if self.packed is None:
            return self.weight.detach()
        return gemm_native.unpack_panels(self.packed, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])  # [T, in]
        if not gemm_native.supports_input(x2):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.unpacked_weight().to(x.dtype), bias)
        if self.packed is not None:
            y = gemm_native.gemm_panels(x2, self.packed, self.out_features, self.in_features, self.bias)
        else:
            y = gemm_native.gemm_bf16(x2, self.weight, self.bias)
        return y if x.dim() == 2 else y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        layout = "bf16 panels" if self.packed is not None else "row-major"
        return f"in_features={self.in_features}, out_features={self.out_features}, {layout}"


def widen_projections(model: nn.Module) -> int:
    """Swap every bfloat16 CPU nn.Linear `.base` of the model's Projections, and its vocab
    projection, for a WidenedLinear (a tied vocab projection gets a WidenedLinear over the
    embedding table as `packed_head`: a view, no copy). Only where `widening_wanted()`;
    idempotent; returns how many layers were swapped."""
    from loraplex.model.linear import Projection

    if not widening_wanted():
        return 0

    def eligible(m: nn.Module) -> bool:
        return (type(m) is nn.Linear and m.weight.dtype == torch.bfloat16
                and m.weight.device.type == "cpu")

    n = 0
    for module in model.modules():
        if isinstance(module, Projection) and eligible(module.base):
            module.base = WidenedLinear(module.base)
            n += 1
    head = getattr(model, "lm_head", None)
    if head is not None and eligible(head):
        model.lm_head = WidenedLinear(head)
        n += 1
    elif head is None and getattr(model, "packed_head", None) is None:
        embed = model.model.embed_tokens
        if type(embed) is nn.Embedding and embed.weight.dtype == torch.bfloat16 and embed.weight.device.type == "cpu":
            shell = nn.Linear(embed.embedding_dim, embed.num_embeddings, bias=False, device="meta")
            shell.weight = embed.weight  # the table itself
            model.packed_head = WidenedLinear(shell, pack=False)
            n += 1
    return n
