"""Paged attention (model/attention.py), both paths — the compiled CPU kernel
(loraplex_kernels/decode_attention.c, which in bfloat16 also takes the tokens of short prefill chunks) and the
torch formulation — against a float64 per-head reference on random caches: GQA ratios, sliding
windows, block sizes, lengths from 1, decode rows that are not contiguous (a step mixing prefill
chunks and decode tokens), prefill-only steps, chunks after cached context, chunks longer than
NATIVE_PREFILL_MAX_QUERY left to SDPA next to short ones, float32 and bfloat16. And int8 caches
(--kv-cache-dtype int8): random codes and scales, written through write_kv, the reference reading
codes x scales in float64.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.model import attention as attn
from loraplex.model.attention import AttentionPlan, paged_attention, write_kv
from loraplex.model.forward_batch import ForwardBatch
from loraplex_kernels import attention_native, native

PATHS = ["native", "torch"]
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _restore_choice():
    before = attn.NATIVE_DECODE
    yield
    attn.NATIVE_DECODE = before


def _choose(path: str) -> None:
    if path == "native" and not native.available():
        pytest.skip(f"compiled kernels unavailable: {native.unavailable_reason()}")
    attn.NATIVE_DECODE = None if path == "native" else False


def _batch(query_lens, seq_lens, block_size, num_blocks, g) -> ForwardBatch:
    """A step over sequences with these new-token counts and context lengths, random block tables."""
    nbs = [-(-n // block_size) for n in seq_lens]
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(seq_lens), max(nbs), dtype=torch.int64)
    used = 0
    for i, nb in enumerate(nbs):
        tables[i, :nb] = perm[used:used + nb]
        used += nb
    positions, slots = [], []
    for i, (q, n) in enumerate(zip(query_lens, seq_lens)):
        for p in range(n - q, n):
            positions.append(p)
            slots.append(int(tables[i, p // block_size]) * block_size + p % block_size)
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    t = starts[-1]
    return ForwardBatch(
        input_ids=torch.zeros(t, dtype=torch.int64), positions=torch.tensor(positions),
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(starts),
        seq_lens=torch.tensor(seq_lens), block_tables=tables,
        logits_indices=torch.tensor(starts[1:]) - 1,
        query_lens_list=list(query_lens), seq_lens_list=list(seq_lens))


def _reference(q, k_cache, v_cache, batch: ForwardBatch, scale, window) -> torch.Tensor:
    """[T, H * D] float64, token by token and head by head."""
    t, h, d = q.shape
    h_kv = k_cache.shape[2]
    bs = k_cache.shape[1]
    out = torch.empty(t, h * d, dtype=torch.float64)
    for i, (ql, n) in enumerate(zip(batch.query_lens_list, batch.seq_lens_list)):
        blocks = batch.block_tables[i, : -(-n // bs)]
        keys = k_cache[blocks].reshape(-1, h_kv, d)[:n].double()  # [n, H_kv, D]
        vals = v_cache[blocks].reshape(-1, h_kv, d)[:n].double()
        for row in range(int(batch.query_start_loc[i]), int(batch.query_start_loc[i]) + ql):
            pos = int(batch.positions[row])
            lo = max(0, pos + 1 - window) if window else 0
            for head in range(h):
                g = head // (h // h_kv)
                s = keys[lo:pos + 1, g] @ q[row, head].double() * scale
                out[row, head * d:(head + 1) * d] = torch.softmax(s, 0) @ vals[lo:pos + 1, g]
    return out


def _run(path, dtype, query_lens, seq_lens, heads, kv_heads, head_dim=64, block_size=16, window=None, seed=0,
         kv_dtype=None):
    _choose(path)
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 5
    batch = _batch(query_lens, seq_lens, block_size, num_blocks, g)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_scale = v_scale = None
    if kv_dtype == torch.int8:  # random codes, and scales spanning two orders of magnitude
        k_cache = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        v_cache = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        k_scale = torch.rand(shape[:3], generator=g) ** 2 * 0.05 + 5e-4
        v_scale = torch.rand(shape[:3], generator=g) ** 2 * 0.05 + 5e-4
    else:
        k_cache = torch.randn(shape, generator=g).to(dtype)
        v_cache = torch.randn(shape, generator=g).to(dtype)
    t = batch.num_tokens
    q = torch.randn(t, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(t, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(t, kv_heads, head_dim, generator=g).to(dtype)
    write_kv(k_cache, v_cache, k, v, batch.slot_mapping, k_scale, v_scale)
    plan = AttentionPlan.build(batch, block_size)
    scale = head_dim ** -0.5
    out = paged_attention(q, k, v, k_cache, v_cache, plan, scale, window, k_scale, v_scale)
    if k_scale is not None:  # what the cache holds, in float64
        k_cache, v_cache = k_cache.double() * k_scale.double()[..., None], v_cache.double() * v_scale.double()[..., None]
    want = _reference(q, k_cache, v_cache, batch, scale, window)
    err = (out.double() - want).abs().max().item()
    if k_scale is not None:  # values up to 127 x 0.05: the tolerance is relative to their size
        err /= max(1.0, want.abs().max().item())
    assert err <= TOL[dtype], err
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4), (8, 2), (6, 1)])
def test_decode_step(path, dtype, heads, kv_heads):
    seq_lens = [1, 2, 15, 16, 17, 33, 100, 7, 64]
    _run(path, dtype, [1] * len(seq_lens), seq_lens, heads, kv_heads, seed=heads)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_sliding_window(path, window):
    seq_lens = [1, 4, 5, 6, 17, 39, 40, 41, 90]
    _run(path, torch.float32, [1] * len(seq_lens), seq_lens, 8, 2, window=window, seed=window)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block_size", [1, 4, 32])
@pytest.mark.parametrize("head_dim", [32, 80, 128])
def test_block_sizes_and_head_dims(path, block_size, head_dim):
    seq_lens = [3, 31, 32, 33, 70]
    _run(path, torch.float32, [1] * len(seq_lens), seq_lens, 4, 2, head_dim=head_dim,
         block_size=block_size, seed=block_size + head_dim)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_prefill_and_decode_rows(path, dtype):
    """Decode tokens between prefill chunks (one fresh, one after cached context): their rows are
    not contiguous, so the kernel reads q through a row index."""
    query_lens = [1, 5, 1, 1, 9, 1]
    seq_lens = [20, 5, 3, 48, 30, 1]
    _run(path, dtype, query_lens, seq_lens, 9, 3, seed=7)
    _run(path, dtype, query_lens, seq_lens, 9, 3, window=8, seed=8)


def test_paths_agree_closely_on_a_real_shape():
    """The default model's attention shape (9 heads over 3 kv heads, D 64), 32 sequences."""
    if not native.available():
        pytest.skip(f"compiled kernels unavailable: {native.unavailable_reason()}")
    seq_lens = [int(n) for n in torch.randint(1, 160, (32,), generator=torch.Generator().manual_seed(3))]
    a = _run("native", torch.float32, [1] * 32, seq_lens, 9, 3, seed=3)
    b = _run("torch", torch.float32, [1] * 32, seq_lens, 9, 3, seed=3)
    assert (a - b).abs().max().item() <= 2e-6


