"""Folders that transformers saved already quantized with bitsandbytes load as they are (peer test).

transformers quantizes a tiny random Llama on CPU with BitsAndBytesConfig (nf4, fp4, each with and
without double quantization; int8 with outlier threshold 0 and 6; nf4 with llm_int8_skip_modules)
and save_pretrained()s it. Our loader reads that folder; transformers loads the same folder as the
reference. Checked:
- every projection holds exactly the saved tensors (packed codes, absmax, code tables, nested
  state; int8 CB/SCB) — bit for bit equal to transformers' layers, with no float weight anywhere;
- base-model logits of one sequence equal transformers' within TIGHT_ATOL (1e-4 on float32 logits
  of magnitude ~25; measured 0.0: same weights, same bitsandbytes kernels, and one sequence means
  the same int8 outlier columns on both sides);
- a flat batch mixing base rows and three PEFT adapters equals transformers + PEFT on the same
  folder row by row. Here the tolerance is test_quantize.py's, for the reason given there: on
  this CPU bitsandbytes' 4-bit matmul rounds activations to bfloat16, so float32-level
  differences upstream (our LoRA kernel vs PEFT's two matmuls) flip a few bfloat16 roundings
  (4-bit: max 0.3, mean 1e-2; int8 at threshold 0: 1e-3); greedy choices must agree on every row;
- conflicts: --quantize with another method than the folder's (none included) or --double-quant on
  a folder without it stops loading with a message; a non-bitsandbytes quantization_config (gptq)
  is refused naming it; a quantized lm_head, or a folder that disagrees with its own skip list,
  is refused naming the module;
- ModelInfo.float16_weight_bytes: the same for the float, on-the-fly nf4 and folder nf4/int8 loads,
  and equal to 2 x transformers' own parameter count.
Hidden 128 / intermediate 256: every weight is a whole number of 64-element 4-bit blocks.
"""

from __future__ import annotations

import json
import random
import shutil
import types

import pytest
import torch

from loraplex.config import ModelConfig
from loraplex.model.kv_cache import KVCache
from loraplex.model.loader import load_model
from loraplex.model.prequantized import PrequantizedConflictError
from loraplex.model.quantize import (QuantSpec, float16_bytes, float16_weight_bytes, quantization_for,
                                     quantized_bytes, spec_from_config)
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.paged_batches import BlockPool, PagedSeq, make_step
from tests.fixtures.tiny_models import make_tiny_model
from tests.test_quantize import (ATOL, BLOCK_SIZE, KINDS, MEAN_ATOL, MIN_QUANT_EFFECT, ROWS, logits_of,
                                 manager_for)

TIGHT_MEAN_ATOL = 2e-3  # mean |diff| of one base-only sequence (measured <= 1e-3)
SKIP = ["lm_head", "down_proj", "model.layers.1.self_attn"]  # prefix, suffix and transformers' default
VARIANTS = {  # name -> BitsAndBytesConfig kwargs
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "nf4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                   bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "fp4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32,
                   bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True, llm_int8_threshold=0.0),  # pure int8: batch-independent
    "int8_t6": dict(load_in_8bit=True),  # LLM.int8() default outlier threshold 6.0
    "nf4_skip": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                     llm_int8_skip_modules=SKIP),
}
METHOD = {"nf4": "nf4", "nf4_dq": "nf4", "fp4": "fp4", "fp4_dq": "fp4", "int8": "int8", "int8_t6": "int8",
          "nf4_skip": "nf4"}


def _skipped(name: str) -> bool:
    return name.endswith("down_proj") or name.startswith("model.layers.1.self_attn.")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The float base, three PEFT adapters, and a lazily built saved folder per variant."""
    assert {"nf4", "fp4", "int8"} <= set(quantization_for("cpu")), "bitsandbytes CPU kernels missing"
    root = tmp_path_factory.mktemp("prequant")
    base = make_tiny_model(root / "base", family="llama", seed=5, hidden_size=128, intermediate_size=256)
    for i, kind in enumerate(KINDS):
        make_peft_adapter(base, root / "adapters" / kind, kind, seed=40 + i)
    saved = {}

    def folder(variant: str, **extra):
        key = (variant, repr(sorted(extra.items())))
        if key not in saved:
            saved[key] = save_quantized(base, root / f"{variant}_{len(saved)}", {**VARIANTS[variant], **extra})
        return saved[key]

    return types.SimpleNamespace(base=base, adapters=root / "adapters", folder=folder)


def save_quantized(base, out, kwargs, **save_kwargs):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    m = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=BitsAndBytesConfig(**kwargs),
                                             device_map="cpu", dtype=torch.float32)
    m.save_pretrained(out, **save_kwargs)
    for f in base.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


def hf_from_folder(folder, adapter=None):
    """transformers' model for the saved folder (its quantization_config applies), PEFT on top."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu", attn_implementation="eager")
    if adapter is not None:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, str(adapter))
    return m.eval()


