"""--quantize-embeddings: the embedding table (and lm_head) kept in 4 bits (model/quantized_embedding.py).

On tiny random Llamas (hidden 128: each embedding row is two whole 64-element blocks), tied and
untied, loaded with nf4 projections + 4-bit embeddings:
- lookup: rows equal, bit for bit, bitsandbytes' own dequantize_4bit of the WHOLE table indexed
  by the ids (random ids with the first and last id and repeats; nf4/fp4, with and without double
  quantization; a >4096-row table so the tied lm_head's vocab chunking is exercised too);
- whole-model logits vs a float64 model whose embedding / lm_head / projections are the
  dequantized 4-bit weights (so only arithmetic differs, not the weights). On a CPU with
  AVX512-BF16, bitsandbytes' Linear4bit forward (projections, untied lm_head) repacks its weight on
  first use into a layout whose block scales are rounded to bfloat16, and computes in bfloat16
  whatever the compute dtype: the effective weights and the activations are both bfloat16-rounded
  at every projection. Measured on this tiny model vs the float64 reference: max |diff| 0.49 with
  nf4 projections only and 0.66 with 4-bit embeddings too, mean 0.07 in both, on logits of std 6.8 /
  max 26; 1 of 24 greedy choices flips. So the exact check runs with that fast path switched off
  (`support_avx512bf16_for_cpu = False` on each Linear4bit, an attribute bitsandbytes reads on every
  forward: the plain path dequantizes in float32 then matmuls, as on a CPU without AVX512-BF16):
  there, ATOL 1e-3 on float32 logits of magnitude ~26 (measured <= 5e-5) and every greedy choice equal. The default
  (bfloat16) path is checked separately: its error with 4-bit embeddings stays at the level of the
  projections-only nf4 model's (the 4-bit table lookup adds no arithmetic error; the tied lm_head
  is a float32 matmul, checked alone at 1e-4). The 4-bit embeddings must really change the logits
  vs the projections-only nf4 model;
- a tied model's lm_head holds no second copy (the chunks are views of the table's storage, no
  float [vocab, hidden] tensor anywhere) and resident bytes drop by exactly the float table minus
  its 4-bit form; float16_weight_bytes is unchanged;
- refusal without a 4-bit method (ModelConfig, QuantSpec, the CLI) and of a hidden size that is
  not a multiple of the blocksize;
- a PEFT LoRA adapter on top: logits of a mixed batch equal the float64 reference with the adapter
  merged into the dequantized weights, and the engine's greedy tokens equal the reference's.
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from loraplex.config import LoraConfig, ModelConfig
from loraplex.lora.manager import LoraManager
from loraplex.model.kv_cache import KVCache
from loraplex.model.loader import load_model
from loraplex.model.quantize import (QuantSpec, float16_bytes, float16_weight_bytes, quantization_for,
                                     quantized_bytes)
from loraplex.model.quantized_embedding import LM_HEAD_CHUNK_ROWS, QuantizedEmbedding
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.engine_run import engine_greedy
from tests.fixtures.paged_batches import BlockPool, PagedSeq, make_step
from tests.fixtures.tiny_models import make_tiny_model

BLOCK_SIZE = 4
ATOL = 1e-3  # float32 logits of magnitude ~25, bitsandbytes' bfloat16 fast path off (module docstring)
MEAN_ATOL = 1e-4
BF16_RATIO = 2.0  # default path: error with 4-bit embeddings <= 2x the projections-only nf4 model's
LM_HEAD_ATOL = 1e-4  # tied lm_head alone: float32 rounding only
MIN_EMBED_EFFECT = 1e-2  # 4-bit embeddings must change the logits vs nf4 projections only
ADAPTER = "qv_r4"  # r=4, lora_alpha=8 on q_proj/v_proj: scale 2
ADAPTER_SCALE = 8 / 4
PROMPT_LENS = (7, 5, 9, 3)

pytestmark = pytest.mark.skipif(not {"nf4", "fp4"} <= set(quantization_for("cpu")),
                                reason="bitsandbytes 4-bit CPU kernels missing")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qemb")
    out = {}
    for tied in (True, False):
        base = make_tiny_model(root / f"tied_{tied}", family="llama", seed=5, hidden_size=128,
                               intermediate_size=256, tie_word_embeddings=tied)
        out[tied] = (base, make_peft_adapter(base, root / f"adapter_{tied}", ADAPTER, seed=41))
    return out


def spec(method: str = "nf4", double_quant: bool = False, embeddings: bool = True) -> QuantSpec:
    return QuantSpec(method, torch.float32, double_quant=double_quant, embeddings=embeddings)


def full_table(module) -> torch.Tensor:
    """The whole 4-bit weight dequantized by bitsandbytes itself (the independent reference)."""
    from bitsandbytes.functional import dequantize_4bit

    qs = module.weight.quant_state
    assert not getattr(qs, "packing_format_for_cpu", False), "read before the first forward repacks it"
    return dequantize_4bit(module.weight.data, qs)  # [out, in]


def random_ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    ids = [0, vocab - 1, 3, 3] + [rng.randrange(vocab) for _ in range(n - 4)]
    rng.shuffle(ids)
    return torch.tensor(ids).view(2, -1)  # 2-D: lookups keep any leading shape


@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("method", ("nf4", "fp4"))
def test_lookup_equals_bitsandbytes_full_dequantize(method, double_quant):
    """A table above one lm_head chunk (2 chunks, the last of 4 rows), model dtype float32 and bf16."""
    vocab = LM_HEAD_CHUNK_ROWS + 4
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        weight = (torch.randn(vocab, 128, generator=gen) * 0.1).to(dtype)  # [vocab, hidden]
        table = QuantizedEmbedding(weight, method, double_quant, "cpu")
        assert table.quant_state.nested == double_quant and table.quant_state.quant_type == method
        full = full_table(table)  # [vocab, hidden]
        ids = random_ids(vocab, 40, seed=1)
        got = table(ids)
        assert got.dtype == dtype and got.shape == (*ids.shape, 128)
        assert torch.equal(got, full[ids]), f"{method} dq={double_quant} {dtype}: lookup != full dequantize"
        assert (full.float() - weight.float()).abs().max() > 1e-3  # really quantized
        # The tied lm_head over both chunks: the same table, float32 rounding (bf16 for a bf16 x).
        x = torch.randn(5, 128, generator=gen).to(dtype)  # [S, hidden]
        want = x.double() @ full.double().T  # [S, vocab]
        tol = LM_HEAD_ATOL if dtype == torch.float32 else 0.05
        assert (table.project(x).double() - want).abs().max().item() < tol


def test_hidden_not_a_multiple_of_the_blocksize_is_refused():
    with pytest.raises(ValueError, match=r"hidden size 96 is not a multiple of the 4-bit blocksize 64"):
        QuantizedEmbedding(torch.randn(10, 96), "nf4", False, "cpu")


@pytest.mark.parametrize("tied", (True, False), ids=("tied", "untied"))
def test_model_lookup_is_exact(models, tied):
    base, _ = models[tied]
    for double_quant in (False, True):
        loaded = load_model(base, torch.float32, "cpu", spec(double_quant=double_quant))
        embed = loaded.model.model.embed_tokens
        assert isinstance(embed, QuantizedEmbedding) and embed.quant_state.nested == double_quant
        ids = random_ids(loaded.arch.vocab_size, 64, seed=2)
        assert torch.equal(embed(ids), full_table(embed)[ids])


def _dequantized_reference(loaded, base, adapter=None, embeddings=True) -> torch.nn.Module:
    """float64 model with the 4-bit model's weights dequantized (before its first forward, which
    repacks Linear4bit weights on AVX512-BF16 CPUs); with `adapter`, its LoRA merged in float64."""
    ref = load_model(base, torch.float64, "cpu").model
    q = loaded.model
    with torch.no_grad():
        for (_, _, qp), (_, _, rp) in zip(q.iter_projections(), ref.iter_projections()):
            rp.base.weight.copy_(full_table(qp.base))
        if embeddings:
            ref.model.embed_tokens.weight.copy_(full_table(q.model.embed_tokens))
        if embeddings and q.lm_head is not None:
            ref.lm_head.weight.copy_(full_table(q.lm_head))
        if adapter is not None:
            tensors = load_file(str(adapter / "adapter_model.safetensors"))
            merged = 0
            for name, p in ref.named_modules():
                a = tensors.get(f"base_model.model.{name}.lora_A.weight")  # [r, in]
                if a is not None:
                    b = tensors[f"base_model.model.{name}.lora_B.weight"]  # [out, r]
                    p.base.weight += ADAPTER_SCALE * (b.double() @ a.double())
                    merged += 1
            assert merged == 2 * loaded.arch.num_layers  # q_proj and v_proj of every layer
    return ref


def _float32_bnb(model: torch.nn.Module) -> torch.nn.Module:
    """Switch bitsandbytes' AVX512-BF16 repack-and-compute-in-bfloat16 path off (before the first
    forward): Linear4bit then dequantizes in float32 and matmuls in float32."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def _forward(model, batch, dtype):
    arch = model.arch
    kv = KVCache.allocate(arch.num_layers, 64, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim, dtype, "cpu")
    return model(batch, kv)  # [T, vocab] float32


