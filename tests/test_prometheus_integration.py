"""A real Prometheus scrapes a real engine's /metrics; the dashboard's PromQL runs against it.

Prometheus (Debian package `prometheus`) runs on loopback with a temporary config (1 s scrapes)
and TSDB folder. The engine runs the tiny random Llama with several adapters; the test polls
Prometheus' HTTP API until the counters, histogram counts and per-adapter series it expects from
the workload show up, then evaluates every expression of deploy/grafana/loraplex-dashboard.json.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from loraplex.api.metrics import METRIC_NAMES, LoraplexMetrics, start_metrics_server
from loraplex.config import EngineConfig, LoraConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import Request, SamplingParams
from loraplex.lora.manager import LoraManager
from loraplex.model.loader import load_model
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.prometheus import DEADLINE, PROMETHEUS, http_json, query, scalar, start_prometheus, stop, wait_for

pytestmark = pytest.mark.skipif(PROMETHEUS is None,
                                reason="prometheus binary not installed (Debian: apt-get install -y prometheus)")

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "loraplex-dashboard.json"
ADAPTERS = ("sql", "chat", "code")
PER_ADAPTER = {"": 2, "sql": 3, "chat": 2, "code": 1}  # requests per adapter ("" = base)
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prom_it")
    make_peft_adapter(tiny_model_dir, tmp / "adapters" / ADAPTERS[0], "qv_r4", seed=11)
    for name in ADAPTERS[1:]:
        shutil.copytree(tmp / "adapters" / ADAPTERS[0], tmp / "adapters" / name)
    loaded = load_model(tiny_model_dir, torch.float32, "cpu")
    # No --max-loras cap: the three adapters stay in the pool, each loaded exactly once.
    manager = LoraManager(LoraConfig(max_lora_rank=8, max_cpu_loras=4, allowed_roots=(str(tmp / "adapters"),)),
                          loaded.model, torch.float32, "cpu")
    for name in ADAPTERS:
        manager.load(name, tmp / "adapters" / name)
    registry = CollectorRegistry()
    metrics = LoraplexMetrics(registry, top_adapters=2)
    engine = Engine(loaded, EngineConfig(block_size=4, num_kv_blocks=128, max_num_seqs=8,
                                         max_num_batched_tokens=64, max_model_len=64,
                                         max_new_tokens_cap=16, max_waiting=32),
                    lora_manager=manager, observers=[metrics])
    metrics.bind(engine, manager, loaded.model)
    engine.start()
    http, _ = start_metrics_server(0, "127.0.0.1", registry)
    metrics_port = http.server_port

    config = ("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
              "scrape_configs:\n  - job_name: loraplex\n    static_configs:\n"
              f"      - targets: ['127.0.0.1:{metrics_port}']\n")
    try:
        proc, base = start_prometheus(config, tmp)
    except BaseException:
        http.shutdown()
        engine.shutdown(0)
        raise
    try:
        yield dict(base=base, engine=engine, metrics=metrics)
    finally:
        stop(proc)
        http.shutdown()
        engine.shutdown(0)


@pytest.fixture(scope="module")
def workload(server):
    import threading

    done = threading.Semaphore(0)
    total = 0
    for adapter, n in PER_ADAPTER.items():
        for i in range(n):
            rid = f"{adapter or 'base'}-{i}"
            server["engine"].submit(
                Request(rid, [5 + i, 17, 42, 9, 100 + total], SamplingParams(
                    max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True), adapter_id=adapter),
                lambda out: out.finished and done.release())
            total += 1
    for _ in range(total):
        assert done.acquire(timeout=DEADLINE)
    server["metrics"].record_rejected("NOT_FOUND")
    return total


def test_prometheus_scrapes_counters_histograms_and_adapter_series(server, workload):
    base, n = server["base"], workload
    wait_for(base, 'sum(loraplex_requests_total{job="loraplex"})', n)
    wait_for(base, 'sum(loraplex_requests_total{finish_reason="length"})', n)
    wait_for(base, "sum(loraplex_generation_tokens_total)", n * NEW_TOKENS)
    wait_for(base, "sum(loraplex_prompt_tokens_total)", n * 5)
    wait_for(base, "loraplex_time_to_first_token_seconds_count", n)
    wait_for(base, "loraplex_inter_token_latency_seconds_count", n * (NEW_TOKENS - 1))
    wait_for(base, 'loraplex_time_to_first_token_seconds_bucket{le="+Inf"}', n)
    wait_for(base, "loraplex_request_duration_seconds_count", n)
    wait_for(base, 'loraplex_requests_rejected_total{code="NOT_FOUND"}', 1)
    wait_for(base, "sum(loraplex_adapter_loads_total{outcome=\"success\"})", len(ADAPTERS))
    wait_for(base, "sum(loraplex_adapters_resident)", len(ADAPTERS))
    # Per-adapter series: top 2 get their own label, the third adapter counts under "other".
    wait_for(base, 'sum(loraplex_requests_total{adapter="base"})', PER_ADAPTER[""])
    own = {a for a in ADAPTERS if scalar(base, f'sum(loraplex_requests_total{{adapter="{a}"}})')}
    assert len(own) == 2
    for a in own:
        wait_for(base, f'sum(loraplex_generation_tokens_total{{adapter="{a}"}})', PER_ADAPTER[a] * NEW_TOKENS)
    (other,) = set(ADAPTERS) - own
    wait_for(base, 'sum(loraplex_requests_total{adapter="other"})', PER_ADAPTER[other])
    wait_for(base, "count(count by (adapter) (loraplex_requests_total))", 2 + 2)  # base, other, 2 own
    assert scalar(base, "loraplex_kv_cache_usage_ratio") == 0.0  # all finished: blocks freed
    assert scalar(base, "loraplex_batch_sequences_count") > 0


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    return exprs


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bloraplex_[a-z_]+\b", expr))


def _base_name(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in METRIC_NAMES:
            return name[: -len(suffix)]
    return name


def test_dashboard_queries_evaluate_and_use_exported_names(server, workload):
    base = server["base"]
    wait_for(base, "sum(loraplex_requests_total)", workload)
    time.sleep(2.5)  # a few more scrapes: rate() needs two samples in its window
    exported = set(http_json(base + "/api/v1/label/__name__/values")["data"])
    dash = json.loads(DASHBOARD.read_text())
    exprs = _dashboard_exprs() + [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    non_empty = 0
    for expr in exprs:
        names = _metric_names(expr)
        assert names, f"no loraplex metric in {expr}"
        for name in names:
            assert _base_name(name) in METRIC_NAMES, f"{name} (in {expr}) is not exported by metrics.py"
            assert name in exported, f"{name} (in {expr}) never reached Prometheus"
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL; its metric name was checked above
        promql = (expr.replace("$__rate_interval", "30s").replace('"$job"', '".*"').replace('"$replica"', '".*"'))
        assert "$" not in promql, promql
        res = query(base, promql)
        assert res["status"] == "success", (expr, res)
        non_empty += bool(res["data"]["result"])
    assert non_empty >= len(exprs) // 2  # most panels have data after the workload
