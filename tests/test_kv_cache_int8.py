"""The int8 KV cache (--kv-cache-dtype int8) outside the attention kernels: its rounding rule
(model/kv_quant.py) against float64, the compiled writer (rotary.c via kv_int8.h) bit for bit
against the torch writer, the cache's bytes, the config and CLI, and engines that serve with it.

The attention paths over int8 caches are checked in test_decode_attention.py (float64 reference),
whole models against transformers with the same rounding in test_model_equivalence.py, and the
compiled decoder layers against the Python ones in test_compiled_layers.py.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.config import EngineConfig
from loraplex.model import kv_quant, rope
from loraplex.model.attention import write_kv
from loraplex.model.kv_cache import KVCache
from loraplex_kernels import layer_ops_native, native


def _heads(g: torch.Generator, t: int, h: int, d: int) -> torch.Tensor:
    """[t, h, d] bfloat16 heads of very different ranges, with an all-zero head and exact ties."""
    x = torch.randn(t, h, d, generator=g) * torch.exp(torch.randn(t, h, 1, generator=g) * 2)
    x[0, 0] = 0  # amax 0: codes 0, scale 1
    if t > 1 and d >= 4:  # amax 127 -> scale exactly 1: x / scale = 2.5, -3.5, 0.5 are ties
        x[1, 0, :4] = torch.tensor([127.0, 2.5, -3.5, 0.5])
    return x.bfloat16()


def test_rule_against_float64():
    x = _heads(torch.Generator().manual_seed(0), 64, 3, 64)
    codes, scale = kv_quant.quantize(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (64, 3)
    xd = x.double()
    amax = xd.abs().amax(-1)  # [64, 3]
    nonzero = amax > 0
    # scale = amax / 127 rounded once to float32; 1 for a zero head, whose codes are all 0
    assert torch.equal(scale[nonzero].double(), (amax[nonzero] / 127).float().double())
    assert torch.equal(scale[~nonzero], torch.ones_like(scale[~nonzero]))
    assert not codes[~nonzero].any()
    # every code within half a step of the value (plus the float32 rounding of scale and of the
    # division: a value at k + 0.5 steps may land on either side), the largest at +-127
    err = (codes.double() * scale.double()[..., None] - xd).abs()
    assert (err <= scale.double()[..., None] / 2 + amax[..., None] * 2 ** -22).all()
    assert torch.equal(codes.abs().amax(-1)[nonzero], torch.full_like(codes.abs().amax(-1)[nonzero], 127))
    # ties go to even (torch.round, and lrintf in C)
    assert codes[1, 0, :4].tolist() == [127, 2, -4, 0]
    back = kv_quant.dequantize(codes, scale, torch.float32)
    assert torch.equal(back, codes.float() * scale[..., None])
    assert torch.equal(kv_quant.round_trip(x), kv_quant.dequantize(codes, scale, torch.bfloat16))


@pytest.mark.skipif(not native.available(), reason="compiled kernels unavailable")
def test_compiled_writer_same_bits_as_torch():
    """rotary.c's pass into an int8 cache against rope + write_kv in torch: the same codes and
    scales in every slot (a random-content cache: slots not written must stay as they were)."""
    g = torch.Generator().manual_seed(1)
    t, hq, hkv, d, nb, bs = 24, 9, 3, 64, 12, 16  # 24 tokens: split over threads (>= 16)
    qkv = torch.cat([_heads(g, t, hq, d), _heads(g, t, hkv, d), _heads(g, t, hkv, d)], 1)  # [T, hq+2hkv, D]
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]  # strided views, as after the GEMM
    pos = torch.randint(0, 500, (t,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)  # [T, D]
    cos, sin = ang.cos().bfloat16()[:, None], ang.sin().bfloat16()[:, None]
    slots = torch.randperm(nb * bs, generator=g)[:t]
    caches = []
    for _ in range(2):
        codes = [torch.randint(-127, 128, (nb, bs, hkv, d), generator=torch.Generator().manual_seed(2),
                               dtype=torch.int8) for _ in range(2)]
        scales = [torch.rand(nb, bs, hkv, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
        caches.append((codes, scales))
    (kc, sc), (kt, st) = caches
    before = kc[0].clone()
    q1, k1 = layer_ops_native.rotary_kv(q, k, v, cos, sin, kc[0], kc[1], slots, sc[0], sc[1])
    q2, k2 = rope.apply_rotary(q, k, (cos, sin))
    write_kv(kt[0], kt[1], k2, v, slots, st[0], st[1])
    assert torch.equal(q1, q2) and torch.equal(k1, k2)
    for a, b in zip(kc + sc, kt + st):
        assert torch.equal(a, b)
    written = torch.zeros(nb * bs, dtype=torch.bool)
    written[slots] = True
    assert torch.equal(kc[0].view(-1, hkv, d)[~written], before.view(-1, hkv, d)[~written])
    assert torch.equal(kc[0].view(-1, hkv, d)[written], kv_quant.quantize(k2)[0][torch.argsort(slots)])
    with pytest.raises(ValueError, match="scales"):
        layer_ops_native.rotary_kv(q, k, v, cos, sin, kc[0], kc[1], slots, sc[0], None)


def test_cache_bytes_and_layout():
    kv = KVCache.allocate(2, 10, 16, 3, 64, torch.int8)
    assert kv.quantized and kv.k[0].dtype == torch.int8 and kv.k_scale[1].shape == (10, 16, 3)
    assert kv.nbytes == KVCache.bytes_per_block(2, 16, 3, 64, torch.int8) * 10
    assert kv.nbytes == 2 * 2 * 10 * 16 * 3 * (64 + 4)
    bf16 = KVCache.allocate(2, 10, 16, 3, 64, torch.bfloat16)
    assert not bf16.quantized and bf16.layer(0)[2:] == (None, None)
    assert kv.nbytes / bf16.nbytes == pytest.approx(68 / 128)


def test_config_and_cli():
    from loraplex.cli import _server_config, build_parser

    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")
    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "int8"])
    assert _server_config(args).engine.kv_cache_dtype == "int8"
    assert _server_config(build_parser().parse_args(["serve"])).engine.kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-dtype", "int4"])


def _greedy(loaded, prompts: list[list[int]], kv_cache_dtype: str, prefix_caching: bool, n: int = 12,
            sequential: bool = False, cached: list[int] | None = None) -> list[list[int]]:
    """Greedy tokens of each prompt (batched together, or one after another); `cached` gets each
    request's prompt tokens found in the prefix cache."""
    import threading

    from loraplex.engine.engine import Engine
    from loraplex.engine.request import Request, SamplingParams

    engine = Engine(loaded, EngineConfig(block_size=4, num_kv_blocks=128, max_model_len=128,
                                         kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=prefix_caching))
    assert engine.runner.kv.quantized == (kv_cache_dtype == "int8")
    engine.start()
    out: list[list[int]] = [[] for _ in prompts]
    try:
        batches = [[i] for i in range(len(prompts))] if sequential else [list(range(len(prompts)))]
        for batch in batches:
            done = threading.Semaphore(0)
            for i in batch:
                def cb(o, i=i):
                    out[i].extend(o.new_token_ids)
                    if o.finished:
                        if cached is not None:
                            cached.append(o.cached_prompt_tokens)
                        done.release()
                engine.submit(Request(f"r{i}", prompts[i], SamplingParams(max_new_tokens=n, temperature=0,
                                                                           ignore_eos=True)), cb)
            for _ in batch:
                assert done.acquire(timeout=120), "engine did not finish"
    finally:
        engine.shutdown(1)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_engine_serves_with_int8_cache_and_prefix_sharing(tiny_model_dir, dtype):
    """Greedy tokens of an engine with an int8 cache: the same whether a request runs alone,
    shares steps with others, or reuses another's prefix blocks; in float32 they are transformers'
    greedy tokens with its keys and values rounded by the cache's rule."""
    from loraplex.model.loader import load_model

    loaded = load_model(tiny_model_dir, dtype, "cpu")
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, loaded.arch.vocab_size, (20,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, loaded.arch.vocab_size, (k,), generator=g).tolist() for k in (3, 7, 1)]
    alone = [_greedy(loaded, [p], "int8", False)[0] for p in prompts]
    assert _greedy(loaded, prompts, "int8", False) == alone  # batched together
    cached: list[int] = []
    assert _greedy(loaded, prompts, "int8", True, sequential=True, cached=cached) == alone
    assert cached == [0, 20, 20]  # the later ones reused the 20-token prefix (5 blocks of 4)
    assert all(len(t) == 12 for t in alone)
    if dtype == torch.float32:
        from tests.test_model_equivalence import _rounding_cache, hf_model

        hf = hf_model(tiny_model_dir)
        for p, ours in zip(prompts, alone):
            with torch.no_grad():
                want = hf.generate(torch.tensor([p]), past_key_values=_rounding_cache(hf), max_new_tokens=12,
                                   min_new_tokens=12, do_sample=False)[0, len(p):].tolist()
            assert ours == want


