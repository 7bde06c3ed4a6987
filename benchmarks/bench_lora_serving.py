"""Multi-LoRA serving on the default model (SmolLM2-135M-Instruct, CPU): four sub-benchmarks.

Each ratio below is measured within one run, the compared systems interleaved round by round so
that other load on the (shared, 2-core) machine hits both sides alike:

(b) many adapters vs the base model: 100 registered rank-8 adapters on q,k,v,o, every request
    picking one uniformly at random, 32 concurrent streams (closed loop), against the same
    requests with no adapter on the same engine. Target: LoRA tokens/s >= 0.75x base.
(c) the same adapter load vs PEFT's mixed-adapter batch: a PeftModel holding 32 of the adapters
    runs `generate(..., adapter_names=[one per row])` on batches of 32 left-padded prompts.
    Target: loraplex tokens/s >= 5x PEFT's.
(d) a large registry under --adapter-root: 1000 adapters on all seven projections, ranks
    8/16/32/64, loaded on demand (host tier of --max-cpu-loras, --zipf-max-loras device slots),
    zipf popularity, two passes (empty cache, then warm). Reports tokens/s, device-slot hit
    ratio, evictions, disk loads.
(e) adapter load time: disk -> host tier (LoraManager.ensure_available / load), page cache cold
    and warm, and host tier -> a fresh device slot (acquire), per rank, median of repeats.

With (b), a profile of one decode step (LoRA vs base, stepped by hand) shows where the extra
time goes: the add_lora calls, those on projections no running adapter targets, top aten ops.

The engine runs with torch's default thread count (one per core, as `loraplex serve` does; the
compiled CPU kernels split their calls over the same threads), PEFT and transformers at 1 thread
and at that count, each a case of the same rounds: (c) is judged against PEFT at its own fastest
setting. --threads 1 --peft-threads 1 compares one core against one core.

Adapters are written directly in PEFT's on-disk format (adapter_config.json +
adapter_model.safetensors with keys `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
...) with random weights: nothing is trained or downloaded. Every request is greedy with EOS
ignored, so every system generates exactly --max-new-tokens tokens per request.

    .venv/bin/python benchmarks/bench_lora_serving.py            # all four, 8-13 min on 2 cores
    .venv/bin/python benchmarks/bench_lora_serving.py --only b,c --rounds 3
    .venv/bin/python benchmarks/bench_lora_serving.py --only b,c --threads 1 --peft-threads 1 \
        --out benchmarks/results/lora_serving_cpu_1thread.md
    .venv/bin/python benchmarks/bench_lora_serving.py --quick    # smoke run, ~1-2 min

Writes benchmarks/results/lora_serving_cpu.md and lora_serving_cpu.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
# OMP_WAIT_POLICY is left to the caller (unset: libgomp's workers spin briefly after a parallel
# region, then sleep). PASSIVE (sleep at once) was this benchmark's default once, to keep the
# engine thread's pool and the main thread's (PEFT, transformers) from spinning on each other's
# core; it made every 2-thread op wait on a futex wake-up instead: a hand-stepped 32-sequence
# decode step on 2 threads took 83 ms with PASSIVE against 58 ms unset (85 ms on 1 thread).
# With both pools alive libgomp does the same by itself (it throttles its spin once its threads
# outnumber the cores), so this thread releases its pool before the engine's cases run
# (loraplex_kernels/openmp_pool.py).

import torch  # noqa: E402
from loraplex_kernels import openmp_pool  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_serving import QUESTIONS, _fmt_load, machine_info  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "lora_serving_cpu.md"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ATTN + ("gate_proj", "up_proj", "down_proj")
_PARENT = {p: ("self_attn" if p in ATTN else "mlp") for p in ALL_LINEAR}
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


# --------------------------------------------------------------------------------------------
# Adapter folders, written in PEFT's format without PEFT (1000 folders must take seconds)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shapes:
    num_layers: int
    features: dict  # short name -> (in_features, out_features)

    def params(self, targets: tuple[str, ...], rank: int) -> int:
        """LoRA parameters of one adapter: r * (in + out) per targeted projection and layer."""
        return self.num_layers * rank * sum(sum(self.features[t]) for t in targets)


def random_lora_tensors(shapes: Shapes, targets: tuple[str, ...], rank: int, gen: torch.Generator,
                        dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's key layout with random (never zero) A and B.

    A ~ N(0, 1/in) keeps x @ A.T at the scale of x; B ~ N(0, 0.02^2) makes the delta a clear but
    not model-breaking change (PEFT would init B to zero, a no-op adapter).
    """
    out = {}
    for layer in range(shapes.num_layers):
        for t in targets:
            d_in, d_out = shapes.features[t]
            key = f"base_model.model.model.layers.{layer}.{_PARENT[t]}.{t}"
            a = torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)  # [r, in]
            b = torch.randn(d_out, rank, generator=gen) * 0.02  # [out, r]
            out[f"{key}.lora_A.weight"] = a.to(dtype).contiguous()
            out[f"{key}.lora_B.weight"] = b.to(dtype).contiguous()
    return out


