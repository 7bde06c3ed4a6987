"""sample_rows.c (the sampler's non-greedy rows on CPU) against a float64 reference of the same
draw: softmax(logits / T) cut to top-k then top-p (engine/sampler.apply_top_k_top_p's set), the
token whose running mass first exceeds u times the kept mass."""

from __future__ import annotations

import math

import pytest
import torch

from loraplex_kernels import native, sample_native
from loraplex.engine.sampler import apply_top_k_top_p

pytestmark = pytest.mark.skipif(not native.available(), reason="compiled CPU kernels unavailable")


def reference(row: torch.Tensor, t: float, k: int, p: float, u: float) -> tuple[int, float]:
    """(token, distance of u * mass to the nearest decision boundary, relative): float64 maths on
    the float32 s = row / t the kernel divides, as sample_rows.c documents: the kept set in
    (e descending, index ascending) order, drawn in index order."""
    s = (row / torch.tensor(t, dtype=torch.float32)).double()
    e = torch.where(torch.isinf(s) & (s < 0), torch.zeros_like(s), torch.exp(s - s.max()))
    order = sorted(range(len(e)), key=lambda i: (-e[i].item(), i))
    if 0 < k < len(e):
        order = order[:k]
    margin = math.inf
    if p < 1.0:
        zk = sum(e[i].item() for i in order)
        keep, before = 1, e[order[0]].item()
        while keep < len(order) and before / zk < p:
            margin = min(margin, abs(before / zk - p))
            before += e[order[keep]].item()
            keep += 1
        if keep < len(order):
            margin = min(margin, abs(before / zk - p))
        order = order[:keep]
    order = sorted(i for i in order if e[i] > 0)  # drawn in index order
    total = sum(e[i].item() for i in order)
    target, run = u * total, 0.0
    for i in order:
        run += e[i].item()
        margin = min(margin, abs(run - target) / total)
        if run > target:
            return i, margin
    return order[-1], margin


def draw(logits, t, k, p, u, rows=None):
    n = len(t)
    rows = torch.arange(n) if rows is None else rows
    return sample_native.sample(logits, rows, torch.tensor(t, dtype=torch.float32), torch.tensor(k, dtype=torch.int64),
                                torch.tensor(p, dtype=torch.float32), torch.tensor(u, dtype=torch.float32))


@pytest.mark.parametrize("vocab", [7, 300, 5000])
def test_draws_match_the_float64_reference(vocab):
    """Random rows, temperatures, top-k / top-p settings and uniforms: the kernel's token is the
    reference's wherever u is not within 1e-5 of a boundary (float32 exp, float sums). Rows from
    flat (scale 0.05) to peaked (scale 40), so that both ways of finding the candidates run: a
    few tokens above a threshold, or the histogram's bins."""
    g = torch.Generator().manual_seed(vocab)
    n = 40
    scales = torch.tensor([0.05, 0.5, 3.0, 12.0, 40.0]).repeat(8)[:, None]  # [n, 1]
    logits = torch.randn(n, vocab, generator=g) * scales
    t = (torch.rand(n, generator=g) * 1.5 + 0.2).tolist()
    k = [[0, 1, 3, 50, vocab, vocab + 5][i % 6] for i in range(n)]
    p = [[1.0, 0.9, 0.5, 0.99, 0.1][i % 5] for i in range(n)]
    checked = 0
    for _ in range(6):
        u = torch.rand(n, generator=g).tolist()
        got = draw(logits, t, k, p, u).tolist()
        for r in range(n):
            want, margin = reference(logits[r], t[r], k[r], p[r], u[r])
            if margin > 1e-5:
                checked += 1
                assert got[r] == want, (r, t[r], k[r], p[r], u[r])
    assert checked > 0.95 * 6 * n


