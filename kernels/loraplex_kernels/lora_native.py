"""The compiled per-row multi-LoRA kernel (lora_rows.c) as a Python call: cpu.py's fast path.

The library is built and loaded by native.py; this module binds one projection group's slot
weights (`prepare`: dense slot tensors) or its view of the adapter memory pool (`PreparedPool`:
the pool and a PoolTable) into a C struct once, so that each call passes only what changes per step.
"""

from __future__ import annotations

import ctypes

import torch

from . import native
from .native import DTYPE_CODES

_I64 = ctypes.c_int64
_P = ctypes.c_void_p
MAX_MEMBERS = 4  # lora_rows.c's MAX_MEMBERS: q/k/v is the largest group


class _Weights(ctypes.Structure):
    """lora_rows.c's lora_weights_t: one projection group's slot weights, pointers and strides."""

    _fields_ = [
        ("d_in", _I64), ("max_rank", _I64), ("w_dtype", ctypes.c_int32), ("num_members", ctypes.c_int32),
        ("A", _P), ("a_slot", _I64), ("a_rank", _I64), ("a_member", _I64),
        ("scales", _P), ("sc_slot", _I64), ("sc_member", _I64),
        ("member_ids", ctypes.c_int32 * MAX_MEMBERS), ("bts", _P * MAX_MEMBERS),
        ("bt_slot", _I64 * MAX_MEMBERS), ("bt_rank", _I64 * MAX_MEMBERS), ("d_outs", _I64 * MAX_MEMBERS),
    ]


class _Pool(ctypes.Structure):
    """lora_rows.c's lora_pool_t: one projection group's pool and offset tables."""

    _fields_ = [
        ("d_in", _I64), ("num_slots", _I64), ("pool_numel", _I64),
        ("w_dtype", ctypes.c_int32), ("num_members", ctypes.c_int32),
        ("pool", _P), ("a_offs", _P), ("bt_offs", _P), ("ranks", _P), ("scales", _P),
        ("member_ids", ctypes.c_int32 * MAX_MEMBERS), ("d_outs", _I64 * MAX_MEMBERS),
    ]


_ARGTYPES = [
    ctypes.POINTER(_Weights),
    _P, _I64, _P, _P,  # order, num_rows, idx, ranks
    _P, ctypes.c_int, _I64,  # x, x_dtype, x_stride
    _P, _P, _P, _P,  # y0..y3
    _I64, _I64, _I64, _I64,  # their row strides
]

_POOLED_ARGTYPES = [
    ctypes.POINTER(_Pool),
    _P, _I64, _P,  # order, num_rows, idx
    _P, ctypes.c_int, _I64,  # x, x_dtype, x_stride
    _P, _P, _P, _P,  # y0..y3
    _I64, _I64, _I64, _I64,  # their row strides
]

# Past these sizes torch's grouped GEMM beats reading weights row by row (benchmarks/results/
# kernels_cpu.md, prefill 4 x 128 rows at 4096 x 4096: 3.7 vs 4.7 ms): long segments of one
# adapter let a real GEMM reuse each weight tile across many rows. The default model's shapes and
# every decode step stay on the compiled kernel.
GEMM_ROWS_PER_SLOT = 64
GEMM_MIN_DIM = 2048


def worth_it(meta, d_in: int) -> bool:
    """Use the compiled kernel for this step's rows, or hand long wide segments to torch?"""
    return d_in < GEMM_MIN_DIM or meta.num_rows < GEMM_ROWS_PER_SLOT * meta.num_active_slots


class Prepared:
    """The kernel bound to one group's weights (A, the members' Bt, scales): call it per step
    with the outputs, x and the step's rows. Built once per weight set (see `prepare`)."""

    def __init__(self, A: torch.Tensor, Bts: list[torch.Tensor], scales: torch.Tensor, members: tuple[int, ...]):
        n = len(members)
        w = _Weights()
        w.d_in, w.max_rank, w.w_dtype, w.num_members = A.shape[3], A.shape[1], DTYPE_CODES[A.dtype], n
        w.A, (w.a_slot, w.a_rank, w.a_member) = A.data_ptr(), A.stride()[:3]
        w.scales, (w.sc_slot, w.sc_member) = scales.data_ptr(), scales.stride()
        for i, (m, bt) in enumerate(zip(members, Bts)):
            w.member_ids[i], w.bts[i] = m, bt.data_ptr()
            w.bt_slot[i], w.bt_rank[i], w.d_outs[i] = bt.stride(0), bt.stride(1), bt.shape[2]
        self.weights = w
        self.ref = ctypes.byref(w)
        self.d_in, self.d_outs, self.dtype = A.shape[3], tuple(bt.shape[2] for bt in Bts), A.dtype
        self.num_members = n

    def __call__(self, ys: list[torch.Tensor], x: torch.Tensor, order: torch.Tensor, idx: torch.Tensor,
                 ranks: torch.Tensor) -> None:
        """ys[i] [T, out_i] += member i's delta for the rows in `order` (see lora_rows)."""
        ptrs = [y.data_ptr() for y in ys] + [None] * (MAX_MEMBERS - len(ys))
        strides = [y.stride(0) for y in ys] + [0] * (MAX_MEMBERS - len(ys))
        fn = native.function("loraplex_lora_rows", _ARGTYPES)
        rc = fn(self.ref, order.data_ptr(), order.shape[0], idx.data_ptr(), ranks.data_ptr(),
                x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0), *ptrs, *strides)
        if rc != 0:
            raise MemoryError("lora_rows could not allocate its scratch buffers")


