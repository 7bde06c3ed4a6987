"""loader.py / arch.py: strict loading of HF folders, sharded weights, config parsing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.model.arch import ArchConfig, RopeConfig
from loraplex.model.kv_cache import KVCache
from loraplex.model.loader import load_model
from tests.fixtures.paged_batches import BlockPool, PagedSeq, make_step


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def _rewrite_weights(folder, edit):
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _logits(loaded, tokens):
    arch = loaded.arch
    kv = KVCache.allocate(arch.num_layers, 8, 4, arch.num_kv_heads, arch.head_dim, loaded.dtype)
    batch, _ = make_step(BlockPool(8, 4), [(PagedSeq(tokens), len(tokens))])
    return loaded.model(batch, kv)


def test_loads_tokenizer_eos_and_dtype(tiny_model_dir):
    loaded = load_model(tiny_model_dir, torch.bfloat16, "cpu")
    assert loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu"
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert loaded.arch.architecture == "LlamaForCausalLM"
    # config.json says eos 0 (<|endoftext|>), generation_config.json [0, 2]: the union, config first.
    assert loaded.arch.eos_token_ids == (0, 2)
    assert loaded.tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert loaded.tokenizer.decode(loaded.tokenizer("hello world").input_ids) == "hello world"
    names = [(i, n) for i, n, _ in loaded.model.iter_projections()]
    assert names[:7] == [(0, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj",
                                          "gate_proj", "up_proj", "down_proj")]
    assert len(names) == 7 * loaded.arch.num_layers
    proj = dict(loaded.model.named_modules())["model.layers.1.self_attn.k_proj"]
    assert proj is list(loaded.model.iter_projections())[8][2]
    assert (proj.in_features, proj.out_features) == (64, 32)


def test_missing_weight_is_refused(model_copy):
    _rewrite_weights(model_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing weight.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(model_copy)


def test_unexpected_weight_is_refused(model_copy):
    def add(t):
        t["model.layers.0.self_attn.q_proj.bias"] = torch.randn(64)
    _rewrite_weights(model_copy, add)
    with pytest.raises(ValueError, match=r"unexpected weight 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_model(model_copy)


def test_wrong_shape_is_refused(model_copy):
    def shrink(t):
        t["model.norm.weight"] = torch.randn(63)
    _rewrite_weights(model_copy, shrink)
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*shape"):
        load_model(model_copy)


def test_rotary_inv_freq_buffers_are_ignored(model_copy, tiny_model_dir):
    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.randn(8)
    _rewrite_weights(model_copy, add)
    tokens = [5, 17, 200, 33]
    torch.testing.assert_close(_logits(load_model(model_copy), tokens),
                               _logits(load_model(tiny_model_dir), tokens), atol=0, rtol=0)


def test_unknown_architecture_is_refused(model_copy):
    _edit_config(model_copy, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"architectures.*GPT2LMHeadModel"):
        load_model(model_copy)


def test_missing_config_and_weights_are_refused(model_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nowhere")
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(model_copy)


def test_sharded_checkpoint_loads_like_single_file(model_copy, tiny_model_dir):
    tensors = load_file(str(model_copy / "model.safetensors"))
    (model_copy / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(model_copy / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (model_copy / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokens = [3, 99, 250, 7, 7, 41]
    torch.testing.assert_close(_logits(load_model(model_copy), tokens),
                               _logits(load_model(tiny_model_dir), tokens), atol=0, rtol=0)
    # An index naming a shard that is not there is refused.
    (model_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_model(model_copy)


BASE_CFG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "eos_token_id": [7, 8],
}


def test_old_and_new_rope_config_styles_agree():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    old = ArchConfig.from_hf_config({**BASE_CFG, "rope_theta": 5e5,
                                     "rope_scaling": {"rope_type": "llama3", **scaling}})
    old_type_key = ArchConfig.from_hf_config({**BASE_CFG, "rope_theta": 5e5,
                                              "rope_scaling": {"type": "llama3", **scaling}})
    new = ArchConfig.from_hf_config({**BASE_CFG, "rope_parameters": {"rope_type": "llama3",
                                                                     "rope_theta": 5e5, **scaling}})
    assert old.rope == old_type_key.rope == new.rope
    assert new.rope == RopeConfig("llama3", 5e5, 8.0, 1.0, 4.0, 64)
    plain = ArchConfig.from_hf_config(BASE_CFG)
    assert plain.rope == RopeConfig() and plain.head_dim == 16
    assert plain.eos_token_ids == (7, 8)
    merged = ArchConfig.from_hf_config({**BASE_CFG, "eos_token_id": 8}, {"eos_token_id": [9, 8]})
    assert merged.eos_token_ids == (8, 9)


@pytest.mark.parametrize("change, field", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"vocab_size": None}, "vocab_size"),
])
def test_unsupported_config_fields_are_named(change, field):
    with pytest.raises(ValueError, match=field):
        ArchConfig.from_hf_config({**BASE_CFG, **change})


def test_family_flags_and_sliding_windows():
    def arch(name, **kw):
        return ArchConfig.from_hf_config({**BASE_CFG, "architectures": [name], **kw})

    assert arch("Qwen2ForCausalLM").qkv_bias and not arch("Qwen2ForCausalLM").o_bias
    assert arch("Qwen3ForCausalLM").qk_norm
    assert arch("LlamaForCausalLM", attention_bias=True).o_bias
    assert arch("MistralForCausalLM", sliding_window=4096).sliding_windows == (4096, 4096)
    assert arch("MistralForCausalLM", sliding_window=None).sliding_windows == (None, None)
    assert arch("Qwen2ForCausalLM", sliding_window=64).sliding_windows == (None, None)
    assert arch("Qwen2ForCausalLM", sliding_window=64, use_sliding_window=True,
                max_window_layers=1).sliding_windows == (None, 64)
    assert arch("Qwen3ForCausalLM", sliding_window=64, use_sliding_window=True,
                layer_types=["sliding_attention", "full_attention"]).sliding_windows == (64, None)