def write_config(folder: Path, rank: int, alpha: float, targets: tuple[str, ...], base: str) -> None:
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": list(targets),
        "bias": "none", "use_rslora": False, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], rank: int, alpha: float,
                  targets: tuple[str, ...], base: str) -> Path:
    from safetensors.torch import save_file

    write_config(folder, rank, alpha, targets, base)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def make_uniform_set(root: Path, n: int, shapes: Shapes, targets: tuple[str, ...], rank: int,
                     file_dtype: torch.dtype, base: str, seed: int) -> list[str]:
    """(b)/(c): n adapters of one kind, each with its own random weights. Returns their ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for i in range(n):
        aid = f"u{i:03d}"
        write_adapter(root / aid, random_lora_tensors(shapes, targets, rank, gen, file_dtype),
                      rank, 2.0 * rank, targets, base)
        ids.append(aid)
    return ids


def make_registry(root: Path, n: int, ranks: tuple[int, ...], distinct_per_rank: int,
                  shapes: Shapes, file_dtype: torch.dtype, base: str, seed: int) -> dict[str, int]:
    """(d)/(e): n all-linear adapters, rank ranks[i % len(ranks)]. Returns id -> rank.

    1000 distinct all-linear files would be ~10 GB (rank 8: 4.9 MB, rank 64: 39 MB in bf16), so
    each rank has `distinct_per_rank` weight files and adapters hard-link one of them; every
    adapter still has its own adapter_config.json with its own lora_alpha (scale), so no two
    adapters compute the same delta and each load reads, decodes and converts a whole file.
    """
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    pool = root / "_weights"
    files: dict[int, list[Path]] = {}
    for r in ranks:
        files[r] = []
        for k in range(distinct_per_rank):
            f = pool / f"r{r}_{k}.safetensors"
            f.parent.mkdir(parents=True, exist_ok=True)
            save_file(random_lora_tensors(shapes, ALL_LINEAR, r, gen, file_dtype), str(f),
                      metadata={"format": "pt"})
            files[r].append(f)
    out = {}
    for i in range(n):
        r = ranks[i % len(ranks)]
        aid = f"z{i:04d}"
        folder = root / aid
        # alpha in [r, 2r): a per-adapter scale; the weights file is shared within a rank
        write_config(folder, r, r * (1.0 + (i % 97) / 97.0), ALL_LINEAR, base)
        src, dst = files[r][(i // len(ranks)) % distinct_per_rank], folder / "adapter_model.safetensors"
        try:
            os.link(src, dst)
        except OSError:  # a filesystem without hard links: pay the copy
            shutil.copyfile(src, dst)
        out[aid] = r
    return out


# --------------------------------------------------------------------------------------------
# Closed-loop client on the engine (one thread per stream, like a gRPC servicer's workers)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
    prompt: tuple[int, ...]
    adapter: str  # "" = base model


@dataclasses.dataclass
class RunResult:
    name: str
    requests: int
    tokens: int
    wall_s: float
    ttfts: list[float]
    outputs: list[list[int]]
    retries: int = 0
    mean_running: float = float("nan")  # sequences in the running batch, sampled every 50 ms
    mean_waiting: float = float("nan")  # admitted to the engine but not running (e.g. no slot)

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.wall_s

    def ttft_ms(self, q: float) -> float:
        xs = sorted(self.ttfts)
        return 1e3 * xs[min(len(xs), max(1, math.ceil(q * len(xs)))) - 1]


def run_streams(engine, manager, jobs: list[Job], streams: int, max_new_tokens: int, name: str,
                on_demand: bool = False) -> RunResult:
    """Run `jobs` with `streams` in flight; each stream submits its next job when one finishes.

    on_demand: before submitting, make the adapter ready on the host tier (disk read if needed)
    from the stream's own thread, as a server worker would; a request whose adapter was dropped
    again before it was reserved (another stream's load evicted it) is retried.
    """
    from loraplex.engine.errors import AdapterNotFoundError
    from loraplex.engine.request import FinishReason, Request, SamplingParams

    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    n = len(jobs)
    outputs: list[list[int]] = [[] for _ in range(n)]
    ttfts = [0.0] * n
    errors: list[str] = []
    retries = [0]
    counter = iter(range(n))
    lock = threading.Lock()

    threads_per_op = torch.get_num_threads()

    def worker():
        torch.set_num_threads(threads_per_op)  # per OS thread (see Engine._loop): loads run here
        while True:
            with lock:
                i = next(counter, None)
            if i is None or errors:
                return
            job = jobs[i]
            done = threading.Event()
            start = time.perf_counter()

            def on_output(out, i=i, start=start, done=done):  # engine thread: record and return
                if out.new_token_ids and not outputs[i]:
                    ttfts[i] = time.perf_counter() - start
                outputs[i].extend(out.new_token_ids)
                if out.finished:
                    if out.finish_reason not in (FinishReason.LENGTH, FinishReason.EOS):
                        errors.append(f"{name} request {i}: {out.finish_reason} {out.error}")
                    done.set()

            for attempt in range(50):
                try:
                    if on_demand and job.adapter:
                        manager.ensure_available(job.adapter)
                    engine.submit(Request(f"{name}-{i}", list(job.prompt), sampling,
                                          adapter_id=job.adapter), on_output)
                    break
                except AdapterNotFoundError as exc:
                    if not on_demand or attempt == 49:
                        errors.append(f"{name} request {i}: {exc!r}")
                        return
                    with lock:
                        retries[0] += 1
                except Exception as exc:  # reported by the caller, not lost in a thread
                    errors.append(f"{name} request {i}: {exc!r}")
                    return
            done.wait()

    occupancy: list[tuple[int, int]] = []
    stop = threading.Event()

    def sampler():  # how full the running batch is: requests waiting for a slot show up here
        while not stop.wait(0.05):
            st = engine.stats()
            occupancy.append((st.num_running, st.num_waiting))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(streams, n))]
    watcher = threading.Thread(target=sampler, daemon=True)
    t0 = time.perf_counter()
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    watcher.join()
    if errors:
        raise RuntimeError("; ".join(errors[:5]))
    mean = (lambda k: statistics.fmean(o[k] for o in occupancy)) if occupancy else (lambda k: float("nan"))
    return RunResult(name, n, sum(map(len, outputs)), wall, ttfts, outputs, retries[0],
                     mean_running=mean(0), mean_waiting=mean(1))


def make_engine(loaded, manager, streams: int, prompt_len: int, max_new_tokens: int, **engine_kw):
    """A started engine sized for `streams` sequences; `engine_kw`: other EngineConfig fields."""
    from loraplex.config import EngineConfig
    from loraplex.engine.engine import Engine

    block = 16
    per_seq_blocks = -(-(prompt_len + max_new_tokens) // block) + 1
    config = EngineConfig(block_size=block, num_kv_blocks=max(64, streams * per_seq_blocks),
                          max_num_seqs=streams, max_model_len=prompt_len + max_new_tokens + 16,
                          max_new_tokens_cap=max(max_new_tokens, 16), **engine_kw)
    engine = Engine(loaded, config, lora_manager=manager)
    engine.warmup()
    engine.start()
    return engine


def stats_snapshot(manager) -> dict:
    s = manager.stats
    return dict(hits=s.hits, misses=s.misses, device_evictions=s.device_evictions,
                host_evictions=s.host_evictions, loads=dict(s.loads), load_seconds=list(s.load_seconds))


def stats_delta(before: dict, after: dict) -> dict:
    d = {k: after[k] - before[k] for k in ("hits", "misses", "device_evictions", "host_evictions")}
    d["loads"] = {k: v - before["loads"].get(k, 0) for k, v in after["loads"].items()
                  if v - before["loads"].get(k, 0)}
    d["load_seconds"] = after["load_seconds"][len(before["load_seconds"]):]  # deque maxlen 1024
    return d


# --------------------------------------------------------------------------------------------
# PEFT / transformers baseline: static batches, left padding
# --------------------------------------------------------------------------------------------

def load_peft(model_dir: Path, dtype: torch.dtype, folders: list[Path], names: list[str]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    # autocast_adapter_dtype=False: keep the LoRA weights in the model dtype (PEFT's default
    # upcasts bf16 adapters to float32, which only makes its LoRA matmuls slower on CPU).
    model = PeftModel.from_pretrained(hf, str(folders[0]), adapter_name=names[0],
                                      autocast_adapter_dtype=False)
    for folder, name in zip(folders[1:], names[1:]):
        model.load_adapter(str(folder), adapter_name=name, autocast_adapter_dtype=False)
    return model.eval()


def run_hf_batches(model, jobs: list[Job], batch: int, max_new_tokens: int, name: str,
                   pad_id: int, use_adapters: bool) -> RunResult:
    """generate() on consecutive batches of `batch` jobs; adapter_names carries each row's adapter."""
    outputs, wall = [], 0.0
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=pad_id, max_new_tokens=max_new_tokens,
              min_new_tokens=max_new_tokens)
    for s in range(0, len(jobs), batch):
        chunk = jobs[s:s + batch]
        width = max(len(j.prompt) for j in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [B, W], left padded
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, j in enumerate(chunk):
            ids[r, width - len(j.prompt):] = torch.tensor(j.prompt)
            mask[r, width - len(j.prompt):] = 1
        t0 = time.perf_counter()
        with torch.inference_mode():
            if use_adapters:
                out = model.generate(input_ids=ids, attention_mask=mask,
                                     adapter_names=[j.adapter or "__base__" for j in chunk], **kw)
            else:
                with model.disable_adapter():
                    out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        wall += time.perf_counter() - t0
        outputs += [row[width:].tolist() for row in out]
    return RunResult(name, len(jobs), sum(map(len, outputs)), wall, [], outputs)


# --------------------------------------------------------------------------------------------
# Sub-benchmarks
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    model_dir: Path
    loaded: object
    prompts: list[tuple[int, ...]]
    shapes: Shapes
    work: Path
    pad_id: int
    file_dtype: torch.dtype  # dtype of the tensors written into adapter files
    backend: str  # kernel backend add_lora dispatches to
    t_start: float
    parallel_cost: dict  # threads -> ms of one parallel op (see parallel_op_cost)
    registry: tuple | None = None  # (root, id -> rank) of (d)'s folders, reused by (e)
    report: dict = dataclasses.field(default_factory=dict)


def section_load(label: str) -> str:
    return f"{label}: load average {_fmt_load(os.getloadavg())}"


def bench_many_adapters(ctx: Context, with_peft: bool, with_base: bool) -> None:
    """(b) and (c): uniform popularity over 100 rank-8 q,k,v,o adapters, 32 streams."""
    from loraplex.config import LoraConfig
    from loraplex.lora.manager import LoraManager

    a = ctx.args
    root = ctx.work / "uniform"
    t0 = time.perf_counter()
    ids = make_uniform_set(root, a.num_adapters, ctx.shapes, ATTN, 8, ctx.file_dtype, str(ctx.model_dir),
                           seed=a.seed)
    gen_s = time.perf_counter() - t0
    manager = LoraManager(LoraConfig(max_loras=a.max_loras, max_lora_rank=a.max_lora_rank,
                                     max_cpu_loras=max(128, a.num_adapters), spill_evicted=a.spill_evicted,
                                     adapter_root=str(root)),
                          ctx.loaded.model, ctx.loaded.dtype, "cpu")
    t0 = time.perf_counter()
    for aid in ids:
        # max_loras in the pool, the others' extents spilled to the host tier (unless
        # --no-spill-evicted: then read again from disk when next used)
        manager.load(aid, root / aid)
    load_s = time.perf_counter() - t0
    prompt_len = max(map(len, ctx.prompts))
    engine = make_engine(ctx.loaded, manager, a.streams, prompt_len, a.max_new_tokens)
    rng = random.Random(a.seed)
    peft_ids = ids[:a.peft_adapters]
    peft, peft_load_s = None, None
    # PEFT and transformers run at each of --peft-threads (torch threads of this main thread); the
    # engine's own thread runs at --threads throughout.
    hf_cases = [f"{kind}@{n}" for n in a.peft_threads for kind in ("peft", "hf_base")]
    cases: dict[str, list[RunResult]] = {"engine_base": [], "engine_lora": [], **{k: [] for k in hf_cases}}
    notes: list[str] = []
    loads: list[str] = []
    try:
        # Untimed warm-up: first calls of the LoRA path (grouped/gather kernels, slot writes).
        warm = [Job(ctx.prompts[i % len(ctx.prompts)], ids[i]) for i in range(8)]
        run_streams(engine, manager, warm, 8, 4, "warm")
        if with_peft:
            t0 = time.perf_counter()
            peft = load_peft(ctx.model_dir, ctx.loaded.dtype, [root / i for i in peft_ids], peft_ids)
            peft_load_s = time.perf_counter() - t0
            run_hf_batches(peft, [Job(ctx.prompts[0], peft_ids[0])] * 2, 2, 2, "warm", ctx.pad_id, True)
        # PEFT's load and warm-up ran multi-threaded torch here: the engine's thread must again
        # hold the cores' only OpenMP pool (torch_threads does the same after each PEFT case).
        openmp_pool.release_thread_pool()
        before = stats_snapshot(manager)
        lora_jobs_all: list[list[Job]] = []
        for rnd in range(a.rounds):
            n = a.requests
            prompts = [ctx.prompts[(rnd * n + i) % len(ctx.prompts)] for i in range(n)]
            lora_jobs = [Job(p, rng.choice(ids)) for p in prompts]
            lora_jobs_all.append(lora_jobs)
            base_jobs = [Job(p, "") for p in prompts]
            # PEFT holds only the first peft_adapters ids: a row keeps the engine's adapter when
            # PEFT has it (its tokens can then be compared) and draws one of PEFT's otherwise.
            peft_jobs = [Job(j.prompt, j.adapter if j.adapter in peft_ids else rng.choice(peft_ids))
                         for j in lora_jobs]
            order = ["engine_base", "engine_lora", *hf_cases]
            if rnd % 2:
                order.reverse()  # alternate who goes first: drift in machine load hits both sides
            for case in order:
                if case == "engine_base" and with_base:
                    r = run_streams(engine, manager, base_jobs, a.streams, a.max_new_tokens, f"b{rnd}")
                elif case == "engine_lora":
                    r = run_streams(engine, manager, lora_jobs, a.streams, a.max_new_tokens, f"l{rnd}")
                elif case.startswith("peft@") and peft is not None:
                    with torch_threads(int(case.split("@")[1])):
                        r = run_hf_batches(peft, peft_jobs[:a.peft_requests], a.peft_batch, a.max_new_tokens,
                                           f"p{rnd}", ctx.pad_id, True)
                elif case.startswith("hf_base@") and peft is not None and a.hf_base:
                    with torch_threads(int(case.split("@")[1])):
                        r = run_hf_batches(peft, base_jobs[:a.peft_requests], a.peft_batch, a.max_new_tokens,
                                           f"h{rnd}", ctx.pad_id, False)
                else:
                    continue
                cases[case].append(r)
                print(f"  round {rnd} {case:12} {r.requests:3} req {r.tok_per_s:8.1f} tok/s "
                      f"({r.wall_s:.1f} s)", flush=True)
            loads.append(section_load(f"after round {rnd}"))
        delta = stats_delta(before, stats_snapshot(manager))
    finally:
        engine.shutdown(0.0)
    if a.profile:
        print("  profiling a decode step", flush=True)
        ctx.report["profile"] = profile_decode(ctx, manager, ids)
        print("\n".join("    " + x for x in ctx.report["profile"][2:9]), flush=True)
    # Checks: the adapters change the output; engine and PEFT agree where they ran the same adapter.
    for rnd in range(len(cases["engine_lora"])):
        lora, jobs = cases["engine_lora"][rnd], lora_jobs_all[rnd]
        if cases["engine_base"]:
            base = cases["engine_base"][rnd]
            differ = sum(x != y for x, y in zip(lora.outputs, base.outputs))
            notes.append(f"(b) round {rnd}: {differ}/{len(jobs)} LoRA requests generated other tokens "
                         "than the base model on the same prompt (the adapters are applied)")
        if cases.get(peft_key(a)):
            pr = cases[peft_key(a)][rnd]
            same = [k for k in range(min(len(pr.outputs), len(jobs))) if jobs[k].adapter in peft_ids]
            notes.append(f"(c) round {rnd}: engine vs PEFT greedy tokens on the {len(same)} rows with "
                         "the same adapter and prompt: "
                         + _agreement([lora.outputs[k] for k in same], [pr.outputs[k] for k in same]))
    wrong = [r.name for rs in cases.values() for r in rs
             if any(len(o) != a.max_new_tokens for o in r.outputs)]
    if wrong:
        notes.append(f"runs with requests not producing exactly {a.max_new_tokens} tokens: {wrong}")
    ctx.report["b"] = dict(cases=cases, delta=delta, gen_s=gen_s, load_s=load_s, notes=notes,
                           loads=loads, peft_load_s=peft_load_s,
                           distinct=[len({j.adapter for j in js}) for js in lora_jobs_all],
                           file_mb=(root / ids[0] / "adapter_model.safetensors").stat().st_size / 1e6)
    del engine, manager, peft
    gc.collect()


class torch_threads:
    """Run a block with n torch threads in this thread, then restore the previous count and
    release this thread's OpenMP workers: the engine cases that follow run on the engine's thread,
    which must hold the cores' only pool (loraplex_kernels/openmp_pool.py; kept, it halved their
    tokens/s)."""

    def __init__(self, n: int):
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)
        openmp_pool.release_thread_pool()


