"""Sampler: greedy, repetition penalty (vs transformers), top-k/top-p masks (vs a float64
reference), the sampled distribution, and per-request seeded reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from loraplex.engine.request import InvalidRequestError, SamplingParams
from loraplex.engine.sampler import Sampler, apply_repetition_penalty, apply_top_k_top_p, first_argmax


def rand_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


def test_greedy_is_argmax():
    logits = rand_logits(9, 300, 0)
    params = [SamplingParams(temperature=0.0)] * 9
    tokens = Sampler()(logits, params, [[1, 2]] * 9, [None] * 9)
    assert tokens == logits.argmax(-1).tolist()


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = rand_logits(5, 50, 1)
    g = torch.Generator().manual_seed(2)
    histories = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (1, 7, 30, 12, 3)]
    histories[2] += histories[2][:5]  # repeated ids
    penalties = [1.3, 0.7, 2.0, 1.0, 1.15]
    ours = apply_repetition_penalty(logits.clone(), histories, penalties)
    for i, (hist, pen) in enumerate(zip(histories, penalties)):
        ref = RepetitionPenaltyLogitsProcessor(penalty=pen)(
            torch.tensor([hist]), logits[i:i + 1].clone())
        torch.testing.assert_close(ours[i:i + 1], ref, rtol=0, atol=1e-6)
    assert not torch.equal(ours[0], logits[0])  # the penalty did change something


def test_greedy_applies_repetition_penalty():
    logits = torch.tensor([[5.0, 4.9, -1.0, 0.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5)]
    assert Sampler()(logits, params, [[0]], [None]) == [1]  # 5/1.5 < 4.9


def reference_keep_mask(logits: torch.Tensor, k: int, p: float) -> set[int]:
    """Independent float64 top-k then top-p: the smallest most-likely set reaching mass p."""
    x = logits.double()
    order = sorted(range(x.numel()), key=lambda i: -float(x[i]))
    if k > 0:
        order = order[:k]
    probs = torch.softmax(x[order], dim=0).tolist()
    kept, mass = [], 0.0
    for idx, pr in zip(order, probs):
        kept.append(idx)
        mass += pr
        if p < 1.0 and mass >= p:
            break
    return set(kept)


@pytest.mark.parametrize("seed", range(3))
def test_top_k_top_p_mask_matches_float64_reference(seed):
    rows, vocab = 24, 64
    logits = rand_logits(rows, vocab, 10 + seed, scale=2.0)
    g = torch.Generator().manual_seed(seed)
    top_k = torch.randint(0, 20, (rows,), generator=g)
    top_k[:4] = torch.tensor([0, 1, vocab, vocab + 5])
    top_p = torch.rand(rows, generator=g) * 0.95 + 0.04
    top_p[4:8] = torch.tensor([1.0, 1.0, 0.5, 0.999])
    top_k[4] = 0  # row 4: both off
    masked = apply_top_k_top_p(logits, top_k, top_p)
    for r in range(rows):
        kept = set(torch.isfinite(masked[r]).nonzero().flatten().tolist())
        assert kept == reference_keep_mask(logits[r], int(top_k[r]), float(top_p[r])), f"row {r}"
        assert torch.equal(masked[r][list(kept)], logits[r][list(kept)])  # survivors untouched
    assert torch.isfinite(masked[4]).all()


def test_sampled_distribution_matches_softmax():
    """20k independent rows of the same logits: empirical frequencies vs float64 probabilities,
    with temperature, and with top-k + top-p renormalisation."""
    torch.manual_seed(0)
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 20000
    for params, k, p in [(SamplingParams(temperature=0.7), 0, 1.0),
                         (SamplingParams(temperature=1.3, top_k=5, top_p=0.8), 5, 0.8)]:
        tokens = Sampler()(base.expand(n, -1).clone(), [params] * n, [[]] * n, [None] * n)
        counts = torch.bincount(torch.tensor(tokens), minlength=8).double() / n
        x = base.double() / params.temperature
        keep = sorted(reference_keep_mask(x, k, p))
        ref = torch.zeros(8, dtype=torch.float64)
        ref[keep] = torch.softmax(x[keep], dim=0)
        assert (counts[ref == 0] == 0).all(), "sampled a masked token"
        # 4.5 sigma of a binomial proportion with n = 20000 is at most ~0.016
        assert torch.allclose(counts, ref, atol=0.016), (counts, ref)


def run_seeded(companions: int, position: int, steps: int = 12) -> list[int]:
    """Sample `steps` tokens for a seed-42 request placed at `position` among other rows."""
    vocab = 200
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    gen = torch.Generator().manual_seed(42)
    other_gens = [torch.Generator().manual_seed(1000 + j) if j % 2 else None for j in range(companions)]
    out = []
    for step in range(steps):
        logits = rand_logits(companions + 1, vocab, 500 + step, scale=1.0)
        # The target's logits are the same in every configuration; companions vary.
        target_row = rand_logits(1, vocab, 900 + step, scale=1.0)[0]
        logits[position] = target_row
        params = [SamplingParams(temperature=0.8)] * (companions + 1)
        params[position] = target
        gens = other_gens[:position] + [gen] + other_gens[position:]
        out.append(Sampler()(logits, params, [[1]] * (companions + 1), gens)[position])
    return out


def test_seeded_request_is_reproducible_whatever_the_batch():
    alone = run_seeded(0, 0)
    assert run_seeded(5, 2) == alone
    assert run_seeded(3, 3) == alone
    assert len(set(alone)) > 3  # it really sampled (not a constant)


def test_different_seeds_differ_and_unseeded_rows_vary():
    logits = rand_logits(1, 1000, 3, scale=0.5)
    a = [Sampler()(logits, [SamplingParams(seed=1)], [[]], [torch.Generator().manual_seed(1)])[0]
         for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same draw
    b = [Sampler()(logits, [SamplingParams(seed=s)], [[]], [torch.Generator().manual_seed(s)])[0]
         for s in range(2, 12)]
    assert len(set(b)) > 1
    c = [Sampler()(logits, [SamplingParams()], [[]], [None])[0] for _ in range(10)]
    assert len(set(c)) > 1


def test_mixed_batch_greedy_rows_unaffected_by_sampling_rows():
    logits = rand_logits(6, 100, 7)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=0.0, repetition_penalty=1.2),
              SamplingParams(temperature=2.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.5, top_p=0.5)]
    hist = [[1, 2, 3]] * 6
    tokens = Sampler()(logits.clone(), params, hist, [None] * 6)
    pen = apply_repetition_penalty(logits.clone(), hist, [p.repetition_penalty for p in params])
    for r in (0, 2, 4):
        assert tokens[r] == int(pen[r].argmax())
    assert tokens[1] in logits[1].topk(3).indices.tolist()
    assert all(0 <= t < 100 for t in tokens)
    assert not math.isnan(sum(tokens))


def test_presence_and_frequency_penalties_match_a_plain_reference():
    """OpenAI semantics over the generated tokens only (the prompt's tokens are not penalised):
    logit -= presence * (count > 0) + frequency * count; checked on random logits in float64."""
    from loraplex.engine.sampler import apply_presence_frequency

    g = torch.Generator().manual_seed(3)
    vocab = 50
    logits = torch.randn(4, vocab, generator=g) * 3  # [S, V]
    histories = [[1, 2, 3, 3, 7], [4, 4, 4], [], [9, 1, 1]]
    prompt_lens = [2, 0, 0, 3]  # row 3: everything is prompt
    presence, frequency = [0.5, -1.0, 2.0, 1.5], [0.25, 0.75, 0.0, 2.0]
    want = logits.double().clone()
    for r, (ids, start) in enumerate(zip(histories, prompt_lens)):
        for t in set(ids[start:]):
            n = ids[start:].count(t)
            want[r, t] -= presence[r] + frequency[r] * n
    got = apply_presence_frequency(logits.clone(), [h[s:] for h, s in zip(histories, prompt_lens)],
                                   presence, frequency)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    # Long histories with heavy repeats (frequency is subtracted once per occurrence): random
    # ids from a small range, up to a few hundred occurrences of one token, against float64.
    rows, vocab = 6, 300
    logits = torch.randn(rows, vocab, generator=g) * 4  # [R, V]
    highs = [3, 40, 90, 140, 190, 300]  # row 0: ~200 occurrences of each of 3 tokens
    histories = [torch.randint(0, highs[r], (400 + 100 * r,), generator=g).tolist() for r in range(rows)]
    presence = (torch.rand(rows, generator=g) * 4 - 2).tolist()
    frequency = (torch.rand(rows, generator=g) * 4 - 2).tolist()
    want = logits.double().clone()
    for r, ids in enumerate(histories):
        counts = torch.bincount(torch.tensor(ids), minlength=vocab).double()  # [V]
        want[r] -= presence[r] * (counts > 0).double() + frequency[r] * counts
    got = apply_presence_frequency(logits.clone(), histories, presence, frequency)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    assert torch.equal(got, apply_presence_frequency(logits.clone(), histories, presence, frequency))
    # The counts scratch a Sampler keeps comes back zero, so the next call (more rows) is right.
    zeros = torch.zeros(rows * vocab)
    again = apply_presence_frequency(logits.clone(), histories, presence, frequency, zeros)
    assert torch.equal(got, again) and not zeros.any()
    sampler = Sampler()
    params = [SamplingParams(temperature=0.0, presence_penalty=presence[r], frequency_penalty=frequency[r])
              for r in range(rows)]
    for n in (2, rows):  # the scratch grows between these calls
        picked = sampler(logits[:n].clone(), params[:n], histories[:n], [None] * n, prompt_lens=[0] * n)
        assert picked == [int(w.argmax()) for w in want[:n]]
        assert not sampler._zeros.any()
    # Through the sampler, greedy: a token the penalty pushes below the runner-up is not chosen.
    row = torch.zeros(1, vocab)
    row[0, 5], row[0, 6] = 3.0, 2.5
    params = [SamplingParams(temperature=0.0, frequency_penalty=0.3)]
    assert Sampler()(row.clone(), params, [[0, 5, 5]], [None], prompt_lens=[1]) == [6]  # 3 - 0.6 < 2.5
    assert Sampler()(row.clone(), params, [[5, 5, 0]], [None], prompt_lens=[2]) == [5]  # prompt 5s are free
    with pytest.raises(InvalidRequestError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_argmax_is_argmax_with_ties_and_nan(dtype):
    g = torch.Generator().manual_seed(5)
    # Few distinct values: most rows have their maximum several times (ties pick the first).
    x = torch.randint(0, 4, (64, 49152), generator=g).to(dtype)
    x[3, 17] = float("nan")  # NaN wins wherever it is
    x[4] = -float("inf")  # all -inf: index 0
    x[5, -1] = 10.0  # the last column
    got = first_argmax(x)
    assert torch.equal(got, torch.argmax(x, dim=-1))
    assert got[3] == 17 and got[4] == 0 and got[5] == 49151
    for row in (0, 1, 2):
        assert got[row] == (x[row] == x[row].max()).nonzero()[0, 0]
    y = torch.randn(7, 1000, generator=g, dtype=torch.float64).to(dtype)
    assert torch.equal(first_argmax(y), torch.argmax(y, dim=-1))


def test_compiled_argmax_matches_torch_on_edge_rows():
    """loraplex_kernels/argmax.c (first_argmax's CPU float32 path) against torch.argmax: ties,
    several NaN (the first wins, before or after the maximum), -0.0 against 0.0, +-inf, strided
    rows, one column, no rows."""
    from loraplex_kernels import argmax_native

    if not argmax_native.available():
        pytest.skip("the compiled argmax is built on AVX-512 CPUs only")
    g = torch.Generator().manual_seed(9)
    wide = torch.randint(-3, 3, (40, 3001), generator=g).float()
    x = wide[:, :2999]  # strided rows
    x[0, 5], x[0, 2000] = float("nan"), float("nan")
    x[1, 2500] = float("nan")  # after the row's maximum
    x[2] = 0.0
    x[2, 0], x[2, 7] = -0.0, 0.0  # equal: index 0
    x[3, 100] = float("inf")
    x[4] = float("-inf")
    x[5, 1] = -float("inf")
    assert argmax_native.supports(x)
    assert torch.equal(argmax_native.argmax(x), torch.argmax(x, dim=-1))
    assert torch.equal(first_argmax(x), torch.argmax(x, dim=-1))
    one = torch.randn(6, 1, generator=g)
    assert torch.equal(argmax_native.argmax(one), torch.zeros(6, dtype=torch.int64))
    assert argmax_native.argmax(torch.empty(0, 10)).shape == (0,)
    assert not argmax_native.supports(torch.empty(3, 0)) and not argmax_native.supports(x.double())


def test_plain_argmax_only_for_unprocessed_greedy_rows():
    """The engine's fast path (tokens straight from the model's argmax) only where Sampler would
    return first_argmax of the raw logits."""
    from loraplex.engine.sampler import plain_argmax

    greedy = SamplingParams(temperature=0)
    assert plain_argmax([greedy, SamplingParams(temperature=0, top_k=5, top_p=0.5, seed=3)])
    assert plain_argmax([])
    for other in (SamplingParams(temperature=0.7), SamplingParams(temperature=0, repetition_penalty=1.2),
                  SamplingParams(temperature=0, presence_penalty=0.5), SamplingParams(temperature=0, frequency_penalty=0.1),
                  SamplingParams(temperature=0, logit_bias=((3, 5.0),))):
        assert not plain_argmax([greedy, other]), other
    # what it promises: Sampler gives first_argmax for such rows
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4))
    params = [greedy, SamplingParams(temperature=0, top_k=2), SamplingParams(temperature=0, top_p=0.3)]
    assert Sampler()(logits, params, [[1, 2]] * 3, [None] * 3) == first_argmax(logits).tolist()


def test_penalties_refuse_token_ids_outside_the_vocabulary():
    """The penalties index [S, V] logits by flat position: an id >= V would reach the next row, so
    it is refused instead (the engine never passes one: prompts are checked at submit)."""
    from loraplex.engine.sampler import apply_presence_frequency

    logits = rand_logits(2, 50, 3)
    for bad in ([[3, 50], [1]], [[-1], [2]]):
        with pytest.raises(IndexError):
            apply_repetition_penalty(logits.clone(), bad, [1.2, 1.2])
        with pytest.raises(IndexError):
            apply_presence_frequency(logits.clone(), bad, [0.5, 0.5], [0.1, 0.1])


def test_penalties_read_int64_arrays_as_lists():
    """The engine hands the sampler each sequence's token_array (int64 array.array, read in place):
    the same logits as with lists, and the arrays can still grow afterwards (no view outlives the
    call: a viewed buffer cannot be resized)."""
    import array

    from loraplex.engine.sampler import apply_presence_frequency

    g = torch.Generator().manual_seed(8)
    logits = rand_logits(4, 60, 6)
    histories = [torch.randint(0, 60, (n,), generator=g).tolist() for n in (5, 40, 1, 17)]
    arrays = [array.array("q", h) for h in histories]
    for fn, args in ((apply_repetition_penalty, ([1.3, 0.8, 1.0, 2.0],)),
                     (apply_presence_frequency, ([0.5, -1.0, 2.0, 0.0], [0.25, 0.5, 0.0, 1.0]))):
        want = fn(logits.clone(), histories, *args)
        got = fn(logits.clone(), arrays, *args)
        assert torch.equal(got, want) and not torch.equal(got, logits)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.4, frequency_penalty=0.5)] * 4
    assert Sampler()(logits, params, arrays, [None] * 4, [2] * 4) == Sampler()(logits, params, histories, [None] * 4,
                                                                                [2] * 4)
    for a in arrays:
        a.append(3)
    assert [len(a) for a in arrays] == [6, 41, 2, 18]


def test_sequence_token_array_follows_token_ids():
    from loraplex.engine.request import Request
    from loraplex.engine.sequence import Sequence

    seq = Sequence.from_request(Request("r", [5, 6, 7], SamplingParams(max_new_tokens=4)))
    for t in (9, 1, 9):
        seq.append_token(t)
    assert list(seq.token_array) == seq.token_ids == [5, 6, 7, 9, 1, 9]
    assert seq.token_array.typecode == "q"
