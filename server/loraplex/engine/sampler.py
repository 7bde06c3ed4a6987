"""Next-token selection for a batch of sequences, one row of logits each.

Order of operations (as in transformers' generate): repetition penalty -> presence / frequency
penalties -> logit_bias -> structured-output masks -> temperature -> top-k -> top-p -> draw.
Greedy rows (temperature 0) take the argmax of the processed logits. All the maths
is batched over rows; only drawing the random numbers of *seeded* rows loops in Python, because
each seeded request owns a torch.Generator so that its draws never depend on its batch companions.

Drawing on CPU (NATIVE_DRAW) is by inverse CDF: one uniform number u per row, and the token whose
running probability (in the kept tokens' order) first exceeds u (loraplex_kernels/sample_rows.c).
Elsewhere it is the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability
p_i (the same distribution as torch.multinomial). Both consume a fixed count of random numbers per
row per step (1, or `vocab`), so a seeded request consumes its stream identically whatever else is
in the batch.
"""

from __future__ import annotations

import array
from collections.abc import Sequence as Seq
from typing import Any

import torch

from loraplex_kernels import sample_native
from loraplex_kernels.argmax_native import first_argmax  # the greedy pick (tests import it from here too)

from loraplex.engine.request import SamplingParams

# The non-greedy rows on CPU through loraplex_kernels/sample_rows.c (inverse CDF, one uniform number
# a row, a sort of top-k / nucleus candidates only) instead of torch's exponential race and full
# sort: ~1-4 ms instead of 30-90 ms for 32 rows of a 49152-token vocabulary on the dev box
# (benchmarks/bench_sampler.py). False = the torch formulation (tests and benchmarks compare).
NATIVE_DRAW = True


def _int64_view(ids: Seq[int]) -> torch.Tensor:
    """ids as an int64 tensor: a view of an int64 array.array (the engine's Sequence.token_array:
    no conversion), else through one (~3.5x faster than torch.tensor on a list of Python ints).
    The caller copies it before the array may grow (a buffer being viewed cannot be resized)."""
    if not (isinstance(ids, array.array) and ids.typecode == "q"):
        ids = array.array("q", ids)
    return torch.frombuffer(ids, dtype=torch.int64)


