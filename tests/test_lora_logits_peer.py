"""Multi-LoRA logits vs PEFT: one flat batch mixing base rows and six different adapters.

Peer test at the model level. Our LlamaForCausalLM with a LoraManager attached runs ONE flat
ForwardBatch in which base-model rows (slot -1) and rows of six PEFT adapters (different ranks,
targets, rank/alpha patterns, rsLoRA, layers_to_transform, regex targets, AdaLoRA) sit side by
side, with prompts of different lengths on shuffled paged-KV blocks. Every computed row's float32
logits must match PEFT's logits for that row's own adapter on the same tokens (teacher forcing):
all prompt positions of the prefill step, then one decode step in a different row order that
reads the prefill's KV cache.

PEFT cannot mix LORA and ADALORA adapters in one model, so the reference is one PeftModel per
adapter, each run on its own rows. Adapter weights are random (PEFT's zero-initialised lora_B
would make every adapter a no-op and the test unable to fail), and the test checks that every
adapter really moves its logits far beyond the tolerance.

Run for two families (llama: GQA, untied; qwen3: q/k norms, head_dim != hidden/heads) and two
kernel backends ("reference", the float64 oracle, and "cpu", the production CPU path).
"""

from __future__ import annotations

import random

import pytest
import torch

from loraplex.config import LoraConfig
from loraplex.lora.manager import LoraManager
from loraplex.model.kv_cache import KVCache
from loraplex.model.loader import load_model
from loraplex_kernels import get_backend, set_backend
from tests.fixtures.adapters import ADAPTER_KINDS, make_peft_adapter
from tests.fixtures.paged_batches import BlockPool, PagedSeq, make_step

FAMILIES = ("llama", "qwen3")
BACKENDS = ("reference", "cpu")
KINDS = tuple(ADAPTER_KINDS)  # all six: qv_r4, all_r8_rslora, patterns_r6, regex_mlp_r5, layer1_r3, adalora
BLOCK_SIZE = 4
MAX_LORA_RANK = 16  # wider than every adapter: the slot padding beyond each rank must be ignored
# float32 logits of magnitude ~15: typical |ours - PEFT| is ~1e-5 per row, but a few ill-conditioned
# positions amplify rounding (the float64 oracle backend shows 4e-5 there, the float32 cpu backend
# 1.6e-4; in float64 both backends agree with each other exactly). Any real LoRA bug (lost adapter,
# wrong slot, scale or rank) moves logits by > MIN_LORA_EFFECT; MEAN_ATOL catches small systematic
# errors that hide under the per-element bound.
ATOL = 5e-4
MEAN_ATOL = 1e-5
MIN_LORA_EFFECT = 1.0  # every adapter must move its logits by at least this much (>> ATOL)

# (adapter kind or None for the base model, prompt length), in batch order. Two rows share
# all_r8_rslora and two share adalora (one slot, several segments of the flat batch); base rows sit
# between adapter rows; a 1-token prompt is in there too.
ROWS: tuple[tuple[str | None, int], ...] = (
    ("all_r8_rslora", 7),
    (None, 5),
    ("patterns_r6", 11),
    ("adalora", 3),
    ("qv_r4", 9),
    ("all_r8_rslora", 4),
    (None, 1),
    ("layer1_r3", 6),
    ("regex_mlp_r5", 8),
    ("adalora", 10),
)


def hf_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                attn_implementation="eager").eval()


def reference_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()  # [L, vocab]


@pytest.fixture(scope="module")
def peer_cases(tiny_model_dirs, tmp_path_factory):
    """family -> (base dir, adapter root, per-row tokens, per-row PEFT logits [L+1, vocab], base logits).

    Row r's tokens are its random prompt plus the token PEFT's own greedy choice would decode next,
    so the decode step feeds the token a real generation with that adapter would feed.
    """
    from peft import PeftModel

    cases = {}
    for fam_idx, family in enumerate(FAMILIES):
        base_dir = tiny_model_dirs[family]
        root = tmp_path_factory.mktemp(f"peer_adapters_{family}")
        for i, kind in enumerate(KINDS):
            make_peft_adapter(base_dir, root / kind, kind, seed=10 * fam_idx + i)
        base = hf_base(base_dir)
        vocab = base.config.vocab_size
        rng = random.Random(100 + fam_idx)
        prompts = [[rng.randrange(vocab) for _ in range(n)] for _, n in ROWS]
        models = {None: base}
        for kind in sorted({k for k, _ in ROWS if k is not None}):
            models[kind] = PeftModel.from_pretrained(hf_base(base_dir), str(root / kind)).eval()
        tokens, logits, base_logits = [], [], []
        for (kind, _), prompt in zip(ROWS, prompts):
            m = models[kind]
            nxt = int(reference_logits(m, prompt)[-1].argmax())
            full = prompt + [nxt]
            tokens.append(full)
            logits.append(reference_logits(m, full))  # [L + 1, vocab]
            base_logits.append(reference_logits(base, full))
        cases[family] = (base_dir, root, tokens, logits, base_logits)
    return cases