_prepared: dict[tuple, Prepared] = {}


def prepare(A: torch.Tensor, Bts: list[torch.Tensor], scales: torch.Tensor, members: tuple[int, ...]) -> Prepared:
    """The Prepared call for these weights, cached by their addresses, shapes and strides (the
    server's slot tensors never move, so each group builds it once; a new tensor at a reused
    address with the same layout gets the same pointers and strides, hence the same struct)."""
    key = (A.data_ptr(), A.shape, A.stride(), A.dtype, scales.data_ptr(), scales.stride(), members,
           *[(bt.data_ptr(), bt.shape, bt.stride()) for bt in Bts])
    call = _prepared.get(key)
    if call is None:
        if len(members) > MAX_MEMBERS or len(Bts) != len(members):
            raise ValueError(f"lora_rows takes 1 to {MAX_MEMBERS} members, one Bt each")
        if len(_prepared) >= 4096:  # tests make many weight sets; the server a few per layer
            _prepared.clear()
        call = _prepared[key] = Prepared(A, Bts, scales, members)
    return call


def weights_fit(A: torch.Tensor, Bts: list[torch.Tensor], scales: torch.Tensor, members: tuple[int, ...]) -> bool:
    """Can the kernel read these slot weights: CPU, fp32/bf16 A with every Bt in A's dtype,
    float32 scales, innermost dimensions contiguous, at most MAX_MEMBERS members, library built.
    Bts are the members' [slots, R, out] views, in `members` order."""
    return (A.device.type == "cpu" and A.dtype in DTYPE_CODES and A.stride(3) == 1
            and scales.dtype == torch.float32 and len(members) <= MAX_MEMBERS
            and all(bt.dtype == A.dtype and bt.stride(2) == 1 for bt in Bts) and native.available())


def activations_fit(x: torch.Tensor, ys: list[torch.Tensor]) -> bool:
    """x and the outputs the kernel writes: fp32/bf16, ys in x's dtype, rows of x's length count,
    innermost dimension contiguous (rows may be strided: column slices of a fused output)."""
    if x.dtype not in DTYPE_CODES or x.stride(1) != 1:
        return False
    return all(y.dtype == x.dtype and y.stride(1) == 1 and y.shape[0] == x.shape[0] for y in ys)


class PreparedPool:
    """The kernel bound to one group's pool and PoolTable for one member set: call it per step
    with the outputs, x and the step's rows. The pool and the table's tensors never move (the
    table is rewritten in place), so their pointers are taken once here."""

    def __init__(self, pool: torch.Tensor, table, members: tuple[int, ...]):
        if not 1 <= len(members) <= MAX_MEMBERS:
            raise ValueError(f"lora_pooled takes 1 to {MAX_MEMBERS} members, got {members}")
        p = _Pool()
        p.d_in, p.num_slots, p.pool_numel = table.d_in, table.num_slots, pool.numel()
        p.w_dtype, p.num_members = DTYPE_CODES[pool.dtype], len(members)
        p.pool = pool.data_ptr()
        p.a_offs, p.bt_offs = table.a_offs.data_ptr(), table.bt_offs.data_ptr()
        p.ranks, p.scales = table.ranks.data_ptr(), table.scales.data_ptr()
        for i, m in enumerate(members):
            p.member_ids[i], p.d_outs[i] = m, table.d_outs[m]
        self.pool_struct = p
        self.ref = ctypes.byref(p)
        self._keep = (pool, table)  # the struct points into them
        self.d_in, self.d_outs = table.d_in, tuple(table.d_outs[m] for m in members)

    def __call__(self, ys: list[torch.Tensor], x: torch.Tensor, order: torch.Tensor, idx: torch.Tensor) -> None:
        """ys[i] [T, out_i] += member i's delta for the rows in `order` (lora_rows.c, lora_pooled)."""
        ptrs = [y.data_ptr() for y in ys] + [None] * (MAX_MEMBERS - len(ys))
        strides = [y.stride(0) for y in ys] + [0] * (MAX_MEMBERS - len(ys))
        fn = native.function("loraplex_lora_pooled", _POOLED_ARGTYPES)
        rc = fn(self.ref, order.data_ptr(), order.shape[0], idx.data_ptr(),
                x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0), *ptrs, *strides)
        if rc == -2:
            raise ValueError("a pool table entry of this step points outside the pool (or a slot outside the "
                             "table): nothing was computed")
        if rc != 0:
            raise MemoryError("lora_pooled could not allocate its scratch buffers")


def pool_fits(pool: torch.Tensor, table, members: tuple[int, ...]) -> bool:
    """Can the kernel read this pool: a contiguous 1-D CPU pool of float32/bfloat16, the table's
    tensors contiguous on the CPU, at most MAX_MEMBERS members, library built."""
    return (pool.device.type == "cpu" and pool.dim() == 1 and pool.dtype in DTYPE_CODES and pool.is_contiguous()
            and table.device.type == "cpu" and 1 <= len(members) <= MAX_MEMBERS
            and all(t.is_contiguous() for t in (table.a_offs, table.bt_offs, table.ranks, table.scales))
            and native.available())
