"""The adapter memory pool: one flat tensor holding every resident adapter at its real size.

    pool = AdapterPool(model, capacity_bytes, num_slots, dtype, device)
    layout = pool.layout(weights)            # where each module's A / Bt goes inside the extent
    pool.write(offset, layout, weights)       # the ONE copy: file tensors -> pool (cast on the way)
    pool.publish(slot, offset, layout)            # make it visible to the kernels (table entries)
    pool.read_extent(offset, elems) / pool.write_extent(offset, extent)   # CPU spill of an evicted one
    pool.unpublish(slot, layout)                  # the kernels no longer see it

Memory. An adapter takes sum over its targeted modules of r_m * (in_m + out_m) elements (plus
alignment): rank 8 on q/v of the default model is 0.9 MB in bfloat16, rank 64 on all seven
projections 33 MB; nothing is reserved per slot. Extents are managed by lora/allocator.py.

Indirection. For every group of projections that read the same x (q/k/v, gate/up; o and down
alone) there is one PoolTable (loraplex_kernels): per slot and member, the element offsets of
that member's A [r, in] and Bt [r, out] blocks, its real rank (0 = not targeted) and its scale.
A "slot" is just a row of those tables: cheap, so there are many (--max-loras caps them). Inside
an extent, a group's members' A blocks are adjacent (q, k, v), so the CPU kernel shrinks x
against all of them as one contiguous [3r, in] block when their ranks are equal.

Concurrency: the manager serialises every call under its lock except `write`, which fills an
extent no table points to yet (so a forward running meanwhile cannot see it half written).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex_kernels import hugepages

from .allocator import ALIGN_ELEMS, ExtentAllocator, aligned
from .layers import PoolGroup
from .peft_format import AdapterWeights

# Projections of one layer that read the same input; their LoRA deltas are computed together.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class ModuleBlock:
    group: int  # index into AdapterPool.groups
    member: int
    rank: int
    a_off: int  # element offsets RELATIVE to the extent start
    bt_off: int
    scale: float


@dataclass(frozen=True)
class Layout:
    blocks: dict[tuple[int, str], ModuleBlock]  # (layer, name) -> its place in the extent
    elems: int  # extent size in elements (aligned)
    max_rank: int


class AdapterPool:
    def __init__(self, model: torch.nn.Module, capacity_bytes: int, num_slots: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_slots = num_slots
        elem = torch.empty(0, dtype=dtype).element_size()
        capacity = capacity_bytes // elem
        if capacity < ALIGN_ELEMS:
            raise ValueError(f"adapter_memory: {capacity_bytes} bytes hold no adapter")
        self.allocator = ExtentAllocator(capacity)
        # [capacity] the pool. torch.empty: pages are touched only as adapters are written, so a
        # large pool costs resident memory as it fills, bounded by its size.
        self.tensor = (hugepages.empty((self.allocator.capacity,), dtype) if self.device.type == "cpu"
                       else torch.empty(self.allocator.capacity, dtype=dtype, device=self.device))
        # The torch fallback kernel reads the pool's first row for members an adapter does not
        # target and multiplies the result by 0: that row must never hold NaN/inf, which fresh
        # memory may. Adapter weights are checked finite at load, so zeros here suffice.
        widest = max(max(p.in_features, p.out_features) for _, _, p in model.iter_projections())
        self.tensor[:widest].zero_()
        self.elem_size = elem
        self.slot_ranks = torch.zeros(num_slots, dtype=torch.int64)  # [slots] adapter max rank, host
        self.groups: list[PoolGroup] = []
        self._where: dict[tuple[int, str], tuple[int, int]] = {}  # (layer, name) -> (group, member)
        projections = {(layer, name): p for layer, name, p in model.iter_projections()}
        for key, proj in projections.items():
            if key in self._where:
                continue
            layer, name = key
            names = next((g for g in FUSED_GROUPS if name in g), (name,))
            keys = [(layer, n) for n in names]
            members = [projections.get(k) for k in keys]
            if len(names) == 1 or any(p is None for p in members):
                keys, members = [key], [proj]
            group = PoolGroup(self.tensor, num_slots, proj.in_features, [p.out_features for p in members])
            for i, (k, p) in enumerate(zip(keys, members)):
                self._where[k] = (len(self.groups), i)
                p.lora_weights = group.members[i]
            self.groups.append(group)
        self.features = {k: (projections[k].in_features, projections[k].out_features) for k in projections}

    @property
    def capacity_bytes(self) -> int:
        return self.allocator.capacity * self.elem_size

    @property
    def used_bytes(self) -> int:
        return self.allocator.used * self.elem_size

    def adapter_bytes(self, targets: tuple[str, ...], rank: int) -> int:
        """Pool bytes of a rank-`rank` adapter on `targets` in every layer (start-up log)."""
        keys = [k for k in self.features if k[1] in targets]
        return sum(aligned(rank * sum(self.features[k])) for k in keys) * self.elem_size

    # ------------------------------------------------------------------ placing adapters
    def layout(self, weights: AdapterWeights) -> Layout:
        """Offsets of every module block within the adapter's extent: per group, the members'
        A blocks adjacent (in member order), then their Bt blocks."""
        blocks: dict[tuple[int, str], ModuleBlock] = {}
        by_group: dict[int, list[tuple[int, tuple[int, str]]]] = {}
        for key in weights.modules:
            g, m = self._where[key]
            by_group.setdefault(g, []).append((m, key))
        pos = 0
        for g in sorted(by_group):
            members = sorted(by_group[g])
            d_in = self.groups[g].table.d_in
            a_pos = {}
            for m, key in members:
                a_pos[key] = pos
                pos += weights.modules[key].rank * d_in
            pos = aligned(pos)
            for m, key in members:
                mod = weights.modules[key]
                blocks[key] = ModuleBlock(g, m, mod.rank, a_pos[key], pos, mod.scale)
                pos = aligned(pos + mod.rank * self.groups[g].table.d_outs[m])
        return Layout(blocks=blocks, elems=aligned(pos), max_rank=weights.max_rank)

    def write(self, offset: int, layout: Layout, weights: AdapterWeights) -> None:
        """Copy the adapter's weights into its extent (cast to the pool dtype on the way)."""
        pool = self.tensor
        for key, b in layout.blocks.items():
            mod = weights.modules[key]
            d_in = self.groups[b.group].table.d_in
            d_out = self.groups[b.group].table.d_outs[b.member]
            a0, bt0 = offset + b.a_off, offset + b.bt_off
            pool[a0:a0 + b.rank * d_in].view(b.rank, d_in).copy_(mod.A, non_blocking=True)  # A [r, in]
            pool[bt0:bt0 + b.rank * d_out].view(b.rank, d_out).copy_(mod.B.T, non_blocking=True)  # Bt [r, out]

    def read_extent(self, offset: int, elems: int) -> torch.Tensor:
        """A copy of an extent as it is in the pool: [elems] pool dtype, on the pool's device."""
        return self.tensor[offset:offset + elems].clone()

    def write_extent(self, offset: int, extent: torch.Tensor) -> None:
        """Put back an extent read by read_extent (at any offset: a layout's offsets are relative)."""
        self.tensor[offset:offset + extent.numel()].copy_(extent)

    def publish(self, slot: int, offset: int, layout: Layout) -> None:
        for b in layout.blocks.values():
            self.groups[b.group].table.set(b.member, slot, offset + b.a_off, offset + b.bt_off, b.rank, b.scale)
        self.slot_ranks[slot] = layout.max_rank

    def unpublish(self, slot: int, layout: Layout) -> None:
        self.slot_ranks[slot] = 0
        for g in {b.group for b in layout.blocks.values()}:  # only the groups it has entries in
            self.groups[g].table.clear(slot)


def available_memory(device: torch.device) -> int:
    """Bytes free now on `device`: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
