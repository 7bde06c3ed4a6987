"""AmxLinear (model/amx_linear.py) and its kernel (loraplex_kernels/gemm_amx.c): bfloat16 GEMMs on
AMX tiles must equal a float64 reference up to float32 summation and one bfloat16 rounding, on
random data, for every row count and tile path (wide: <= 16 rows, tall: 17-32, several blocks);
columns must not depend on how panels are grouped (fusion) nor rows on their batch companions or
the thread count; and the engine packs a bf16 model with it and generates what the oneDNN-packed
model generates. Skipped where the CPU or the compiler has no AMX-BF16 (the kernel is not built)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex_kernels import gemm_amx_native as amx

pytestmark = pytest.mark.skipif(not amx.available(), reason="no AMX-BF16 on this CPU (or the kernel build lacks it)")


def random_bf16(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(torch.bfloat16)


def assert_matches_float64(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """y (bfloat16) = x @ w.T + bias rounded once to bfloat16, with float32 sums: within half a
    bfloat16 step of the float64 value plus float32 summation error (k terms of |x||w|)."""
    ref = x.double() @ w.double().T + (0 if bias is None else bias.double())  # [M, N]
    magnitude = x.double().abs() @ w.double().abs().T  # [M, N]: what float32 sums can be off by, x 2^-24 k
    bound = ref.abs() * 2.0 ** -8 + magnitude * x.shape[1] * 2.0 ** -24 + 1e-30
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"worst error / bound {(err / bound).max().item():.3g}"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 31, 32, 33, 48, 64, 100])
@pytest.mark.parametrize(("n", "k"), [(960, 576), (576, 1536), (16, 32), (112, 96), (48, 64)])
def test_gemm_matches_float64(n, k, rows, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    w, x = random_bf16(g, n, k), random_bf16(g, rows, k)
    b = random_bf16(g, n) if bias else None
    panels = amx.pack(w)
    assert torch.equal(amx.unpack(panels), w)
    assert_matches_float64(amx.gemm(x, panels, b), x, w, b)
    strided = random_bf16(g, rows, 2 * k)[:, :k]  # rows of a wider tensor: x_stride != k
    assert_matches_float64(amx.gemm(strided, panels, b), strided, w, b)


def test_rows_do_not_depend_on_batch_or_threads():
    """Each output is one float32 sum over K in a fixed order: the same for a row alone or in any
    batch (wide and tall tile paths), and with 1 or 2 threads."""
    g = torch.Generator().manual_seed(7)
    w, x = random_bf16(g, 576, 1536), random_bf16(g, 70, 1536)
    panels = amx.pack(w)
    full = amx.gemm(x, panels)
    for lo, hi in ((0, 1), (5, 21), (3, 35), (40, 70), (69, 70)):
        assert torch.equal(amx.gemm(x[lo:hi], panels), full[lo:hi])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(amx.gemm(x, panels), full)
    finally:
        torch.set_num_threads(before)


def test_columns_do_not_depend_on_panel_grouping():
    """q/k/v fused into one GEMM (model/fused_linear.py) give each member's exact columns."""
    g = torch.Generator().manual_seed(8)
    ws = [random_bf16(g, n, 576) for n in (576, 192, 192)]
    x = random_bf16(g, 33, 576)
    fused = amx.gemm(x, amx.pack(torch.cat(ws)))
    assert torch.equal(fused, torch.cat([amx.gemm(x, amx.pack(w)) for w in ws], dim=1))


def test_bad_operands_are_refused():
    g = torch.Generator().manual_seed(9)
    with pytest.raises(ValueError):
        amx.pack(random_bf16(g, 24, 64))  # 24 columns: not whole panels
    with pytest.raises(ValueError):
        amx.pack(random_bf16(g, 32, 48))  # K = 48: not whole tile slices
    with pytest.raises(ValueError):
        amx.pack(torch.randn(32, 64))  # float32
    panels = amx.pack(random_bf16(g, 32, 64))
    with pytest.raises(ValueError):
        amx.gemm(random_bf16(g, 2, 96), panels)  # wrong K
    with pytest.raises(ValueError):
        amx.gemm(torch.randn(2, 64), panels)  # float32 x
    with pytest.raises(ValueError):
        amx.gemm(random_bf16(g, 2, 64), panels, random_bf16(g, 16))  # bias of the wrong width