def test_supports_only_cpu_float_operands():
    q = torch.randn(2, 4, 8)
    cache = torch.randn(3, 4, 2, 8)
    assert attention_native.supports(q, cache) == native.available()
    assert not attention_native.supports(q.half(), cache)
    assert not attention_native.supports(q, cache.half())
    assert not attention_native.supports(q.transpose(1, 2), cache)  # head dim not contiguous


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("query_lens", "seq_lens"), [
    ([38, 40, 2, 64], [38, 40, 2, 64]),  # a prefill-only step of fresh prompts: every row native
    ([7, 30, 3], [50, 30, 19]),  # chunks after cached context
    ([65, 1, 12, 1, 100], [65, 9, 40, 77, 130]),  # long chunks (SDPA) between short ones and decodes
    ([1, 1, 70], [20, 33, 70]),  # decode rows first, one long chunk
])
@pytest.mark.parametrize("window", [None, 6])
def test_prefill_chunks(path, dtype, query_lens, seq_lens, window):
    _run(path, dtype, query_lens, seq_lens, 9, 3, window=window, seed=len(query_lens) + (window or 0))


def test_prefill_threshold_routes_chunks(monkeypatch):
    """Every chunk through SDPA (threshold 0) or through the kernel (a large one): same result."""
    if not native.available():
        pytest.skip(f"compiled kernels unavailable: {native.unavailable_reason()}")
    query_lens, seq_lens = [65, 1, 12, 1, 100], [65, 9, 40, 77, 130]
    monkeypatch.setattr(attn, "NATIVE_PREFILL_MAX_QUERY", 0)
    a = _run("native", torch.bfloat16, query_lens, seq_lens, 8, 2, seed=1)
    monkeypatch.setattr(attn, "NATIVE_PREFILL_MAX_QUERY", 10_000)
    b = _run("native", torch.bfloat16, query_lens, seq_lens, 8, 2, seed=1)
    assert (a.float() - b.float()).abs().max().item() <= 2e-2
    assert not torch.equal(a, b)  # the routes differ (else this test would check nothing)