def test_uniform_grid_reproduces_the_distribution():
    """u = (j + 1/2) / N for j < N: the inverse CDF hands each kept token a count within 1 of
    N times its probability (top-k 20 then top-p 0.8 of softmax(row / 0.7))."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 1000, generator=g) * 3
    grid = 20000
    u = ((torch.arange(grid, dtype=torch.float64) + 0.5) / grid).float().tolist()
    got = draw(logits.expand(grid, -1).contiguous(), [0.7] * grid, [20] * grid, [0.8] * grid, u)
    counts = torch.bincount(got, minlength=1000).double()
    masked = apply_top_k_top_p((logits / 0.7).double(), torch.tensor([20]), torch.tensor([0.8]))
    probs = torch.softmax(masked, dim=-1)[0]
    assert bool(((counts == 0) | (probs > 0)).all())  # nothing outside the kept set
    assert (counts - grid * probs).abs().max().item() <= 1.5


def test_masked_tokens_are_never_drawn_and_dead_rows_get_their_argmax():
    """-inf logits (structured output's mask, logit bias) have no mass whatever u is, even u just
    below 1; a row with no finite logit gets its first largest one, as argmax would."""
    g = torch.Generator().manual_seed(5)
    logits = torch.full((6, 4000), float("-inf"))
    allowed = torch.tensor([17, 1999, 3998])
    logits[:, allowed] = torch.randn(6, 3, generator=g)
    logits[5] = float("-inf")
    u = [0.0, 0.3, 0.999999, 0.5, 0.9999999, 0.2]
    got = draw(logits, [1.0, 0.5, 2.0, 1.0, 1.0, 1.0], [0, 0, 0, 2, 0, 0], [1.0, 0.9, 1.0, 1.0, 0.95, 1.0], u)
    assert all(tok in allowed.tolist() for tok in got[:5].tolist())
    assert got[5].item() == 0


def test_ties_at_the_top_k_boundary_keep_the_lower_index():
    """Equal logits straddling the k-th place: the lower indices stay (a stable descending sort)."""
    logits = torch.zeros(1, 10)
    logits[0, [2, 5, 8]] = 1.0  # three equal largest, top-k 2 keeps 2 and 5
    grid = 1000
    u = ((torch.arange(grid) + 0.5) / grid).tolist()
    got = draw(logits.expand(grid, -1).contiguous(), [1.0] * grid, [2] * grid, [1.0] * grid, u)
    assert set(got.tolist()) == {2, 5}


def test_rows_and_thread_count():
    """rows picks which logits rows are drawn (in that order); the answer does not depend on the
    thread count (each row is one thread's)."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(9, 2048, generator=g)
    rows = torch.tensor([8, 0, 3, 3])
    args = ([0.9] * 4, [0, 40, 0, 7], [0.95, 1.0, 0.5, 1.0], [0.1, 0.5, 0.7, 0.99])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = draw(logits, *args, rows=rows)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(draw(logits, *args, rows=rows), one)
    for j, r in enumerate(rows.tolist()):
        assert one[j].item() == reference(logits[r], args[0][j], args[1][j], args[2][j], args[3][j])[0]


def test_bad_operands_are_refused():
    logits = torch.randn(2, 64)
    ok = ([1.0, 1.0], [0, 0], [1.0, 1.0], [0.5, 0.5])
    for bad in (([0.0, 1.0],) + ok[1:], ok[:2] + ([0.0, 1.0], ok[3]), ok[:3] + ([0.5, 1.0],)):
        with pytest.raises(ValueError):
            draw(logits, *bad)
    with pytest.raises(ValueError):
        draw(logits, *ok, rows=torch.tensor([0, 2]))
    with pytest.raises(ValueError):
        sample_native.sample(logits.double(), torch.arange(2), *(torch.tensor(v) for v in ok))


def test_top_p_just_below_one_on_a_flat_row():
    """p = 0.9999999 on equal logits: the nucleus is (almost) the whole row, every token ties.
    The kernel's histogram of the mass may fall short of p by a rounding, and the draw must
    still be the reference's."""
    logits = torch.zeros(64, 5000)
    logits[1::2] = torch.randn(32, 5000, generator=torch.Generator().manual_seed(2)) * 0.01
    u = torch.linspace(0.001, 0.999, 64).tolist()
    got = draw(logits, [1.0] * 64, [0] * 64, [0.9999999] * 64, u).tolist()
    for r in range(64):
        want, margin = reference(logits[r], 1.0, 0, float(torch.tensor(0.9999999, dtype=torch.float32)), u[r])
        if margin > 1e-5:
            assert got[r] == want, r
