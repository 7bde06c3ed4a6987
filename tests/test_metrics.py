"""Prometheus metrics and request logs on a real Engine (tiny random Llama) with a real LoraManager.

Expected values come from outside the metrics code: the RequestOutput events the callbacks saw,
the engine's own counters, the manager's counters and tensors, and arithmetic on the workload.
The exposition is parsed with prometheus_client's parser and linted by `promtool check metrics`.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.api.metrics import METRIC_NAMES, LoraplexMetrics
from loraplex.api.request_log import JsonFormatter, RequestLogger
from loraplex.config import EngineConfig, LoraConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import Request, SamplingParams
from loraplex.lora.manager import LoraManager
from loraplex.model.loader import load_model
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.collector import Collector

NEW_TOKENS = 4
ADAPTERS = [f"ad{i}" for i in range(5)]
TOP_N = 2


@pytest.fixture(scope="module")
def adapter_root(tiny_model_dir, tmp_path_factory):
    """One real PEFT adapter, copied under several ids (the tests count adapters, not weights)."""
    root = tmp_path_factory.mktemp("metrics_adapters")
    make_peft_adapter(tiny_model_dir, root / ADAPTERS[0], "qv_r4", seed=7)
    for name in ADAPTERS[1:]:
        shutil.copytree(root / ADAPTERS[0], root / name)
    return root


def engine_config(**kw) -> EngineConfig:
    base = dict(block_size=4, num_kv_blocks=256, max_num_seqs=16, max_num_batched_tokens=64,
                max_model_len=128, max_new_tokens_cap=64, max_waiting=64)
    base.update(kw)
    return EngineConfig(**base)


def scrape(registry) -> dict[str, list]:
    """family name -> samples [(name, labels, value)] from the text exposition."""
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = [(s.name, s.labels, s.value) for s in fam.samples]
    return out


def value(fams, sample_name, **labels) -> float:
    """Sum of the samples called `sample_name` whose labels include `labels`."""
    total, found = 0.0, False
    for samples in fams.values():
        for name, lbl, v in samples:
            if name == sample_name and all(lbl.get(k) == want for k, want in labels.items()):
                total += v
                found = True
    assert found, f"no sample {sample_name}{labels}"
    return total


def label_values(fams, sample_name, label) -> set[str]:
    return {lbl[label] for samples in fams.values() for name, lbl, _ in samples
            if name == sample_name and label in lbl}


def prompt(i: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(3, 200, (n,), generator=g).tolist()


def sampling() -> SamplingParams:
    # Greedy and EOS ignored: every request generates exactly NEW_TOKENS tokens.
    return SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def run(tiny_model_dir, adapter_root):
    """One workload on a real engine + manager, observed by metrics and the request logger:
    phase 1: 2 base requests and one per adapter ad1..ad4, concurrently (at most 2 adapters are
    resident: --max-loras 2; loading 5 evicted ad0..ad2 to disk); phase 2: ad0 alone, reloaded
    from disk by the prefetcher."""
    loaded = load_model(tiny_model_dir, torch.float32, "cpu")
    manager = LoraManager(LoraConfig(max_loras=2, max_lora_rank=8, max_cpu_loras=4,
                                     allowed_roots=(str(adapter_root),)),
                          loaded.model, torch.float32, "cpu")
    for name in ADAPTERS:
        manager.load(name, adapter_root / name)
    registry = CollectorRegistry()
    metrics = LoraplexMetrics(registry, top_adapters=TOP_N)
    log_stream = io.StringIO()
    req_logger = logging.getLogger("test_metrics.requests")
    req_logger.propagate = False
    req_logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(log_stream)
    handler.setFormatter(JsonFormatter())
    req_logger.addHandler(handler)
    engine = Engine(loaded, engine_config(), lora_manager=manager,
                    observers=[metrics, RequestLogger(req_logger)])
    metrics.bind(engine, manager, loaded.model)
    engine.start()
    sink = Collector()
    jobs = [("b0", ""), ("b1", "")] + [(f"r{n}", n) for n in ADAPTERS[1:]]
    prompts = {}
    try:
        for i, (rid, adapter) in enumerate(jobs):
            prompts[rid] = prompt(i, 5 + i)
            engine.submit(Request(rid, prompts[rid], sampling(), adapter_id=adapter), sink)
        sink.wait([r for r, _ in jobs])
        manager.ensure_available(ADAPTERS[0])  # what the servicer does before submit
        prompts["r_ad0"] = prompt(99, 9)
        engine.submit(Request("r_ad0", prompts["r_ad0"], sampling(), adapter_id=ADAPTERS[0]), sink)
        sink.wait(["r_ad0"])
        metrics.record_rejected("NOT_FOUND")
        metrics.record_rejected("StatusCode.RESOURCE_EXHAUSTED")
        metrics.record_rejected("NOT_FOUND")
        engine.shutdown(0)  # the loop has stopped: every step's bookkeeping is done
        fams = scrape(registry)
        yield dict(fams=fams, sink=sink, prompts=prompts, engine=engine, manager=manager,
                   loaded=loaded, registry=registry, metrics=metrics, log=log_stream.getvalue(),
                   adapters={"b0": "", "b1": "", "r_ad0": ADAPTERS[0], **{f"r{n}": n for n in ADAPTERS[1:]}})
    finally:
        engine.shutdown(0)
        req_logger.removeHandler(handler)


def test_request_and_token_counters(run):
    fams, sink, prompts = run["fams"], run["sink"], run["prompts"]
    n = len(prompts)
    assert all(sink.final(r).completion_tokens == NEW_TOKENS for r in prompts)
    assert value(fams, "loraplex_requests_total", finish_reason="length") == n
    assert value(fams, "loraplex_requests_total") == n
    assert value(fams, "loraplex_requests_total", adapter="base") == 2
    assert value(fams, "loraplex_prompt_tokens_total") == sum(len(p) for p in prompts.values())
    assert value(fams, "loraplex_prompt_tokens_total", adapter="base") == len(prompts["b0"]) + len(prompts["b1"])
    assert value(fams, "loraplex_generation_tokens_total") == n * NEW_TOKENS
    assert value(fams, "loraplex_generation_tokens_total", adapter="base") == 2 * NEW_TOKENS
    assert value(fams, "loraplex_requests_rejected_total", code="NOT_FOUND") == 2
    assert value(fams, "loraplex_requests_rejected_total", code="RESOURCE_EXHAUSTED") == 1
    stats = run["engine"].stats()
    assert value(fams, "loraplex_sampled_tokens_total") == stats.generation_tokens_total == n * NEW_TOKENS
    assert value(fams, "loraplex_prefill_tokens_total") == stats.prompt_tokens_total


def test_top_n_adapter_labels_are_bounded(run):
    fams = run["fams"]
    labels = label_values(fams, "loraplex_requests_total", "adapter") - {"base"}
    # 5 adapters served, top 2 get their own label, the other 3 share "other": N + 1 values.
    assert len(labels) == TOP_N + 1 and "other" in labels
    own = labels - {"other"}
    assert own <= set(ADAPTERS)
    for family in ("loraplex_prompt_tokens_total", "loraplex_generation_tokens_total"):
        assert label_values(fams, family, "adapter") - {"base"} == labels
    # Each own-label adapter served exactly one request; "other" got the remaining three.
    for a in own:
        assert value(fams, "loraplex_requests_total", adapter=a) == 1
        assert value(fams, "loraplex_generation_tokens_total", adapter=a) == NEW_TOKENS
    assert value(fams, "loraplex_requests_total", adapter="other") == len(ADAPTERS) - TOP_N


def test_label_policy_is_sticky_and_deterministic():
    m = LoraplexMetrics(CollectorRegistry(), top_adapters=2)
    assert [m.adapter_label(a) for a in ("x", "", "y", "z", "x", "w", "y")] == \
        ["x", "base", "y", "other", "x", "other", "y"]
    # Ids that would collide with the reserved values never get their own label.
    m2 = LoraplexMetrics(CollectorRegistry(), top_adapters=3)
    assert m2.adapter_label("other") == "other" and m2.adapter_label("base") == "other"
    assert LoraplexMetrics(CollectorRegistry(), top_adapters=0).adapter_label("x") == "other"
    with pytest.raises(ValueError):
        LoraplexMetrics(CollectorRegistry(), top_adapters=-1)


def test_latency_histograms(run):
    fams, sink, prompts = run["fams"], run["sink"], run["prompts"]
    n = len(prompts)
    finals = [sink.final(r) for r in prompts]
    assert value(fams, "loraplex_time_to_first_token_seconds_count") == n
    assert value(fams, "loraplex_request_duration_seconds_count") == n
    assert value(fams, "loraplex_request_queue_seconds_count") == n
    assert value(fams, "loraplex_inter_token_latency_seconds_count") == n * (NEW_TOKENS - 1)
    # The sums match the timings the clients got (computed by the engine, not by metrics.py).
    assert value(fams, "loraplex_time_to_first_token_seconds_sum") == pytest.approx(
        sum(o.timings.ttft_seconds for o in finals), rel=1e-9, abs=1e-9)
    assert value(fams, "loraplex_request_duration_seconds_sum") == pytest.approx(
        sum(o.timings.total_seconds for o in finals), rel=1e-9, abs=1e-9)
    itl_sum = value(fams, "loraplex_inter_token_latency_seconds_sum")
    # Gaps of one request add up to (last token time - first token time) < total - ttft.
    assert 0 < itl_sum <= sum(o.timings.total_seconds - o.timings.ttft_seconds for o in finals) + 1e-9
    # Cumulative buckets: +Inf equals count and the series never decreases.
    for base in ("loraplex_time_to_first_token_seconds", "loraplex_inter_token_latency_seconds"):
        buckets = [(float(l["le"]), v) for name, l, v in fams[base] if name == base + "_bucket"]
        buckets.sort()
        assert buckets[-1] == (float("inf"), value(fams, base + "_count"))
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))


def test_batch_histograms(run):
    fams, engine = run["fams"], run["engine"]
    stats = engine.stats()
    steps = value(fams, "loraplex_batch_sequences_count")
    assert 0 < steps <= stats.steps_total
    assert value(fams, "loraplex_batch_tokens_count") == steps
    assert value(fams, "loraplex_batch_distinct_adapters_count") == steps
    # Tokens fed = prompt tokens + every generated token but the last of each request.
    n = len(run["prompts"])
    assert value(fams, "loraplex_batch_tokens_sum") == stats.prompt_tokens_total + n * (NEW_TOKENS - 1)
    # Phase 1 ran 4 adapters + base concurrently on 2 slots: some step held 2 adapters.
    assert value(fams, "loraplex_batch_distinct_adapters_bucket", le="1.0") < steps
    assert value(fams, "loraplex_batch_distinct_adapters_bucket", le="2.0") == steps  # 2 slots


def test_adapter_cache_metrics(run):
    fams, mgr = run["fams"], run["manager"]
    # 5 adapters through a pool of 2 (--max-loras 2): loading them evicted 3, whose extents stayed
    # on the host tier (4 copies); the requests then brought evicted ones back through the
    # prefetcher from there (ad0 at least, in phase 2), with no disk read.
    assert value(fams, "loraplex_adapter_loads_total", source="api", outcome="success") == len(ADAPTERS)
    reloads = value(fams, "loraplex_adapter_loads_total", source="disk_reload", outcome="success")
    assert reloads == mgr.stats.loads.get("disk_reload", 0) == 0
    refills = value(fams, "loraplex_adapter_spill_refills_total")
    assert refills == mgr.stats.spill_refills >= 1
    assert value(fams, "loraplex_adapter_loads_total", source="on_demand") == 0
    assert value(fams, "loraplex_adapter_loads_total", outcome="failure") == 0
    assert value(fams, "loraplex_adapter_load_seconds_count") == len(ADAPTERS) + reloads  # folder reads
    assert value(fams, "loraplex_adapter_load_seconds_sum") > 0
    hits, misses = value(fams, "loraplex_adapter_cache_hits_total"), value(fams, "loraplex_adapter_cache_misses_total")
    assert hits + misses == len(ADAPTERS) and misses >= 1  # five adapter requests
    assert (hits, misses) == (mgr.stats.hits, mgr.stats.misses)
    assert 0 <= value(fams, "loraplex_adapter_prefetch_hits_total") <= misses
    assert value(fams, "loraplex_adapter_evictions_total", tier="device") >= len(ADAPTERS) - 2 + refills
    tiers = {t: value(fams, "loraplex_adapters_resident", tier=t) for t in ("device", "host", "disk")}
    assert sum(tiers.values()) == len(ADAPTERS) and 1 <= tiers["device"] <= 2
    assert tiers == {t.value: n for t, n in mgr.tier_counts().items()}
    assert value(fams, "loraplex_adapter_slots_used") == tiers["device"]
    assert value(fams, "loraplex_adapter_slots") == 2
    assert value(fams, "loraplex_adapter_pool_bytes") == mgr.device_bytes
    assert 0 < value(fams, "loraplex_adapter_pool_used_bytes") == mgr.pool_used_bytes
    assert value(fams, "loraplex_adapter_load_queue_depth") == 0
    # One adapter wait per adapter request, observed at its admission.
    assert value(fams, "loraplex_adapter_wait_seconds_count") == len(ADAPTERS)
    assert value(fams, "loraplex_adapter_wait_seconds_sum") >= 0


def test_resident_bytes(run):
    fams, loaded, engine = run["fams"], run["loaded"], run["engine"]
    arch, cfg = loaded.arch, engine.config
    kv = 2 * arch.num_layers * cfg.num_kv_blocks * cfg.block_size * arch.num_kv_heads * arch.head_dim * 4
    assert value(fams, "loraplex_kv_cache_bytes") == kv
    params = {p.data_ptr(): p.numel() * p.element_size() for p in loaded.model.parameters()}
    params.update({b.data_ptr(): b.numel() * b.element_size() for b in loaded.model.buffers()})
    assert value(fams, "loraplex_base_model_bytes") == sum(params.values())
    # The adapter pool: --adapter-memory (default 1 GiB), whatever the adapters' ranks.
    assert value(fams, "loraplex_adapter_slot_bytes") == value(fams, "loraplex_adapter_pool_bytes") == 2**30


def test_running_waiting_and_kv_gauges(loaded_plain):
    registry = CollectorRegistry()
    metrics = LoraplexMetrics(registry)
    engine = Engine(loaded_plain, engine_config(max_num_seqs=2), observers=[metrics])
    metrics.bind(engine, None, loaded_plain.model)
    sink = Collector()
    for i in range(3):
        engine.submit(Request(f"w{i}", prompt(i, 6), SamplingParams(max_new_tokens=50)), sink)
    fams = scrape(registry)
    assert value(fams, "loraplex_requests_waiting") == 3
    assert value(fams, "loraplex_requests_running") == 0
    assert value(fams, "loraplex_kv_cache_usage_ratio") == 0
    engine.step()  # not started: the test drives steps; max_num_seqs=2 admits two
    fams = scrape(registry)
    assert value(fams, "loraplex_requests_running") == 2
    assert value(fams, "loraplex_requests_waiting") == 1
    bm = engine.block_manager
    assert value(fams, "loraplex_kv_cache_usage_ratio") == pytest.approx(bm.num_used_blocks / bm.num_blocks)
    assert value(fams, "loraplex_kv_cache_usage_ratio") > 0
    assert value(fams, "loraplex_kv_cache_blocks") == 256
    assert "loraplex_adapters_resident" not in fams  # no manager bound: no adapter series
    engine.shutdown(0)
    fams = scrape(registry)
    assert value(fams, "loraplex_requests_total", finish_reason="cancelled") == 3
    # The step prefilled two of them (first token sampled); the third was cancelled in the
    # queue: no TTFT / queue observation for it, but an end-to-end one for all three.
    assert value(fams, "loraplex_generation_tokens_total") == 2
    assert value(fams, "loraplex_request_duration_seconds_count") == 3
    assert value(fams, "loraplex_time_to_first_token_seconds_count") == 2
    assert value(fams, "loraplex_request_queue_seconds_count") == 2
    assert value(fams, "loraplex_inter_token_latency_seconds_count") == 0


@pytest.fixture(scope="module")
def loaded_plain(tiny_model_dir):
    return load_model(tiny_model_dir, torch.float32, "cpu")


def test_broken_observer_does_not_break_the_engine(loaded_plain):
    class Broken:
        def on_step(self, *a):
            raise RuntimeError("boom")

        def on_finish(self, req):
            raise RuntimeError("boom")

    engine = Engine(loaded_plain, engine_config(), observers=[Broken()])
    engine.start()
    sink = Collector()
    try:
        engine.submit(Request("x", prompt(0, 5), sampling()), sink)
        sink.wait(["x"])
        assert sink.final("x").completion_tokens == NEW_TOKENS
    finally:
        engine.shutdown(0)


def test_request_log_json_lines(run):
    lines = [json.loads(line) for line in run["log"].splitlines()]
    by_id = {d["request_id"]: d for d in lines}
    assert set(by_id) == set(run["prompts"])
    for rid, d in by_id.items():
        out = run["sink"].final(rid)
        assert d["logger"] == "test_metrics.requests" and d["level"] == "INFO"
        assert d["adapter_id"] == run["adapters"][rid]
        assert d["finish_reason"] == "length"
        assert d["prompt_tokens"] == len(run["prompts"][rid]) == out.prompt_tokens
        assert d["completion_tokens"] == NEW_TOKENS
        assert d["ttft_seconds"] == pytest.approx(out.timings.ttft_seconds, abs=1e-6)
        assert d["total_seconds"] == pytest.approx(out.timings.total_seconds, abs=1e-6)
        assert 0 < d["itl_mean_seconds"] <= d["itl_max_seconds"]


def test_request_log_text_line():
    from loraplex.api.request_log import configure_logging

    stream = io.StringIO()
    handler = configure_logging("text", "INFO", stream=stream)
    try:
        logging.getLogger("loraplex.requests").info("hello %s", "world")
        assert stream.getvalue().rstrip().endswith("INFO loraplex.requests: hello world")
        with pytest.raises(ValueError):
            configure_logging("xml")
    finally:
        logging.getLogger().removeHandler(handler)


def test_exported_names_are_documented(run):
    fams = run["fams"]
    exported = set()
    for samples in fams.values():
        for name, _, _ in samples:
            for suffix in ("_bucket", "_sum", "_count", "_created"):
                if name.endswith(suffix) and name[: -len(suffix)] in METRIC_NAMES:
                    name = name[: -len(suffix)]
            exported.add(name)
    # prometheus_client's standard process_* metrics are exported too (ProcessCollector).
    assert {n for n in exported if not n.startswith("process_")} == set(METRIC_NAMES)
    assert "process_resident_memory_bytes" in exported


def test_promtool_check_metrics(run):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install -y prometheus)")
    text = generate_latest(run["registry"])
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), \
        (res.stdout + res.stderr).decode()


def test_structured_output_metrics(loaded_plain):
    """Compiles, cache hits and failures of structured-output constraints, read at scrape time
    from the engine's grammar compiler (the histogram counts only compiles that finished)."""
    import json

    from loraplex.engine.request import InvalidRequestError
    from loraplex.engine.structured.spec import Constraint, Kind

    registry = CollectorRegistry()
    metrics = LoraplexMetrics(registry)
    engine = Engine(loaded_plain, engine_config(), observers=[metrics])
    metrics.bind(engine, None, loaded_plain.model)
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    for i in range(3):  # one compile, then two cache hits
        engine.submit(Request(f"s{i}", prompt(i, 4), SamplingParams(max_new_tokens=4),
                              constraint=Constraint.json_schema(schema, "structured_output.json_schema")),
                      Collector())
    with pytest.raises(InvalidRequestError):  # an unsatisfiable regex fails to compile
        engine.grammars.compile(Constraint(Kind.REGEX, "(", field="structured_output.regex"))
    fams = scrape(registry)
    assert value(fams, "loraplex_structured_output_cache_misses_total") == 2
    assert value(fams, "loraplex_structured_output_cache_hits_total") == 2
    assert value(fams, "loraplex_structured_output_compile_failures_total") == 1
    assert value(fams, "loraplex_structured_output_cached_grammars") == 1  # the failed one is dropped
    assert value(fams, "loraplex_structured_output_compile_seconds_count") == 1
    assert 0 < value(fams, "loraplex_structured_output_compile_seconds_sum") < 10
    engine.shutdown(0)