def test_amx_linear_module():
    from loraplex.model.amx_linear import AmxLinear, amx_fits

    g = torch.Generator().manual_seed(10)
    layer = nn.Linear(96, 80, bias=True, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(80, 96, generator=g))
        layer.bias.copy_(torch.randn(80, generator=g))
    packed = AmxLinear(layer)
    assert torch.equal(packed.unpacked_weight(), layer.weight)
    assert packed.nbytes == 80 * 96 * 2
    x = random_bf16(g, 2, 5, 96)  # leading dims
    y = packed(x)
    assert y.shape == (2, 5, 80)
    assert_matches_float64(y.view(10, 80), x.view(10, 96), layer.weight.detach(), layer.bias.detach())
    assert not amx_fits(nn.Linear(96, 72, dtype=torch.bfloat16)) and not amx_fits(nn.Linear(96, 80))
    with pytest.raises(ValueError):
        AmxLinear(nn.Linear(96, 72, dtype=torch.bfloat16))


def test_engine_packs_with_amx_and_generates_like_onednn(monkeypatch, tmp_path):
    """pack_linear picks AmxLinear here (LORAPLEX_AMX=0: PackedLinear); q/k/v and gate/up fuse;
    a projection's outputs match the unpacked model's to float32 summation; greedy tokens equal
    the oneDNN-packed engine's; the weights take the same bytes."""
    from loraplex.model.amx_linear import AmxLinear
    from loraplex.model.fused_linear import PackedSlice
    from loraplex.model.linear import Projection
    from loraplex.model.loader import load_model
    from loraplex.model.packed_linear import PackedLinear, packing_available
    from loraplex.model.quantize import float16_weight_bytes, quantized_bytes
    from tests.fixtures.engine_run import engine_greedy
    from tests.fixtures.tiny_models import make_tiny_model

    if not packing_available():
        pytest.skip("oneDNN bfloat16 packing unavailable")
    jobs = {"a": (None, [1, 5, 9, 13, 2]), "b": (None, [3, 4]), "c": (None, [7] * 11)}
    model_dir = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LORAPLEX_AMX", flag)
        loaded = load_model(model_dir, torch.bfloat16, "cpu")
        tokens = engine_greedy(loaded, None, jobs, max_new_tokens=6)
        model = loaded.model
        kinds = {type(p.base) for p in model.modules() if isinstance(p, Projection)}
        groups = {type(p.base.group.linear) for p in model.modules()
                  if isinstance(p, Projection) and isinstance(p.base, PackedSlice)}
        runs[flag] = (tokens, kinds | groups, type(model.packed_head), quantized_bytes(model),
                      float16_weight_bytes(model))
        if flag == "1":
            plain = load_model(model_dir, torch.bfloat16, "cpu").model
            g = torch.Generator().manual_seed(4)
            mine = dict(model.named_modules())
            for name, ref in plain.named_modules():
                if isinstance(ref, Projection):
                    x = random_bf16(g, 5, ref.in_features)
                    assert_matches_float64(mine[name](x), x, ref.base.weight.detach(), ref.base.bias)
    assert runs["1"][1] == {AmxLinear, PackedSlice} and runs["1"][2] is AmxLinear
    assert runs["0"][1] == {PackedLinear, PackedSlice} and runs["0"][2] is PackedLinear
    assert runs["1"][0] == runs["0"][0]
    assert all(err is None and len(toks) == 6 for toks, err in runs["1"][0].values())
    assert runs["1"][3:] == runs["0"][3:]


def test_torch_amx_kernels_unaffected_in_the_same_thread():
    """oneDNN and ATen run their own AMX kernels on the same threads: after ours, their bfloat16
    matmul and attention give exactly what they gave before."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(11)
    q, k, v = (random_bf16(g, 1, 9, 37, 64) for _ in range(3))
    a, b = random_bf16(g, 64, 576), random_bf16(g, 576, 576)
    attention, product = F.scaled_dot_product_attention(q, k, v, is_causal=True), a @ b
    panels, x = amx.pack(random_bf16(g, 960, 576)), random_bf16(g, 37, 576)
    for _ in range(3):
        amx.gemm(x, panels)
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, is_causal=True), attention)
        amx.gemm(x[:5], panels)
        assert torch.equal(a @ b, product)


def _bf16_step(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 values at |x| (one step of its 8-bit significand)."""
    exp = torch.frexp(x.double().abs().clamp_min(1e-30)).exponent
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exp - 8)


