"""Huge-page arenas (loraplex_kernels/hugepages.py) and the packed weights moved into one
(model/weight_arena.py): where the memory lies, that the kernel backs it with huge pages where this
host allows them, and that nothing a model computes changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex_kernels import hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The host's THP mode ("always", "madvise", "never"), None where there is no such file."""
    try:
        text = THP.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def anon_huge_kb(addr: int) -> int:
    """AnonHugePages of the mapping that holds `addr` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_an_arena_starts_on_a_huge_page_and_is_backed_by_them_where_the_host_allows():
    buf = hugepages.arena(8 << 20)
    assert buf.dtype == torch.uint8 and buf.numel() == 8 << 20
    assert buf.data_ptr() % hugepages.HUGE == 0
    buf.fill_(7)  # the first touch: the kernel picks the page size now
    assert int(buf[::4096].sum()) == 7 * (8 << 20) // 4096
    if thp_mode() in ("madvise", "always"):
        assert anon_huge_kb(buf.data_ptr()) >= 2048  # at least one of its 4 huge pages
    small = hugepages.arena(4096)  # below one huge page: plain memory
    assert small.numel() == 4096


def test_the_switch_turns_the_advice_off(monkeypatch):
    monkeypatch.setenv("LORAPLEX_HUGEPAGES", "0")
    assert not hugepages.wanted()
    buf = hugepages.arena(8 << 20)
    assert buf.numel() == 8 << 20 and buf.storage_offset() == 0  # a plain tensor, not a view


def test_carve_gives_disjoint_aligned_contiguous_tensors():
    specs = [((3, 5), torch.bfloat16), ((1000, 1000), torch.float32), ((7,), torch.int8),
             ((600, 1000), torch.bfloat16), ((0, 4), torch.float32)]
    ts = hugepages.carve(specs)
    spans = []
    for t, (shape, dtype) in zip(ts, specs):
        assert tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous()
        assert t.data_ptr() % hugepages.ALIGN == 0
        spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no overlap
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(t.shape, generator=g).to(t.dtype) for t in ts]
    for t, v in zip(ts, values):
        t.copy_(v)
    assert all(torch.equal(t, v) for t, v in zip(ts, values))  # nothing wrote over another


def test_empty_is_on_a_huge_page_boundary_when_large():
    t = hugepages.empty((1024, 1024), torch.float32)
    assert t.shape == (1024, 1024) and t.dtype == torch.float32 and t.data_ptr() % hugepages.HUGE == 0


def test_moving_packed_weights_changes_no_output(tiny_model_dir):
    """The packed tensors move into one arena (new addresses, same bytes) and a projection's
    output stays bit for bit the same."""
    from loraplex.engine.engine import pack_cpu_weights
    from loraplex.model.loader import load_model
    from loraplex.model.weight_arena import move_to_huge_pages

    loaded = load_model(tiny_model_dir, torch.bfloat16, "cpu")
    model = loaded.model
    pack_cpu_weights(model)  # packs, moves (this test checks the move again below) and attaches
    packed = [m for m in model.modules() if isinstance(getattr(m, "packed", None), torch.Tensor)
              and m.packed.layout == torch.strided]
    if not packed:
        pytest.skip("no packed strided weights on this CPU (no AMX-BF16, no widened kernel)")
    before = {id(m): (m.packed.data_ptr(), m.packed.clone()) for m in packed}
    moved = move_to_huge_pages(model)
    assert moved == sum(m.packed.numel() * m.packed.element_size() for m in packed)
    for m in packed:
        ptr, value = before[id(m)]
        assert m.packed.data_ptr() != ptr and torch.equal(m.packed, value) and m.packed.is_contiguous()
    lo = min(m.packed.data_ptr() for m in packed)
    hi = max(m.packed.data_ptr() + m.packed.numel() * m.packed.element_size() for m in packed)
    assert hi - lo < moved + hugepages.ALIGN * len(packed)  # one arena, tensors back to back
    if moved >= hugepages.HUGE:  # (the tiny model's weights are smaller than one huge page)
        assert lo % hugepages.HUGE == 0
    x = torch.randn(5, packed[0].in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    m = packed[0]
    y_now = m(x)
    m.packed = before[id(m)][1]  # the original bytes in ordinary memory
    assert torch.equal(m(x), y_now)


def test_the_adapter_pool_is_an_arena(tiny_model_dir):
    from loraplex.config import LoraConfig
    from loraplex.lora.manager import LoraManager
    from loraplex.model.loader import load_model

    loaded = load_model(tiny_model_dir, torch.float32, "cpu")
    mgr = LoraManager(LoraConfig(adapter_memory="8MiB"), loaded.model, torch.float32, "cpu")
    try:
        assert mgr.pool.tensor.data_ptr() % hugepages.HUGE == 0 and mgr.pool.capacity_bytes <= 8 << 20
    finally:
        mgr.close()
