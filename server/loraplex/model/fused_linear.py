"""One packed GEMM for the projections that read the same input (q/k/v, gate/up).

A decode step on CPU runs small GEMMs (M = the running sequences), where oneDNN's fixed cost per
call and its efficiency at narrow N (k/v are 192 wide on the default model) are a visible share:
on the dev box one [32, 576] x [576, 960] q/k/v GEMM takes ~245 us against ~355 us for three, and
gate/up 665 against ~705 us. So after packing (packed_linear.py), the members' weights are
concatenated along `out` and packed once; each member's `.base` becomes a PackedSlice naming its
column range. The sums are bit-identical to the separate GEMMs (oneDNN's reduction over `in` does
not depend on N; tests/test_packed_linear.py checks it), and no weight is held twice: the members'
own packed tensors are dropped.

`project_all` (model/linear.py) runs the group's GEMM once and hands every member a column view;
a member called on its own (a test, a tool) still works: it runs the group's GEMM and slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from loraplex.model.amx_linear import AmxLinear
from loraplex.model.packed_linear import PackedLinear

# The packed layers a group can be made of (all members of one type; the group's GEMM is that
# type too). AMX panels concatenate along `out` like oneDNN's do: each column's sum is its own.
_GROUPABLE = (PackedLinear, AmxLinear)


class PackedGroup(nn.Module):
    """y = x @ cat(W_1..W_n).T + cat(b_1..b_n) for x [T, in] bfloat16, packed once."""

    @staticmethod
    def refusal(members: Sequence[nn.Module]) -> str | None:
        """Why these layers cannot form a group (None: they can)."""
        if len(members) < 2 or type(members[0]) not in _GROUPABLE or any(type(m) is not type(members[0])
                                                                          for m in members):
            return "a PackedGroup needs >= 2 members, all PackedLinear or all AmxLinear"
        if len({m.in_features for m in members}) != 1:
            return f"a PackedGroup needs members of one input width, got {sorted({m.in_features for m in members})}"
        if len({m.bias is None for m in members}) != 1:
            return "a PackedGroup's members must all have a bias or none"
        return None

    def __init__(self, members: Sequence[PackedLinear | AmxLinear]) -> None:
        super().__init__()
        why = self.refusal(members)
        if why is not None:
            raise ValueError(why)
        self.in_features = members[0].in_features
        self.widths = tuple(m.out_features for m in members)
        self.out_features = sum(self.widths)
        cat = nn.Linear(self.in_features, self.out_features, bias=members[0].bias is not None,
                        dtype=torch.bfloat16)
        with torch.no_grad():
            cat.weight.copy_(torch.cat([m.unpacked_weight() for m in members]))  # [sum out, in]
            if cat.bias is not None:
                cat.bias.copy_(torch.cat([m.bias for m in members]))
        self.linear = type(members[0])(cat)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [T, in] -> one [T, out_i] column view of the shared [T, sum out] result per member."""
        return self.linear.forward(x).split_with_sizes(self.widths, dim=-1)


class PackedSlice(nn.Module):
    """A group member's `.base`: its columns of the group's GEMM."""

    def __init__(self, group: PackedGroup, index: int) -> None:
        super().__init__()
        self.group = group  # registered in every member; module walks and byte counts dedupe it
        self.index = index
        self.in_features = group.in_features
        self.out_features = group.widths[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group(x)[self.index]

    def extra_repr(self) -> str:
        return f"member {self.index} of a packed group, in_features={self.in_features}, out_features={self.out_features}"


def packed_group(projections: Sequence[nn.Module]) -> PackedGroup | None:
    """The PackedGroup whose members are exactly `projections`, in order; None otherwise."""
    first = projections[0].base
    if not isinstance(first, PackedSlice):
        return None
    group = first.group
    if len(projections) != len(group.widths):
        return None
    for i, p in enumerate(projections):  # a loop, not any(<genexpr>): this runs twice a layer a step
        base = p.base
        if not isinstance(base, PackedSlice) or base.group is not group or base.index != i:
            return None
    return group


def group_outputs(projections: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor] | None:
    """The members' base outputs from one GEMM when `projections` are exactly one PackedGroup's
    members in order; None otherwise (the caller runs each base)."""
    group = packed_group(projections)
    return None if group is None else list(group.forward(x))


def group_swiglu(projections: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor | None:
    """silu(gate(x)) * up(x) [T, intermediate] in the group GEMM's own pass when (gate, up) are
    one AMX group of two equal halves (AmxLinear.swiglu); None otherwise (the caller runs the
    GEMM and the two ops). The caller makes sure no LoRA delta is due on either member."""
    group = packed_group(projections)
    if (group is None or type(group.linear) is not AmxLinear or len(group.widths) != 2
            or group.widths[0] != group.widths[1] or group.widths[0] % 16):
        return None
    return group.linear.swiglu(x)


def fuse_packed(members: Sequence[nn.Module]) -> bool:
    """Replace the `.base` of these Projections (all PackedLinear, one input width) by slices of
    one PackedGroup. Returns False (and changes nothing) when they do not qualify."""
    bases = [p.base for p in members]
    if PackedGroup.refusal(bases) is not None:
        return False
    group = PackedGroup(bases)
    for i, p in enumerate(members):
        p.base = PackedSlice(group, i)
    return True


# Sibling projections that read the same input, by attribute name on their parent module.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_siblings(model: nn.Module) -> int:
    """fuse_packed every q/k/v and gate/up triple/pair of packed projections in the model.
    Idempotent (fused members are PackedSlices, not PackedLinears); returns how many groups."""
    n = 0
    for module in model.modules():
        for names in SIBLINGS:
            members = [getattr(module, name, None) for name in names]
            if all(hasattr(m, "base") for m in members) and fuse_packed(members):
                n += 1
    return n