def peft_key(a, kind: str = "peft") -> str:
    """The PEFT (or transformers) case at the engine's own thread count, else the first one run."""
    n = a.threads if a.threads in a.peft_threads else a.peft_threads[0]
    return f"{kind}@{n}"


def _agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(a, b))
    firsts = [next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
              for x, y in zip(a, b) if x != y]
    extra = f"; the others part at token {sorted(firsts)}" if firsts else ""
    return f"{same}/{len(a)} identical{extra}"


def zipf_jobs(ids: list[str], n: int, s: float, prompts, rng: random.Random) -> list[Job]:
    """n jobs whose adapters follow p(k) ~ 1/k^s over a random popularity order of `ids`."""
    order = list(ids)
    rng.shuffle(order)  # popularity is independent of the adapter's rank
    weights = [1.0 / (k + 1) ** s for k in range(len(order))]
    picks = rng.choices(order, weights=weights, k=n)
    return [Job(prompts[i % len(prompts)], aid) for i, aid in enumerate(picks)]


def bench_registry(ctx: Context) -> None:
    """(d): 1000 adapters under --adapter-root, on-demand loads, zipf popularity."""
    from loraplex.config import LoraConfig
    from loraplex.lora.manager import LoraManager

    a = ctx.args
    root = ctx.work / "registry"
    t0 = time.perf_counter()
    ranks = make_registry(root, a.registry_size, a.ranks, a.distinct_per_rank, ctx.shapes,
                          ctx.file_dtype, str(ctx.model_dir), seed=a.seed + 1)
    gen_s = time.perf_counter() - t0
    ctx.registry = (root, ranks)
    manager = LoraManager(LoraConfig(max_loras=a.zipf_max_loras, max_lora_rank=max(a.ranks),
                                     max_cpu_loras=a.max_cpu_loras, spill_evicted=a.spill_evicted,
                                     adapter_root=str(root)),
                          ctx.loaded.model, ctx.loaded.dtype, "cpu")
    prompt_len = max(map(len, ctx.prompts))
    engine = make_engine(ctx.loaded, manager, a.streams, prompt_len, a.zipf_new_tokens)
    rng = random.Random(a.seed + 2)
    ids = sorted(ranks)
    jobs = zipf_jobs(ids, a.zipf_requests, a.zipf_s, ctx.prompts, rng)
    base_jobs = [Job(j.prompt, "") for j in jobs]
    try:
        # Untimed warm-up on adapters the timed run never picks (tiny), so the cache starts cold.
        unused = [i for i in ids if i not in {j.adapter for j in jobs}]
        warm = [Job(ctx.prompts[k], unused[k]) for k in range(4)]
        run_streams(engine, manager, warm, 4, 2, "warm", on_demand=True)
        for aid in {j.adapter for j in warm}:
            manager.unload(aid)
        base1 = run_streams(engine, manager, base_jobs, a.streams, a.zipf_new_tokens, "zb0")
        print(f"  zipf base   {base1.tok_per_s:8.1f} tok/s ({base1.wall_s:.1f} s)", flush=True)
        passes = []  # 1: from an empty cache; 2: the same requests again, cache as pass 1 left it
        for k in (1, 2):
            before = stats_snapshot(manager)
            r = run_streams(engine, manager, jobs, a.streams, a.zipf_new_tokens, f"z{k}", on_demand=True)
            passes.append((r, stats_delta(before, stats_snapshot(manager))))
            print(f"  zipf lora pass {k} {r.tok_per_s:8.1f} tok/s ({r.wall_s:.1f} s)", flush=True)
        base2 = run_streams(engine, manager, base_jobs, a.streams, a.zipf_new_tokens, "zb1")
        print(f"  zipf base   {base2.tok_per_s:8.1f} tok/s ({base2.wall_s:.1f} s)", flush=True)
        tiers = {t.value: c for t, c in manager.tier_counts().items()}
    finally:
        engine.shutdown(0.0)
    counts = {}
    for j in jobs:
        counts[j.adapter] = counts.get(j.adapter, 0) + 1
    top = sorted(counts.values(), reverse=True)
    ctx.report["d"] = dict(base=[base1, base2], passes=passes, gen_s=gen_s, tiers=tiers,
                           distinct=len(counts), top=top[:5],
                           rank_mix={r: sum(ranks[j.adapter] == r for j in jobs) for r in a.ranks},
                           load=section_load("after (d)"),
                           disk_mb=_du_mb(root))
    del engine, manager
    gc.collect()


