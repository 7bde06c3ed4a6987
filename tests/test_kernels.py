"""Batched LoRA kernels (CPU backend, public op, metadata) against the float64 reference.

Random data, never zeros; A/B carry large garbage beyond every slot's rank; y is poisoned with
random values and rows with idx = -1 must come back bit-identical.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import loraplex_kernels as K
from loraplex_kernels import build_lora_meta
from loraplex_kernels.cpu import add_lora_cpu, use_grouped
from loraplex_kernels.reference import add_lora_reference
from loraplex_kernels.testing import POPULARITIES, TOLERANCE, compare, expected, make_case

# (T, d_in, d_out, adapters, popularity, rank_mode, prefill): odd sizes, 1..64 adapters, every
# popularity, decode-like token mixes and prefill segments. Big shapes are few (2-core budget).
SWEEP = [
    (1, 128, 128, 1, "identical", "mixed", False),
    (7, 129, 576, 3, "distinct", "mixed", False),
    (33, 576, 1536, 8, "uniform", "pow2", False),
    (33, 1000, 129, 64, "zipf", "mixed", True),
    (257, 576, 576, 64, "uniform", "mixed", True),
    (257, 128, 1000, 7, "zipf", "pow2", True),
    (257, 1536, 576, 1, "identical", "16", True),
    (64, 576, 576, 64, "distinct", "mixed", False),
    (7, 4096, 4096, 5, "uniform", "mixed", False),
    (33, 4096, 576, 16, "zipf", "pow2", True),
]
DTYPES = [torch.float32, torch.bfloat16]
# add_lora_cpu keyword arguments per strategy: "auto" is what the server runs (the compiled kernel
# when it is built and takes the operands, else the torch cost model); the others force one path.
STRATEGIES = {"auto": {}, "torch_auto": {"native": False}, "grouped": {"grouped": True},
              "gather": {"grouped": False}, "native": {"native": True}}
# The compiled kernel reads B rank-major only (the server's layout); out-major B goes to torch.
LAYOUT_STRATEGIES = [(lay, s) for lay in ("out_major", "rank_major") for s in STRATEGIES
                     if not (s == "native" and lay == "out_major")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny GEMMs gain nothing from two


def _case_id(c):
    return "T{}-{}x{}-a{}-{}-{}{}".format(*c[:6], "-prefill" if c[6] else "")


def _run_cpu(case, grouped=None, rank_major=False, native=None):
    y = case.y0.clone()
    # rank_major: B as the [slots, out, R] view of a contiguous [slots, R, out] tensor, the layout
    # lora/layers.py keeps slots in; same values, other strides.
    B = case.B.transpose(1, 2).contiguous().transpose(1, 2) if rank_major else case.B
    add_lora_cpu(y, case.x, case.A, B, case.scales, case.meta(), grouped=grouped, native=native)
    return y


@pytest.mark.parametrize(("layout", "strategy"), LAYOUT_STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SWEEP, ids=_case_id)
def test_cpu_matches_reference(shape, dtype, strategy, layout):
    T, d_in, d_out, n, pop, rank_mode, prefill = shape
    case = make_case(T, d_in, d_out, n, pop, rank_mode, dtype=dtype, prefill=prefill, seed=T + n)
    res = compare(_run_cpu(case, rank_major=layout == "rank_major", **STRATEGIES[strategy]), case, expected(case))
    assert res["untouched"], "a row with idx = -1 was modified"
    assert res["err"] <= TOLERANCE[dtype], res


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("max_rank", [12, 64])
def test_grouped_compaction_both_ways(compact, dtype, max_rank, monkeypatch):
    """grouped_mm over compacted slots and over the whole pool (max_rank 12 in bf16 cannot be read
    in place: 24-byte rows, so it must fall back to compaction) give the same answer."""
    import loraplex_kernels.cpu as cpu

    monkeypatch.setattr(cpu, "COMPACT", compact)
    case = make_case(96, 256, 320, 6, "zipf", "mixed", max_rank=max_rank, dtype=dtype, extra_slots=5, seed=9)
    res = compare(_run_cpu(case, grouped=True), case, expected(case))
    assert res["untouched"] and res["err"] <= TOLERANCE[dtype], res


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("num_adapters", [1, 2, 17, 64])
def test_popularity_sweep_float32(popularity, num_adapters, native):
    case = make_case(33, 256, 192, num_adapters, popularity, "mixed", seed=num_adapters)
    res = compare(_run_cpu(case, rank_major=True, native=native), case, expected(case))
    assert res["untouched"] and res["err"] <= TOLERANCE[torch.float32], res


def test_public_op_all_backends_agree():
    case = make_case(40, 320, 200, 9, "zipf", "mixed", dtype=torch.float32, prefill=True, seed=3)
    want = expected(case)
    before = K.get_backend()
    try:
        for name in ("reference", "cpu"):
            K.set_backend(name)
            assert K.get_backend() == name
            y = case.y0.clone()
            K.add_lora(y, case.x, case.A, case.B, case.scales, case.meta())
            res = compare(y, case, want)
            assert res["untouched"] and res["err"] <= TOLERANCE[torch.float32], (name, res)
    finally:
        K.set_backend(before)


def test_garbage_beyond_rank_is_ignored_exactly():
    """Same problem with zeros instead of garbage beyond each rank: bit-identical output."""
    for kwargs in ({"grouped": True}, {"grouped": False}, {"native": True, "rank_major": True}):
        case = make_case(48, 256, 256, 6, "uniform", "mixed", garbage=1e3, seed=11)
        clean = make_case(48, 256, 256, 6, "uniform", "mixed", garbage=0.0, seed=11)
        assert not torch.equal(case.A, clean.A)
        assert torch.equal(_run_cpu(case, **kwargs), _run_cpu(clean, **kwargs)), kwargs


def test_rank_changes_result():
    """Guards the test above: using one more rank column than declared must change the output."""
    case = make_case(16, 128, 128, 3, "uniform", "16", garbage=1.0, seed=5)
    wider = make_case(16, 128, 128, 3, "uniform", "16", garbage=1.0, seed=5)
    wider.ranks = case.ranks + (case.ranks > 0).to(torch.int32)
    assert not torch.allclose(_run_cpu(case), _run_cpu(wider))
    assert not torch.allclose(_run_cpu(case, rank_major=True, native=True),
                              _run_cpu(wider, rank_major=True, native=True))


@pytest.mark.parametrize("rank_major", [False, True])
def test_mixed_dtypes_bf16_activations_fp32_weights(rank_major):
    """The CPU slot layout of a bfloat16 model (slot_weight_dtype): float32 rank-major weights."""
    case = make_case(33, 576, 576, 5, "uniform", "mixed", dtype=torch.bfloat16, weight_dtype=torch.float32, seed=2)
    res = compare(_run_cpu(case, rank_major=rank_major), case, expected(case))
    assert res["untouched"] and res["err"] <= TOLERANCE[torch.bfloat16], res


def test_slot_weight_dtype_per_backend(monkeypatch):
    from loraplex_kernels import native

    monkeypatch.setattr(native, "available", lambda: True)  # the compiled kernel reads bf16 weights
    assert K.slot_weight_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert K.slot_weight_dtype(torch.float16, "cpu") == torch.float32  # the kernel takes no fp16
    monkeypatch.setattr(native, "available", lambda: False)  # the torch fallback: fp32 is faster
    assert K.slot_weight_dtype(torch.bfloat16, "cpu") == torch.float32
    assert K.slot_weight_dtype(torch.float16, "cpu") == torch.float32
    assert K.slot_weight_dtype(torch.float32, "cpu") == torch.float32
    assert K.slot_weight_dtype(torch.bfloat16, "triton") == torch.bfloat16
    assert K.slot_weight_dtype(torch.bfloat16, "reference") == torch.bfloat16


def test_strided_views_fused_slice():
    """y may be a column slice of a fused output (q of qkv), x a strided view."""
    case = make_case(21, 192, 128, 4, "uniform", "mixed", seed=8)
    fused = torch.randn(21, 128 + 64 + 64)
    fused[:, :128] = case.y0
    wide_x = torch.randn(21, 2 * 192)
    wide_x[:, ::2] = case.x
    rest = fused[:, 128:].clone()
    before = K.get_backend()
    K.set_backend("cpu")
    try:
        K.add_lora(fused[:, :128], wide_x[:, ::2], case.A, case.B, case.scales, case.meta())
    finally:
        K.set_backend(before)
    res = compare(fused[:, :128], case, expected(case))
    assert res["untouched"] and res["err"] <= TOLERANCE[torch.float32], res
    assert torch.equal(fused[:, 128:], rest)


def test_meta_worked_example():
    """The example in meta.py's docstring, field by field."""
    m = build_lora_meta(torch.tensor([2, 0, -1, 2, 3, 0, 2]), torch.tensor([8, 0, 16, 4], dtype=torch.int32))
    assert m.has_lora and m.num_rows == 6 and m.max_rank == 16 and m.max_seg_len == 3
    assert m.sorted_token_ids.tolist() == [1, 5, 4, 0, 3, 6]
    assert m.sorted_slots.tolist() == [0, 0, 3, 2, 2, 2]
    assert m.seg_slots.tolist() == [0, 3, 2]
    assert m.seg_starts.tolist() == [0, 2, 3]
    assert m.seg_lens.tolist() == [2, 1, 3]
    assert m.seg_ranks.tolist() == [8, 4, 16]
    b8, b16 = m.buckets
    assert (b8.rank, b8.row_start, b8.row_end) == (8, 0, 3)
    assert b8.group_slots.tolist() == [0, 3] and b8.group_offs.tolist() == [2, 3]
    assert b8.group_slot_ids == (0, 3) and b8.slot_offs.tolist() == [2, 2, 2, 3]
    assert b16.slot_offs.tolist() == [0, 0, 3, 3]
    assert b8.rank_mask.sum(1).tolist() == [8, 8, 4]
    assert (b16.rank, b16.row_start, b16.row_end, b16.rank_mask) == (16, 3, 6, None)
    assert b16.group_slots.tolist() == [2] and b16.group_offs.tolist() == [3]


