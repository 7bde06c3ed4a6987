"""BoundLora (loraplex_kernels/bound.py): add_lora_multi on fixed slot weights, as the server's
LoRA layers call it. Against the float64 reference per member, on the cpu backend (compiled
kernel and torch fallback) and the reference backend; operands the kernel cannot take fall back;
mismatched metadata and shapes are refused."""

from __future__ import annotations

import pytest
import torch

import loraplex_kernels as K
from loraplex_kernels import BoundLora
from loraplex_kernels import cpu as cpu_backend
from loraplex_kernels.testing import TOLERANCE, compare, expected, make_case

OUTS = (320, 96, 96)


def _group(dtype=torch.float32, weight_dtype=None, seed=5, T=37):
    cases = [make_case(T, 192, out, 6, "zipf", "mixed", dtype=dtype, weight_dtype=weight_dtype, seed=seed)
             for out in OUTS]
    for c in cases[1:]:
        c.x = cases[0].x
    A = torch.stack([c.A for c in cases], dim=2)  # [slots, R, M, in]
    Bs = [c.B.transpose(1, 2).contiguous().transpose(1, 2) for c in cases]  # rank-major, as served
    scales = torch.stack([c.scales for c in cases], dim=1)
    return cases, BoundLora(A, Bs, scales)


@pytest.fixture
def backend():
    before = K.get_backend()
    yield K.set_backend
    K.set_backend(before)


@pytest.mark.parametrize("native", [None, False])
@pytest.mark.parametrize("which", ["cpu", "reference"])
@pytest.mark.parametrize("members", [(0, 1, 2), (1,), (0, 2)])
@pytest.mark.parametrize(("dtype", "weight_dtype"), [(torch.float32, None), (torch.bfloat16, None),
                                                     (torch.bfloat16, torch.float32)], ids=str)
def test_matches_reference_per_member(which, members, dtype, weight_dtype, native, backend, monkeypatch):
    backend(which)
    monkeypatch.setattr(cpu_backend, "NATIVE", native)
    if native is False:  # the torch path is what runs when the kernel is not there
        monkeypatch.setattr(K.native, "available", lambda: False)
    cases, op = _group(dtype, weight_dtype)
    ys = [c.y0.clone() for c in cases]
    op(ys, cases[0].x, cases[0].meta(), members)
    for m, (y, c) in enumerate(zip(ys, cases)):
        if m not in members:
            assert torch.equal(y, c.y0)
            continue
        res = compare(y, c, expected(c))
        assert res["untouched"] and res["err"] <= TOLERANCE[dtype], (m, res)


def test_strided_x_falls_back_and_stays_right(backend):
    backend("cpu")
    cases, op = _group()
    wide = torch.randn(cases[0].x.shape[0], 2 * 192, dtype=torch.float64).float()
    wide[:, ::2] = cases[0].x
    ys = [c.y0.clone() for c in cases]
    op(ys, wide[:, ::2], cases[0].meta(), (0, 1, 2))
    for y, c in zip(ys, cases):
        res = compare(y, c, expected(c))
        assert res["untouched"] and res["err"] <= TOLERANCE[torch.float32], res


def test_no_adapter_and_no_members_touch_nothing(backend):
    backend("cpu")
    cases, op = _group()
    ys = [c.y0.clone() for c in cases]
    op(ys, cases[0].x, K.build_lora_meta(torch.full((37,), -1), cases[0].ranks), (0, 1, 2))
    op(ys, cases[0].x, cases[0].meta(), ())
    assert all(torch.equal(y, c.y0) for y, c in zip(ys, cases))


def test_refuses_mismatches(backend):
    backend("cpu")
    cases, op = _group()
    other = make_case(37, 192, 320, 3, "uniform", "mixed", seed=1)  # 5 slots, not 8
    ys = [c.y0.clone() for c in cases]
    with pytest.raises(ValueError, match="slots"):
        op(ys, cases[0].x, other.meta(), (0,))
    with pytest.raises(ValueError, match=r"\[slots, R, M, in\]"):
        BoundLora(op.A[:, :, 0], op.Bs, op.scales)
    with pytest.raises(ValueError, match="must be"):
        BoundLora(op.A, [op.Bs[0][:, :, :4]] + op.Bs[1:], op.scales)


def test_long_wide_segments_go_to_torch_and_stay_right(backend, monkeypatch):
    """Prefill segments of >= 64 rows per adapter on a >= 2048-wide projection: torch's grouped
    GEMM runs them (faster there); decode-like steps and narrow projections keep the kernel."""
    from loraplex_kernels import lora_native

    backend("cpu")
    case = make_case(256, 2048, 192, 2, "uniform", "16", prefill=True, seed=4)
    meta = case.meta()
    assert not lora_native.worth_it(meta, 2048)
    assert lora_native.worth_it(meta, 576)  # narrow: the kernel
    decode = make_case(32, 2048, 192, 32, "distinct", "16", seed=4).meta()
    assert lora_native.worth_it(decode, 2048)  # one row per adapter: the kernel
    calls = []
    monkeypatch.setattr(lora_native.Prepared, "__call__", lambda self, *a: calls.append(a))
    op = BoundLora(case.A.unsqueeze(2), [case.B.transpose(1, 2).contiguous().transpose(1, 2)],
                   case.scales.unsqueeze(1))
    y = case.y0.clone()
    op([y], case.x, meta, (0,))
    assert not calls  # the compiled kernel was not used
    res = compare(y, case, expected(case))
    assert res["untouched"] and res["err"] <= TOLERANCE[torch.float32], res