@pytest.fixture(params=BACKENDS)
def kernel_backend(request):
    previous = get_backend()
    set_backend(request.param)
    try:
        yield request.param
    finally:
        set_backend(previous)


def garbage_cache(loaded, num_blocks: int = 64) -> KVCache:
    arch = loaded.arch
    kv = KVCache.allocate(arch.num_layers, num_blocks, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim,
                          loaded.dtype, loaded.device)
    # Finite garbage, not zeros: reading a wrong block or past a context must change logits.
    for t in kv.k + kv.v:
        t.copy_(torch.randn_like(t) * 3)
    return kv


def run_step(model, kv, pool, manager, work, slot_of, logits="all"):
    """One flat step; work = [(seq, n_tokens)], slot_of[id(seq)] = adapter slot or -1."""
    batch, rows = make_step(pool, work, logits=logits)
    seq_slots = [slot_of[id(seq)] for seq, _ in work]
    token_slots = torch.repeat_interleave(torch.tensor(seq_slots, dtype=torch.int64),
                                          torch.tensor([n for _, n in work], dtype=torch.int64))  # [T]
    batch.lora = manager.build_lora_batch(token_slots, torch.tensor(seq_slots, dtype=torch.int64))
    return model(batch, kv), rows


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_adapter_batch_matches_peft(peer_cases, family, kernel_backend):
    base_dir, root, tokens, want_logits, base_logits = peer_cases[family]
    assert get_backend() == kernel_backend
    loaded = load_model(base_dir, torch.float32, "cpu")
    manager = LoraManager(
        LoraConfig(max_loras=8, max_lora_rank=MAX_LORA_RANK, max_cpu_loras=8, allowed_roots=(str(root),)),
        loaded.model, torch.float32, "cpu")
    # Load and place in an order unrelated to the batch order, so slot numbers are shuffled too.
    kinds = sorted({k for k, _ in ROWS if k is not None}, reverse=True)
    slot_by_kind = {}
    for kind in kinds:
        manager.load(kind, root / kind)
        manager.reserve(kind)
        slot_by_kind[kind] = manager.acquire(kind)
    assert sorted(slot_by_kind.values()) == list(range(len(kinds)))

    seqs = [PagedSeq(list(t)) for t in tokens]
    slot_of = {id(s): (-1 if kind is None else slot_by_kind[kind]) for s, (kind, _) in zip(seqs, ROWS)}
    want_by_seq = {id(s): w for s, w in zip(seqs, want_logits)}
    base_by_seq = {id(s): b for s, b in zip(seqs, base_logits)}
    kind_by_seq = {id(s): kind for s, (kind, _) in zip(seqs, ROWS)}
    pool = BlockPool(64, BLOCK_SIZE, seed=3)
    kv = garbage_cache(loaded)

    # Prefill every prompt in one flat batch, logits for every token row.
    ours, rows = run_step(loaded.model, kv, pool, manager, [(s, len(s.tokens) - 1) for s in seqs], slot_of)
    # Decode the next token of every sequence, in another row order, against the paged KV cache.
    order = [seqs[i] for i in (4, 9, 1, 0, 7, 3, 6, 2, 8, 5)]
    ours_dec, rows_dec = run_step(loaded.model, kv, pool, manager, [(s, 1) for s in order], slot_of,
                                  logits="last")
    ours = torch.cat([ours, ours_dec])
    rows = rows + rows_dec
    assert ours.dtype == torch.float32 and ours.shape[0] == sum(len(t) for t in tokens)

    want_all = torch.stack([want_by_seq[id(seq)][pos] for seq, pos in rows])  # [rows, vocab]
    mean_err = (ours - want_all).abs().mean().item()
    assert mean_err < MEAN_ATOL, f"{family}/{kernel_backend}: mean |ours - PEFT| = {mean_err:.3g}"
    for i, (seq, pos) in enumerate(rows):
        kind = kind_by_seq[id(seq)]
        want = want_all[i]
        step = "prefill" if i < len(rows) - len(rows_dec) else "decode"
        torch.testing.assert_close(ours[i], want, atol=ATOL, rtol=0,
                                   msg=lambda m: f"{family}/{kernel_backend}: {step} row of "
                                                 f"{kind or 'base'} at position {pos}: {m}")
    # The comparison above could not tell a lost adapter from a working one unless every adapter
    # really changes its rows' logits.
    for seq, (kind, _) in zip(seqs, ROWS):
        if kind is not None:
            effect = (want_by_seq[id(seq)] - base_by_seq[id(seq)]).abs().max().item()
            assert effect > MIN_LORA_EFFECT, f"{kind} barely changes the logits ({effect:.2g})"