def test_cache_sized_by_memory(tiny_model_dir):
    """--kv-cache-memory: as many blocks as fit, so int8 holds more tokens in the same bytes; the
    engine allocates exactly that many (plus none) and its block manager hands them all out."""
    from loraplex.cli import _server_config, build_parser
    from loraplex.engine.engine import Engine
    from loraplex.model.loader import load_model

    loaded = load_model(tiny_model_dir, torch.bfloat16, "cpu")
    arch = loaded.arch
    blocks = {}
    for dtype_name, dt in (("auto", torch.bfloat16), ("int8", torch.int8)):
        per_block = KVCache.bytes_per_block(arch.num_layers, 4, arch.num_kv_heads, arch.head_dim, dt)
        config = EngineConfig(block_size=4, kv_cache_dtype=dtype_name, kv_cache_memory="2MiB", max_model_len=64)
        engine = Engine(loaded, config)
        try:
            blocks[dtype_name] = engine.config.num_kv_blocks
            assert blocks[dtype_name] == 2 * 2**20 // per_block
            assert engine.runner.kv.num_blocks == blocks[dtype_name]
            assert engine.runner.kv.nbytes <= 2 * 2**20 < engine.runner.kv.nbytes + per_block
            assert engine.stats().kv_blocks_total == blocks[dtype_name]
        finally:
            engine.shutdown(0)
    head = arch.head_dim
    assert blocks["int8"] / blocks["auto"] == pytest.approx(2 * head / (head + 4), rel=0.01)
    with pytest.raises(ValueError, match="holds no KV block"):
        Engine(loaded, EngineConfig(block_size=4, kv_cache_memory="100B"))
    for bad in ("0.5", "lots", "0B"):
        with pytest.raises(ValueError, match="kv_cache_memory"):
            EngineConfig(kv_cache_memory=bad)
    args = build_parser().parse_args(["serve", "--kv-cache-memory", "3GiB", "--kv-cache-dtype", "int8"])
    assert _server_config(args).engine.kv_cache_memory == "3GiB"