def test_meta_buckets_are_few():
    """64 adapters with ranks 1..64: at most log2(64) - 2 + 1 = 4 buckets (8, 16, 32, 64)."""
    m = build_lora_meta(torch.arange(64), torch.arange(1, 65, dtype=torch.int32))
    assert [b.rank for b in m.buckets] == [8, 16, 32, 64]
    assert sum(b.num_groups for b in m.buckets) == 64


def test_meta_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        build_lora_meta(torch.tensor([0, 4]), torch.tensor([8, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="outside"):
        build_lora_meta(torch.tensor([0, -3]), torch.tensor([8, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="rank is 0"):
        build_lora_meta(torch.tensor([0, 1]), torch.tensor([8, 0], dtype=torch.int32))


def test_meta_empty_batch():
    meta = build_lora_meta(torch.zeros(0, dtype=torch.int64), torch.tensor([8], dtype=torch.int32))
    assert not meta.has_lora and meta.num_tokens == 0


def test_no_adapter_fast_path():
    meta = build_lora_meta(torch.full((64,), -1), torch.tensor([8, 16], dtype=torch.int32))
    assert not meta.has_lora
    y = torch.randn(64, 32)
    before = y.clone()
    # No work at all: the op returns before even looking at its operands.
    K.add_lora(y, None, None, None, None, meta)
    assert torch.equal(y, before)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        K.add_lora(y, None, None, None, None, meta)
    assert (time.perf_counter() - t0) / n < 20e-6


def test_public_op_validates_shapes():
    case = make_case(8, 64, 32, 2, seed=1)
    meta = case.meta()
    with pytest.raises(ValueError):
        K.add_lora(case.y0[:4], case.x, case.A, case.B, case.scales, meta)
    with pytest.raises(ValueError):
        K.add_lora(case.y0, case.x[:, :32], case.A, case.B, case.scales, meta)
    with pytest.raises(ValueError, match="max_rank"):
        K.add_lora(case.y0, case.x, case.A[:, :2], case.B[:, :, :2], case.scales, meta)
    with pytest.raises(ValueError):
        K.set_backend("cuda-magic")


def test_strategy_choice():
    def bucket(num_tokens, num_adapters):
        ranks = torch.full((num_adapters,), 16, dtype=torch.int32)
        return build_lora_meta(torch.arange(num_tokens) % num_adapters, ranks).buckets[0]

    decode, decode2, prefill = bucket(32, 32), bucket(64, 32), bucket(512, 4)
    assert not use_grouped(decode, 16, 576, 576, torch.bfloat16)  # bf16 GEMM start-up dominates
    assert use_grouped(decode, 16, 576, 576, torch.float32)
    assert use_grouped(decode2, 16, 4096, 4096, torch.bfloat16)  # weight copies dominate
    assert use_grouped(prefill, 16, 576, 576, torch.float32)
    assert use_grouped(prefill, 16, 576, 576, torch.bfloat16)
    assert not use_grouped(prefill, 16, 129, 576, torch.float32)  # rows not 16-byte aligned
    assert not use_grouped(prefill, 16, 576, 576, torch.float32, prefer=False)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("prefill", [False, True])
def test_no_per_adapter_work_and_no_host_sync(prefill, grouped, compact, monkeypatch):
    """With the strategy fixed, the op count of a call does not grow with the number of adapters;
    nothing reads a device value back on the host (aten::_local_scalar_dense is what .item() and
    .tolist() dispatch to)."""
    import loraplex_kernels.cpu as cpu

    monkeypatch.setattr(cpu, "COMPACT", compact)
    counts = []
    for n in (2, 48):
        case = make_case(96, 128, 128, n, "uniform", "16", prefill=prefill, seed=n)
        meta = case.meta()
        with _OpCounter() as c:
            add_lora_cpu(case.y0.clone(), case.x, case.A, case.B, case.scales, meta, grouped=grouped)
        assert not any("_local_scalar_dense" in op for op in c.ops)
        counts.append(len(c.ops))
    assert counts[0] == counts[1], counts


def test_reference_against_hand_computation():
    """The oracle itself, on a problem small enough to write out."""
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    A = torch.tensor([[[1.0, 0.0], [7.0, 7.0]], [[0.0, 1.0], [1.0, 1.0]]])  # slot 0 rank 1
    B = torch.tensor([[[2.0, 9.0], [-1.0, 9.0]], [[1.0, 0.0], [0.0, 1.0]]])
    y = torch.ones(3, 2)
    meta = build_lora_meta(torch.tensor([0, 1, -1]), torch.tensor([1, 2], dtype=torch.int32))
    add_lora_reference(y, x, A, B, torch.tensor([0.5, 2.0]), meta)
    # t0: slot 0, r=1: x@A[0,:1].T = [1]; @ B[0,:,:1].T = [2, -1]; *0.5 -> [1, -0.5]
    # t1: slot 1, r=2: x@A[1].T = [-1, 2]; @ I = [-1, 2]; *2 -> [-2, 4]
    assert torch.equal(y, torch.tensor([[2.0, 0.5], [-1.0, 5.0], [1.0, 1.0]]))


# (T, d_in, member outs, adapters, popularity, rank_mode, prefill) for the fused multi-member op.
MULTI_SWEEP = [
    (33, 576, (576, 192, 192), 8, "uniform", "mixed", False),  # q/k/v of a GQA model, decode
    (257, 128, (1000, 129), 7, "zipf", "pow2", True),  # gate/up, prefill, odd outs (gather only)
    (7, 129, (64, 576, 64), 3, "distinct", "mixed", False),
    (64, 576, (1536, 1536), 30, "distinct", "16", False),
]


@pytest.mark.parametrize("members", ["all", "last", "first_and_last"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MULTI_SWEEP, ids=lambda c: "T{}-{}-{}".format(c[0], c[1], "x".join(map(str, c[2]))))
def test_multi_matches_reference_per_member(shape, dtype, strategy, members):
    """add_lora_multi_cpu == the float64 reference run member by member on the same x; members
    not asked for are left bit-identical."""
    from loraplex_kernels.cpu import add_lora_multi_cpu

    T, d_in, outs, n, pop, rank_mode, prefill = shape
    # Same seed: every member gets the same idx and ranks (drawn first), its own weights and y.
    cases = [make_case(T, d_in, out, n, pop, rank_mode, dtype=dtype, prefill=prefill, seed=T + n)
             for out in outs]
    for c in cases[1:]:
        assert torch.equal(c.idx, cases[0].idx) and torch.equal(c.ranks, cases[0].ranks)
        c.x = cases[0].x
    A = torch.stack([c.A for c in cases], dim=2)  # [slots, R, M, in], ranks interleaved
    Bs = [c.B.transpose(1, 2).contiguous().transpose(1, 2) for c in cases]  # rank-major views
    scales = torch.stack([c.scales for c in cases], dim=1)  # [slots, M]
    chosen = {"all": tuple(range(len(outs))), "last": (len(outs) - 1,),
              "first_and_last": (0, len(outs) - 1)}[members]
    ys = [c.y0.clone() for c in cases]
    add_lora_multi_cpu(ys, cases[0].x, A, Bs, scales, cases[0].meta(), chosen, **STRATEGIES[strategy])
    for m, (y, c) in enumerate(zip(ys, cases)):
        if m not in chosen:
            assert torch.equal(y, c.y0), f"member {m} was not asked for but changed"
            continue
        res = compare(y, c, expected(c))
        assert res["untouched"], f"member {m}: a row with idx = -1 was modified"
        assert res["err"] <= TOLERANCE[dtype], (m, res)


@pytest.mark.parametrize("grouped", [None, True, False])
@pytest.mark.parametrize("max_rank", [6, 12])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_unaligned_max_rank(max_rank, dtype, grouped):  # None: out-major B, so torch
    """A max_lora_rank that leaves a member's rank slice unaligned (6, 12 floats) while M * w is
    aligned: grouped_mm cannot take it, the op must still be right (found by an API test)."""
    from loraplex_kernels.cpu import add_lora_multi_cpu

    cases = [make_case(29, 64, out, 5, "uniform", "mixed", max_rank=max_rank, dtype=dtype, seed=3)
             for out in (256, 256)]
    cases[1].x = cases[0].x
    ys = [c.y0.clone() for c in cases]
    A = torch.stack([c.A for c in cases], dim=2)
    scales = torch.stack([c.scales for c in cases], dim=1)
    add_lora_multi_cpu(ys, cases[0].x, A, [c.B for c in cases], scales, cases[0].meta(), grouped=grouped)
    for y, c in zip(ys, cases):
        res = compare(y, c, expected(c))
        assert res["untouched"] and res["err"] <= TOLERANCE[dtype], res


def test_public_multi_op_matches_single_op_on_every_backend():
    """add_lora_multi through the public API: CPU (fused) and reference (member loop) agree
    with add_lora per member."""
    outs = (576, 192, 192)
    cases = [make_case(33, 576, out, 6, "uniform", "mixed", seed=11) for out in outs]
    for c in cases[1:]:
        c.x = cases[0].x
    A = torch.stack([c.A for c in cases], dim=2)
    scales = torch.stack([c.scales for c in cases], dim=1)
    before = K.get_backend()
    try:
        for backend in ("cpu", "reference"):
            K.set_backend(backend)
            ys = [c.y0.clone() for c in cases]
            K.add_lora_multi(ys, cases[0].x, A, [c.B for c in cases], scales, cases[0].meta())
            for y, c in zip(ys, cases):
                res = compare(y, c, expected(c))
                assert res["untouched"] and res["err"] <= TOLERANCE[torch.float32], (backend, res)
        with pytest.raises(ValueError, match="slots, R, M, in"):
            K.add_lora_multi(ys[:2], cases[0].x, A, [c.B for c in cases], scales, cases[0].meta())
    finally:
        K.set_backend(before)
