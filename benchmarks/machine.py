"""The CPU a benchmark ran on: its name, cores and the instruction-set flags that decide which
matmul paths it has (AVX-512 BF16, AMX, or AVX2 only, where bfloat16 is emulated)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class CpuInfo:
    name: str
    logical_cores: int
    torch_threads: int
    flags: frozenset[str]  # the subset that decides the bf16 / fp32 matmul paths
    l3_bytes: int | None

    def describe(self) -> str:
        want = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx_ne_convert")
        have = ", ".join(f"{f} {'yes' if f in self.flags else 'no'}" for f in want)
        l3 = f"{self.l3_bytes / 2**20:.0f} MiB" if self.l3_bytes else "?"
        return (f"{self.name}; {self.logical_cores} logical cores, torch threads {self.torch_threads}; "
                f"L3 {l3}; {have}")


def cpu_info() -> CpuInfo:
    name, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    l3 = None
    try:
        for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            if (idx / "level").read_text().strip() == "3":
                size = (idx / "size").read_text().strip()  # e.g. "32768K"
                l3 = int(size[:-1]) * {"K": 2**10, "M": 2**20}[size[-1]] if size[-1] in "KM" else int(size)
    except (OSError, ValueError):
        pass
    return CpuInfo(name, os.cpu_count() or 1, torch.get_num_threads(), frozenset(flags), l3)
