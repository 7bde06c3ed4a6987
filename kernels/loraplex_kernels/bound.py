"""add_lora_multi bound to one set of slot weights: what a served projection (group) calls per step.

The server's slot tensors never move, so their shapes are checked once here instead of on every
call, and on the CPU backend the compiled kernel's argument struct is built once per member set.
Per call only the step's activations are looked at. This matters on CPU decode steps, where a LoRA
call's own work is ~50-130 us and the Python layers around it (checks, views, dispatch) cost about
as much again once the interpreter's caches are cold from the base model's GEMMs.

    op = BoundLora(A, Bs, scales)           # A [slots, R, M, in], Bs[m] [slots, out_m, R], scales [slots, M]
    op(ys, x, meta, members)                # == add_lora_multi(ys, x, A, Bs, scales, meta, members)

    op = BoundPooled(pool, table)           # pool [P] flat, table a PoolTable (pool_table.py)
    op(ys, x, meta, members)                # == add_lora_pooled(ys, x, pool, table, meta, members)
"""

from __future__ import annotations

import torch

from . import backend, cpu, lora_native
from .meta import LoraMeta

_UNSET = object()


class BoundLora:
    def __init__(self, A: torch.Tensor, Bs: list[torch.Tensor], scales: torch.Tensor):
        if A.dim() != 4 or len(Bs) != A.shape[2] or scales.shape != (A.shape[0], A.shape[2]):
            raise ValueError(f"A {tuple(A.shape)} must be [slots, R, M, in] with M = len(Bs) = {len(Bs)}, "
                             f"scales {tuple(scales.shape)} [slots, M]")
        slots, max_rank = A.shape[:2]
        for B in Bs:
            if B.dim() != 3 or B.shape[0] != slots or B.shape[2] != max_rank:
                raise ValueError(f"B {tuple(B.shape)} must be [{slots}, out, {max_rank}]")
        self.A, self.Bs, self.scales = A, list(Bs), scales
        self.num_slots, self.max_rank, self.d_in = int(slots), int(max_rank), int(A.shape[3])
        self.d_outs = tuple(int(B.shape[1]) for B in Bs)
        self._native: dict[tuple[int, ...], lora_native.Prepared | None] = {}

    def _prepared(self, members: tuple[int, ...]) -> lora_native.Prepared | None:
        """The compiled kernel bound to these members, or None where it cannot take the weights."""
        call = self._native.get(members, _UNSET)
        if call is _UNSET:
            Bts = [self.Bs[m].transpose(1, 2) for m in members]  # [slots, R, out_m]
            ok = lora_native.weights_fit(self.A, Bts, self.scales, members)
            call = self._native[members] = lora_native.prepare(self.A, Bts, self.scales, members) if ok else None
        return call

    def __call__(self, ys: list[torch.Tensor], x: torch.Tensor, meta: LoraMeta, members: tuple[int, ...]) -> None:
        """ys[m] [T, out_m] += member m's LoRA delta of x [T, in], for m in members."""
        if not meta.has_lora or not members:
            return
        if meta.num_slots != self.num_slots or meta.max_rank > self.max_rank:
            raise ValueError(f"meta for {meta.num_slots} slots / rank {meta.max_rank}, weights have "
                             f"{self.num_slots} slots of rank <= {self.max_rank}")
        if backend.get_backend() == "cpu" and lora_native.worth_it(meta, self.d_in):
            call = self._prepared(members)
            chosen = [ys[m] for m in members]
            if call is not None and x.shape == (meta.num_tokens, self.d_in) \
                    and all(y.shape[1] == self.d_outs[m] for m, y in zip(members, chosen)) \
                    and lora_native.activations_fit(x, chosen):
                call(chosen, x, meta.sorted_token_ids, meta.token_slots, meta.slot_ranks)
                return
        from . import add_lora_multi

        add_lora_multi(ys, x, self.A, self.Bs, self.scales, meta, members)


class BoundPooled:
    """add_lora_pooled bound to one group's pool and PoolTable. Neither moves while the server
    runs (the table is rewritten in place), so on the CPU backend the compiled kernel's struct of
    pointers is built once per member set; per call only the activations are checked."""

    def __init__(self, pool: torch.Tensor, table):
        if pool.dim() != 1:
            raise ValueError(f"the pool must be 1-D, got {tuple(pool.shape)}")
        self.pool, self.table = pool, table
        self._native: dict[tuple[int, ...], lora_native.PreparedPool | None] = {}

    def _prepared(self, members: tuple[int, ...]) -> lora_native.PreparedPool | None:
        call = self._native.get(members, _UNSET)
        if call is _UNSET:
            ok = lora_native.pool_fits(self.pool, self.table, members)
            call = self._native[members] = lora_native.PreparedPool(self.pool, self.table, members) if ok else None
        return call

    def native_call(self, members: tuple[int, ...]) -> lora_native.PreparedPool | None:
        """The compiled kernel's bound call for these members when __call__ would take it (CPU
        backend, native kernels on, the pool fits); None otherwise. For callers that run the
        kernel from C (model/compiled_layers.py) and check the activations themselves."""
        if backend.get_backend() != "cpu" or cpu.NATIVE is False:
            return None
        return self._prepared(members)

    def __call__(self, ys: list[torch.Tensor], x: torch.Tensor, meta: LoraMeta, members: tuple[int, ...]) -> None:
        """ys[m] [T, out_m] += member m's LoRA delta of x [T, in], for m in members."""
        if not meta.has_lora or not members:
            return
        table = self.table
        if meta.num_slots != table.num_slots:
            raise ValueError(f"meta for {meta.num_slots} slots, the table has {table.num_slots}")
        if backend.get_backend() == "cpu" and cpu.NATIVE is not False:
            call = self._prepared(members)
            chosen = [ys[m] for m in members]
            if call is not None and x.shape == (meta.num_tokens, table.d_in) \
                    and all(y.shape[1] == table.d_outs[m] for m, y in zip(members, chosen)) \
                    and lora_native.activations_fit(x, chosen):
                call(chosen, x, meta.sorted_token_ids, meta.token_slots)
                return
        from . import add_lora_pooled

        add_lora_pooled(ys, x, self.pool, table, meta, members)