def test_float32_prefill_stays_on_sdpa():
    """float32 prefill rows are exactly the torch path's (bit parity with transformers' sdpa)."""
    if not native.available():
        pytest.skip(f"compiled kernels unavailable: {native.unavailable_reason()}")
    query_lens, seq_lens = [38, 40, 5], [38, 40, 30]
    a = _run("native", torch.float32, query_lens, seq_lens, 9, 3, seed=2)
    b = _run("torch", torch.float32, query_lens, seq_lens, 9, 3, seed=2)
    assert torch.equal(a, b)


def _assert_same_bits_on_1_2_3_threads(dtype, query_lens, seq_lens, seed):
    """_run (float64-checked) at 1, 2 and 3 threads, with and without a window: identical outputs."""
    if not native.available():
        pytest.skip(f"compiled kernels unavailable: {native.unavailable_reason()}")
    before = torch.get_num_threads()
    try:
        outs = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs[n] = [_run("native", dtype, query_lens, seq_lens, 9, 3, window=w, seed=seed) for w in (None, 64)]
    finally:
        torch.set_num_threads(before)
    for n in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(outs[1], outs[n])), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_same_bits_on_any_thread_count(dtype):
    """The compiled kernel splits rows over threads (each row on one thread): 1, 2 and 3 threads
    give identical outputs, with decode rows, short prefill chunks and a window."""
    query_lens, seq_lens = [1] * 20 + [30, 1, 12], [int(n) for n in torch.arange(40, 240, 10)] + [30, 300, 50]
    _assert_same_bits_on_1_2_3_threads(dtype, query_lens, seq_lens, seed=11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("query_lens", "seq_lens"), [([1], [700]), ([1, 1], [900, 40]), ([1, 5], [600, 20])])
def test_fewer_rows_than_threads_split_by_head_same_bits(dtype, query_lens, seq_lens):
    """With fewer rows than threads the kernel splits (row, KV head) pairs over the threads (one
    long sequence's heads side by side): against float64 (in _run) and bit for bit the output of
    one thread, which computes every head of a row together."""
    _assert_same_bits_on_1_2_3_threads(dtype, query_lens, seq_lens, seed=5)


# --- int8 caches ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4), (6, 1)])
def test_int8_cache_decode_step(path, dtype, heads, kv_heads):
    seq_lens = [1, 2, 15, 16, 17, 33, 100, 7, 64]
    _run(path, dtype, [1] * len(seq_lens), seq_lens, heads, kv_heads, seed=heads, kv_dtype=torch.int8)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("head_dim", "block_size"), [(64, 1), (128, 16), (80, 4), (32, 32)])
def test_int8_cache_head_dims_and_block_sizes(path, dtype, head_dim, block_size):
    """64 and 128 have their own compiled instances (64: the vectorised passes), others the generic one."""
    seq_lens = [3, 31, 32, 33, 70]
    _run(path, dtype, [1] * len(seq_lens), seq_lens, 8, 2, head_dim=head_dim, block_size=block_size,
         seed=head_dim + block_size, kv_dtype=torch.int8)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 8])
def test_int8_cache_prefill_and_decode_rows(path, dtype, window):
    """Fresh chunks (their k / v rounded as the cache keeps them), chunks after cached context, a
    chunk longer than NATIVE_PREFILL_MAX_QUERY, and decode rows between them."""
    query_lens = [1, 5, 1, 70, 9, 1]
    seq_lens = [20, 5, 3, 70, 30, 1]
    _run(path, dtype, query_lens, seq_lens, 9, 3, window=window, seed=11, kv_dtype=torch.int8)


def test_int8_cache_needs_its_scales():
    q = torch.randn(2, 4, 8)
    cache = torch.zeros(3, 4, 2, 8, dtype=torch.int8)
    scales = torch.ones(3, 4, 2)
    assert attention_native.supports(q, cache) == native.available()
    batch = _batch([1, 1], [3, 5], 4, 3, torch.Generator().manual_seed(0))
    plan = AttentionPlan.build(batch, 4)
    k = torch.randn(2, 2, 8)
    with pytest.raises(ValueError, match="scales"):
        paged_attention(q, k, k, cache, cache, plan, 0.3)
    with pytest.raises(ValueError, match="scales"):
        paged_attention(q, k, k, cache.float(), cache.float(), plan, 0.3, None, scales, scales)
    if native.available():
        with pytest.raises(ValueError, match="scales"):
            attention_native.decode_attention(q, slice(0, 2), cache, cache, plan.decode_table, plan.decode_seq_lens,
                                              0.3, None, scales, scales[:, :2].contiguous())
