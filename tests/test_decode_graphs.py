"""Decode graphs (model/decode_graphs.py, --cuda-graphs) on CPU: the fixed-shape, padded decode step
they record gives the ordinary forward's logits and greedy tokens (run eagerly here: no GPU), the
buckets, what the graphs leave to the eager path, and the refusal on a CPU device. The CUDA capture
itself only runs on a GPU (never run so far)."""

from __future__ import annotations

import pytest
import torch

from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.request import Request, SamplingParams
from loraplex.engine.sampler import first_argmax
from loraplex.model.decode_graphs import batch_buckets
from loraplex.model.loader import load_model


@pytest.mark.parametrize("max_seqs, want", [
    (1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (20, [1, 2, 4, 8, 16, 20]),
    (64, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]),
])
def test_buckets(max_seqs, want):
    assert batch_buckets(max_seqs) == want


def _config(**kw):
    base = dict(block_size=4, num_kv_blocks=128, max_num_seqs=6, max_num_batched_tokens=32, max_model_len=96,
                max_new_tokens_cap=64)
    base.update(kw)
    return EngineConfig(**base)


@pytest.fixture(scope="module")
def loaded_by_family(tiny_model_dirs):
    return {fam: load_model(tiny_model_dirs[fam], torch.float32, "cpu") for fam in ("llama", "mistral")}


def test_refused_on_cpu(loaded_by_family):
    loaded = loaded_by_family["llama"]
    with pytest.raises(ValueError, match="cuda_graphs: needs a CUDA device, the model is on cpu"):
        Engine(loaded, _config(cuda_graphs=True))
    with pytest.raises(ValueError, match="decode_graphs: unknown mode"):
        ModelRunner(loaded.model, loaded.arch, _config(), torch.float32, "cpu", decode_graphs="yes")


def _lockstep(loaded, plain: Engine, graphed: Engine) -> None:
    """Feed both engines the same requests and step them in lockstep; `graphed` runs its decode
    steps through the decode graphs. Every step's logits agree and so does every token."""
    logits = {"plain": [], "graphed": []}
    graph_steps = []
    for name, eng in (("plain", plain), ("graphed", graphed)):
        inner = eng.runner.run

        def rec(seqs, nums, inner=inner, name=name, greedy=False):
            out = inner(seqs, nums)  # the logits even on greedy steps, to compare them
            logits[name].append(out.clone())
            return first_argmax(out) if greedy else out
        eng.runner.run = rec
    inner_graph = graphed.runner.graphs.run

    def count(*args, **kw):
        graph_steps.append(len(kw["input_ids"]))
        return inner_graph(*args, **kw)
    graphed.runner.graphs.run = count

    gen = torch.Generator().manual_seed(5)
    outs = {"plain": {}, "graphed": {}}
    # Staggered prompts and lengths: decode batches of 1..4 sequences (3 is padded to bucket 4)
    # mixed with steps that still prefill (those stay eager).
    for i in range(5):
        ids = torch.randint(3, loaded.arch.vocab_size, (3 + 7 * i,), generator=gen).tolist()
        for name, eng in (("plain", plain), ("graphed", graphed)):
            eng.submit(Request(f"r{i}", ids, SamplingParams(max_new_tokens=6 + 5 * i, temperature=0.0,
                                                            ignore_eos=True)),
                       lambda out, name=name: outs[name].setdefault(out.request_id, []).extend(out.new_token_ids))
        plain.step()
        graphed.step()
    while plain.scheduler.has_work() or graphed.scheduler.has_work():
        plain.step()
        graphed.step()
    assert outs["graphed"] == outs["plain"] and len(outs["plain"]) == 5
    assert len(logits["plain"]) == len(logits["graphed"])
    # Not bit-identical: padding rows change the GEMMs' M, and the float32 GEMM picks its blocking
    # (so its rounding) by M; measured differences are ~2e-5 on logits of magnitude ~1.
    for a, b in zip(logits["plain"], logits["graphed"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert {1, 3} <= set(graph_steps), graph_steps  # 3 sequences: padded up to bucket 4
    assert len(graph_steps) < len(logits["graphed"])  # prefill steps stayed eager


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_padded_static_decode_matches_the_forward(loaded_by_family, family):
    """The decode graphs' padded fixed-shape step, run eagerly on CPU, against the ordinary forward."""
    loaded = loaded_by_family[family]
    plain = Engine(loaded, _config())
    graphed = Engine(loaded, _config())
    graphed.runner = ModelRunner(loaded.model, loaded.arch, _config(), torch.float32, "cpu",
                                 decode_graphs="eager")
    assert graphed.runner.kv.num_blocks == 129  # + the scratch block of the padding rows
    _lockstep(loaded, plain, graphed)


@pytest.mark.gpu
def test_captured_cuda_graphs_match_the_forward(tiny_model_dirs):
    """On a GPU: --cuda-graphs captures every bucket at start-up and replays decode steps."""
    loaded = load_model(tiny_model_dirs["llama"], torch.float32, "cuda")
    plain = Engine(loaded, _config())
    graphed = Engine(loaded, _config(cuda_graphs=True))
    assert sorted(graphed.runner.graphs._graphs) == batch_buckets(6)
    _lockstep(loaded, plain, graphed)


def test_what_the_graphs_leave_to_the_eager_path(loaded_by_family):
    loaded = loaded_by_family["llama"]
    runner = ModelRunner(loaded.model, loaded.arch, _config(), torch.float32, "cpu", decode_graphs="eager")
    g = runner.graphs
    width = g.width  # 96 / 4 = 24 blocks
    assert width == 24
    assert g.covers(3, [1, 1, 1], [2, 5, 24], any_adapter=False)
    assert not g.covers(3, [1, 4, 1], [2, 5, 7], any_adapter=False)  # a prefill chunk
    assert not g.covers(3, [1, 1, 1], [2, 5, 7], any_adapter=True)  # LoRA metadata is per step, on the host
    assert not g.covers(7, [1] * 7, [2] * 7, any_adapter=False)  # more than the largest bucket
    assert not g.covers(2, [1, 1], [2, 25], any_adapter=False)  # wider than the static tables