@pytest.mark.parametrize("rows", [1, 7, 16, 17, 32, 45, 300])
@pytest.mark.parametrize(("n", "k"), [(960, 576), (576, 1536), (48, 64)])
def test_residual_epilogue_is_torchs_add(rows, n, k):
    """gemm(x, residual=r) == r + gemm(x), bit for bit, with strided x and residual rows."""
    g = torch.Generator().manual_seed(rows + n)
    panels, b = amx.pack(random_bf16(g, n, k)), random_bf16(g, n)
    x = random_bf16(g, rows, k + 32)[:, 16:16 + k]
    r = (random_bf16(g, rows, n + 16) * 4)[:, :n]
    assert torch.equal(amx.gemm(x, panels, b, residual=r), r + amx.gemm(x, panels, b))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 33, 100, 260])
@pytest.mark.parametrize(("half", "k"), [(1536, 576), (48, 64), (16, 32), (80, 96)])
def test_swiglu_epilogue_matches_torch_and_float64(half, k, rows, bias):
    """swiglu(x) against torch's F.silu(gate) * up on the same GEMM's bfloat16 halves: at most one
    bfloat16 step apart (our exp inside silu), nearly all equal; and as close to the float64
    silu(gate) * up of those halves as torch's own bfloat16 ops. Half widths of 1, 3 and 5 panels
    exercise the one-item tail of the 2-items-per-step grouping."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(rows * 7 + half + k)
    w = random_bf16(g, 2 * half, k) * 0.2
    x, b = random_bf16(g, rows, k), (random_bf16(g, 2 * half) if bias else None)
    panels = amx.pack(w)
    y = amx.gemm(x, panels, b)  # [rows, 2 half]: bf16(gate), bf16(up)
    gate, up = y[:, :half], y[:, half:]
    want = F.silu(gate) * up
    got = amx.swiglu(x, panels, b)
    assert got.shape == (rows, half) and got.dtype == torch.bfloat16
    diff = (got.double() - want.double()).abs()
    assert bool((diff <= _bf16_step(want)).all())
    assert (diff == 0).double().mean() >= 0.999
    g64, u64 = gate.double(), up.double()
    ref = g64 * torch.sigmoid(g64) * u64
    assert (got.double() - ref).abs().mean() <= 1.05 * (want.double() - ref).abs().mean() + 1e-12


def test_swiglu_epilogue_extremes_match_torch():
    """silu at the ends of the float range, infinities and NaN (set through the bias): torch's
    values, NaN where torch has NaN."""
    import torch.nn.functional as F

    half, k = 32, 32
    edge = torch.tensor([0.0, -0.0, 1e-3, -1e-3, 20.0, -20.0, 88.0, -88.0, 89.5, -89.5, 104.0, -104.0,
                         1e30, -1e30, float("inf"), float("-inf"), float("nan")] * 4)[:half]
    g = torch.Generator().manual_seed(12)
    w = torch.zeros(2 * half, k, dtype=torch.bfloat16)  # sums of zero: the bias is the value
    b = torch.cat([edge, random_bf16(g, half).float()]).to(torch.bfloat16)
    panels, x = amx.pack(w), random_bf16(g, 3, k)
    y = amx.gemm(x, panels, b)
    want = F.silu(y[:, :half]) * y[:, half:]
    got = amx.swiglu(x, panels, b)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def test_epilogue_operands_are_refused():
    g = torch.Generator().manual_seed(13)
    panels, x = amx.pack(random_bf16(g, 48, 64)), random_bf16(g, 4, 64)
    with pytest.raises(ValueError):
        amx.swiglu(x, panels)  # 48 columns: no two halves of whole panels
    with pytest.raises(ValueError):
        amx.gemm(x, panels, residual=random_bf16(g, 4, 32))  # residual of the wrong width
    with pytest.raises(ValueError):
        amx.gemm(x, panels, residual=torch.randn(4, 48))  # float32 residual


def test_fused_epilogues_in_the_engine(monkeypatch, tmp_path):
    """llama.FUSED_EPILOGUES: SwiGLU and the residual adds run in the AMX GEMMs' epilogues where
    no LoRA delta is due on those projections, the separate ops where one is (adapters on q/v,
    on layer 1's gate/up and on layer 1's v/down, batched with base rows); greedy tokens equal
    the unfused engine's for every request, and both epilogues really ran."""
    from loraplex.model import compiled_layers, llama
    from loraplex.model.loader import load_model
    from tests.fixtures.adapters import make_peft_adapter, manager_with_slots
    from tests.fixtures.engine_run import engine_greedy
    from tests.fixtures.tiny_models import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "model")
    kinds = ("qv_r4", "regex_mlp_r5", "layer1_r3")
    for i, kind in enumerate(kinds):
        make_peft_adapter(model_dir, tmp_path / "adapters" / kind, kind, seed=i)
    calls = {"swiglu": 0, "residual": 0}
    real_swiglu, real_gemm = amx.swiglu, amx.gemm

    def swiglu(*a, **kw):
        calls["swiglu"] += 1
        return real_swiglu(*a, **kw)

    def gemm(x, panels, bias=None, residual=None):
        calls["residual"] += residual is not None
        return real_gemm(x, panels, bias, residual)

    monkeypatch.setattr(amx, "swiglu", swiglu)
    monkeypatch.setattr(amx, "gemm", gemm)
    monkeypatch.setattr(compiled_layers, "COMPILED", False)  # the Python layers (compiled: test_compiled_layers)
    jobs = {"base": (None, [1, 5, 9, 13, 2]), "qv": ("qv_r4", [3, 4, 8]),
            "mlp1": ("regex_mlp_r5", [7] * 11), "down1": ("layer1_r3", [9, 1]), "base2": (None, [2, 2, 6])}
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(llama, "FUSED_EPILOGUES", fused)
        loaded = load_model(model_dir, torch.bfloat16, "cpu")
        manager, _ = manager_with_slots(loaded, tmp_path / "adapters", kinds)
        before = dict(calls)
        runs[fused] = engine_greedy(loaded, manager, jobs, max_new_tokens=6)
        ran = {name: calls[name] - before[name] for name in calls}
        assert (ran["swiglu"] > 0 and ran["residual"] > 0) if fused else ran == {"swiglu": 0, "residual": 0}
    assert all(err is None and len(toks) == 6 for toks, err in runs[True].values())
    assert runs[True] == runs[False]


