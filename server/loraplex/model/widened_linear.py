"""bfloat16 projections on CPUs without native bfloat16 math: float32 FMAs on widened weights.

On a CPU with AVX2 but neither AVX-512 BF16 nor AMX (where oneDNN's weight packing,
packed_linear.py, is unavailable too), torch's bfloat16 F.linear is emulated at ~20 GFLOP/s
against ~140 GFLOP/s for float32 on the same cores: a 32-sequence decode step of the default
model took ~500-800 ms in bfloat16 against ~150 ms in float32 (benchmarks/results/roofline_cpu.md).
The compiled kernel (loraplex_kernels/gemm_bf16.c) widens each block of the bfloat16 weight into
an L1-sized float32 buffer and multiplies in float32, so bfloat16 keeps its half-size weights,
KV cache and adapters and computes at float32's speed.

`WidenedLinear` is an nn.Linear (same weight and bias Parameters, same state_dict, no copy) whose
forward calls that kernel for bfloat16 CPU input. Its sums run in another order than oneDNN's: an
output can differ from torch's bfloat16 F.linear by one bfloat16 step (checked against float64 in
tests/test_widened_linear.py). float32 models are never touched (their bit-parity with
transformers stays).
"""

from __future__ import annotations

import functools

import torch
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


class WidenedLinear(nn.Linear):
    """nn.Linear whose bfloat16 CPU forward runs gemm_bf16.c (float32 math, one rounding)."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "WidenedLinear":
        """A WidenedLinear holding `linear`'s own Parameters (no copy)."""
        shell = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        shell.weight = linear.weight
        shell.bias = linear.bias
        return shell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and gemm_native.supports(x, self.weight):  # [T, in]: the model's case
            return gemm_native.gemm_bf16(x, self.weight, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [T, in]
        if not gemm_native.supports(x2, self.weight):
            return super().forward(x)
        return gemm_native.gemm_bf16(x2, self.weight, self.bias).view(*shape[:-1], self.out_features)


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
            module.base = WidenedLinear.wrap(module.base)
            n += 1
    head = getattr(model, "lm_head", None)
    if head is not None and eligible(head):
        model.lm_head = WidenedLinear.wrap(head)
        n += 1
    elif head is None and getattr(model, "packed_head", None) is None:
        embed = model.model.embed_tokens
        if type(embed) is nn.Embedding and embed.weight.dtype == torch.bfloat16 and embed.weight.device.type == "cpu":
            shell = nn.Linear(embed.embedding_dim, embed.num_embeddings, bias=False, device="meta")
            shell.weight = embed.weight  # the table itself
            model.packed_head = WidenedLinear.wrap(shell)
            n += 1
    return n
