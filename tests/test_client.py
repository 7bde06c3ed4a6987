"""loraplex.client (sync and asyncio) against an in-process server on the tiny random Llama."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from loraplex.client import AsyncClient, Client, LoraplexError, build_request
from loraplex.config import EngineConfig, LoraConfig
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, build_lora_manager, start_engine
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.engine_run import slow_steps

pytestmark = pytest.mark.timeout(300)

ENGINE = EngineConfig(block_size=16, num_kv_blocks=160, max_num_seqs=16, max_num_batched_tokens=256,
                      max_model_len=256, max_new_tokens_cap=200, max_waiting=64)


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("client_adapters")
    make_peft_adapter(tiny_model_dir, root / "qv", "qv_r4", seed=4)
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir, library):
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    manager = build_lora_manager(loaded, LoraConfig(max_loras=2, max_lora_rank=8, allowed_roots=(str(library),)))
    srv = ServerThread(start_engine(loaded, ENGINE, manager)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def test_generate_and_stream_agree(client):
    done = client.generate("The quick brown fox", max_new_tokens=10, temperature=0, ignore_eos=True)
    assert done.finish_reason == "length" and len(done.token_ids) == 10 and done.usage.completion_tokens == 10
    assert 0 <= done.timings.queue_seconds <= done.timings.total_seconds
    chunks = list(client.stream("The quick brown fox", max_new_tokens=10, temperature=0, ignore_eos=True))
    assert "".join(c.text for c in chunks) == done.text
    assert [t for c in chunks for t in c.token_ids] == list(done.token_ids)
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.prompt_tokens == done.usage.prompt_tokens
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    chat = client.generate(messages=[{"role": "user", "content": "Hi!"}], max_new_tokens=4, temperature=0)
    assert chat.usage.prompt_tokens > 3
    ids = client.generate(prompt_token_ids=[1, 5, 9], max_new_tokens=3, temperature=0, ignore_eos=True)
    assert len(ids.token_ids) == 3


def test_errors_carry_status_and_field(client):
    with pytest.raises(LoraplexError) as exc:
        client.generate("x", adapter="nobody")
    assert exc.value.code == "NOT_FOUND" and exc.value.details.startswith("adapter_id:")
    with pytest.raises(LoraplexError) as exc:
        client.generate("x", temperature=-1)
    assert exc.value.code == "INVALID_ARGUMENT" and exc.value.details.startswith("sampling.temperature:")
    with pytest.raises(ValueError, match="exactly one"):
        build_request("x", prompt_token_ids=[1])


def test_adapters_and_model_info(client, library):
    info = client.model_info()
    assert info.max_model_len == 256 and info.sampling_defaults.source == "neutral"
    a = client.load_adapter("qv", library / "qv", pinned=True)
    assert a.adapter_id == "qv" and a.pinned and a.max_rank == 4 and a.tier in ("device", "host", "disk")
    assert [x.adapter_id for x in client.list_adapters()] == ["qv"]
    base = client.generate("Hello", max_new_tokens=6, temperature=0, ignore_eos=True)
    tuned = client.generate("Hello", adapter="qv", max_new_tokens=6, temperature=0, ignore_eos=True)
    assert base.token_ids != tuned.token_ids
    client.unload_adapter("qv")
    assert client.list_adapters() == []


def test_leaving_a_stream_early_cancels_it(server, client, monkeypatch):
    engine = server.server.runtime.engine
    slow_steps(monkeypatch, engine, 0.02)
    before = engine.stats().finished_total.get("cancelled", 0)
    for chunk in client.stream("Once upon a time", max_new_tokens=150, temperature=0, ignore_eos=True):
        if chunk.token_ids:
            break
    deadline = time.monotonic() + 10
    while engine.stats().finished_total.get("cancelled", 0) == before or engine.stats().kv_blocks_used:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.02)


def test_async_client(server):
    async def run():
        async with AsyncClient(server.address, timeout=60) as c:
            done = await c.generate("The quick brown fox", max_new_tokens=8, temperature=0, ignore_eos=True)
            streamed = [ch async for ch in c.stream("The quick brown fox", max_new_tokens=8, temperature=0,
                                                    ignore_eos=True)]
            many = await asyncio.gather(*[c.generate(p, max_new_tokens=4, temperature=0) for p in ("a", "b c", "d")])
            info = await c.model_info()
            with pytest.raises(LoraplexError) as exc:
                await c.unload_adapter("nobody")
            return done, streamed, many, info, exc.value

    done, streamed, many, info, err = asyncio.run(run())
    assert "".join(c.text for c in streamed) == done.text and streamed[-1].finish_reason == "length"
    assert len(many) == 3 and info.vocab_size > 0
    assert err.code == "NOT_FOUND"
