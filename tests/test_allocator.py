"""The adapter pool's extent allocator (lora/allocator.py): best fit, release, and the eviction
window, checked against a brute-force reference on random load/evict cycles."""

from __future__ import annotations

import random

import pytest

from loraplex.lora.allocator import ALIGN_ELEMS, ExtentAllocator, aligned

A = ALIGN_ELEMS


def check_invariants(al: ExtentAllocator) -> None:
    ext = al.extents()
    assert [s for s, _, _ in ext] == sorted(s for s, _, _ in ext)
    for (s0, n0, _), (s1, _, _) in zip(ext, ext[1:]):
        assert s0 + n0 <= s1, "extents overlap"
    assert all(s % A == 0 and n % A == 0 for s, n, _ in ext)
    assert al.used == sum(n for _, n, _ in ext)
    assert al.used + sum(n for _, n in al.holes()) == al.capacity


def test_best_fit_and_release():
    al = ExtentAllocator(100 * A)
    assert al.alloc(30 * A, "a") == 0
    assert al.alloc(20 * A, "b") == 30 * A
    assert al.alloc(30 * A, "c") == 50 * A
    al.release(30 * A)  # hole [30, 50) of 20; tail hole [80, 100) of 20
    al.release(0)  # hole [0, 30) merges with it: [0, 50) of 50
    assert al.holes() == [(0, 50 * A), (80 * A, 20 * A)]
    assert al.alloc(15 * A, "d") == 80 * A  # the smaller hole that fits
    assert al.alloc(60 * A, "e") is None
    assert al.alloc(1, "f") == 95 * A  # best fit: the 5-unit tail hole, not [0, 50)
    assert al.extents()[-1] == (95 * A, A, "f")  # rounded up to one alignment unit
    check_invariants(al)


def test_plan_picks_the_window_with_the_oldest_victims():
    al = ExtentAllocator(100 * A)
    for name, size in (("a", 30), ("b", 20), ("c", 20), ("d", 30)):
        al.alloc(size * A, name)
    al.release(50 * A)  # c gone: hole [50, 70)
    age = {"a": 5.0, "b": 9.0, "d": 1.0}
    plan = al.plan(40 * A, age.get)
    assert plan.offset == 50 * A and plan.victims == ("d",)  # hole + d: the oldest victim
    age["d"] = None  # d in use: the window must not cross it
    plan = al.plan(40 * A, age.get)
    assert plan.offset == 30 * A and plan.victims == ("b",)  # b + hole beats a + b: fewer bytes
    assert al.plan(80 * A, age.get) is None  # only 70 units lie left of d
    assert al.plan(101 * A, lambda _: 0.0) is None
    assert al.plan(10 * A, age.get).victims == ()  # the hole fits already


def _brute_plan(al: ExtentAllocator, size: int, age):
    """Every window start at a region start; the best (newest victim, victim bytes)."""
    size = aligned(size)
    regions = []
    pos = 0
    for s, n, owner in al.extents():
        if s > pos:
            regions.append((pos, s, float("-inf"), None))
        regions.append((s, s + n, age(owner), owner))
        pos = s + n
    if pos < al.capacity:
        regions.append((pos, al.capacity, float("-inf"), None))
    best = None
    for i in range(len(regions)):
        keys, victims, j = [], 0, i
        while j < len(regions) and regions[j][2] is not None and regions[j][0] - regions[i][0] < size:
            keys.append(regions[j][2])
            if regions[j][3] is not None:
                victims += regions[j][1] - regions[j][0]
            j += 1
        if j > i and regions[j - 1][1] - regions[i][0] >= size:
            key = (max(keys), victims)
            if best is None or key < best:
                best = key
    return best


@pytest.mark.parametrize("seed", range(6))
def test_random_cycles_keep_invariants_and_plan_is_optimal(seed):
    rng = random.Random(seed)
    al = ExtentAllocator(4096 * A)
    live: dict[int, int] = {}  # owner -> start
    ages: dict[int, float | None] = {}
    for step in range(400):
        owner = step
        size = rng.choice([1, 3, 8, 17, 64, 150]) * A + rng.randrange(A)
        ages_now = {o: (None if rng.random() < 0.2 else rng.random()) for o in live}
        start = al.alloc(size, owner)
        if start is None:
            plan = al.plan(size, ages_now.get)
            ref = _brute_plan(al, size, ages_now.get)
            if plan is None:
                assert ref is None
                continue
            got_key = (max([ages_now[v] for v in plan.victims], default=float("-inf")),
                       sum(n for s, n, o in al.extents() if o in plan.victims))
            assert ref is not None and got_key == ref
            for v in plan.victims:
                assert ages_now[v] is not None, "a fixed extent was chosen"
                al.release(live.pop(v))
            al.take(plan.offset, size, owner)
            start = plan.offset
        live[owner] = start
        ages[owner] = 0.0
        if live and rng.random() < 0.3:
            victim = rng.choice(sorted(live))
            al.release(live.pop(victim))
        check_invariants(al)
    assert len(al) == len(live)