@pytest.mark.parametrize("rows", [1, 17, 40])
def test_float_epilogue_is_the_bf16_result_widened(rows):
    """gemm_float == gemm(...).float(), bit for bit (the vocab projection's logits)."""
    g = torch.Generator().manual_seed(rows + 77)
    panels, b = amx.pack(random_bf16(g, 112, 96)), random_bf16(g, 112)
    x = random_bf16(g, rows, 128)[:, :96]
    got = amx.gemm_float(x, panels, b)
    assert got.dtype == torch.float32 and torch.equal(got, amx.gemm(x, panels, b).float())


@pytest.mark.parametrize("rows", [1, 17, 40, 64])
@pytest.mark.parametrize(("n", "k"), [(16, 32), (112, 96), (4096, 576)])
def test_argmax_epilogue_is_torch_argmax(rows, n, k):
    """gemm_argmax == torch.argmax(gemm_float(...), -1) on random operands, with and without bias,
    with 1 or 2 threads (4096 columns: each thread takes half, the merge picks between them)."""
    g = torch.Generator().manual_seed(rows * 7 + n)
    panels, b = amx.pack(random_bf16(g, n, k)), random_bf16(g, n)
    x = random_bf16(g, rows, 2 * k)[:, :k]  # strided rows
    before = torch.get_num_threads()
    try:
        for threads in (1, before):
            torch.set_num_threads(threads)
            for bias in (None, b):
                got = amx.gemm_argmax(x, panels, bias)
                assert got.dtype == torch.int64 and got.shape == (rows,)
                assert torch.equal(got, torch.argmax(amx.gemm_float(x, panels, bias), dim=-1))
    finally:
        torch.set_num_threads(before)