def _du_mb(root: Path) -> float:
    """Bytes on disk (hard links counted once)."""
    seen, total = set(), 0
    for p in root.rglob("*"):
        st = p.stat()
        if p.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total / 1e6


def _drop_page_cache(path: Path) -> None:
    """Evict one file from the page cache (only this file: other jobs' caches are untouched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_load_times(ctx: Context) -> None:
    """(e): disk -> host tier and host tier -> a fresh device slot, per rank (all-linear)."""
    from loraplex.config import LoraConfig
    from loraplex.lora.manager import LoraManager

    a = ctx.args
    if ctx.registry is None:
        root = ctx.work / "registry"
        ranks = make_registry(root, 2 * len(a.ranks), a.ranks, 2, ctx.shapes,
                              ctx.file_dtype, str(ctx.model_dir), seed=a.seed + 1)
        ctx.registry = (root, ranks)
    root, ranks = ctx.registry
    manager = LoraManager(LoraConfig(max_lora_rank=max(a.ranks), max_cpu_loras=4, adapter_root=str(root)),
                          ctx.loaded.model, ctx.loaded.dtype, "cpu")
    rows = []
    for r in a.ranks:
        pair = [i for i in sorted(ranks) if ranks[i] == r][:2]
        weights = root / pair[0] / "adapter_model.safetensors"
        cold, warm, api = [], [], []
        writes0 = len(manager.stats.pool_write_seconds)
        for rep in range(a.load_repeats):
            _drop_page_cache(weights)
            t0 = time.perf_counter()
            manager.ensure_available(pair[0])  # read + the one copy into the pool
            cold.append(time.perf_counter() - t0)
            manager.unload(pair[0])
            t0 = time.perf_counter()
            manager.ensure_available(pair[0])  # the file was just read: page cache warm
            warm.append(time.perf_counter() - t0)
            manager.unload(pair[0])
            t0 = time.perf_counter()
            manager.load(pair[0], root / pair[0])
            api.append(time.perf_counter() - t0)
            manager.unload(pair[0])
        slot = list(manager.stats.pool_write_seconds)[writes0:]  # file tensors -> pool, per load
        mb = weights.stat().st_size / 1e6
        rows.append(dict(rank=r, mb=mb, params=ctx.shapes.params(ALL_LINEAR, r),
                         cold=statistics.median(cold), warm=statistics.median(warm),
                         api=statistics.median(api), slot=statistics.median(slot),
                         slot_min=min(slot), cold_min=min(cold)))
        print(f"  rank {r:3}: {mb:5.1f} MB  disk cold {1e3 * rows[-1]['cold']:7.1f} ms  warm "
              f"{1e3 * rows[-1]['warm']:7.1f} ms  pool write {1e3 * rows[-1]['slot']:6.2f} ms", flush=True)
    ctx.report["e"] = dict(rows=rows, load=section_load("after (e)"))
    del manager
    gc.collect()


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _total(rs: list[RunResult]) -> tuple[int, float]:
    return sum(r.tokens for r in rs), sum(r.wall_s for r in rs)


def _tps(rs: list[RunResult]) -> float:
    tokens, wall = _total(rs)
    return tokens / wall if wall else float("nan")


def write_report(ctx: Context, load_at_start, path: Path) -> str:
    a, rep = ctx.args, ctx.report
    dt = str(ctx.loaded.dtype).removeprefix("torch.")
    lines = ["# Multi-LoRA serving on CPU", "",
             f"Model: SmolLM2-135M-Instruct (embedded default), {dt}, CPU, kernel backend "
             f"`{ctx.backend}`, {_cpu_kernels_line()}; torch threads: loraplex {a.threads}, PEFT and "
             f"transformers {' and '.join(map(str, a.peft_threads))} (each thread count its own case); "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}. "
             "Every request is greedy with EOS ignored, so each generates exactly "
             "its `max_new_tokens`; tokens/s = generated tokens / wall time (prefill included). "
             "Adapters are random, written in PEFT's format (adapter_config.json + "
             f"adapter_model.safetensors, {a.file_dtype} tensors).", ""]
    summary = []
    if "b" in rep:
        b = rep["b"]
        cases = b["cases"]
        d = b["delta"]
        lines += [
            f"## (b) {a.num_adapters} adapters vs the base model, and (c) vs PEFT", "",
            f"{a.num_adapters} adapters of rank 8 on q,k,v,o ({b['file_mb']:.1f} MB each), all loaded "
            "before the run; "
            + ("those beyond the pool's slots keep their extents on the host tier (CPU spill)"
               if a.spill_evicted else "those evicted from the pool are read again from disk when "
               "next used (`--no-spill-evicted`)")
            + f"; `max_loras` = {a.max_loras} device slots, "
            f"`max_lora_rank` = {a.max_lora_rank}. {a.streams} concurrent streams (closed loop), "
            f"{a.requests} requests per case and round, {a.max_new_tokens} new tokens each; every LoRA "
            f"request picks one of the {a.num_adapters} adapters uniformly at random (distinct "
            f"adapters per round: {b['distinct']}). The base case sends the same prompts with no "
            "adapter to the same engine. PEFT: a PeftModel (peft "
            f"{_version('peft')}, transformers `generate`) holding {a.peft_adapters} of the adapters "
            f"(LoRA weights kept in {dt}: `autocast_adapter_dtype=False`), {a.peft_requests} requests "
            f"per round in left-padded batches of {a.peft_batch}, `adapter_names` = each row's adapter "
            "(the engine's adapter when PEFT holds it, else one of PEFT's 32 drawn uniformly); "
            "`transformers (no adapter)` is the same model and batches under `disable_adapter()`. "
            f"The cases of a round are interleaved, the order reversed every other round.", "",
            "| round | case | requests | tokens | wall s | tokens/s | TTFT p50 ms | TTFT p90 ms "
            "| mean running / waiting |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        labels = {"engine_base": f"loraplex, base model, {a.threads} thread(s)",
                  "engine_lora": f"loraplex, {a.num_adapters} adapters, {a.threads} thread(s)"}
        for n in a.peft_threads:
            labels[f"peft@{n}"] = f"PEFT mixed batch, {a.peft_adapters} adapters, {n} thread(s)"
            labels[f"hf_base@{n}"] = f"transformers (no adapter), {n} thread(s)"
        for case, rs in cases.items():
            for k, r in enumerate(rs):
                ttft = (f"{r.ttft_ms(0.5):.0f} | {r.ttft_ms(0.9):.0f}" if r.ttfts else "- | -")
                occ = (f"{r.mean_running:.1f} / {r.mean_waiting:.1f}" if r.ttfts
                       else f"{a.peft_batch} (static batch)")
                lines.append(f"| {k} | {labels[case]} | {r.requests} | {r.tokens} | {r.wall_s:.1f} | "
                             f"{r.tok_per_s:.1f} | {ttft} | {occ} |")
        lines.append("")
        lines += ["| all rounds | tokens/s |", "|---|---:|"]
        for case, rs in cases.items():
            if rs:
                lines.append(f"| {labels[case]} | {_tps(rs):.1f} |")
        hits, misses = d["hits"], d["misses"]
        lines += ["", f"Device slots over the timed rounds: {hits} hits, {misses} misses (hit ratio "
                  f"{hits / max(1, hits + misses):.2f}), {d['device_evictions']} evictions. Writing the "
                  f"{a.num_adapters} folders took {b['gen_s']:.1f} s, loading them into the host tier "
                  f"{b['load_s']:.1f} s" + (f", loading {a.peft_adapters} into PEFT {b['peft_load_s']:.1f} s"
                                            if b["peft_load_s"] else "") + ".", ""]
        lines += [f"- {x}" for x in b["loads"]] + [""]
        if cases["engine_base"]:
            ratio = _tps(cases["engine_lora"]) / _tps(cases["engine_base"])
            per = [l.tok_per_s / bb.tok_per_s for l, bb in zip(cases["engine_lora"], cases["engine_base"])]
            summary.append(f"(b) {a.num_adapters} adapters / base model = **{ratio:.2f}x** "
                           f"(per round {', '.join(f'{x:.2f}' for x in per)}; target >= 0.75x: "
                           f"{'met' if ratio >= 0.75 else 'MISSED'})")
        peft_runs = {n: cases[f"peft@{n}"] for n in a.peft_threads if cases.get(f"peft@{n}")}
        if peft_runs:
            for n, runs in peft_runs.items():
                ratio = _tps(cases["engine_lora"]) / _tps(runs)
                per = [l.tok_per_s / p.tok_per_s for l, p in zip(cases["engine_lora"], runs)]
                summary.append(f"(c) loraplex {a.num_adapters} adapters ({a.threads} thread(s)) / PEFT mixed "
                               f"batch ({n} thread(s)) = **{ratio:.2f}x** (per round "
                               f"{', '.join(f'{x:.2f}' for x in per)})")
            best_n = max(peft_runs, key=lambda n: _tps(peft_runs[n]))
            ratio = _tps(cases["engine_lora"]) / _tps(peft_runs[best_n])
            summary.append(f"(c) against PEFT at its fastest thread count in this run ({best_n}): "
                           f"**{ratio:.2f}x** (target >= 5x: {'met' if ratio >= 5 else 'MISSED'})")
            pk, hk = peft_key(a), peft_key(a, "hf_base")
            if cases.get(pk) and cases.get(hk) and cases["engine_base"]:
                summary.append(
                    f"(c) context at {pk.split('@')[1]} thread(s): PEFT mixed batch runs at "
                    f"{_tps(cases[pk]) / _tps(cases[hk]):.2f}x of the same transformers batches without "
                    "adapters; loraplex base / transformers base = "
                    f"{_tps(cases['engine_base']) / _tps(cases[hk]):.2f}x; so even a free LoRA (1.0x "
                    f"of base) would give loraplex / PEFT = {_tps(cases['engine_base']) / _tps(cases[pk]):.2f}x")
        pn = rep.get("profile_numbers")
        if pn:
            summary.append(
                f"(b) profile: a {pn['seqs']}-sequence LoRA decode step takes {1e3 * pn['lora']:.0f} ms vs "
                f"{1e3 * pn['base']:.0f} ms without adapters; "
                + (f"{1e3 * pn['compiled']:.1f} ms are inside the LoRA calls of the compiled decoder layers"
                   if pn["compiled"] > 0 else
                   f"{1e3 * pn['inside']:.0f} ms are inside the {pn['calls']:.0f} LoRA calls, "
                   f"{1e3 * pn['idle']:.0f} ms of it in the {pn['idle_calls']:.0f} calls on projections "
                   "no running adapter targets") + " (see the profile)")
        lines += ["Checks:", ""] + [f"- {x}" for x in b["notes"]] + [""]
    if "d" in rep:
        d = rep["d"]
        base_tps = _tps(d["base"])
        lines += [
            f"## (d) {a.registry_size} registered adapters, on-demand loads, zipf popularity", "",
            f"{a.registry_size} adapters under `--adapter-root`, all seven projections, rank "
            f"{'/'.join(map(str, a.ranks))} (adapter i has rank ranks[i mod {len(a.ranks)}], so "
            f"{a.registry_size // len(a.ranks)} of each). Only {a.distinct_per_rank} distinct weight "
            f"files per rank exist; the folders hard-link them and each has its own "
            "adapter_config.json with its own lora_alpha (1000 distinct files would take ~10 GB; "
            f"these take {d['disk_mb']:.0f} MB, written in {d['gen_s']:.1f} s). Nothing is loaded before "
            f"pass 1: host tier `max_cpu_loras` = {a.max_cpu_loras}, `max_loras` = {a.zipf_max_loras} "
            f"device slots, `max_lora_rank` = {max(a.ranks)}. {a.zipf_requests} requests, "
            f"{a.zipf_new_tokens} new tokens each, {a.streams} streams; each request's adapter is "
            f"drawn with p(k) ~ 1/k^{a.zipf_s} over a random popularity order (distinct adapters "
            f"requested: {d['distinct']}; the 5 most requested: {d['top']} requests; requests per "
            f"rank: {d['rank_mix']}). Each stream calls `ensure_available` (reads the folder if the "
            "adapter is not on the host tier) and then submits, like a server worker. Pass 2 sends "
            "the same requests again, starting from the cache pass 1 left behind. The base row sends "
            "the same prompts without adapters (mean of a run before and one after the passes).", "",
            "| metric | pass 1 (empty cache) | pass 2 (same requests) |", "|---|---:|---:|"]

        def row(label, fn):
            lines.append(f"| {label} | " + " | ".join(fn(r, dl) for r, dl in d["passes"]) + " |")

        def loads_n(dl):
            return sum(dl["loads"].values())

        def hit_ratio(dl):
            return dl["hits"] / max(1, dl["hits"] + dl["misses"])

        def ms(xs, f):
            return f"{1e3 * f(xs):.0f}" if xs else "-"

        row("tokens/s", lambda r, dl: f"{r.tok_per_s:.1f}")
        row(f"ratio to base ({base_tps:.1f} tokens/s)", lambda r, dl: f"{r.tok_per_s / base_tps:.2f}x")
        row("wall s", lambda r, dl: f"{r.wall_s:.1f}")
        row("mean running / waiting sequences (sampled every 50 ms; base: "
            f"{statistics.fmean(b.mean_running for b in d['base']):.1f} / "
            f"{statistics.fmean(b.mean_waiting for b in d['base']):.1f})",
            lambda r, dl: f"{r.mean_running:.1f} / {r.mean_waiting:.1f}")
        row("TTFT p50 / p90 ms (includes the adapter's disk load)",
            lambda r, dl: f"{r.ttft_ms(0.5):.0f} / {r.ttft_ms(0.9):.0f}")
        row("device slot acquires: hits / misses", lambda r, dl: f"{dl['hits']} / {dl['misses']}")
        row("device slot hit ratio", lambda r, dl: f"{hit_ratio(dl):.2f}")
        row("device slot evictions", lambda r, dl: f"{dl['device_evictions']}")
        row("disk loads (on demand + reloads after a host eviction)", lambda r, dl: f"{loads_n(dl)}")
        row("host-tier hit ratio (requests that found their adapter on the host)",
            lambda r, dl: f"{1 - loads_n(dl) / r.requests:.2f}")
        row("host-tier evictions (dropped back to disk)", lambda r, dl: f"{dl['host_evictions']}")
        row("disk load time median / max ms (concurrent loads)",
            lambda r, dl: f"{ms(dl['load_seconds'], statistics.median)} / {ms(dl['load_seconds'], max)}")
        row("submit retries (adapter evicted between load and reserve)", lambda r, dl: f"{r.retries}")
        lines += ["", f"Tiers at the end (disk/host/device): {d['tiers']}.", "", f"- {d['load']}", ""]
        (r1, d1), (r2, d2) = d["passes"]
        summary.append(f"(d) zipf over {a.registry_size} adapters: pass 1 (empty cache) "
                       f"{r1.tok_per_s:.1f} tokens/s ({r1.tok_per_s / base_tps:.2f}x of base), slot hit "
                       f"ratio {hit_ratio(d1):.2f}, {loads_n(d1)} disk loads, {d1['device_evictions']} slot "
                       f"evictions, {d1['host_evictions']} host evictions; pass 2 {r2.tok_per_s:.1f} "
                       f"tokens/s ({r2.tok_per_s / base_tps:.2f}x), slot hit ratio {hit_ratio(d2):.2f}, "
                       f"{loads_n(d2)} disk loads")
    if "e" in rep:
        e = rep["e"]
        lines += [
            "## (e) Adapter load time", "",
            f"All seven projections, median of {a.load_repeats} repeats. *disk cold*: "
            "`ensure_available` (on-demand load from `--adapter-root`) after evicting the weights "
            "file from the page cache (posix_fadvise DONTNEED; the VM's own disk cache may still "
            "serve it); *disk warm*: the same with the file in the page cache; *load()*: "
            "`LoraManager.load(id, path)` (the LoadAdapter path), warm. All three read the file, "
            "validate it (as float32), and write it into the adapter memory pool in the serving "
            "dtype: the one copy, included in all three. *pool write*: that copy alone (the "
            "manager's own timing of each load's write into the pool; on CPU the pool is host "
            "memory and nothing is copied again when a request is admitted).", "",
            "| rank | file MB | LoRA params | disk cold ms | disk warm ms | load() ms | pool write ms |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in e["rows"]:
            lines.append(f"| {r['rank']} | {r['mb']:.1f} | {r['params'] / 1e6:.1f} M | "
                         f"{1e3 * r['cold']:.1f} | "
                         f"{1e3 * r['warm']:.1f} | {1e3 * r['api']:.1f} | {1e3 * r['slot']:.2f} |")
        lines += ["", f"- {e['load']}", ""]
        summary.append("(e) disk load (warm) " + ", ".join(
            f"r{r['rank']} {1e3 * r['warm']:.0f} ms" for r in e["rows"]) + "; of which pool write " + ", ".join(
            f"r{r['rank']} {1e3 * r['slot']:.1f} ms" for r in e["rows"]))
    if rep.get("profile"):
        lines += ["## Profile of one LoRA decode step", "", *rep["profile"], ""]
    lines = lines[:4] + ["## Summary", ""] + [f"- {s}" for s in summary if s] + [""] + lines[4:]
    lines += ["## Command", "", "```",
              " ".join(["HF_HUB_OFFLINE=1", ".venv/bin/python", "benchmarks/bench_lora_serving.py"]
                       + [shlex.quote(x) for x in sys.argv[1:]]),
              "```", "", "## Machine", ""] + machine_info(load_at_start) + [
        f"- peft {_version('peft')}; total run time {time.perf_counter() - ctx.t_start:.0f} s",
        "- Cost of one parallel torch op at the start (warm `fill_` of 1 MB, median): "
        + ", ".join(f"{k} thread(s) {v:.2f} ms" for k, v in ctx.parallel_cost.items())
        + " (when other jobs keep the second core busy, a 2-thread op waits for a scheduler slice)", ""]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def _cpu_kernels_line() -> str:
    """How the engine's CPU work runs in this process (README: compiled kernels, packed weights)."""
    from loraplex_kernels import native

    packed = os.environ.get("LORAPLEX_PACK_WEIGHTS", "1") != "0"
    return native.describe() + (", bfloat16 weights packed for oneDNN (q/k/v and gate/up one GEMM each, "
                                "lm_head packed)" if packed else ", projections not packed")


