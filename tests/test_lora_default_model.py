"""Multi-LoRA on the embedded default model (SmolLM2-135M-Instruct) vs PEFT, in float32.

Three PEFT adapters are made on the converted default model with random weights of small std (the
answers stay sane, the logits still move by whole units): rank 8 on q/k/v/o; rsLoRA rank 4 on
all linear layers; and one with rank_pattern/alpha_pattern overrides (a smaller rank for v_proj,
a larger one for one layer's down_proj, another alpha for up_proj). One batch mixes a base-model
row and rows of every adapter (one adapter on two rows), with different chat prompts. Checked:
  - our logits vs PEFT's at every prompt position of the prefill and at each decode step;
  - 16 greedy tokens per row identical to PEFT's own greedy loop (EOS ignored on both sides).

The default model comes from conftest.py's session fixture `default_model_dir`: converted once per
session (~35 s) in a temp dir, or reused from $LORAPLEX_CACHE_DIR when set.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.config import LoraConfig
from loraplex.lora.manager import LoraManager
from loraplex.model.kv_cache import KVCache
from loraplex.model.loader import load_model
from tests.fixtures.paged_batches import BlockPool, PagedSeq, make_step

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

ADAPTERS: dict[str, dict] = {
    "qkvo_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all_r4_rslora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    "patterns_r8": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                        rank_pattern={"v_proj": 2, "layers.5.mlp.down_proj": 12},
                        alpha_pattern={"up_proj": 24}),
}
WEIGHT_STD = 0.02  # on both A and B: logits move by a few units, greedy answers stay sane
QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do I bake bread?",
    "Name three prime numbers.",
)
# (adapter or None for the base model, question index); qkvo_r8 serves two rows.
ROWS = ((None, 0), ("qkvo_r8", 1), ("all_r4_rslora", 2), ("patterns_r8", 3), ("qkvo_r8", 0))
NEW_TOKENS = 16
BLOCK_SIZE = 16
# 30 layers of float32 with logits up to ~40: rounding between the two implementations measured < 1e-4;
# a wrong scale/rank/target moves logits by whole units (MIN_LORA_EFFECT).
ATOL = 5e-4
MIN_LORA_EFFECT = 0.5


def hf_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapter_dirs(default_model_dir, tmp_path_factory) -> dict[str, Path]:
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("default_model_adapters")
    gen = torch.Generator().manual_seed(1234)
    for name, spec in ADAPTERS.items():
        model = get_peft_model(hf_base(default_model_dir),
                               PeftLoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **spec))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:  # lora_B starts at zero in PEFT: randomise both A and B
                    p.copy_(torch.randn(p.shape, generator=gen) * WEIGHT_STD)
        model.save_pretrained(str(root / name))
    return {name: root / name for name in ADAPTERS}


@pytest.fixture(scope="module")
def prompts(default_model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    return [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)) for q in QUESTIONS]


def peft_greedy(model, prompt: list[int]) -> tuple[list[int], torch.Tensor, list[torch.Tensor]]:
    """PEFT's greedy loop with its own KV cache: (new tokens, prompt logits [L, V], step logits)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        prompt_logits = out.logits[0].float()  # [L, vocab]
        step_logits = [prompt_logits[-1]]
        tokens = [int(step_logits[-1].argmax())]
        past = out.past_key_values
        for _ in range(NEW_TOKENS - 1):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            step_logits.append(out.logits[0, -1].float())
            tokens.append(int(step_logits[-1].argmax()))
    return tokens, prompt_logits, step_logits


@pytest.fixture(scope="module")
def peft_reference(default_model_dir, adapter_dirs, prompts):
    """Per row: PEFT's greedy tokens, prompt logits and per-step logits; plus base prompt logits."""
    from peft import PeftModel

    base = hf_base(default_model_dir)
    models = {None: base}
    for name, folder in adapter_dirs.items():
        models[name] = PeftModel.from_pretrained(hf_base(default_model_dir), str(folder)).eval()
    rows = [peft_greedy(models[kind], prompts[q]) for kind, q in ROWS]
    with torch.no_grad():
        base_logits = [base(input_ids=torch.tensor([prompts[q]])).logits[0].float() for _, q in ROWS]
    return rows, base_logits


def test_mixed_adapter_batch_matches_peft_on_the_default_model(
        default_model_dir, adapter_dirs, prompts, peft_reference):
    reference, base_logits = peft_reference
    loaded = load_model(default_model_dir, torch.float32, "cpu")
    manager = LoraManager(
        LoraConfig(max_loras=4, max_lora_rank=16, max_cpu_loras=4,
                   allowed_roots=(str(next(iter(adapter_dirs.values())).parent),)),
        loaded.model, torch.float32, "cpu")
    slots = {}
    for name, folder in adapter_dirs.items():
        manager.load(name, folder)
        manager.reserve(name)
        slots[name] = manager.acquire(name)
    row_slots = [-1 if kind is None else slots[kind] for kind, _ in ROWS]

    arch = loaded.arch
    kv = KVCache.allocate(arch.num_layers, 64, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim,
                          torch.float32, "cpu")
    pool = BlockPool(64, BLOCK_SIZE, seed=5)
    seqs = [PagedSeq(list(prompts[q])) for _, q in ROWS]

    def step(work, logits):
        batch, _ = make_step(pool, work, logits=logits)
        token_slots = torch.repeat_interleave(torch.tensor(row_slots), torch.tensor([n for _, n in work]))
        batch.lora = manager.build_lora_batch(token_slots, torch.tensor(row_slots))
        return loaded.model(batch, kv)

    # Prefill: every prompt position of every row against PEFT's prompt logits.
    out = step([(s, len(s.tokens)) for s in seqs], logits="all")  # [sum L, vocab]
    start = 0
    generated = [[] for _ in ROWS]
    for i, ((kind, _), seq) in enumerate(zip(ROWS, seqs)):
        n = len(seq.tokens)
        want = reference[i][1]
        torch.testing.assert_close(out[start:start + n], want, atol=ATOL, rtol=0,
                                   msg=lambda m: f"prefill of row {i} ({kind or 'base'}): {m}")
        if kind is not None:
            effect = (want - base_logits[i]).abs().max().item()
            assert effect > MIN_LORA_EFFECT, f"{kind} barely moves the logits ({effect:.3g})"
        generated[i].append(int(out[start + n - 1].argmax()))
        start += n

    # Greedy decode, all rows in one batch per step; EOS is not a stop here (16 tokens each).
    for t in range(1, NEW_TOKENS):
        for seq, toks in zip(seqs, generated):
            seq.tokens.append(toks[-1])
        out = step([(s, 1) for s in seqs], logits="last")  # [rows, vocab]
        for i, (kind, _) in enumerate(ROWS):
            want_tokens = reference[i][0]
            if generated[i] == want_tokens[:t]:  # same context as PEFT's: the logits must match too
                torch.testing.assert_close(out[i], reference[i][2][t], atol=ATOL, rtol=0,
                                           msg=lambda m: f"decode step {t}, row {i} ({kind or 'base'}): {m}")
            generated[i].append(int(out[i].argmax()))

    tok = loaded.tokenizer
    for i, (kind, _) in enumerate(ROWS):
        assert generated[i] == reference[i][0], (
            f"row {i} ({kind or 'base'}): ours {tok.decode(generated[i])!r} vs PEFT {tok.decode(reference[i][0])!r}")