def one_sequence_logits(loaded, prompt):
    arch = loaded.arch
    seq = PagedSeq(list(prompt))
    batch, _ = make_step(BlockPool(16, BLOCK_SIZE, seed=2), [(seq, len(prompt))], logits="all")
    kv = KVCache.allocate(arch.num_layers, 16, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim, torch.float32, "cpu")
    return loaded.model(batch, kv)  # [L, vocab]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_folder_weights_are_used_as_saved(env, variant):
    import bitsandbytes as bnb

    folder = env.folder(variant)
    loaded = load_model(folder, torch.float32, "cpu")
    ref = hf_from_folder(folder)  # no forward yet: bitsandbytes' CPU path repacks 4-bit weights on first use
    qc = VARIANTS[variant]
    assert loaded.quant.method == METHOD[variant] and loaded.quant.prequantized
    assert loaded.quant.double_quant == bool(qc.get("bnb_4bit_use_double_quant"))
    if METHOD[variant] == "int8":
        assert loaded.quant.int8_threshold == qc.get("llm_int8_threshold", 6.0)
    else:
        assert loaded.quant.compute_dtype == torch.float32
    refs = dict(ref.named_modules())
    n_quantized = 0
    for layer, short, proj in loaded.model.iter_projections():
        name = f"model.layers.{layer}.{'self_attn' if short[0] in 'qkvo' else 'mlp'}.{short}"
        ours, theirs = proj.base, refs[name]
        if variant == "nf4_skip" and _skipped(name):
            assert type(ours) is torch.nn.Linear and type(theirs) is torch.nn.Linear, name
            assert torch.equal(ours.weight, theirs.weight), name
            continue
        n_quantized += 1
        assert type(ours) is type(theirs), name
        assert not ours.weight.dtype.is_floating_point, f"{name}: a float weight is resident"
        assert torch.equal(ours.weight.data, theirs.weight.data), name
        if isinstance(ours, bnb.nn.Linear4bit):
            a, b = ours.weight.quant_state, theirs.weight.quant_state
            assert (a.quant_type, a.blocksize, tuple(a.shape), a.dtype) == (b.quant_type, b.blocksize,
                                                                           tuple(b.shape), b.dtype)
            assert a.shape == (proj.out_features, proj.in_features)
            assert torch.equal(a.absmax, b.absmax) and torch.equal(a.code, b.code), name
            assert a.nested == b.nested == loaded.quant.double_quant
            if a.nested:
                assert torch.equal(a.state2.absmax, b.state2.absmax) and torch.equal(a.state2.code, b.state2.code)
                assert torch.equal(a.offset, b.offset)
        else:
            assert torch.equal(ours.weight.SCB, theirs.weight.SCB), name
            assert ours.state.threshold == theirs.state.threshold
    assert n_quantized == (7 * 2 - 2 - 4 if variant == "nf4_skip" else 7 * 2)


def assert_projections_equal(loaded, ref, variant: str, rows: int, seed: int) -> None:
    """Every projection of ours gives exactly the output of the same transformers module."""
    refs = dict(ref.named_modules())
    gen = torch.Generator().manual_seed(seed)
    for layer, short, proj in loaded.model.iter_projections():
        name = f"model.layers.{layer}.{'self_attn' if short[0] in 'qkvo' else 'mlp'}.{short}"
        x = torch.randn(rows, proj.in_features, generator=gen)  # [T, in]
        with torch.no_grad():
            assert torch.equal(proj.base(x), refs[name](x)), f"{variant}: {name} output differs"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layers_and_base_logits_match_transformers(env, variant):
    folder = env.folder(variant)
    loaded = load_model(folder, torch.float32, "cpu")
    ref = hf_from_folder(folder)
    # Same saved weights, same bitsandbytes kernels: every projection gives the very same output.
    assert_projections_equal(loaded, ref, variant, rows=5, seed=1)
    rng = random.Random(3)
    prompt = [rng.randrange(loaded.arch.vocab_size) for _ in range(11)]
    ours = one_sequence_logits(loaded, prompt)
    want = logits_of(ref, prompt)
    diff = (ours - want).abs()
    print(f"{variant}: max |ours - transformers| = {diff.max().item():.3g}, mean {diff.mean().item():.3g} "
          f"(logits up to {want.abs().max().item():.3g})")
    # Whole model: our paged attention and transformers' eager one differ at float32 rounding level,
    # which bitsandbytes' bfloat16 4-bit path on this CPU can turn into bfloat16-level differences
    # (module docstring); int8 keeps float32 level.
    assert diff.max().item() < ATOL[METHOD[variant]], f"{variant}: max |ours - transformers| = {diff.max().item():.3g}"
    assert diff.mean().item() < TIGHT_MEAN_ATOL
    assert torch.equal(ours.argmax(-1), want.argmax(-1)), f"{variant}: a greedy choice differs"
    # The test could not fail if the folder's weights were somehow the float model's: they are not.
    floating = one_sequence_logits(load_model(env.base, torch.float32, "cpu"), prompt)
    assert (floating - ours).abs().max().item() > MIN_QUANT_EFFECT


