"""bfloat16 projections on CPU with their weights pre-packed in oneDNN's blocked layout.

A plain `F.linear` hands oneDNN a row-major weight, which it re-blocks for its kernels on every
call; a decode step's GEMMs are small (M = the number of running sequences), so that per-call
work is a visible share: on the dev box a [32, 576] x [576, 1536] bfloat16 GEMM takes ~20 % less
time with the weight packed once (benchmarks/results/lora_serving_cpu.md has the engine-level
effect). The results are bit-identical to F.linear (tests/test_packed_linear.py checks it for
batch sizes 1 to 1024), so this changes speed only.

Only unquantized bfloat16 nn.Linear layers on CPU are packed (float32 packing picks another
kernel whose sums differ in the last bits; bitsandbytes layers have their own kernels). The packed
tensor replaces the dense weight (no second copy); `unpacked_weight()` rebuilds the dense one.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from loraplex.model.amx_linear import AmxLinear, amx_fits, amx_wanted


@functools.cache
def packing_available() -> bool:
    """oneDNN's bfloat16 weight packing works on this CPU. Asked by doing it once on a tiny
    weight: it needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT, which some CPUs of the dev and CI
    machines lack (an AMD EPYC with AVX2 only raised "bf16 path needs the cpu support ..."); there
    the projections stay plain nn.Linear (same results, without the ~20 % speed-up)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        w = torch.ones(16, 16, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 16, dtype=torch.bfloat16), packed, None, "none", [], "")
    except RuntimeError:
        return False
    return True


class PackedLinear(nn.Module):
    """y = x @ W.T + b for x [..., in] bfloat16 on CPU, W held packed ([out, in] logically)."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 32) -> None:
        super().__init__()
        w = linear.weight.detach()
        if w.dtype != torch.bfloat16 or w.device.type != "cpu":
            raise ValueError(f"PackedLinear takes a bfloat16 CPU nn.Linear, got {w.dtype} on {w.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # batch_hint: the M oneDNN tunes the layout for; any M works (checked bit-identical).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.nbytes = w.numel() * w.element_size()  # the packed tensor hides its storage size
        self.tied_copy = False  # True: a packed copy of the tied embedding table (pack_lm_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or not x.is_cpu:
            raise ValueError(f"PackedLinear expects bfloat16 CPU input, got {x.dtype} on {x.device}")
        if x.dim() == 2:  # the model's case: [T, in]
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.packed, self.bias, "none", [], "")
        return y.view(*shape[:-1], self.out_features)

    def unpacked_weight(self) -> torch.Tensor:
        """The dense [out, in] weight (an identity matmul through the packed layout, exact)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(eye, self.packed, None, "none", [], "").T.contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def pack_linear(linear: nn.Linear) -> nn.Module:
    """A bfloat16 CPU nn.Linear packed once: AmxLinear (our AMX tile kernel, amx_linear.py) where
    it is built and the shape fits its tiles, else PackedLinear (oneDNN's layout)."""
    if amx_wanted() and amx_fits(linear):
        return AmxLinear(linear)
    return PackedLinear(linear)


def pack_lm_head(model: nn.Module, tied_copy: bool = True) -> int:
    """Pack the vocab projection of a bfloat16 CPU model (the largest GEMM of a decode step: ~12
    against ~17 ms per 32-row step on the default model). An untied lm_head is swapped in place.
    A tied one is the embedding table, which the token lookup needs row-major, so packing it
    keeps a second copy (vocab x hidden x 2 bytes: +54 MiB on the default model); only with
    `tied_copy`. Returns the extra bytes the copy takes (0 untied or not packed)."""
    if not packing_available() or getattr(model, "packed_head", None) is not None:
        return 0
    head = getattr(model, "lm_head", None)
    if type(head) is nn.Linear:
        if head.weight.dtype == torch.bfloat16 and head.weight.device.type == "cpu":
            model.lm_head = pack_linear(head)
        return 0
    embed = model.model.embed_tokens
    if head is not None or not tied_copy or type(embed) is not nn.Embedding:
        return 0
    w = embed.weight
    if w.dtype != torch.bfloat16 or w.device.type != "cpu":
        return 0
    vocab, hidden = w.shape
    shell = nn.Linear(hidden, vocab, bias=False, dtype=torch.bfloat16, device="meta")
    shell.weight = nn.Parameter(w.detach(), requires_grad=False)  # the table itself, not copied
    packed = pack_linear(shell)
    packed.tied_copy = True  # float16_weight_bytes: a copy of the embedding, not another weight
    model.packed_head = packed
    return packed.nbytes