def _batch(vocab: int, seed: int):
    rng = random.Random(seed)
    seqs = [PagedSeq([rng.randrange(vocab) for _ in range(n)]) for n in PROMPT_LENS]
    batch, _ = make_step(BlockPool(64, BLOCK_SIZE, seed=seed), [(s, len(s.tokens)) for s in seqs], logits="all")
    return batch


def _assert_close(ours, want, what):
    err = (ours.double() - want.double()).abs()
    print(f"{what}: max {err.max().item():.3g}, mean {err.mean().item():.3g}, |logits| max {want.abs().max():.3g}")
    assert err.max().item() < ATOL, f"{what}: max |ours - float64 reference| = {err.max().item():.3g}"
    assert err.mean().item() < MEAN_ATOL, f"{what}: mean |ours - float64 reference| = {err.mean().item():.3g}"
    assert torch.equal(ours.argmax(-1), want.argmax(-1)), f"{what}: a greedy choice differs"


@pytest.mark.parametrize("tied", (True, False), ids=("tied", "untied"))
def test_logits_match_float64_dequantized_reference(models, tied):
    base, _ = models[tied]
    loaded = load_model(base, torch.float32, "cpu", spec())
    ref = _dequantized_reference(loaded, base)
    batch = _batch(loaded.arch.vocab_size, seed=7)
    ours = _forward(_float32_bnb(loaded.model), batch, torch.float32)
    want = _forward(ref, batch, torch.float64)
    _assert_close(ours, want, "tied" if tied else "untied")
    if tied:  # the tied lm_head alone: same final hidden rows, float32 vs float64 matmul
        x = torch.randn(6, loaded.arch.hidden_size, generator=torch.Generator().manual_seed(4))
        lm = loaded.model.output_logits(x).double()
        assert (lm - x.double() @ ref.model.embed_tokens.weight.T).abs().max().item() < LM_HEAD_ATOL
    # The flag must change the model: 4-bit embeddings vs the nf4-projections-only model.
    proj_only = load_model(base, torch.float32, "cpu", spec(embeddings=False))
    proj_ref = _dequantized_reference(proj_only, base, embeddings=False)
    proj_logits = _forward(_float32_bnb(proj_only.model), batch, torch.float32)
    assert (proj_logits - ours).abs().max().item() > MIN_EMBED_EFFECT
    # Default (bfloat16) bitsandbytes path: no worse than the projections-only nf4 model is.
    fast = load_model(base, torch.float32, "cpu", spec())
    fast_err = (_forward(fast.model, batch, torch.float32).double() - want).abs()
    fast_proj = load_model(base, torch.float32, "cpu", spec(embeddings=False))
    proj_err = (_forward(fast_proj.model, batch, torch.float32).double() - _forward(proj_ref, batch, torch.float64)).abs()
    print(f"bfloat16 path: max {fast_err.max():.3g} / mean {fast_err.mean():.3g} with 4-bit embeddings, "
          f"{proj_err.max():.3g} / {proj_err.mean():.3g} projections only")
    assert fast_err.max() <= BF16_RATIO * proj_err.max() and fast_err.mean() <= BF16_RATIO * proj_err.mean()