@pytest.mark.parametrize("variant", ["nf4", "nf4_dq", "fp4", "fp4_dq", "int8", "nf4_skip"])
def test_mixed_adapter_logits_match_transformers_peft(env, variant):
    folder = env.folder(variant)
    loaded = load_model(folder, torch.float32, "cpu")
    manager, slots = manager_for(loaded, env.adapters)
    rng = random.Random(7)
    prompts = [[rng.randrange(loaded.arch.vocab_size) for _ in range(n)] for _, n in ROWS]
    seqs = [PagedSeq(list(p)) for p in prompts]
    batch, rows = make_step(BlockPool(64, BLOCK_SIZE, seed=1), [(s, len(s.tokens)) for s in seqs], logits="all")
    seq_slots = torch.tensor([-1 if k is None else slots[k] for k, _ in ROWS])
    batch.lora = manager.build_lora_batch(torch.repeat_interleave(seq_slots, torch.tensor([n for _, n in ROWS])),
                                          seq_slots)
    arch = loaded.arch
    kv = KVCache.allocate(arch.num_layers, 64, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim, torch.float32, "cpu")
    ours = loaded.model(batch, kv)  # [T, vocab]

    refs = {k: hf_from_folder(folder, None if k is None else env.adapters / k) for k in (None, *KINDS)}
    want = {id(s): logits_of(refs[k], p) for s, (k, _), p in zip(seqs, ROWS, prompts)}
    want_rows = torch.stack([want[id(s)][pos] for s, pos in rows])  # [T, vocab]
    diff = (ours - want_rows).abs()
    print(f"{variant}: max |ours - transformers+PEFT| = {diff.max().item():.3g}, mean {diff.mean().item():.3g}")
    assert diff.max().item() < ATOL[METHOD[variant]], f"{variant}: max diff {diff.max().item():.3g}"
    assert diff.mean().item() < MEAN_ATOL
    assert torch.equal(ours.argmax(-1), want_rows.argmax(-1)), f"{variant}: a greedy choice differs"


@pytest.mark.parametrize("variant", ["nf4_dq", "int8_t6"])
def test_qkv_bias_model_saved_in_shards(env, variant, tmp_path):
    """Qwen2 (q/k/v biases next to quantized weights), saved in several shards (an index file plus
    4 files here; the loader collects a projection's pieces across files, though transformers keeps
    them together)."""
    base = make_tiny_model(tmp_path / "qwen2", family="qwen2", seed=9, hidden_size=128, intermediate_size=256)
    folder = save_quantized(base, tmp_path / variant, VARIANTS[variant], max_shard_size="150KB")
    assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").is_file()
    loaded = load_model(folder, torch.float32, "cpu")
    ref = hf_from_folder(folder)
    refs = dict(ref.named_modules())
    q = loaded.model.model.layers[0].self_attn.q_proj.base
    assert q.bias is not None and torch.equal(q.bias, refs["model.layers.0.self_attn.q_proj"].bias)
    assert_projections_equal(loaded, ref, variant, rows=3, seed=2)
    prompt = list(range(5, 17))
    diff = (one_sequence_logits(loaded, prompt) - logits_of(ref, prompt)).abs()
    assert diff.max().item() < ATOL[METHOD[variant]] and diff.mean().item() < TIGHT_MEAN_ATOL


