"""bfloat16 projections on CPUs with AMX, through our own tile kernel (loraplex_kernels/gemm_amx.c).

On the 2-core AMX dev box a decode step's GEMMs are bound by how fast the weights stream from
memory, and oneDNN's packed GEMM (packed_linear.py) streams them at ~12-15 GB/s where a plain read
reaches ~23; our kernel reads each weight once, in order, in 1 KB tiles, and runs the step's
projections 1.3-1.6x faster (benchmarks/results/amx_gemm_cpu.md). So where it is built and the
shape fits whole tiles (N % 16, K % 32: every Llama-family projection we serve), the engine packs
bfloat16 projections as AmxLinear instead of PackedLinear (packed_linear.pack_linear; off with
LORAPLEX_AMX=0). Sums are float32 over K in a fixed order, so results match F.linear up to
float32 rounding (not bit for bit: tests/test_amx_linear.py checks against float64).

Same interface as PackedLinear: `.packed` holds the weight (the panels replace the dense weight,
no second copy), `unpacked_weight()` rebuilds the dense one (exact), `nbytes`, `tied_copy`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from loraplex_kernels import gemm_amx_native


def amx_wanted() -> bool:
    """The AMX kernel is built and enabled on this CPU, and not turned off (LORAPLEX_AMX=0)."""
    return os.environ.get("LORAPLEX_AMX", "1") != "0" and gemm_amx_native.available()


def amx_fits(linear: nn.Linear) -> bool:
    """A bfloat16 CPU nn.Linear whose shape is whole AMX tiles."""
    w = linear.weight
    return (w.dtype == torch.bfloat16 and w.device.type == "cpu"
            and gemm_amx_native.supports_shape(linear.out_features, linear.in_features))


class AmxLinear(nn.Module):
    """y = x @ W.T + b for x [..., in] bfloat16 on CPU, W held as AMX K-pair panels."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not amx_fits(linear):
            raise ValueError(f"AmxLinear takes a bfloat16 CPU nn.Linear with out % 16 == 0 and in % 32 == 0, "
                             f"got {linear.weight.dtype} {tuple(linear.weight.shape)} on {linear.weight.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = gemm_amx_native.pack(linear.weight.detach())  # [out / 16, in / 2, 16, 2]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().contiguous(),
                                                                  requires_grad=False)
        self.nbytes = self.packed.numel() * self.packed.element_size()
        self.tied_copy = False  # True: a packed copy of the tied embedding table (pack_lm_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.stride(1) == 1:  # the model's case: [T, in]
            return gemm_amx_native.gemm(x, self.packed, self.bias)
        shape = x.shape
        y = gemm_amx_native.gemm(x.reshape(-1, shape[-1]).contiguous(), self.packed, self.bias)
        return y.view(*shape[:-1], self.out_features)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + forward(x) for x [T, in], residual [T, out]: one pass, rounded exactly as
        torch rounds the two ops on bfloat16 (gemm_amx.c's RESIDUAL epilogue)."""
        return gemm_amx_native.gemm(x, self.packed, self.bias, residual=residual)

    def forward_float(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x).float() for x [T, in], without the bfloat16 result and its copy (gemm_amx.c's
        FLOAT epilogue): the vocab projection's logits."""
        return gemm_amx_native.gemm_float(x, self.packed, self.bias)

    def forward_argmax(self, x: torch.Tensor) -> torch.Tensor:
        """torch.argmax(forward_float(x), -1) [T] int64 for x [T, in], without the [T, out] logits
        (gemm_amx.c's ARGMAX epilogue): a greedy step's tokens from the vocab projection."""
        return gemm_amx_native.gemm_argmax(x, self.packed, self.bias)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for this layer's two output halves [gate; up]: x [T, in] ->
        [T, out / 2] (gemm_amx.c's SWIGLU epilogue; needs out / 2 % 16 == 0)."""
        return gemm_amx_native.swiglu(x, self.packed, self.bias)

    def unpacked_weight(self) -> torch.Tensor:
        """The dense [out, in] weight (exact)."""
        return gemm_amx_native.unpack(self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=AMX panels"
