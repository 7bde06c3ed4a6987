"""A measured roofline for one decode step of the served model on this machine's CPU.

What the hardware allows, measured here and now (the dev/CI CPUs differ: AMX, AVX-512 BF16, or
AVX2 only, where bfloat16 matmuls are emulated and ~5-10x slower than float32):

1. memory bandwidth: torch copy (dst = src), triad (a = b + s * c) and read (sum) over float32
   arrays of several sizes; the limit used is the best of any kernel over the arrays at least as
   large as the largest step's bytes (floor_bandwidth: a smaller array, re-read, is partly served
   from a large last-level cache, which the step's own re-reads of its weights are not);
2. matmul peak per dtype: F.linear at a large square shape and at the decode shapes of the model
   (M = batch rows); the fastest of them is the peak;
3. the floor of one decode step at batch B: max(bytes it must read or write / bandwidth,
   FLOPs it must do / matmul peak), bytes = every weight the step multiplies (projections, norms,
   the vocab projection) + the KV cache it reads + the K/V it writes; FLOPs = 2 x rows x weights
   + attention (QK^T and PV over each sequence's context). Activations are left out (a few MB,
   mostly cache-resident), so the floor is optimistic, as a floor should be;
4. the measured step: Engine.step() with B sequences all decoding (benchmarks/decode_driver.py;
   scheduler, forward, sampler and postprocessing, the real thing), median over rounds that
   interleave every (dtype, batch) case, so load from other processes hits all cases alike.

Efficiency = floor / measured step (100 % = at the hardware limit). The matmul peak and bandwidth
are measured before and after the steps; the best of both is used (a shared machine can only
make a measurement slower, never faster, so the best is the closest to the hardware).

    python benchmarks/roofline.py                       # ~5 min on 2 busy cores
    python benchmarks/roofline.py --batches 1,8 --rounds 2 --steps 2 --variants float32   # smoke

Writes benchmarks/results/roofline_cpu.md and .png (--out to change).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from decode_driver import VARIANTS  # noqa: E402
from machine import cpu_info  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "roofline_cpu.md"


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------

def _best_and_median(fn, reps: int) -> tuple[float, float]:
    fn()  # first touch / allocation outside the timing
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def measure_bandwidth(sizes_mib: list[int], reps: int = 5) -> list[dict]:
    """GB/s (1e9 bytes) of copy, triad and read over float32 arrays of each size, on ordinary
    (4 KiB) pages and on 2 MiB ones where the host gives them (the engine keeps its packed weights
    and adapter pool there: loraplex_kernels/hugepages.py). Bytes counted STREAM's way: copy
    2 x size, triad 3 x size, read 1 x size (write-allocate traffic not counted)."""
    from loraplex_kernels import hugepages

    rows = []
    for mib in sizes_mib:
        n = mib * 2**20 // 4
        for pages, alloc in (("", lambda: torch.rand(n)),
                             (", 2 MiB pages", lambda: hugepages.empty((n,), torch.float32).uniform_())):
            if pages and not hugepages.wanted():
                continue
            a, b, c = alloc(), alloc(), alloc()
            size = n * 4
            kernels = {
                "copy": (lambda: a.copy_(b), 2 * size),
                "triad": (lambda: torch.add(b, c, alpha=1.5, out=a), 3 * size),
                "read": (lambda: b.sum(), size),
            }
            for name, (fn, nbytes) in kernels.items():
                best, med = _best_and_median(fn, reps)
                rows.append(dict(kernel=name + pages, mib=mib, best=nbytes / best / 1e9, median=nbytes / med / 1e9))
            del a, b, c
    return rows


def floor_bandwidth(rows: Iterable[dict], step_bytes: float) -> tuple[float, int]:
    """(GB/s, array MiB) for the floor: the best of any kernel over the arrays of at least
    `step_bytes` (each array re-read at that distance, as the step re-reads its weights), else
    over the largest arrays measured. rows: measure_bandwidth's."""
    rows = list(rows)
    big = [r for r in rows if r["mib"] * 2**20 >= step_bytes]
    if not big:
        largest = max(r["mib"] for r in rows)
        big = [r for r in rows if r["mib"] == largest]
    best = max(big, key=lambda r: r["best"])
    return best["best"], best["mib"]