def test_conflicting_quantize_flags_are_refused(env):
    folder = env.folder("nf4")
    for asked in ("int8", "fp4", "none"):
        with pytest.raises(PrequantizedConflictError,
                           match=rf"already quantized with bitsandbytes nf4 .*--quantize {asked} was asked.*"
                                 r"--quantize auto or nf4"):
            load_model(folder, torch.float32, "cpu", QuantSpec(asked))
        with pytest.raises(PrequantizedConflictError, match=rf"--quantize {asked} was asked"):
            load_model(folder, torch.float32, "cpu", spec_from_config(ModelConfig(quantize=asked), "cpu"))
    with pytest.raises(PrequantizedConflictError, match="--double-quant was asked"):
        load_model(folder, torch.float32, "cpu", QuantSpec("nf4", double_quant=True))
    # auto (the flags' default, resolved to "none" on CPU) and the folder's own method use the folder.
    for spec in (spec_from_config(ModelConfig(), "cpu"), spec_from_config(ModelConfig(quantize="nf4"), "cpu"),
                 None):
        assert load_model(folder, torch.float32, "cpu", spec).quant.method == "nf4"
    # An explicit --quant-compute-dtype wins over the folder's bnb_4bit_compute_dtype.
    spec = spec_from_config(ModelConfig(quantize="auto", quant_compute_dtype="bfloat16"), "cpu")
    loaded = load_model(folder, torch.float32, "cpu", spec)
    assert loaded.model.model.layers[0].self_attn.q_proj.base.compute_dtype == torch.bfloat16


def _with_config(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_or_inconsistent_folders_are_refused(env, tmp_path):
    nf4 = env.folder("nf4")

    def gptq(cfg):
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    with pytest.raises(ValueError, match=r"quant_method 'gptq', which loraplex cannot load.*bitsandbytes"):
        load_model(_with_config(nf4, tmp_path / "gptq", gptq), torch.float32, "cpu")

    def both_off(cfg):
        cfg["quantization_config"].update(load_in_4bit=False, _load_in_4bit=False)
    with pytest.raises(ValueError, match="exactly one of load_in_4bit / load_in_8bit"):
        load_model(_with_config(nf4, tmp_path / "off", both_off), torch.float32, "cpu")

    def dropped_skip_list(cfg):
        cfg["quantization_config"]["llm_int8_skip_modules"] = None
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: float weights in a nf4 checkpoint"):
        load_model(_with_config(env.folder("nf4_skip"), tmp_path / "noskip", dropped_skip_list), torch.float32, "cpu")

    # A skip list without lm_head: transformers then quantizes lm_head too, which we keep in float.
    lm_head_q = env.folder("nf4", llm_int8_skip_modules=["down_proj"])
    with pytest.raises(ValueError, match=r"lm_head is quantized in this checkpoint.*including 'lm_head'"):
        load_model(lm_head_q, torch.float32, "cpu")


def test_float16_weight_bytes_is_the_same_for_every_load(env):
    from transformers import AutoModelForCausalLM

    from loraplex.api.convert import model_info_to_proto
    from tests.fixtures.fake_engine import fake_engine

    hf_params = AutoModelForCausalLM.from_pretrained(str(env.base), dtype=torch.float32).num_parameters()
    engine = fake_engine()
    loads = {"none": load_model(env.base, torch.float32, "cpu"),
             "nf4 at load": load_model(env.base, torch.bfloat16, "cpu", QuantSpec("nf4")),
             "nf4 folder": load_model(env.folder("nf4_dq"), torch.float32, "cpu"),
             "int8 folder": load_model(env.folder("int8"), torch.float32, "cpu")}
    for what, loaded in loads.items():
        info = model_info_to_proto(loaded, engine)
        assert info.float16_weight_bytes == float16_weight_bytes(loaded.model) == 2 * hf_params, what
        assert info.float16_weight_bytes == float16_bytes(loaded.arch), what
        assert info.base_weight_bytes == quantized_bytes(loaded.model), what
    # The saving is visible: nf4 projections + float32 rest < the all-float32 model.
    assert quantized_bytes(loads["nf4 folder"].model) < quantized_bytes(loads["none"].model)


def test_server_serves_a_quantized_folder_and_info_prints_float16_bytes(env, capsys):
    """The serve path (flags -> spec_from_config -> load_model -> engine -> gRPC) on an nf4 folder;
    `loraplex info` prints the quantization and the float16 size from ModelInfo."""
    from loraplex import cli
    from loraplex.config import EngineConfig
    from loraplex.model.quantize import memory_summary
    from loraplex.serve import ServerThread, start_engine

    folder = env.folder("nf4_dq")
    loaded = load_model(folder, torch.bfloat16, "cpu", spec_from_config(ModelConfig(path=str(folder)), "cpu"))
    assert memory_summary(loaded).startswith("quantize=nf4 (quantized in the folder): base weights ")
    srv = ServerThread(start_engine(loaded, EngineConfig(block_size=16, num_kv_blocks=32, max_num_seqs=4,
                                                         max_model_len=128))).start()
    try:
        assert cli.main(["info", "--server", srv.address]) == 0
    finally:
        srv.stop()
    out = capsys.readouterr().out
    assert "quantization: nf4" in out and "dtype: bfloat16" in out
    assert f"float16_weight_bytes: {float16_bytes(loaded.arch)}\n" in out
    assert f"base_weight_bytes: {quantized_bytes(loaded.model)}\n" in out
