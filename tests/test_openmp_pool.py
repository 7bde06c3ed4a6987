"""loraplex_kernels/openmp_pool.py: a thread's OpenMP workers are released (they exit), a helper
thread is kept to one torch thread without changing torch's default for the others, the right
runtime is asked (torch's libgomp, not another package's renamed copy), and Engine.start() /
warmup() / an idle engine release pools so that the engine's thread holds the only one."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from loraplex_kernels import openmp_pool

needs_libgomp = pytest.mark.skipif(not openmp_pool.available(), reason="this torch does not run on libgomp")


def _tasks() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _parallel_work() -> None:
    """Big enough for torch to run a parallel region on 2 threads."""
    x = torch.rand(1 << 22)
    for _ in range(3):
        x = x * 1.0001 + 0.5


@needs_libgomp
def test_release_makes_the_calling_threads_workers_exit():
    result = {}

    def worker():
        torch.set_num_threads(2)
        before = _tasks()
        _parallel_work()
        with_pool = _tasks()
        result["new"] = with_pool - before  # the pool's worker thread(s)
        result["released"] = openmp_pool.release_thread_pool()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and result["new"] & _tasks():
            time.sleep(0.01)
        result["left"] = result["new"] & _tasks()
        _parallel_work()  # a released pool comes back at the next region: nothing is lost
        result["again"] = len(_tasks() - with_pool) + len(result["new"] - _tasks())

    default = torch.get_num_threads()
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    torch.set_num_threads(default)  # the worker's set_num_threads(2) also set torch's default
    assert len(result["new"]) >= 1, "2 torch threads should have started a worker"
    assert result["released"] is True
    assert result["left"] == set(), "the released workers should have exited"
    assert result["again"] >= 1


def test_one_thread_keeps_a_helper_thread_poolless_and_the_default_as_it_was():
    default = torch.get_num_threads()
    result = {}

    def helper():
        openmp_pool.one_thread()
        result["threads"] = torch.get_num_threads()
        before = _tasks()
        _parallel_work()
        result["new"] = _tasks() - before

    def later():
        result["later"] = torch.get_num_threads()

    for fn in (helper, later):
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    assert result["threads"] == 1
    assert result["new"] == set()  # no pool, no worker thread
    assert result["later"] == default == torch.get_num_threads()  # others keep torch's default


@needs_libgomp
def test_the_runtime_asked_is_torchs():
    path = openmp_pool._loaded_libgomp()
    torch_dir = str(os.path.realpath(os.path.dirname(torch.__file__)))
    maps = open("/proc/self/maps").read()
    if torch_dir in maps and "libgomp" in maps[maps.find(torch_dir):]:
        assert path.startswith(torch_dir)
    assert os.path.basename(path).startswith("libgomp")


def test_engine_start_and_warmup_release_the_callers_pool(tiny_model_dir, monkeypatch):
    from loraplex.config import EngineConfig
    from loraplex.engine.engine import Engine
    from loraplex.model.loader import load_model

    from loraplex.engine.request import Request, SamplingParams

    calls = []
    monkeypatch.setattr(openmp_pool, "release_thread_pool", lambda: calls.append(threading.get_ident()) or True)
    engine = Engine(load_model(tiny_model_dir, torch.float32, "cpu"), EngineConfig(num_kv_blocks=16))
    me = threading.get_ident()
    try:
        engine.warmup()
        assert calls == []  # not started: the caller is the one that computes
        engine.start()
        assert me in calls
        engine_thread = engine._thread.ident
        deadline = time.monotonic() + 10
        while engine_thread not in calls and time.monotonic() < deadline:  # idle at start: released
            time.sleep(0.01)
        assert set(calls) == {me, engine_thread}
        calls.clear()
        engine.warmup()  # after start, on this thread: released again
        assert calls == [me]
        calls.clear()
        done = threading.Event()
        engine.submit(Request("r", [1, 2, 3], SamplingParams(max_new_tokens=3)),
                      lambda out: out.finished and done.set())
        assert done.wait(30)
        while engine_thread not in calls and time.monotonic() < deadline + 10:  # idle again
            time.sleep(0.01)
        assert set(calls) == {engine_thread}
    finally:
        engine.shutdown()