def _version(pkg: str) -> str:
    from importlib.metadata import version

    try:
        return version(pkg)
    except Exception:
        return "?"


def write_plot(ctx: Context, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep, a = ctx.report, ctx.args
    panels = [k for k in ("b", "d", "e") if k in rep]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "b":
            cases = rep["b"]["cases"]
            names = [("engine_base", "loraplex\nbase", "#888"),
                     ("engine_lora", f"loraplex\n{a.num_adapters} LoRAs", "#1f77b4"),
                     *[(f"hf_base@{n}", f"transformers\nbase, {n} thr", "#bbb") for n in a.peft_threads],
                     *[(f"peft@{n}", f"PEFT mixed\n{a.peft_adapters} LoRAs, {n} thr", "#d62728")
                       for n in a.peft_threads]]
            names = [x for x in names if cases.get(x[0])]
            bars = ax.bar([n for _, n, _ in names], [_tps(cases[k]) for k, _, _ in names],
                          color=[c for _, _, c in names])
            ax.bar_label(bars, fmt="%.0f")
            ax.margins(y=0.12)
            ax.set_ylabel("generated tokens/s")
            ax.set_title(f"(b)/(c) {a.streams} streams, uniform over {a.num_adapters} r8 adapters")
        elif key == "d":
            d = rep["d"]
            labels, vals = ["base"], [_tps(d["base"])]
            for k, (r, dl) in enumerate(d["passes"], 1):
                hr = dl["hits"] / max(1, dl["hits"] + dl["misses"])
                labels.append(f"zipf pass {k}\nslot hit {hr:.2f}\n{sum(dl['loads'].values())} disk loads")
                vals.append(r.tok_per_s)
            bars = ax.bar(labels, vals, color=["#888", "#2ca02c", "#98df8a"])
            ax.bar_label(bars, fmt="%.0f")
            ax.margins(y=0.12)
            ax.set_title(f"(d) {a.registry_size} adapters r{'/'.join(map(str, a.ranks))}, on demand")
            ax.set_ylabel("generated tokens/s")
        else:
            rows = rep["e"]["rows"]
            ranks = [r["rank"] for r in rows]
            for k, label in (("cold", "disk, page cache cold"), ("warm", "disk, page cache warm"),
                             ("slot", "write into the adapter pool")):
                ax.plot(ranks, [1e3 * r[k] for r in rows], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ranks, [str(r) for r in ranks])
            ax.set_xlabel("rank (all seven projections)")
            ax.set_ylabel("ms (median)")
            ax.set_title("(e) adapter load time")
            ax.legend()
    dtype = str(ctx.loaded.dtype).removeprefix("torch.")
    fig.suptitle(f"loraplex multi-LoRA serving, SmolLM2-135M, CPU {dtype}, torch threads {a.threads}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="b,c,d,e", help="comma list of sub-benchmarks: b,c,d,e")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    p.add_argument("--file-dtype", default="bfloat16", choices=sorted(_DTYPES),
                   help="dtype of the tensors in the adapter files")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64, help="(b)/(c)")
    p.add_argument("--requests", type=int, default=32, help="(b) requests per case and round")
    p.add_argument("--rounds", type=int, default=2, help="(b)/(c) interleaved rounds")
    p.add_argument("--num-adapters", type=int, default=100, help="(b)")
    p.add_argument("--max-loras", type=int, default=32, help="(b) device slots")
    p.add_argument("--max-lora-rank", type=int, default=16, help="(b) slot rank")
    p.add_argument("--no-spill-evicted", dest="spill_evicted", action="store_false",
                   help="(b)/(d) evicted adapters are read again from disk, not kept on the host tier")
    p.add_argument("--peft-adapters", type=int, default=32, help="(c) adapters loaded into PEFT")
    p.add_argument("--peft-batch", type=int, default=32, help="(c) generate() batch size")
    p.add_argument("--peft-requests", type=int, default=32, help="(c) requests per round")
    p.add_argument("--no-hf-base", dest="hf_base", action="store_false",
                   help="(c) skip transformers batches without adapters (context only)")
    p.add_argument("--registry-size", type=int, default=1000, help="(d)")
    p.add_argument("--ranks", default="8,16,32,64", help="(d)/(e)")
    p.add_argument("--distinct-per-rank", type=int, default=4, help="(d) distinct weight files per rank")
    p.add_argument("--max-cpu-loras", type=int, default=64, help="(d) host tier")
    p.add_argument("--zipf-max-loras", type=int, default=16, help="(d) device slots")
    p.add_argument("--zipf-requests", type=int, default=64)
    p.add_argument("--zipf-new-tokens", type=int, default=32)
    p.add_argument("--zipf-s", type=float, default=1.0, help="(d) zipf exponent")
    p.add_argument("--load-repeats", type=int, default=5, help="(e)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="(b) skip the decode-step profile (LoRA vs base, add_lora time, op table)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads of the engine (default: torch's, one per core, what `loraplex "
                        f"serve` runs with: {torch.get_num_threads()} here)")
    p.add_argument("--peft-threads", default=None,
                   help="(c) comma list of torch thread counts to run PEFT and transformers at, each a "
                        "case of every round; (c) is judged against PEFT's fastest (default: 1 and --threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="default model cache (~/.cache/loraplex)")
    p.add_argument("--work-dir", default=None, help="where adapter folders go (a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the adapter folders")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes everywhere")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.streams, args.max_new_tokens, args.requests, args.rounds = 8, 8, 8, 1
        args.num_adapters, args.max_loras, args.peft_adapters = 12, 8, 4
        args.peft_batch = args.peft_requests = 8
        args.registry_size, args.distinct_per_rank, args.max_cpu_loras = 40, 1, 8
        args.zipf_max_loras, args.zipf_requests, args.zipf_new_tokens = 4, 12, 4
        args.load_repeats = 2
    args.peft_threads = (tuple(int(n) for n in args.peft_threads.split(",")) if args.peft_threads
                         else tuple(sorted({1, args.threads})))
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not args.only <= {"b", "c", "d", "e"}:
        p.error("--only takes b, c, d, e")
    args.ranks = tuple(sorted(int(r) for r in args.ranks.split(",")))
    if args.peft_adapters > args.num_adapters:
        p.error("--peft-adapters must be <= --num-adapters")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    parallel_cost = parallel_op_cost()
    from transformers import AutoTokenizer

    from loraplex.lora.peft_format import BaseShapes
    from loraplex.model.default_model import ensure_default_model
    from loraplex.model.loader import load_model
    from loraplex_kernels import get_backend

    model_dir = ensure_default_model(args.cache_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tuple(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)) for q in QUESTIONS]
    loaded = load_model(model_dir, _DTYPES[args.dtype], torch.device("cpu"))
    bs = BaseShapes.from_model(loaded.model)
    shapes = Shapes(bs.num_layers, dict(bs.features))
    work_parent = Path(args.work_dir) if args.work_dir else None
    if work_parent:
        work_parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-lora-", dir=work_parent))
    pad_id = 2 if tok.pad_token_id is None else tok.pad_token_id  # <|im_end|> on SmolLM2
    ctx = Context(args, model_dir, loaded, prompts, shapes, work, pad_id=pad_id,
                  file_dtype=_DTYPES[args.file_dtype], backend=get_backend(), t_start=t_start,
                  parallel_cost=parallel_cost)
    print(f"model {model_dir} ({args.dtype}), adapters in {work}, backend {ctx.backend}, "
          f"load average {_fmt_load(load_at_start)}", flush=True)
    try:
        if args.only & {"b", "c"}:
            print("== (b)/(c) many adapters vs base vs PEFT", flush=True)
            bench_many_adapters(ctx, with_peft="c" in args.only, with_base="b" in args.only)
        if "d" in args.only:
            print("== (d) registry, zipf, on-demand", flush=True)
            bench_registry(ctx)
        if "e" in args.only:
            print("== (e) load times", flush=True)
            bench_load_times(ctx)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = write_report(ctx, load_at_start, args.out)
    png = args.out.with_suffix(".png")
    write_plot(ctx, png)
    print(f"\nwrote {args.out} and {png}\n")
    print(text)
    return 0


def parallel_op_cost() -> dict[int, float]:
    """ms for a warm 1 MB fill_ with 1 and 2 torch threads: shows whether the cores are contended."""
    keep = torch.get_num_threads()
    x = torch.empty(1 << 18)  # 1 MB of float32: above ATen's grain size, so 2 threads split it
    out = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        ts = []
        for _ in range(21):
            t0 = time.perf_counter()
            x.fill_(1.0)
            ts.append(time.perf_counter() - t0)
        out[n] = 1e3 * statistics.median(ts)
    torch.set_num_threads(keep)
    return out


def profile_decode(ctx: Context, manager, ids: list[str], steps: int = 6, reps: int = 3) -> list[str]:
    """Where a decode step's time goes, LoRA vs base: the same engine, stepped by hand.

    `streams` sequences decode together, each with its own adapter (all resident in slots: only
    the kernel path is measured, no slot writes). Step times alternate base/LoRA over `reps`
    rounds; the time inside the LoRA apply calls (the batched kernel calls) is summed by a wrapper; then
    torch.profiler attributes each step's extra time to aten ops.
    """
    from torch.profiler import ProfilerActivity, profile

    from loraplex.config import EngineConfig
    from loraplex.engine.engine import Engine
    from loraplex.engine.request import Request, SamplingParams
    from loraplex.lora.layers import PoolGroup, PoolMember
    from loraplex_kernels import build_lora_meta
    from loraplex_kernels.decode_layers_native import PHASES

    a = ctx.args
    n = min(a.streams, a.max_loras)
    prompt_len = max(map(len, ctx.prompts))
    total = steps * (reps + 2) + 8
    engine = Engine(ctx.loaded, EngineConfig(
        block_size=16, num_kv_blocks=n * (-(-(prompt_len + total) // 16) + 1), max_num_seqs=n,
        max_model_len=prompt_len + total + 16, max_new_tokens_cap=total), lora_manager=manager)
    sampling = SamplingParams(max_new_tokens=total, temperature=0.0, ignore_eos=True)
    tag = iter(range(10**6))

    def fill(use_lora: bool) -> None:
        for i in range(n):
            engine.submit(Request(f"prof-{next(tag)}", list(ctx.prompts[i % len(ctx.prompts)]), sampling,
                                  adapter_id=ids[i] if use_lora else ""), None)
        engine.step()  # takes the submitted requests out of the engine's inbox
        while engine.scheduler.num_waiting or any(not s.is_decoding for s in engine.scheduler.running):
            engine.step()  # prefill chunks
        engine.step()  # first pure decode step
        assert len(engine.scheduler.running) == n and all(s.is_decoding for s in engine.scheduler.running)

    def clear() -> None:
        for rid in list(engine._live):
            engine.abort(rid)
        engine.step()

    inside = [0.0, 0, 0.0, 0]  # seconds, calls; then the same for calls on untargeted projections
    orig = PoolMember.apply
    orig_group = PoolGroup.apply

    def timed(fn, untargeted: bool) -> None:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        inside[0] += dt
        inside[1] += 1
        if untargeted:
            inside[2] += dt
            inside[3] += 1

    def timed_apply(self, y, x, lora):
        # A projection none of the step's adapters targets skips the kernel (lora/layers.py).
        untargeted = not self.group.targeted(lora, self.index)
        timed(lambda: orig(self, y, x, lora), untargeted)

    def timed_group_apply(self, ys, x, lora):  # q/k/v or gate/up in one call (lora/layers.py)
        untargeted = not any(self.targeted(lora, m) for m in range(len(self.members)))
        timed(lambda: orig_group(self, ys, x, lora), untargeted)

    step_s: dict[bool, list[float]] = {False: [], True: []}
    # CPU time of the stepping thread too: on a shared box wall time also counts waits for a core.
    step_cpu: dict[bool, list[float]] = {False: [], True: []}
    lora_inside = []
    # Where the decoder layers run as one compiled call (model/compiled_layers.py) the LoRA calls
    # are made from C, past the wrappers: decode_layers.c's own timer of its "LoRA deltas" phase.
    layers = getattr(ctx.loaded.model, "compiled_layers", None)
    phase_ns = torch.zeros(len(PHASES), dtype=torch.int64)
    compiled_inside = []
    PoolMember.apply = timed_apply
    PoolGroup.apply = timed_group_apply
    try:
        for rep in range(reps):
            for use in ((False, True) if rep % 2 == 0 else (True, False)):
                fill(use)
                inside[:] = [0.0, 0, 0.0, 0]
                phase_ns.zero_()
                if layers is not None:
                    layers.phase_ns = phase_ns
                for _ in range(steps):
                    t0, c0 = time.perf_counter(), time.thread_time()
                    engine.step()
                    step_s[use].append(time.perf_counter() - t0)
                    step_cpu[use].append(time.thread_time() - c0)
                if layers is not None:
                    layers.phase_ns = None
                if use:
                    lora_inside.append([v / steps for v in inside])
                    compiled_inside.append(int(phase_ns[PHASES.index("LoRA deltas")]) / 1e9 / steps)
                clear()
    finally:
        PoolMember.apply = orig
        PoolGroup.apply = orig_group
        if layers is not None:
            layers.phase_ns = None
    tables = {}
    for use in (False, True):
        fill(use)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
        tables[use] = {e.key: (e.self_cpu_time_total / 1e3 / steps, e.count / steps)
                       for e in prof.key_averages()}  # op -> (ms per step, calls per step)
        clear()
    engine.shutdown(0.0)
    meta_s = []
    token_slots = torch.arange(n, dtype=torch.int64)
    for _ in range(50):
        t0 = time.perf_counter()
        build_lora_meta(token_slots, manager.pool.slot_ranks)
        meta_s.append(time.perf_counter() - t0)

    base = statistics.median(step_s[False])
    lora = statistics.median(step_s[True])
    base_cpu, lora_cpu = statistics.median(step_cpu[False]), statistics.median(step_cpu[True])
    in_ms = 1e3 * statistics.median(x[0] for x in lora_inside)
    calls = statistics.median(x[1] for x in lora_inside)
    idle_ms = 1e3 * statistics.median(x[2] for x in lora_inside)
    idle_calls = statistics.median(x[3] for x in lora_inside)
    compiled_ms = 1e3 * statistics.median(compiled_inside)
    per_token_params = ctx.shapes.params(ATTN, 8)  # rank-8 q,k,v,o adapter
    flops = 2 * n * per_token_params
    weight_mb = n * per_token_params * ctx.loaded.dtype.itemsize / 1e6
    lines = [
        f"One decode step with {n} running sequences, each with its own rank-8 q,k,v,o adapter, all "
        f"resident in device slots (no slot writes), against the same {n} sequences without "
        f"adapters; the same engine stepped by hand, torch threads {torch.get_num_threads()}, "
        f"median of {reps * steps} steps per side, base and LoRA alternated.", "",
        "| | ms per step |", "|---|---:|",
        f"| base step | {1e3 * base:.1f} |",
        f"| LoRA step | {1e3 * lora:.1f} |",
        f"| extra | {1e3 * (lora - base):.1f} (step ratio base/LoRA {base / lora:.2f}) |",
        f"| base / LoRA step in thread CPU time | {1e3 * base_cpu:.1f} / {1e3 * lora_cpu:.1f} "
        f"(ratio {base_cpu / lora_cpu:.2f}) |",
        f"| inside the {calls:.0f} LoRA calls from the Python layers (add_lora, or add_lora_multi for q/k/v "
        f"and gate/up) | {in_ms:.1f} ({1e3 * in_ms / max(calls, 1):.0f} us per call) |",
        f"| inside the LoRA calls from the compiled decoder layers (decode_layers.c's timer) | {compiled_ms:.1f} |",
        f"| of which the {idle_calls:.0f} calls on projections no running adapter targets (their "
        f"slots hold zeros: the call adds exactly 0) | {idle_ms:.1f} |",
        f"| build_lora_meta (once per step) | {1e3 * statistics.median(meta_s):.2f} |",
        f"| floor: {flops / 1e6:.0f} MFLOP and {weight_mb:.0f} MB of adapter weights per step | "
        f"~{1e3 * weight_mb / 26e3:.1f} (at ~26 GB/s) |", "",
        "Where the extra time goes (torch.profiler, self CPU time per step; top aten ops by "
        "LoRA - base):", "",
        "| op | base ms/step | LoRA ms/step | extra ms | LoRA calls/step |", "|---|---:|---:|---:|---:|"]
    keys = set(tables[True]) | set(tables[False])
    diff = sorted(keys, key=lambda k: tables[True].get(k, (0, 0))[0] - tables[False].get(k, (0, 0))[0],
                  reverse=True)
    for k in diff[:8]:
        b_ms, _ = tables[False].get(k, (0.0, 0))
        l_ms, l_n = tables[True].get(k, (0.0, 0))
        lines.append(f"| `{k}` | {b_ms:.1f} | {l_ms:.1f} | {l_ms - b_ms:+.1f} | {l_n:.0f} |")
    ctx.report["profile_numbers"] = dict(seqs=n, base=base, lora=lora, inside=in_ms / 1e3, calls=calls,
                                         idle=idle_ms / 1e3, idle_calls=idle_calls, compiled=compiled_ms / 1e3)
    return lines


if __name__ == "__main__":
    sys.exit(main())