def measure_weight_streaming(arch, reps: int = 5) -> dict:
    """GB/s at which this machine reads the decode step's weight matrices one after another:
    separate bfloat16 tensors of the model's GEMM shapes (q/k/v fused, o, gate/up fused, down per
    layer, then the vocab projection), each read once per pass by a plain reduction (int16 max).
    What a perfect GEMM would stream at here: on some VMs far below the large-array bandwidth
    (many MB-sized matrices, each a new prefetch stream and new pages)."""
    from loraplex_kernels import hugepages

    h, i = arch.hidden_size, arch.intermediate_size
    shapes = [(arch.q_size + 2 * arch.kv_size, h), (h, arch.q_size), (2 * i, h), (h, i)] * arch.num_layers
    # One huge-page arena, as the engine's packed weights (model/weight_arena.py).
    mats = hugepages.carve([((n, k), torch.bfloat16) for n, k in shapes + [(arch.vocab_size, h)]])
    for m in mats:
        m.copy_(torch.randn(m.shape))
    nbytes = sum(m.numel() * 2 for m in mats)

    def read_all():
        for m in mats:
            m.view(torch.int16).max()

    best, med = _best_and_median(read_all, reps)
    return dict(best=nbytes / best / 1e9, median=nbytes / med / 1e9, mbytes=nbytes / 1e6)


def measure_matmul(dtype: torch.dtype, shapes: list[tuple[int, int, int]], reps: int = 5,
                   ours: bool = False) -> list[dict]:
    """GFLOP/s of F.linear(x [M, K], w [N, K]) at each (M, K, N) in `dtype`, best and median;
    `ours`: the GEMM a bfloat16 engine runs on this CPU where it is one of our kernels
    (model/amx_linear.py on AMX CPUs, model/widened_linear.py on AVX2-only ones)."""
    from loraplex.model.amx_linear import AmxLinear, amx_fits, amx_wanted
    from loraplex.model.widened_linear import WidenedLinear, widening_wanted

    rows = []
    for m, k, n in shapes:
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        linear = torch.nn.Linear(k, n, bias=False, device="meta")
        linear.weight = torch.nn.Parameter(w, requires_grad=False)
        layer = linear
        if ours and dtype == torch.bfloat16 and amx_wanted() and amx_fits(linear):
            layer = AmxLinear(linear)
        elif ours and dtype == torch.bfloat16 and widening_wanted():
            layer = WidenedLinear(linear)
        best, med = _best_and_median(lambda: layer(x), reps)
        flops = 2 * m * k * n
        rows.append(dict(m=m, k=k, n=n, best=flops / best / 1e9, median=flops / med / 1e9))
    return rows


# --------------------------------------------------------------------------------------------
# The model's decode step: bytes and FLOPs
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepCost:
    """What one decode step of `batch` sequences must move and compute, at least."""

    weight_bytes: int  # every weight the step multiplies or scales, read once
    kv_read_bytes: int  # the cached K/V the batch attends over
    kv_write_bytes: int  # this step's K/V
    matmul_flops: int  # 2 x rows x weights (projections + vocab projection)
    attention_flops: int  # QK^T + PV over each sequence's context

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes

    @property
    def flops(self) -> int:
        return self.matmul_flops + self.attention_flops

    def floor_seconds(self, bandwidth: float, peak_flops: float) -> tuple[float, str]:
        """(the step's lower bound in seconds, "memory" or "compute": which one sets it);
        bandwidth in bytes/s, peak in FLOP/s."""
        mem, comp = self.bytes / bandwidth, self.flops / peak_flops
        return (mem, "memory") if mem >= comp else (comp, "compute")


def matmul_weights(arch) -> int:
    """Elements of the weight matrices one token's forward multiplies: the seven projections of
    every layer and the vocab projection (tied or not, it is a [vocab, hidden] matrix read whole)."""
    h, i = arch.hidden_size, arch.intermediate_size
    per_layer = h * arch.q_size + 2 * h * arch.kv_size + arch.q_size * h + 3 * h * i
    return arch.num_layers * per_layer + arch.vocab_size * h


def decode_step_cost(arch, dtype_bytes: int, batch: int, context: float) -> StepCost:
    """The StepCost of one decode step: `batch` sequences, each attending over `context` keys."""
    h = arch.hidden_size
    norms = arch.num_layers * 2 * h + h + (2 * arch.num_layers * arch.head_dim if arch.qk_norm else 0)
    weights = matmul_weights(arch)
    kv_per_token = arch.num_layers * 2 * arch.kv_size * dtype_bytes  # K and V of every layer
    # Each query head: q.k over the context (2 FLOPs per key element) and p.v (2 more).
    attention = arch.num_layers * batch * arch.num_heads * 4 * arch.head_dim * context
    return StepCost(weight_bytes=(weights + norms) * dtype_bytes,
                    kv_read_bytes=int(batch * context * kv_per_token),
                    kv_write_bytes=batch * kv_per_token,
                    matmul_flops=2 * batch * weights, attention_flops=int(attention))