@pytest.mark.real_model
def test_benchmark_script_runs(tmp_path):
    """benchmarks/bench_kv_cache_dtype.py as written, tiny settings, in a subprocess: both tables
    come out with a row per context and per cache."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "kv.md"
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_kv_cache_dtype.py"), "--contexts", "20,40",
                           "--steps", "1", "--batch", "2", "--text-len", "48", "--out", str(out)],
                          cwd=repo, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert len(re.findall(r"^\| (20|40) \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", text, re.M)) == 2
    rows = re.findall(r"^\| (bfloat16|int8) cache \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert [r[0] for r in rows] == ["bfloat16", "int8"]
    for _, agree, kl, ppl in rows:
        assert 0.5 < float(agree) <= 1 and 0 < float(kl) < 0.1 and float(ppl) > 1


def test_start_up_log_names_the_cache(tiny_model_dir, caplog):
    import logging

    from loraplex.model.loader import load_model
    from loraplex.serve import start_engine

    loaded = load_model(tiny_model_dir, torch.bfloat16, "cpu")
    with caplog.at_level(logging.INFO, logger="loraplex"):
        runtime = start_engine(loaded, EngineConfig(block_size=4, kv_cache_dtype="int8", kv_cache_memory="1MiB",
                                                    max_model_len=64))
    try:
        blocks = runtime.engine.config.num_kv_blocks
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:"))
        assert f"{blocks} blocks of 4 tokens ({4 * blocks} tokens)" in line
        assert "in int8 (--kv-cache-memory 1MiB)" in line
    finally:
        runtime.engine.shutdown(0)