@pytest.mark.parametrize("tied", (True, False), ids=("tied", "untied"))
def test_no_float_table_and_resident_bytes(models, tied):
    base, _ = models[tied]
    loaded = load_model(base, torch.float32, "cpu", spec())
    proj_only = load_model(base, torch.float32, "cpu", spec(embeddings=False))
    model, arch = loaded.model, loaded.arch
    vocab, hidden = arch.vocab_size, arch.hidden_size
    embed = model.model.embed_tokens
    # No float tensor of the table's size anywhere in the model (parameters or buffers).
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert not (t.is_floating_point() and t.numel() >= vocab * hidden // 2), f"float table left: {name}"
    if tied:
        assert model.lm_head is None
        storage = embed.weight.untyped_storage().data_ptr()
        absmax = embed.quant_state.absmax.untyped_storage().data_ptr()
        for _, _, data, state in embed._lm_head_chunks:  # noqa: SLF001 - the point of the test
            assert data.untyped_storage().data_ptr() == storage  # a view of the table, not a copy
            assert state.absmax.untyped_storage().data_ptr() == absmax
        logits = model.output_logits(torch.randn(3, hidden))
        assert logits.shape == (3, vocab)
        assert embed.weight.untyped_storage().data_ptr() == storage  # not repacked by the matmul
    else:
        assert type(model.lm_head).__name__ == "Linear4bit"
    # Each float32 table ([vocab, hidden] x 4 B) becomes packed codes (1/2 B per weight) + one
    # float32 scale per 64 weights + the 16-entry float32 code table.
    tables = 1 if tied else 2
    four_bit = vocab * hidden // 2 + vocab * hidden // 64 * 4 + 16 * 4
    drop = quantized_bytes(proj_only.model) - quantized_bytes(model)
    assert drop == tables * (vocab * hidden * 4 - four_bit), (drop, tables, four_bit)
    assert float16_weight_bytes(model) == float16_weight_bytes(proj_only.model) == float16_bytes(arch)
    assert quantized_bytes(model) <= 0.3 * float16_bytes(arch)
    # GetModelInfo reports the flag and the bytes (engine fields stubbed: only the model matters).
    from loraplex.api.convert import model_info_to_proto
    from tests.fixtures.fake_engine import fake_engine

    engine = fake_engine()
    info, plain = model_info_to_proto(loaded, engine), model_info_to_proto(proj_only, engine)
    assert (info.quantized_embeddings, plain.quantized_embeddings) == (True, False)
    assert info.base_weight_bytes == quantized_bytes(model) and info.float16_weight_bytes == float16_bytes(arch)


def test_refused_without_a_4bit_method(models, tmp_path):
    from loraplex import cli

    for method in ("auto", "none", "int8"):
        with pytest.raises(ValueError, match=r"quantize_embeddings: needs a 4-bit method, --quantize nf4 or fp4 "
                                             rf"\(got '{method}'\)"):
            ModelConfig(quantize=method, quantize_embeddings=True)
    assert ModelConfig(quantize="fp4", quantize_embeddings=True).quantize_embeddings
    from loraplex.model.quantize import spec_from_config
    assert spec_from_config(ModelConfig(quantize="nf4", quantize_embeddings=True), "cpu") == \
        QuantSpec("nf4", embeddings=True)
    assert not spec_from_config(ModelConfig(quantize="nf4"), "cpu").embeddings
    assert not ModelConfig().quantize_embeddings
    with pytest.raises(ValueError, match=r"quantize_embeddings: needs a 4-bit method .* 'int8'"):
        QuantSpec("int8", embeddings=True)
    with pytest.raises(ValueError, match=r"quantize_embeddings: needs a 4-bit method"):
        load_model(models[True][0], torch.float32, "cpu", QuantSpec(embeddings=True))
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--quantize", "nf4", "--quantize-embeddings"])
    assert cli._server_config(args).model.quantize_embeddings  # noqa: SLF001
    assert not cli._server_config(parser.parse_args(["serve", "--quantize", "nf4"])).model.quantize_embeddings
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--quantize", "int8", "--quantize-embeddings"])
    assert exit_info.value.code == 2


def test_cli_refusal_message(capsys):
    from loraplex import cli

    with pytest.raises(SystemExit):
        cli.main(["serve", "--quantize-embeddings"])  # --quantize auto
    err = capsys.readouterr().err
    assert "quantize_embeddings: needs a 4-bit method, --quantize nf4 or fp4 (got 'auto')" in err


def _reference_greedy(model, prompt, n):
    arch = model.arch
    pool = BlockPool(64, BLOCK_SIZE, seed=3)
    kv = KVCache.allocate(arch.num_layers, 64, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim, torch.float64, "cpu")
    seq = PagedSeq(list(prompt))
    work = len(prompt)
    for _ in range(n):
        batch, _ = make_step(pool, [(seq, work)], logits="last")
        seq.tokens.append(int(model(batch, kv)[0].argmax()))
        work = 1
    return seq.tokens[len(prompt):]


@pytest.mark.parametrize("tied", (True, False), ids=("tied", "untied"))
def test_lora_adapter_on_top(models, tied):
    base, adapter = models[tied]
    loaded = load_model(base, torch.float32, "cpu", spec())
    ref_base = _dequantized_reference(loaded, base)
    ref_lora = _dequantized_reference(loaded, base, adapter)
    _float32_bnb(loaded.model)  # float32-level comparison (module docstring)
    manager = LoraManager(LoraConfig(max_loras=2, max_lora_rank=8, max_cpu_loras=2,
                                     allowed_roots=(str(adapter.parent),)), loaded.model, loaded.dtype, "cpu")
    manager.load(ADAPTER, adapter)
    manager.reserve(ADAPTER)
    slot = manager.acquire(ADAPTER)
    # One flat batch: sequences 0 and 2 use the adapter, 1 and 3 the base model.
    batch = _batch(loaded.arch.vocab_size, seed=9)
    seq_slots = torch.tensor([slot, -1, slot, -1])
    batch.lora = manager.build_lora_batch(torch.repeat_interleave(seq_slots, torch.tensor(PROMPT_LENS)), seq_slots)
    ours = _forward(loaded.model, batch, torch.float32)
    batch.lora = None
    with_lora, without = _forward(ref_lora, batch, torch.float64), _forward(ref_base, batch, torch.float64)
    rows = torch.repeat_interleave(seq_slots >= 0, torch.tensor(PROMPT_LENS))  # [T] adapter rows
    want = torch.where(rows[:, None], with_lora, without)
    _assert_close(ours, want, f"{'tied' if tied else 'untied'} + LoRA")
    assert (with_lora - without)[rows].abs().max().item() > 1.0  # the adapter matters
    manager.release(ADAPTER)
    # Engine greedy tokens (adapter and base requests in the same steps) = the float64 references'.
    tok = loaded.tokenizer
    prompts = [tok("The quick brown fox")["input_ids"], tok("Once upon a time")["input_ids"]]
    n = 8
    got = engine_greedy(loaded, manager, {0: (ADAPTER, prompts[0]), 1: ("", prompts[1]),
                                           2: (ADAPTER, prompts[1])}, n, block_size=BLOCK_SIZE, timeout_s=60)
    want_tokens = {0: _reference_greedy(ref_lora, prompts[0], n), 1: _reference_greedy(ref_base, prompts[1], n),
                   2: _reference_greedy(ref_lora, prompts[1], n)}
    for key, (tokens, error) in got.items():
        assert error in (None, ""), error
        assert tokens == want_tokens[key], f"request {key}: ours {tokens} vs float64 reference {want_tokens[key]}"
    assert want_tokens[1] != want_tokens[2]  # the adapter changes the tokens


def test_prequantized_folder_gets_4bit_embeddings(models, tmp_path):
    """A folder transformers saved in nf4 (float embeddings): --quantize-embeddings quantizes its
    table at load; the projections stay the folder's tensors, bit for bit."""
    from tests.test_prequantized import save_quantized

    base, _ = models[True]
    folder = save_quantized(base, tmp_path / "nf4", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype=torch.float32))
    plain = load_model(folder, torch.float32, "cpu", QuantSpec("nf4", torch.float32, requested="nf4"))
    loaded = load_model(folder, torch.float32, "cpu", QuantSpec("nf4", torch.float32, requested="nf4", embeddings=True))
    assert loaded.quant.prequantized and loaded.quant.embeddings
    embed = loaded.model.model.embed_tokens
    assert isinstance(embed, QuantizedEmbedding) and isinstance(plain.model.model.embed_tokens, torch.nn.Embedding)
    q_proj = loaded.model.model.layers[0].self_attn.q_proj.base.weight
    assert torch.equal(q_proj.data, plain.model.model.layers[0].self_attn.q_proj.base.weight.data)
    ids = random_ids(loaded.arch.vocab_size, 32, seed=5)
    assert torch.equal(embed(ids), full_table(embed)[ids])
    assert quantized_bytes(loaded.model) < quantized_bytes(plain.model)
    assert float16_weight_bytes(loaded.model) == float16_weight_bytes(plain.model)
