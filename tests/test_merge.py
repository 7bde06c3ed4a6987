"""`loraplex merge` (lora/merge.py) against PEFT's merge_and_unload, float32.

For each adapter kind (LoRA, rsLoRA, rank/alpha patterns, AdaLoRA) on the tiny random Llama, the
merged folder loaded by transformers gives the logits of PEFT's merge_and_unload (atol 1e-5), and
our server on the merged folder gives the greedy tokens of our server on base + adapter. A
bitsandbytes folder (nf4 and int8) is dequantized then merged: compared with PEFT merging into the same
folder loaded by transformers and dequantized (model.dequantize()) -- the same bitsandbytes
dequantization on both sides, so the same tolerance holds. Refusals: existing folder without
--force, adapter for another base; nothing written then.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from loraplex.cli import main
from loraplex.lora.merge import merge_adapter
from loraplex.lora.peft_format import AdapterFormatError
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.tiny_models import make_tiny_model

ATOL = 1e-5
KINDS = ("qv_r4", "all_r8_rslora", "patterns_r6", "adalora")
TOKENS = [[5, 17, 33, 101, 7, 250, 64, 12], [200, 3, 9, 44]]


def hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu",
                                                attn_implementation="eager").eval()


def logits(model):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([t])).logits[0].float() for t in TOKENS]


def peft_merged(base_model, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter)).merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return root, {k: make_peft_adapter(tiny_model_dir, root / k, k, seed=60 + i) for i, k in enumerate(KINDS)}


@pytest.mark.parametrize("kind", KINDS)
def test_merged_folder_equals_peft_merge_and_unload(tiny_model_dir, adapters, kind, tmp_path):
    root, folders = adapters
    out = tmp_path / "merged"
    assert main(["merge", str(tiny_model_dir), str(folders[kind]), str(out), "--quiet"]) == 0
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    ref = logits(peft_merged(hf(tiny_model_dir), folders[kind]))
    base = logits(hf(tiny_model_dir))
    got = logits(hf(out))
    for r, g, b in zip(ref, got, base):
        assert float((r - b).abs().max()) > 0.1, "the adapter must move the logits"
        torch.testing.assert_close(g, r, atol=ATOL, rtol=0)


def test_server_on_merged_folder_equals_base_plus_adapter(tiny_model_dir, adapters, tmp_path):
    from loraplex.config import LoraConfig
    from loraplex.lora.manager import LoraManager
    from loraplex.model.loader import load_model
    from tests.fixtures.engine_run import engine_greedy

    root, folders = adapters
    out = merge_adapter(tiny_model_dir, folders["patterns_r6"], tmp_path / "merged", progress=False)
    loaded = load_model(tiny_model_dir, dtype=torch.float32)
    manager = LoraManager(LoraConfig(max_lora_rank=16, allowed_roots=(str(root),)), loaded.model, loaded.dtype, "cpu")
    try:
        manager.load("pat", folders["patterns_r6"])
        with_adapter = engine_greedy(loaded, manager, {i: ("pat", t) for i, t in enumerate(TOKENS)}, 8)
    finally:
        manager.close()
    merged = load_model(out, dtype=torch.float32)
    alone = engine_greedy(merged, None, {i: ("", t) for i, t in enumerate(TOKENS)}, 8)
    base = engine_greedy(load_model(tiny_model_dir, dtype=torch.float32), None,
                         {i: ("", t) for i, t in enumerate(TOKENS)}, 8)
    assert alone == with_adapter
    assert alone != base


QUANT = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
         "int8": dict(load_in_8bit=True)}


@pytest.mark.parametrize("method", list(QUANT))
def test_quantized_base_is_dequantized_then_merged(tmp_path, method):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = make_tiny_model(tmp_path / "base", seed=3, hidden_size=128, intermediate_size=256)
    adapter = make_peft_adapter(base, tmp_path / "ad", "all_r8_rslora", seed=8)
    q = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=BitsAndBytesConfig(**QUANT[method]),
                                             device_map="cpu", dtype=torch.float32)
    qdir = tmp_path / method
    q.save_pretrained(qdir)
    for f in base.glob("tokenizer*"):
        shutil.copy(f, qdir / f.name)
    out = merge_adapter(qdir, adapter, tmp_path / "merged", progress=False)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    deq = AutoModelForCausalLM.from_pretrained(str(qdir), device_map="cpu", attn_implementation="eager")
    deq = deq.dequantize().float().eval()
    ref = logits(peft_merged(deq, adapter))
    for r, g in zip(ref, logits(hf(out))):
        torch.testing.assert_close(g, r, atol=ATOL, rtol=0)
    # ... and the dequantized merge is not the float base's merge (the quantization error is there).
    float_ref = logits(peft_merged(hf(base), adapter))
    assert any(float((g - f).abs().max()) > 1e-3 for g, f in zip(logits(hf(out)), float_ref))


def test_refusals_write_nothing(tiny_model_dir, adapters, tmp_path, capsys):
    root, folders = adapters
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(tiny_model_dir), str(folders["qv_r4"]), str(out), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --force replaces it whole.
    assert main(["merge", str(tiny_model_dir), str(folders["qv_r4"]), str(out), "--quiet", "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    # An adapter made for another base (other hidden size): refused naming the tensor, nothing written.
    other = make_tiny_model(tmp_path / "other", hidden_size=32, intermediate_size=96)
    wrong = make_peft_adapter(other, tmp_path / "wrong", "qv_r4", seed=1)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(AdapterFormatError) as err:
        merge_adapter(tiny_model_dir, wrong, tmp_path / "never", progress=False)
    assert "lora_A" in err.value.field
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_failure_while_writing_leaves_no_folder(tiny_model_dir, adapters, tmp_path, monkeypatch):
    import safetensors.torch

    root, folders = adapters
    out = tmp_path / "merged"

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")  # a partial file, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(tiny_model_dir, folders["qv_r4"], out, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling
