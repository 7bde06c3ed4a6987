"""Quantized default model (SmolLM2-135M-Instruct) + multi-LoRA vs transformers + bitsandbytes + PEFT.

The peer test of tests/test_quantize.py on the real model instead of a tiny random one. Both sides
load the converted default model (conftest.py's session fixture `default_model_dir`) quantized the
same way, compute dtype float32: ours with load_model(..., QuantSpec(method, float32)), the reference
with AutoModelForCausalLM.from_pretrained(..., BitsAndBytesConfig(same method, float32)) and PEFT on
top. Methods: nf4 (the default 4-bit method) and int8 (pure LLM.int8(), threshold 0, see
INT8_THRESHOLD). Three PEFT adapters are made on the default model with random weights (small std:
answers stay sane, the logits still move by whole units): q/v rank 4; rsLoRA rank 8 on all linear
layers; rank 6 with rank_pattern/alpha_pattern overrides (tests/fixtures/adapters.py). Checked:
  - both sides really hold bitsandbytes layers of the method (else everything could pass unquantized);
  - one flat prefill batch mixing base rows and rows of every adapter (one adapter on two rows, one
    prompt asked of the base model and of an adapter) gives the reference's logits at every prompt
    position within the bounds below; the next-token choice differs only at reference near-ties;
  - the engine's greedy tokens (NEW_TOKENS per row, EOS ignored) for that mixed-adapter batch equal
    PEFT generate's row by row, or first diverge at a near-tie of generate's own logits (the rule of
    test_quantize.py's test_mixed_adapter_greedy_tokens_match); and, teacher-forced on OUR tokens,
    every token we chose is the reference's choice or a near-tie of it (so a row that diverged early
    is still checked to its end).

Why the logits are not float32-identical, bounded: both sides quantize the same float32 weights
with the same bitsandbytes functions, but
  - nf4: on a CPU with AVX512-BF16, bitsandbytes' 4-bit forward computes in bfloat16 whatever
    compute_dtype says (test_quantize.py's docstring). A float32 rounding difference upstream (our
    batched LoRA kernel vs PEFT's two matmuls, paged vs eager attention) flips bfloat16 roundings of
    activations, and over 30 layers that grows to a few bfloat16 ulps in the logits;
  - int8: activations are rounded to int8 per row; where a float32 rounding difference flips one
    such rounding, the row's logits move by units; elsewhere the match is exact (base rows: 0).
The test measures the reference's sensitivity to such roundings on the same prompts: the same
quantized PEFT model with sdpa instead of eager attention (a float32-rounding-only change: 6e-5 on
the float model), and with its embeddings and LoRA products nudged by one float32 ulp (a few random
patterns). Our error must be within FLOOR_FACTOR x that noise as well as the absolute bounds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.model.kv_cache import KVCache
from loraplex.model.loader import load_model
from loraplex.model.quantize import QuantSpec, quantization_for
from tests.fixtures.adapters import make_peft_adapter, manager_with_slots
from tests.fixtures.engine_run import engine_greedy
from tests.fixtures.paged_batches import BlockPool, PagedSeq, make_step

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

KINDS = ("qv_r4", "all_r8_rslora", "patterns_r6")  # tests/fixtures/adapters.py ADAPTER_KINDS
# Random A and B std per adapter. The fixture's default (0.2) is sized for a hidden size of 128; on
# 576-wide layers over 30 layers it would drown the model. These make every adapter move the
# reference's logits by several units (max > MIN_LORA_EFFECT = 2x nf4's ATOL, mean > 1.5x MEAN_ATOL:
# an adapter dropped or given a wrong scale cannot hide inside the tolerance; measured max 3.8-10.7,
# mean 0.5-1.5) while the answers stay sane. rsLoRA on all seven
# projections moves the most per unit of std, hence its smaller std.
WEIGHT_STD = {"qv_r4": 0.03, "all_r8_rslora": 0.015, "patterns_r6": 0.03}
QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do I bake bread?",
    "Name three prime numbers.",
)
# (adapter kind or None for the base model, question index) in flat-batch order; qv_r4 serves two
# rows, question 0 is asked both of the base model and of qv_r4.
ROWS = ((None, 0), ("qv_r4", 1), ("all_r8_rslora", 2), (None, 3), ("patterns_r6", 3), ("qv_r4", 0))
NEW_TOKENS = 12
BLOCK_SIZE = 16
# Measured on this model (2-core AVX512-BF16 CPU, bitsandbytes 0.50.2; 6 rows, 218 prompt positions,
# |logits| up to ~40), ours vs reference / reference eager vs its own sdpa ("spread"):
#   nf4:  max 0.90 / 0.93; worst row mean 0.117 / 0.119 (all positions: 0.088). Base rows: max 0.76 /
#         0.76 and 0.55 / 0.55, i.e. our paged attention is exactly as far from eager as sdpa is;
#         adapter rows add our LoRA kernel's float32 rounding. One bfloat16 ulp at |logit| 32 is 0.25.
#   int8: max 4.39 / 5.49; worst row mean 0.46 / 0.81 (all positions: 0.11). Base rows, one qv_r4 row
#         and patterns_r6 match to 0, 0 and 8e-6; rows where one int8 activation rounding flipped are
#         off by units, on both comparisons alike.
# Bounds: ATOL (max) and MEAN_ATOL (worst row's mean; every adapter's mean effect must exceed 1.5x it,
# so a dropped adapter or a wrong scale, rank or target cannot hide inside it) set ~1.5x the measured,
# AND at most FLOOR_FACTOR x the spread measured in the test: on a CPU where bitsandbytes computes nf4
# in float32 the spread is ~1e-4 and that bound tightens by itself to FLOAT_ATOL (the float32 level
# of test_lora_default_model.py).
ATOL = {"nf4": 1.5, "int8": 6.0}
MEAN_ATOL = {"nf4": 0.2, "int8": 0.7}
FLOOR_FACTOR = 2.0
ROW_FLOOR_FACTOR = 1.25
FLOAT_ATOL = 1e-3
NUDGE_SEEDS = (11, 12, 13)  # the one-ulp nudge patterns that sample the reference's noise floor
# A reference near-tie: its top logit beats its logit for our token by at most this. Measured
# margins where choices differed (two adapter std settings tried): nf4 0.017-0.064 at prompt
# positions, 0.023 in greedy; int8 0.048-0.12 at prompt positions, 0.006-0.29 in greedy (up to 4
# of 6 rows diverge at a near-tie; teacher-forced on our tokens max 0.27). Two bfloat16 ulps at
# |logit| 32; a real error (a wrong adapter) gives margins of units.
NEAR_TIE = {"nf4": 0.5, "int8": 0.5}
MAX_FLIP_FRACTION = 0.05  # next-token choices that may differ (near-ties): measured 0-3 of 218
METHODS = ("nf4", "int8")
# int8 runs pure LLM.int8() (no float16 outlier columns) on both sides: with the default threshold
# 6.0 the outlier columns are picked per call from the whole flat batch, so a row's logits would
# depend on its batch neighbours (test_quantize.py's docstring; test_int8_single_sequences_match_tightly
# covers threshold 6.0 one sequence at a time).
INT8_THRESHOLD = 0.0
MIN_LORA_EFFECT = 3.0  # every adapter must move the reference's logits (max) by more than this


@pytest.fixture(scope="module")
def adapters(default_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("default_model_quant_adapters")
    for i, kind in enumerate(KINDS):
        make_peft_adapter(default_model_dir, root / kind, kind, seed=70 + i, weight_std=WEIGHT_STD[kind])
    return root


@pytest.fixture(scope="module")
def prompts(default_model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    return [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)) for q in QUESTIONS]


@pytest.fixture(scope="module", params=METHODS)
def method(request) -> str:
    # Module-scoped parameter: pytest runs every test of one method before building the next
    # method's models, so only one pair of 135M-parameter models is resident at a time.
    assert request.param in quantization_for("cpu"), f"bitsandbytes cannot run {request.param} on this CPU"
    return request.param


@pytest.fixture(scope="module")
def ours(default_model_dir, adapters, method):
    """Our quantized model with every adapter in a device slot: (loaded, manager, kind -> slot)."""
    spec = QuantSpec(method, torch.float32, int8_threshold=INT8_THRESHOLD)
    loaded = load_model(default_model_dir, torch.float32, "cpu", spec)
    manager, slots = manager_with_slots(loaded, adapters, KINDS)
    return loaded, manager, slots


@pytest.fixture(scope="module")
def reference(default_model_dir, adapters, method):
    """transformers + BitsAndBytesConfig (same method, compute dtype float32) with all three PEFT
    adapters on ONE quantized base (a 135M-parameter quantizing load per adapter costs seconds each).
    PEFT applies only the active adapter; `disable_adapter()` gives the plain quantized base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(default_model_dir), quantization_config=qc, device_map="cpu",
                                                dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(adapters / KINDS[0]), adapter_name=KINDS[0])
    for kind in KINDS[1:]:
        model.load_adapter(str(adapters / kind), adapter_name=kind)
    return model.eval()


