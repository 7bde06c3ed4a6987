"""Would torch.compile speed up a CPU decode step? A probe on the default model's layer shapes.

Issue 19 named torch.compile (inductor's CPU code generation) as a candidate for closing the gap
to the roofline. Before wiring the model's paged attention and compiled LoRA / norm kernels into
inductor as custom ops, this measures what compilation can win at best: a stack of 30 layers of
the default model's shapes (q/k/v/o, gate/up/down, two RMSNorms, SwiGLU, residuals; attention
replaced by a cheap elementwise stand-in, so every op left is one inductor can compile) in
float32 (or bfloat16), eager against four inductor settings, at decode batch sizes:

- `compile`: torch.compile(dynamic=False), default inductor (fuses the elementwise ops, calls
  the GEMM library for the matmuls);
- `freeze`: + inductor's freezing (weights as constants, prepacked for oneDNN);
- `autotune`: + max_autotune with inductor's C++ GEMM template ("CPP,ATEN"), which generates
  its own micro-kernels per shape and keeps them where they beat the library;
- `widened` (bfloat16 only, not compiled): eager with the engine's own bfloat16 GEMM
  (model/widened_linear.py), the baseline a compiled bfloat16 stack would have to beat.

Each mode runs in its own process (inductor's settings are global). Compile time is reported:
on a server it is paid per distinct batch shape unless shapes are bucketed.

    python benchmarks/compile_probe.py            # ~12 min on 2 cores (autotune dominates)
    python benchmarks/compile_probe.py --modes eager,compile --batches 1,32   # quick

Writes benchmarks/results/compile_probe_cpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "compile_probe_cpu.md"
MODES = ("eager", "compile", "freeze", "autotune")
EXTRA_MODES = ("widened",)  # eager with the engine's bfloat16 GEMM (model/widened_linear.py)


def run_mode(mode: str, batches: list[int], layers: int, reps: int, dtype_name: str) -> dict:
    """In this process: build the stack, compile it per `mode`, time a forward per batch size."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    hidden, inter, q, kv = 576, 1536, 576, 192  # the default model (SmolLM2-135M)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(hidden, q, bias=False), nn.Linear(hidden, kv, bias=False), nn.Linear(hidden, kv, bias=False)
            self.o = nn.Linear(q, hidden, bias=False)
            self.g, self.u = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
            self.d = nn.Linear(inter, hidden, bias=False)
            self.n1, self.n2 = nn.Parameter(torch.ones(hidden)), nn.Parameter(torch.ones(hidden))

        @staticmethod
        def norm(x, w):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

        def forward(self, x):  # x [B, hidden]
            h = self.norm(x, self.n1)
            qq, kk, vv = self.q(h), self.k(h), self.v(h)
            a = qq + torch.cat([kk, vv, kk], -1)  # stand-in for attention: [B, q]
            x = x + self.o(a)
            h = self.norm(x, self.n2)
            return x + self.d(F.silu(self.g(h)) * self.u(h))

    dtype = getattr(torch, dtype_name)
    model = nn.Sequential(*[Layer() for _ in range(layers)]).to(dtype).eval()
    if mode == "widened":
        from loraplex.model.widened_linear import WidenedLinear

        for layer in model:
            for name in ("q", "k", "v", "o", "g", "u", "d"):
                setattr(layer, name, WidenedLinear(getattr(layer, name)))
    elif mode != "eager":
        import torch._inductor.config as ic
        if mode in ("freeze", "autotune"):
            ic.freezing = True
        if mode == "autotune":
            ic.max_autotune = True
            ic.max_autotune_gemm_backends = "CPP,ATEN"
        model = torch.compile(model, dynamic=False)
    out = {}
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, hidden, dtype=dtype)
            t0 = time.perf_counter()
            model(x)  # compiles this shape
            first = time.perf_counter() - t0
            for _ in range(2):
                model(x)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
            times.sort()
            out[b] = {"median_ms": times[len(times) // 2] * 1e3, "best_ms": times[0] * 1e3, "first_s": first}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: eager is torch's bfloat16 GEMM (emulated on AVX2-only CPUs)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    unknown = set(a.modes.split(",")) - set(MODES + EXTRA_MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}")
    if "widened" in a.modes.split(",") and a.dtype != "bfloat16":
        p.error("mode widened is bfloat16 only")
    if a.child:
        print(json.dumps(run_mode(a.child, batches, a.layers, a.reps, a.dtype)))
        return 0
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine import cpu_info

    load0 = os.getloadavg()
    results = {}
    for mode in a.modes.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--batches", a.batches,
                               "--layers", str(a.layers), "--reps", str(a.reps), "--dtype", a.dtype],
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        results[mode] = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
        print(mode, results[mode], flush=True)
    load1 = os.getloadavg()
    lines = [
        f"# torch.compile probe: a {a.layers}-layer stack of the default model's shapes, {a.dtype}, CPU", "",
        f"- CPU: {cpu_info().describe()}",
        f"- torch {torch.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f}",
        "- Command: `" + " ".join(["python benchmarks/compile_probe.py", *(sys.argv[1:] if argv is None else argv)]) + "`",
        "- Forward of the stack (no attention, no LoRA, no sampler): median and best of "
        f"{a.reps} calls; `first call` = compile time for that batch shape (eager: none).", "",
        "| mode | batch | median ms | best ms | vs eager (median) | first call s |", "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, per in results.items():
        for b, r in per.items():
            base = results.get("eager", {}).get(b)
            rel = f"{base['median_ms'] / r['median_ms']:.2f}x" if base else "-"
            lines.append(f"| {mode} | {b} | {r['median_ms']:.1f} | {r['best_ms']:.1f} | {rel} | {r['first_s']:.1f} |")
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