def test_argmax_epilogue_ties_and_nan():
    """Equal largest logits: the first column wins, whether the tied columns share a 16-column
    lane (100 and 2020: the same lane), sit in different lanes (100 and 101) or in different
    threads' halves (100 and 3000 of 4096). A NaN logit counts as largest, the first NaN winning:
    torch.argmax's answer in every case."""
    g = torch.Generator().manual_seed(11)
    x = random_bf16(g, 24, 576)
    w = random_bf16(g, 4096, 576)
    top = (x[0].float() * 4).to(torch.bfloat16)  # makes row 0's logit the largest in its columns
    cases = {"lane": (2020, 100), "lanes": (101, 100), "threads": (3000, 100)}
    for name, cols in cases.items():
        wt = w.clone()
        for c in cols:
            wt[c] = top
        panels = amx.pack(wt)
        logits = amx.gemm_float(x, panels)
        assert logits[0, cols[0]] == logits[0, cols[1]] == logits[0].max(), name
        got = amx.gemm_argmax(x, panels)
        assert got[0].item() == min(cols), name
        assert torch.equal(got, torch.argmax(logits, dim=-1)), name
    wn = w.clone()
    wn[3500, 3] = float("nan")  # column 3500 is NaN in every row; then column 700 too
    wn[700, 9] = float("nan")
    panels = amx.pack(wn)
    got = amx.gemm_argmax(x, panels)
    assert torch.equal(got, torch.full((24,), 700)) and torch.equal(got, torch.argmax(amx.gemm_float(x, panels), -1))


def test_greedy_steps_take_the_fused_argmax(monkeypatch, tmp_path):
    """Greedy requests with nothing between logits and argmax get their tokens from the vocab
    GEMM's ARGMAX epilogue (model.output_argmax): the same tokens as with llama.FUSED_ARGMAX off
    (logits, then argmax), base and adapter rows alike; a request asking for logprobs, a sampled
    one and a penalised one go through the logits and the sampler."""
    from loraplex.engine.engine import Engine
    from loraplex.engine.request import Request, SamplingParams
    from loraplex.config import EngineConfig
    from loraplex.model import llama
    from loraplex.model.loader import load_model
    from tests.fixtures.adapters import make_peft_adapter, manager_with_slots
    from tests.fixtures.engine_run import engine_greedy, run_requests
    from tests.fixtures.tiny_models import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "model")
    make_peft_adapter(model_dir, tmp_path / "adapters" / "qv_r4", "qv_r4", seed=1)
    calls = [0]
    real = amx.gemm_argmax

    def counted(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(amx, "gemm_argmax", counted)
    jobs = {"base": (None, [1, 5, 9, 13, 2]), "qv": ("qv_r4", [3, 4, 8]), "base2": (None, [2, 2, 6, 7])}
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(llama, "FUSED_ARGMAX", fused)
        loaded = load_model(model_dir, torch.bfloat16, "cpu")
        manager, _ = manager_with_slots(loaded, tmp_path / "adapters", ("qv_r4",))
        before = calls[0]
        runs[fused] = engine_greedy(loaded, manager, jobs, max_new_tokens=6)
        assert (calls[0] > before) == fused
    assert all(err is None and len(toks) == 6 for toks, err in runs[True].values())
    assert runs[True] == runs[False]

    monkeypatch.setattr(llama, "FUSED_ARGMAX", True)
    loaded = load_model(model_dir, torch.bfloat16, "cpu")
    eng = Engine(loaded, EngineConfig(block_size=16, num_kv_blocks=64, max_model_len=64))
    flags = []
    inner = eng.runner.run

    def spy(seqs, nums, greedy=False):
        flags.append(greedy)
        return inner(seqs, nums, greedy=greedy)

    eng.runner.run = spy
    eng.start()
    try:
        for params in (SamplingParams(max_new_tokens=3, temperature=0, logprobs=2),
                       SamplingParams(max_new_tokens=3, temperature=0.8, seed=1),
                       SamplingParams(max_new_tokens=3, temperature=0, repetition_penalty=1.3),
                       SamplingParams(max_new_tokens=3, temperature=0)):
            flags.clear()
            out = run_requests(eng, {"r": Request("r", [1, 2, 3], params)})
            assert out["r"][3] is None and len(out["r"][1]) == 3
            assert flags == [params == SamplingParams(max_new_tokens=3, temperature=0)] * 3, (params, flags)
    finally:
        eng.shutdown(1)