def _one_ulp_nudge(seed: int):
    """A forward hook: out moved one float32 ulp up or down per element (a random pattern fixed by seed)."""

    def hook(module, args, out: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        up = torch.rand(out.shape, generator=g) < 0.5  # out's shape
        return torch.nextafter(out, torch.where(up, torch.inf, -torch.inf).to(out.dtype))

    return hook


class _Active:
    """Context manager: `kind`'s adapter active on the reference, or none for kind None."""

    def __init__(self, model, kind):
        self.model, self.kind, self._ctx = model, kind, None

    def __enter__(self):
        if self.kind is None:
            self._ctx = self.model.disable_adapter()
            self._ctx.__enter__()
        else:
            self.model.set_adapter(self.kind)
        return self.model

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def ref_logits(model, kind, tokens: list[int]) -> torch.Tensor:
    with _Active(model, kind), torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()  # [L, vocab]


def test_both_sides_are_really_quantized(ours, reference, method):
    """Else the logits test could pass with quantization silently skipped on both sides."""
    import bitsandbytes as bnb

    layer_type = bnb.nn.Linear8bitLt if method == "int8" else bnb.nn.Linear4bit
    loaded, _, _ = ours
    for _, name, proj in loaded.model.iter_projections():
        assert isinstance(proj.base, layer_type), f"our {name} is {type(proj.base).__name__}"
    ref_layers = [m for m in reference.modules() if isinstance(m, layer_type)]
    assert len(ref_layers) == 7 * loaded.arch.num_layers
    if method != "int8":
        assert all(proj.base.weight.quant_state.quant_type == method for _, _, proj in loaded.model.iter_projections())
        assert all(m.weight.quant_state.quant_type == method for m in ref_layers)


def test_mixed_adapter_logits_match_transformers_bnb_peft(ours, reference, prompts, method):
    loaded, manager, slots = ours
    arch = loaded.arch
    seqs = [PagedSeq(list(prompts[q])) for _, q in ROWS]
    batch, rows = make_step(BlockPool(128, BLOCK_SIZE, seed=3), [(s, len(s.tokens)) for s in seqs], logits="all")
    seq_slots = torch.tensor([-1 if k is None else slots[k] for k, _ in ROWS])  # [rows]
    token_slots = torch.repeat_interleave(seq_slots, torch.tensor([len(s.tokens) for s in seqs]))  # [T]
    batch.lora = manager.build_lora_batch(token_slots, seq_slots)
    kv = KVCache.allocate(arch.num_layers, 128, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim, torch.float32, "cpu")
    got = loaded.model(batch, kv)  # [T, vocab]: base rows and adapter rows in ONE forward

    def reference_rows(attn: str, nudge: int | None = None) -> torch.Tensor:  # [T, vocab], our row order
        base = reference.get_base_model()
        base.set_attn_implementation(attn)
        # nudge (a seed): the input embeddings and every LoRA B product moved by one float32 ulp at
        # random (up or down): the size and the places of the rounding differences between our
        # LoRA kernel and PEFT's two matmuls, both correct in float32.
        nudged = [base.model.embed_tokens] + [m for name, m in reference.named_modules()
                                              if ".lora_B." in name and isinstance(m, torch.nn.Linear)]
        hooks = [m.register_forward_hook(_one_ulp_nudge(nudge)) for m in nudged] if nudge is not None else []
        try:
            per_prompt = {(kind, q): ref_logits(reference, kind, prompts[q]) for kind, q in set(ROWS)}
        finally:
            base.set_attn_implementation("eager")
            for hook in hooks:
                hook.remove()
        by_seq = {id(s): per_prompt[key] for s, key in zip(seqs, ROWS)}
        return torch.stack([by_seq[id(s)][pos] for s, pos in rows]), per_prompt

    want_rows, want = reference_rows("eager")
    mean_effect = {}  # (kind, q) -> the adapter's mean move of the reference's logits on that prompt
    for kind, q in ROWS:  # a test on an adapter that does nothing could not fail
        if kind is not None:
            delta = (want[(kind, q)] - ref_logits(reference, None, prompts[q])).abs()  # [L, vocab]
            effect, mean_effect[(kind, q)] = delta.max().item(), delta.mean().item()
            print(f"{kind} moves the reference's logits by max {effect:.3g}, mean {delta.mean().item():.3g}")
            assert effect > MIN_LORA_EFFECT, f"{kind} barely moves the logits ({effect:.3g})"
            # Dropped, this adapter's rows would be off by its mean effect: the per-row mean bound must catch it.
            assert delta.mean().item() > 1.5 * MEAN_ATOL[method], f"{kind} barely moves the logits on average"
    # The reference's own noise floor, several samples of it: the same quantized model with sdpa
    # instead of eager attention (a float32-rounding-only change: 6e-5 on the float model), and with
    # its input embeddings and LoRA products nudged by one ulp (NUDGE_SEEDS patterns). Where one int8
    # activation rounding flips, a row moves by units, so one sample alone says little about a row
    # (measured on a 2-core AMX CPU: the first qv_r4 row 0.425 from us, 0.202 from sdpa); per row
    # and per position the largest of the samples.
    floor = (reference_rows("sdpa")[0] - want_rows).abs()  # [T, vocab]
    for seed in NUDGE_SEEDS:
        floor = torch.maximum(floor, (reference_rows("eager", nudge=seed)[0] - want_rows).abs())

    diff = (got - want_rows).abs()  # [T, vocab]
    err = diff.max().item()
    # Mean error per ROW (sequence), worst row: a wrong adapter cannot hide in an average over all rows.
    row_means, floor_row_means, per_row, start = [], [], [], 0
    for seq, (kind, _) in zip(seqs, ROWS):
        n = len(seq.tokens)
        row_means.append(diff[start:start + n].mean().item())
        floor_row_means.append(floor[start:start + n].mean().item())
        per_row.append(f"{kind or 'base'} max {diff[start:start + n].max().item():.3g}"
                       f"/{floor[start:start + n].max().item():.3g} mean {row_means[-1]:.3g}/{floor_row_means[-1]:.3g}")
        start += n
    mean_err = max(row_means)
    print(f"{method} default model: max |ours - transformers+bnb+PEFT| = {err:.3g}, worst row mean {mean_err:.3g}, "
          f"overall mean {diff.mean().item():.3g}; reference noise (sdpa, 1-ulp nudge): max {floor.max().item():.3g}, "
          f"worst row mean {max(floor_row_means):.3g}; "
          f"logit range {want_rows.abs().max().item():.3g}; per row ours/floor: {', '.join(per_row)}")
    floor_max, floor_mean = floor.max().item(), max(floor_row_means)
    assert err < ATOL[method], f"max |ours - transformers+bnb+PEFT| = {err:.3g} (per row ours/floor: {per_row})"
    assert err <= max(FLOOR_FACTOR * floor_max, FLOAT_ATOL), (
        f"max error {err:.3g} is more than {FLOOR_FACTOR}x the reference's own noise {floor_max:.3g}")
    # Each row within MEAN_ATOL, or within ROW_FLOOR_FACTOR of that row's own reference noise
    # where the reference is noisier than that: pure LLM.int8() re-rounds every activation row, so
    # a last-bit difference in a LoRA sum (another float32 summation order) can move a row's logits
    # as much as the reference's two attention kernels do (measured: the patterns_r6 row, 0.85
    # against the reference's own 0.81). A dropped adapter moves its row by > 1.5 x MEAN_ATOL.
    for row_mean, row_floor, key in zip(row_means, floor_row_means, ROWS):
        bound = max(MEAN_ATOL[method], ROW_FLOOR_FACTOR * row_floor)
        assert row_mean < bound, f"a row's mean |ours - transformers+bnb+PEFT| = {row_mean:.3g} ({per_row})"
        # The bound must still catch this row's adapter dropped (its row off by the adapter's mean effect).
        assert key not in mean_effect or mean_effect[key] > bound, (
            f"{key[0]}'s mean effect {mean_effect[key]:.3g} is within this row's bound {bound:.3g}")
    assert mean_err <= max(FLOOR_FACTOR * floor_mean, FLOAT_ATOL), (
        f"mean error {mean_err:.3g} is more than {FLOOR_FACTOR}x the reference's own noise {floor_mean:.3g}")
    # Next-token choices: equal, except at near-ties of the reference (its logit for its own top
    # token beats its logit for ours by at most NEAR_TIE[method]), and then only at a few positions.
    flips = (got.argmax(-1) != want_rows.argmax(-1)).nonzero().flatten().tolist()
    margins = [float(want_rows[t].max() - want_rows[t, got[t].argmax()]) for t in flips]
    print(f"argmax differs at {len(flips)} of {len(rows)} positions; reference margins there: "
          f"{[round(m, 3) for m in margins]}")
    assert all(m <= NEAR_TIE[method] for m in margins), f"a next-token choice differs beyond a near-tie: {margins}"
    assert len(flips) <= MAX_FLIP_FRACTION * len(rows), f"{len(flips)} of {len(rows)} next-token choices differ"


def test_mixed_adapter_greedy_tokens_match(ours, reference, prompts, method):
    loaded, manager, _ = ours
    tok = loaded.tokenizer
    jobs = {i: (kind, prompts[q]) for i, (kind, q) in enumerate(ROWS)}
    # Every job submitted at once to one engine: the rows of different adapters share steps.
    got = engine_greedy(loaded, manager, jobs, NEW_TOKENS, block_size=BLOCK_SIZE, num_kv_blocks=64,
                        max_model_len=256, timeout_s=300)
    for key, (kind, prompt) in jobs.items():
        x = torch.tensor([prompt])
        with _Active(reference, kind), torch.no_grad():
            out = reference.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                     output_logits=True, return_dict_in_generate=True)
        want = out.sequences[0, len(prompt):].tolist()
        tokens, error = got[key]
        assert error in (None, ""), error
        assert len(tokens) == NEW_TOKENS
        print(f"{method} row {key} ({kind or 'base'}): {'same' if tokens == want else 'DIFF'} {tok.decode(tokens)!r}")
        if tokens != want:
            # Allowed only at a near-tie of the reference: at the first divergence, the reference's
            # logit for its token may beat its logit for ours by no more than NEAR_TIE (the
            # rounding inside bitsandbytes' CPU matmuls, module docstring). The prefix before is equal.
            i = next(j for j, (a, b) in enumerate(zip(tokens, want)) if a != b)
            # generate's own logits at that step (its KV-cached path rounds differently from a
            # full forward of the same context: with int8 by up to NEAR_TIE, measured)
            lg = out.logits[i][0].float()  # [vocab]
            margin = float(lg[want[i]] - lg[tokens[i]])
            print(f"{method} row {key} ({kind or 'base'}): first divergence at token {i}, reference margin {margin:.3g}")
            assert 0 <= margin <= NEAR_TIE[method], (
                f"{kind or 'base'}: ours {tok.decode(tokens)!r} vs reference {tok.decode(want)!r}, token {i}: "
                f"reference margin {margin:.3g} > near-tie bound {NEAR_TIE[method]}")
        # After a divergence the rows no longer share a context; so check every token we generated,
        # teacher-forced: given OUR prefix, the reference's choice is ours or a near-tie of it.
        lg = ref_logits(reference, kind, prompt + tokens[:-1])[len(prompt) - 1:]  # [NEW_TOKENS, vocab]
        margins = lg.max(-1).values - lg[torch.arange(NEW_TOKENS), torch.tensor(tokens)]  # [NEW_TOKENS]
        print(f"{method} row {key}: teacher-forced reference margins max {margins.max().item():.3g}, "
              f"nonzero at {int((margins > 0).sum())} of {NEW_TOKENS}")
        assert margins.max().item() <= NEAR_TIE[method], (
            f"{kind or 'base'}: given our own prefix, the reference prefers another token by "
            f"{margins.max().item():.3g} at step {int(margins.argmax())}")