# --------------------------------------------------------------------------------------------
# Measured steps
# --------------------------------------------------------------------------------------------

def measure_steps(models: dict, batches: list[int], rounds: int, steps: int, prompt_len: int) -> dict:
    """{(dtype, batch): {"step": [s...], "forward": [s...], "context": [...]}} from interleaved rounds."""
    from decode_driver import make_decode_engine, time_forward

    decode_steps = rounds * steps + 1
    engines = {}
    for dname, loaded in models.items():
        for b in batches:
            t0 = time.perf_counter()
            dec = make_decode_engine(loaded, b, prompt_len, decode_steps, widen=VARIANTS[dname][1])
            time_forward(dec)
            dec.step()  # one untimed decode step: first-call costs at this shape
            engines[(dname, b)] = dec
            print(f"  {dname} batch {b}: prefilled in {time.perf_counter() - t0:.1f} s", flush=True)
    out = {k: {"step": [], "forward": [], "context": []} for k in engines}
    keys = list(engines)
    for r in range(rounds):
        for key in (keys if r % 2 == 0 else keys[::-1]):  # reversed every other round
            dec = engines[key]
            for _ in range(steps):
                out[key]["context"].append(dec.mean_context)
                dec.forward_seconds.clear()
                out[key]["step"].append(dec.step())
                out[key]["forward"].append(dec.forward_seconds[-1])
        print(f"  round {r}: " + ", ".join(f"{d} b{b} {statistics.median(v['step']) * 1e3:.0f} ms"
                                           for (d, b), v in out.items()), flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def best_of(*runs: list[dict], key) -> dict:
    """Per key(row): the row with the highest `best` over several measurement runs."""
    best: dict = {}
    for run in runs:
        for row in run:
            k = key(row)
            if k not in best or row["best"] > best[k]["best"]:
                best[k] = row
    return best


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for dname, color in zip(VARIANTS, ("tab:blue", "tab:gray", "tab:orange")):
        rs = [r for r in rows if r["dtype"] == dname]
        if not rs:
            continue
        b = [r["batch"] for r in rs]
        ax.plot(b, [r["step_ms"] for r in rs], "o-", color=color, label=f"{dname} measured step")
        if dname != "bfloat16-torch-gemm":  # same floor as bfloat16
            ax.plot(b, [r["floor_ms"] for r in rs], "s--", color=color, label=f"{dname} roofline floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequences in the decode step")
    ax.set_ylabel("ms per step")
    ax.set_title("Decode step vs the roofline floor (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per case and round")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--bandwidth-mib", default="128,256,512,1024",
                   help="float32 array sizes (the floor uses those of at least a step's bytes)")
    p.add_argument("--square", type=int, default=2048, help="M = K = N of the peak matmul")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    batches = [int(x) for x in a.batches.split(",")]
    dnames = a.variants.split(",")
    unknown = set(dnames) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}")
    sizes = [int(x) for x in a.bandwidth_mib.split(",")]
    cpu = cpu_info()
    print(cpu.describe(), flush=True)

    from loraplex.model.default_model import ensure_default_model
    from loraplex.model.loader import load_model
    from loraplex.model.packed_linear import packing_available
    from loraplex.model.amx_linear import amx_wanted
    from loraplex.model.widened_linear import widening_wanted

    model_dir = ensure_default_model()
    models = {d: load_model(model_dir, VARIANTS[d][0], torch.device("cpu")) for d in dnames}
    arch = next(iter(models.values())).arch
    h, i = arch.hidden_size, arch.intermediate_size
    # The decode step's GEMM shapes (M = rows): q/k/v fused, o, gate/up fused, down, vocab.
    decode_shapes = [(b, k, n) for b in batches for k, n in
                     ((h, arch.q_size + 2 * arch.kv_size), (arch.q_size, h), (h, 2 * i), (i, h), (h, arch.vocab_size))]

    def machine_pass(tag):
        print(f"measuring bandwidth and matmul peaks ({tag})", flush=True)
        bw = measure_bandwidth(sizes)
        mm = {d: measure_matmul(VARIANTS[d][0], [(a.square, a.square, a.square)] + decode_shapes, reps=5,
                                ours=VARIANTS[d][1])
              for d in dnames}
        return bw, mm, measure_weight_streaming(arch)

    bw1, mm1, st1 = machine_pass("before")
    print("measuring decode steps", flush=True)
    steps = measure_steps(models, batches, a.rounds, a.steps, a.prompt_len)
    bw2, mm2, st2 = machine_pass("after")
    streaming = max(st1["best"], st2["best"]) * 1e9  # bytes/s
    load1 = os.getloadavg()

    bw = best_of(bw1, bw2, key=lambda r: (r["kernel"], r["mib"]))
    step_bytes = max(decode_step_cost(arch, VARIANTS[d][0].itemsize, b, statistics.mean(steps[(d, b)]["context"])).bytes
                     for d in dnames for b in batches)
    bw_gbs, bw_mib = floor_bandwidth(bw.values(), step_bytes)
    bandwidth = bw_gbs * 1e9  # bytes/s
    mm = {d: best_of(mm1[d], mm2[d], key=lambda r: (r["m"], r["k"], r["n"])) for d in dnames}
    # The peak is the fastest any measured shape ran (on an AVX2-only CPU bfloat16 runs faster at
    # the decode shapes than at the square one: the square is not always the best case). The
    # step's arithmetic may run in any dtype that holds its operands exactly: float32 holds
    # bfloat16, so a bfloat16 floor uses the fastest rate measured in either (on a CPU without
    # bfloat16 units float32's FMAs are the hardware's bfloat16 limit too).
    own = {d: max(r["best"] for r in mm[d].values()) * 1e9 for d in dnames}  # FLOP/s
    peak = {d: own[d] if VARIANTS[d][0] == torch.float32 else max(own.values()) for d in dnames}

    def decode_gemm_rate(d, b):
        """FLOP/s of the step's GEMMs at M = b, weighted by their FLOPs (= total FLOPs / total time)."""
        rs = [mm[d][s] for s in decode_shapes if s[0] == b]
        flops = sum(2 * r["m"] * r["k"] * r["n"] for r in rs)
        return flops / sum(2 * r["m"] * r["k"] * r["n"] / (r["best"] * 1e9) for r in rs)

    rows = []
    for d in dnames:
        for b in batches:
            s = steps[(d, b)]
            ctx = statistics.mean(s["context"])
            cost = decode_step_cost(arch, VARIANTS[d][0].itemsize, b, ctx)
            floor, bound = cost.floor_seconds(bandwidth, peak[d])
            floor_dec, _ = cost.floor_seconds(bandwidth, decode_gemm_rate(d, b))
            floor_st, _ = cost.floor_seconds(min(streaming, bandwidth), peak[d])
            step, fwd = statistics.median(s["step"]), statistics.median(s["forward"])
            best = min(s["step"])
            rows.append(dict(dtype=d, batch=b, ctx=ctx, mbytes=cost.bytes / 1e6, gflop=cost.flops / 1e9,
                             mem_ms=cost.bytes / bandwidth * 1e3, comp_ms=cost.flops / peak[d] * 1e3,
                             floor_ms=floor * 1e3, bound=bound, floor_dec_ms=floor_dec * 1e3,
                             floor_st_ms=floor_st * 1e3, eff_st=floor_st / step,
                             step_ms=step * 1e3, fwd_ms=fwd * 1e3, eff=floor / step, eff_dec=floor_dec / step,
                             best_ms=best * 1e3, eff_best=floor / best, tps=b / step))

    lines = [
        "# Roofline of a decode step on CPU", "",
        f"Model: {Path(model_dir).name} (the embedded default), {arch.num_layers} layers, hidden {h}, "
        f"intermediate {i}, {arch.num_heads} heads / {arch.num_kv_heads} KV heads, vocab {arch.vocab_size}; "
        f"{matmul_weights(arch) / 1e6:.1f} M matmul weights per token (projections + vocab projection).", "",
        f"- CPU: {cpu.describe()}",
        f"- oneDNN bfloat16 weight packing available (model/packed_linear.py): {packing_available()}; "
        f"bfloat16 GEMMs on our AMX kernel (model/amx_linear.py): {amx_wanted()}; "
        f"bfloat16 GEMMs in float32 math (model/widened_linear.py): {widening_wanted()}",
        "- Variants: `bfloat16` = the engine as it runs by default; `bfloat16-torch-gemm` = the same with "
        "LORAPLEX_WIDEN_BF16=0 and LORAPLEX_AMX=0 (torch's bfloat16 GEMM, oneDNN-packed where it can be: "
        "what ran before our GEMM kernels); `float32` = --dtype float32.",
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load0)}, at end "
        f"{'/'.join(f'{x:.2f}' for x in load1)}. Other processes on these cores (a load average above "
        "this run's own ~1-2) and a virtual machine's neighbours inflate absolute times by an unknown factor; bandwidth and peaks "
        "are the best of a pass before and one after the steps, the steps the median of interleaved rounds.",
        "", "Command: `python benchmarks/roofline.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
        "", "## Machine limits (measured)", "",
        "| kernel | array MiB | GB/s best | GB/s median |", "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['kernel']} | {r['mib']} | {r['best']:.1f} | {r['median']:.1f} |" for r in bw.values()]
    lines += ["", f"Bandwidth used for the floor: **{bandwidth / 1e9:.1f} GB/s**, the best kernel over the arrays "
              f"of at least the largest step's {step_bytes / 1e6:.0f} MB (here {bw_mib} MiB): an array re-read at "
              f"a smaller size is partly served from the last-level cache (L3 "
              f"{f'{cpu.l3_bytes / 2**20:.0f} MiB' if cpu.l3_bytes else 'of unknown size'} here), which the step's re-reads of its weights, that far apart, are not.", "",
              "| dtype | M x K x N | GFLOP/s best | GFLOP/s median |", "|---|---|---:|---:|"]
    for d in dnames:
        lines += [f"| {d} | {r['m']} x {r['k']} x {r['n']} | {r['best']:.1f} | {r['median']:.1f} |"
                  for r in mm[d].values()]
    lines += ["", "Fastest rate measured: " + ", ".join(f"{d} {own[d] / 1e9:.1f} GFLOP/s" for d in dnames)
              + " (square or decode shape). Peak used for the floor: "
              + ", ".join(f"{d} **{peak[d] / 1e9:.1f} GFLOP/s**" for d in dnames)
              + " (bfloat16: the fastest of any variant, float32 FMAs carry bfloat16 operands exactly).", ""]
    lines += [
        "## Decode step vs floor", "",
        "floor = max(bytes / bandwidth, FLOPs / peak); efficiency = floor / measured step (the target of "
        "issue 19 is >= 50 % in bfloat16 at 32 sequences). `floor @ decode GEMMs` uses the GEMM rate this CPU "
        "reaches at the step's own shapes (M = batch) instead of the square peak: the part of the gap that "
        "is the matmul library's at small M, not ours. step = Engine.step() (schedule + forward + sample + "
        "postprocess); forward = ModelRunner.run inside it (medians). On a shared machine the fastest step "
        "of the rounds is the closest to what the hardware does alone: `best step` and its efficiency. "
        f"`floor @ weight streaming` takes the rate at which this machine reads the step's weight matrices "
        f"one after another ({streaming / 1e9:.1f} GB/s in this run, a plain reduction over separate "
        "tensors of the model's GEMM shapes) instead of the large-array bandwidth: what a perfect GEMM "
        "could stream here; the target stays defined against the floor.", "",
        "| dtype | batch | mean context | MB moved | GFLOP | memory ms | compute ms | floor ms (bound) "
        "| median step ms | forward ms | efficiency | floor @ decode GEMMs ms | efficiency vs that "
        "| floor @ weight streaming ms | efficiency vs that | tokens/s "
        "| best step ms | efficiency (best) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['ctx']:.0f} | {r['mbytes']:.0f} | {r['gflop']:.2f} | "
                     f"{r['mem_ms']:.1f} | {r['comp_ms']:.1f} | {r['floor_ms']:.1f} ({r['bound']}) | "
                     f"{r['step_ms']:.1f} | {r['fwd_ms']:.1f} | {100 * r['eff']:.0f} % | {r['floor_dec_ms']:.1f} | "
                     f"{100 * r['eff_dec']:.0f} % | {r['floor_st_ms']:.1f} | {100 * r['eff_st']:.0f} % | "
                     f"{r['tps']:.0f} | {r['best_ms']:.1f} | {100 * r['eff_best']:.0f} % |")
    def ratio(num, den, b, f):
        return f(steps[(num, b)]["step"]) / f(steps[(den, b)]["step"])

    for num, den, what in (("bfloat16-torch-gemm", "bfloat16", "speed-up of our bfloat16 GEMM kernels"),
                           ("float32", "bfloat16", "< 1: float32 is faster here")):
        if num in dnames and den in dnames:
            lines += ["", f"{num} / {den} step time, same run ({what}): "
                      + ", ".join(f"batch {b} {ratio(num, den, b, statistics.median):.2f}x "
                                  f"(best steps {ratio(num, den, b, min):.2f}x)" for b in batches)]
    lines += ["", "Per-step times (ms) of every round, for the record:", ""]
    for (d, b), s in steps.items():
        lines.append(f"- {d} batch {b}: step " + ", ".join(f"{x * 1e3:.0f}" for x in s["step"])
                     + "; forward " + ", ".join(f"{x * 1e3:.0f}" for x in s["forward"]))
    text = "\n".join(lines) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    write_plot(rows, a.out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