def _row_ids(lists: Seq[Seq[int]], rows: Seq[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids of lists[i] for i in rows, concatenated ([N] int64), and each one's row
    ([N] int64). Lists of ints or int64 array.arrays (read in place: 32 histories of 2000 ids
    0.1 ms, against ~2 ms converting lists). An id outside [0, vocab) is refused: indexing [S, V]
    logits by flat position, it would land in another row."""
    ids = torch.cat([_int64_view(lists[i]) for i in rows])  # [N], a copy: the views end here
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise IndexError(f"a token id is outside the vocabulary [0, {vocab})")
    lengths = torch.tensor([len(lists[i]) for i in rows])  # [R]
    return ids, torch.repeat_interleave(torch.tensor(rows), lengths)  # [N], [N]


def apply_repetition_penalty(logits: torch.Tensor, token_ids: Seq[Seq[int]],
                             penalties: Seq[float]) -> torch.Tensor:
    """HF semantics, in place: every token id seen in the row's prompt + output has its logit
    divided by the penalty when positive, multiplied when negative. logits: [S, V]."""
    rows = [i for i, p in enumerate(penalties) if p != 1.0 and len(token_ids[i]) > 0]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[1]
    # The seen entries only, by flat index into [S, V] (no [R, V] copy): a token seen twice is
    # the same index twice, which gathers and writes back the same value.
    ids, row = _row_ids(token_ids, rows, vocab)  # [N], [N]
    flat = (ids + row * vocab).to(dev)  # [N]
    pen = torch.tensor(list(penalties), dtype=logits.dtype)[row].to(dev)  # [N]
    view = logits.view(-1)
    seen = view[flat]  # [N]
    view[flat] = torch.where(seen < 0, seen * pen, seen / pen)
    return logits


def apply_presence_frequency(logits: torch.Tensor, generated: Seq[Seq[int]], presence: Seq[float],
                             frequency: Seq[float], counts: torch.Tensor | None = None) -> torch.Tensor:
    """OpenAI semantics, in place: logits[r, t] -= presence[r] * (count > 0) + frequency[r] * count,
    count = how often token t occurs in row r's generated tokens. logits: [S, V]. counts: float32
    zeros on logits' device, at least S * V of them, left zero on return (Sampler keeps one, so
    a call costs O(generated tokens) and nothing [S, V]-wide); None: allocated here."""
    rows = [i for i in range(len(generated)) if (presence[i] or frequency[i]) and len(generated[i]) > 0]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[1]
    ids, row = _row_ids(generated, rows, vocab)  # [N], [N]
    flat = (ids + row * vocab).to(dev)  # [N] each occurrence's entry of [S, V]
    if counts is None:
        counts = torch.zeros(logits.numel(), dtype=torch.float32, device=dev)
    elif counts.numel() < logits.numel():
        raise ValueError(f"counts: {counts.numel()} entries for [{logits.shape[0]}, {vocab}] logits")
    # Counts without a sort (torch.unique's was ~1.2 ms of 2.1 at 32 rows x 2000 tokens): add one
    # per occurrence at its entry, read each occurrence's total, put the touched entries back to 0.
    counts.index_add_(0, flat, torch.ones(flat.shape[0], dtype=torch.float32, device=dev))
    n = counts[flat].to(logits.dtype)  # [N] exact integers (float32 holds them up to 2**24)
    counts[flat] = 0.0
    pres = torch.tensor(list(presence), dtype=logits.dtype)[row].to(dev)  # [N]
    freq = torch.tensor(list(frequency), dtype=logits.dtype)[row].to(dev)  # [N]
    view = logits.view(-1)
    # A token seen n times is the same entry n times: every one of them gathers before any write
    # and writes the same value.
    view[flat] = view[flat] - (pres + freq * n)
    return logits


def apply_logit_bias(logits: torch.Tensor, biases: Seq[Seq[tuple[int, float]]]) -> torch.Tensor:
    """OpenAI's logit_bias, in place: logits[r, t] += bias for each (t, bias) of row r.
    logits: [S, V]."""
    pairs = [(i, t, b) for i, row in enumerate(biases) for t, b in row]
    if not pairs:
        return logits
    dev = logits.device
    rows = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=dev)  # [P]
    cols = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=dev)  # [P]
    vals = torch.tensor([p[2] for p in pairs], dtype=logits.dtype, device=dev)  # [P]
    logits.index_put_((rows, cols), vals, accumulate=True)
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (set to -inf) what top-k and then top-p exclude. logits: [S, V] (temperature already
    applied); top_k: [S] int64, 0 = off; top_p: [S] float, 1 = off. Returns a new tensor.

    top-p keeps the smallest set of most likely tokens whose probability (renormalised after
    top-k) reaches top_p; the most likely token is always kept."""
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # [S, V]
    # top-k: drop sorted positions >= k (ties at the k-th value are cut arbitrarily but stably).
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))  # [S]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
    drop = ranks >= k.unsqueeze(1)  # [S, V]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    # top-p on the renormalised survivors: drop a token when the mass before it already >= p.
    probs = torch.softmax(sorted_logits, dim=-1)  # [S, V]
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [S, V]
    p = top_p.to(probs.dtype).unsqueeze(1)  # [S, 1]
    drop_p = (mass_before >= p) & (p < 1.0)  # p == 1 is "off" even if rounding makes mass reach 1
    drop_p[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)


def plain_argmax(params: Seq[SamplingParams]) -> bool:
    """Is every row's token the first argmax of its raw logits -- greedy, with no penalty and no
    logit bias (what Sampler.__call__ applies before its argmax) -- and nobody asks for the
    distribution (logprobs)? Structured output's masks are the caller's to rule out. Then the
    engine asks the model for the tokens alone (ModelRunner.run(greedy=True)): no [S, vocab]
    logits are written and read back."""
    return all(p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty
               and not p.frequency_penalty and not p.logit_bias and p.logprobs is None for p in params)


