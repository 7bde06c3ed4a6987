"""BlockManager: allocate-as-you-grow, free, counters; checked against a plain-Python model."""

from __future__ import annotations

import random

import pytest

from loraplex.engine.block_manager import BlockManager
from loraplex.engine.request import Request, SamplingParams
from loraplex.engine.sequence import Sequence


def make_seq(n_prompt: int, rid: str = "r") -> Sequence:
    return Sequence.from_request(Request(rid, list(range(1, n_prompt + 1)), SamplingParams()))


def test_grows_one_block_per_block_size_tokens():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(5)
    assert bm.blocks_needed(seq, 5) == 2
    bm.allocate(seq, 3)  # first chunk of 3 tokens: one block
    assert len(seq.block_table) == 1 and bm.num_used_blocks == 1
    seq.num_computed_tokens = 3
    assert bm.blocks_needed(seq, 1) == 0  # token 3 still fits in block 0
    bm.allocate(seq, 1)
    seq.num_computed_tokens = 4
    assert bm.blocks_needed(seq, 1) == 1  # token 4 opens block 1
    bm.allocate(seq, 2)
    assert len(seq.block_table) == 2
    assert bm.num_free_blocks == 8 and bm.usage == pytest.approx(0.2)
    assert len(set(seq.block_table)) == 2


def test_can_allocate_and_max_tokens_respect_free_blocks():
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = make_seq(8, "a"), make_seq(8, "b")
    bm.allocate(a, 8)  # 2 blocks
    assert bm.can_allocate(b, 4) and not bm.can_allocate(b, 5)
    assert bm.max_tokens_allocatable(b) == 4
    a.num_computed_tokens = 6  # 2 free slots left in a's last block, plus the free block
    assert bm.max_tokens_allocatable(a) == 2 + 4
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(b, 5)
    assert b.block_table == [] and bm.num_free_blocks == 1  # failed allocate changed nothing


def test_free_returns_everything_and_is_idempotent():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_seq(7)
    bm.allocate(a, 7)
    assert bm.num_used_blocks == 4
    bm.free(a)
    bm.free(a)
    assert a.block_table == [] and bm.num_used_blocks == 0 and bm.num_free_blocks == 6


def test_random_workload_against_python_model():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=40, block_size=3)
    seqs = [make_seq(rng.randint(1, 20), f"s{i}") for i in range(12)]
    for _ in range(2000):
        seq = rng.choice(seqs)
        if rng.random() < 0.15:
            bm.free(seq)
            seq.num_computed_tokens = 0
            continue
        n = rng.randint(1, 7)
        expected_need = max(-(-(seq.num_computed_tokens + n) // 3) - len(seq.block_table), 0)
        assert bm.blocks_needed(seq, n) == expected_need
        if bm.can_allocate(seq, n):
            bm.allocate(seq, n)
            seq.num_computed_tokens += n
            assert len(seq.block_table) * 3 >= seq.num_computed_tokens
        else:
            assert expected_need > bm.num_free_blocks
        owned = [b for s in seqs for b in s.block_table]
        assert len(owned) == len(set(owned)), "a block has two owners"
        assert len(owned) == bm.num_used_blocks
        assert all(0 <= b < 40 for b in owned)
