"""benchmarks/roofline.py's step cost model against independent counts (the model's own parameters,
the KV cache's own block size), its floor, and the decode driver both benchmarks use."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from loraplex.model.kv_cache import KVCache
from loraplex.model.llama import LlamaForCausalLM
from loraplex.model.loader import load_model, read_arch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import roofline  # noqa: E402
from decode_driver import make_decode_engine, time_forward  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_matmul_weights_and_bytes_match_the_model(tiny_model_dirs, family):
    arch = read_arch(tiny_model_dirs[family])
    model = LlamaForCausalLM(arch, dtype=torch.bfloat16, device="meta")
    proj = sum(p.base.weight.numel() for _, _, p in model.iter_projections())
    head = arch.vocab_size * arch.hidden_size  # tied or not, one [vocab, hidden] GEMM per step
    assert roofline.matmul_weights(arch) == proj + head
    norms = sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    cost = roofline.decode_step_cost(arch, 2, batch=3, context=10)
    assert cost.weight_bytes == 2 * (proj + head + norms)
    assert cost.matmul_flops == 2 * 3 * (proj + head)
    per_block = KVCache.bytes_per_block(arch.num_layers, 16, arch.num_kv_heads, arch.head_dim, torch.bfloat16)
    assert cost.kv_read_bytes == 3 * 10 * per_block // 16
    assert cost.kv_write_bytes == 3 * per_block // 16
    # QK^T and PV: 2 x D multiply-adds per key and query head, per layer and sequence.
    assert cost.attention_flops == arch.num_layers * 3 * arch.num_heads * 2 * 2 * arch.head_dim * 10


def test_floor_takes_the_slower_limit():
    cost = roofline.StepCost(weight_bytes=1000, kv_read_bytes=0, kv_write_bytes=0, matmul_flops=10_000,
                             attention_flops=0)
    assert cost.floor_seconds(bandwidth=100.0, peak_flops=10_000.0) == (10.0, "memory")
    assert cost.floor_seconds(bandwidth=1000.0, peak_flops=1000.0) == (10.0, "compute")
    assert cost.floor_seconds(bandwidth=10_000.0, peak_flops=100.0) == (100.0, "compute")


def test_floor_bandwidth_uses_arrays_as_large_as_the_step():
    """A small array re-read from a large cache must not set the floor: only arrays of at least the
    step's bytes count (the best kernel among them), else the largest arrays measured."""
    rows = [dict(kernel=k, mib=mib, best=gbs, median=gbs) for k, mib, gbs in
            [("read", 128, 41.0), ("copy", 128, 27.0), ("read", 256, 29.6), ("triad", 512, 29.9),
             ("read", 512, 29.4), ("copy", 1024, 26.0)]]
    assert roofline.floor_bandwidth(rows, 300e6) == (29.9, 512)  # 256 MiB = 268 MB < 300 MB
    assert roofline.floor_bandwidth(rows, 100e6) == (41.0, 128)
    assert roofline.floor_bandwidth(rows, 600e6) == (26.0, 1024)
    assert roofline.floor_bandwidth(rows, 5e9) == (26.0, 1024)  # none big enough: the largest


def test_decode_driver_runs_full_decode_steps(tiny_model_dir):
    loaded = load_model(tiny_model_dir, torch.float32, "cpu")
    dec = make_decode_engine(loaded, batch=3, prompt_len=5, decode_steps=4)
    assert all(s.is_decoding for s in dec.engine.scheduler.running)
    ctx0 = dec.mean_context
    time_forward(dec)
    for _ in range(4):
        assert dec.step() > 0
    assert dec.mean_context == ctx0 + 4
    assert len(dec.forward_seconds) == 4


def test_decode_driver_keeps_each_variants_gemm(tiny_model_dir, monkeypatch):
    """widen=False builds the engine with LORAPLEX_WIDEN_BF16=0 and LORAPLEX_AMX=0 (torch's
    bfloat16 GEMM, the 'before' of the roofline's bfloat16 rows); widen=True lets it swap in
    WidenedLinear or, on an AMX CPU, AmxLinear; the environment is restored either way."""
    from loraplex.model import widened_linear
    from loraplex.model.linear import Projection
    from loraplex.model.packed_linear import packing_available

    monkeypatch.setattr(widened_linear, "widening_wanted", lambda: True)
    monkeypatch.delenv("LORAPLEX_WIDEN_BF16", raising=False)
    monkeypatch.delenv("LORAPLEX_AMX", raising=False)
    kinds = {}
    for widen in (False, True):
        loaded = load_model(tiny_model_dir, torch.bfloat16, "cpu")
        dec = make_decode_engine(loaded, batch=2, prompt_len=4, decode_steps=2, widen=widen)
        assert dec.step() > 0
        kinds[widen] = {type(p.base) for p in loaded.model.modules() if isinstance(p, Projection)}
    assert "LORAPLEX_WIDEN_BF16" not in os.environ and "LORAPLEX_AMX" not in os.environ
    if not packing_available():  # where oneDNN packs, neither variant widens
        assert kinds[False] == {torch.nn.Linear} and kinds[True] == {widened_linear.WidenedLinear}
    from loraplex.model.amx_linear import AmxLinear, amx_wanted
    from loraplex.model.fused_linear import PackedSlice

    if amx_wanted():  # an AMX CPU: ours (AmxLinear) only in the default variant, oneDNN's otherwise
        assert kinds[True] == {AmxLinear, PackedSlice} and AmxLinear not in kinds[False]
    assert roofline.VARIANTS["bfloat16-torch-gemm"] == (torch.bfloat16, False)