class Sampler:
    def __init__(self):
        self._zeros: torch.Tensor | None = None  # apply_presence_frequency's counts, kept zero

    def _counts(self, logits: torch.Tensor) -> torch.Tensor:
        """Zeros for apply_presence_frequency, at least logits.numel() of them on its device;
        grown (by reallocation) when a step has more rows than any before."""
        z = self._zeros
        if z is None or z.device != logits.device or z.numel() < logits.numel():
            self._zeros = z = torch.zeros(logits.numel(), dtype=torch.float32, device=logits.device)
        return z

    def __call__(self, logits: torch.Tensor, params: Seq[SamplingParams],
                 token_ids: Seq[Seq[int]], generators: Seq[torch.Generator | None],
                 prompt_lens: Seq[int] | None = None, masks: Any = None) -> list[int]:
        """logits: [S, V] float32, one row per sequence; token_ids: each row's prompt + generated
        tokens (for the penalties), of which the first prompt_lens[i] are the prompt (None: all
        generated). masks: structured output's allowed tokens of the constrained rows
        (engine.structured.masks.TokenMasks), None = no row constrained. Returns one token id per row."""
        num_rows, vocab = logits.shape
        if num_rows == 0:
            return []
        penalties = [p.repetition_penalty for p in params]
        has_penalty = any(p != 1.0 for p in penalties)
        has_presence = any(p.presence_penalty or p.frequency_penalty for p in params)
        has_bias = any(p.logit_bias for p in params)
        logits = logits.float()
        if has_penalty or has_presence or has_bias:
            # The processors below write in place: one copy, never into the caller's tensor (the
            # engine reads the raw logits afterwards for logprobs).
            logits = logits.clone()
        if has_penalty:
            apply_repetition_penalty(logits, token_ids, penalties)
        if has_presence:
            starts = prompt_lens if prompt_lens is not None else [0] * num_rows
            generated = [ids[start:] for ids, start in zip(token_ids, starts)]
            apply_presence_frequency(logits, generated, [p.presence_penalty for p in params],
                                     [p.frequency_penalty for p in params], self._counts(logits))
        if has_bias:
            apply_logit_bias(logits, [p.logit_bias for p in params])
        if masks is not None:  # structured output: disallowed tokens -> -inf (before any sampling maths)
            logits = masks.apply(logits)
        # [S]; final for greedy rows (the others' entries are overwritten below)
        out = (first_argmax(logits) if any(p.greedy for p in params)
               else torch.empty(num_rows, dtype=torch.long, device=logits.device))

        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            dev = logits.device
            row_idx = torch.tensor(rows, dtype=torch.long, device=dev)  # [R]
            temp = torch.tensor([params[i].temperature for i in rows], device=dev)  # [R]
            top_k = torch.tensor([params[i].top_k for i in rows], dtype=torch.long, device=dev)
            top_p = torch.tensor([params[i].top_p for i in rows], dtype=torch.float32, device=dev)
            row_gens = [generators[i] for i in rows]
            if NATIVE_DRAW and sample_native.supports(logits):  # CPU: a uniform number per row, no sort of the row
                uniform = self._draw(torch.empty(len(rows)), row_gens, torch.Tensor.uniform_)  # [R]
                out[row_idx] = sample_native.sample(logits, row_idx, temp, top_k, top_p, uniform)
                return out.tolist()
            scaled = logits[row_idx] / temp.unsqueeze(1)  # [R, V]
            if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in rows):
                scaled = apply_top_k_top_p(scaled, top_k, top_p)
            probs = torch.softmax(scaled, dim=-1)  # [R, V]
            # Exp(1) can round to 0; the smallest positive float keeps p / E finite.
            noise = self._draw(torch.empty(len(rows), vocab, device=dev), row_gens,
                               torch.Tensor.exponential_).clamp_min_(torch.finfo(torch.float32).tiny)  # [R, V]
            out[row_idx] = first_argmax(probs / noise)
        return out.tolist()

    @staticmethod
    def _draw(out: torch.Tensor, generators: Seq[torch.Generator | None], fill: Any) -> torch.Tensor:
        """out [R, ...] filled row by row with fill(tensor, generator=...) (a torch in-place
        sampler): a seeded row's from its own generator, so its draws never depend on the batch;
        the unseeded rows in one call on torch's default generator."""
        unseeded = [j for j, g in enumerate(generators) if g is None]
        if unseeded:
            out[unseeded] = fill(torch.empty((len(unseeded), *out.shape[1:]), dtype=out.dtype, device=out.device))
        for j, g in enumerate(generators):
            if g is not None:
                fill(out[j], generator=g)
        return out
