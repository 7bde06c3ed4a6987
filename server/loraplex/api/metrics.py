"""Prometheus metrics: one `LoraplexMetrics` per server, exposed on HTTP /metrics.

Two kinds of sources, chosen so the step loop pays (almost) nothing:
  * events the engine reports to observers, once per step and once per finished request
    (`on_step`, `on_finish`): batch histograms, latency histograms, per-adapter request and
    token counters; gRPC rejections the servicer counts with `record_rejected(status_name)`;
  * state read at scrape time by a custom Collector (`_StateCollector`): running/waiting
    requests, KV usage, adapter tiers and slots, the LoRA manager's counters, resident bytes.
    Nothing is computed for these between scrapes.

Naming follows Prometheus conventions: `loraplex_` prefix, base units (seconds, bytes, ratio),
counters end in `_total`. Every metric is listed in `METRIC_NAMES` (tests check the dashboard
uses nothing else).

Per-adapter label (bounded cardinality). `adapter` takes at most `top_adapters + 2` values:
"base" (no adapter), "other", and the ids of the first `top_adapters` distinct adapters that
finish a request since the process started (admission order = order of their first finished
request, so for a given request sequence it is deterministic). Once an id has its own label it
keeps it for the life of the process: its counters never move to "other" and never go backwards,
and Prometheus never sees a series vanish. Only requests that passed validation finish, so
unknown ids sent by clients cannot take label slots. The trade-off: adapters that become popular
late share "other" until restart; raise --metrics-top-adapters if that matters.
"""

from __future__ import annotations

import bisect
import logging
import threading
from typing import Any, Iterable

from prometheus_client import (CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics,
                               start_http_server)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from loraplex.engine.request import FinishReason

log = logging.getLogger(__name__)

BASE_LABEL = "base"
OTHER_LABEL = "other"
DEFAULT_TOP_ADAPTERS = 10

# LLM-suited buckets. TTFT spans a few ms (short prompt, idle GPU) to tens of seconds (long
# queue on CPU); inter-token gaps are ms to ~1 s; end-to-end runs to minutes.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                 80.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0,
               240.0, 480.0)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.0, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Grammar compiles: typically ~1 ms (llguidance), bounded by --structured-output-compile-timeout.
COMPILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SEQ_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
BATCH_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
ADAPTER_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

# The manager's load sources (lora/manager.py `_register(source_kind=...)`), pre-declared so the
# series exist at 0 before the first load (rate() needs two points).
LOAD_SOURCES = ("api", "on_demand", "disk_reload", "combine", "mixture")


class LoraplexMetrics:
    """Engine observer + scrape-time collector, registered in `registry`.

        metrics = LoraplexMetrics(registry, top_adapters=10)
        engine = Engine(loaded, cfg, manager, observers=[metrics])
        metrics.bind(engine, manager, loaded.model)       # gauges read these at scrape time
        start_metrics_server(9400, "0.0.0.0", registry)
    """

    def __init__(self, registry: CollectorRegistry | None = None,
                 top_adapters: int = DEFAULT_TOP_ADAPTERS):
        if top_adapters < 0:
            raise ValueError(f"top_adapters: must be >= 0, got {top_adapters}")
        # No `*_created` series: they double the series count and Prometheus' text scrape
        # ignores them (process-wide switch in prometheus_client).
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.top_adapters = top_adapters
        self._labels_lock = threading.Lock()
        self._own_label: set[str] = set()  # adapter ids exported under their own label
        r = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds...: the standard
        # process metrics (Linux /proc), for memory dashboards and the soak tool's --metrics-url.
        ProcessCollector(registry=r)
        self.requests = Counter(
            "loraplex_requests", "Finished requests by adapter and finish reason "
            "(eos, length, stop, cancelled, error, grammar).", ["adapter", "finish_reason"], registry=r)
        self.rejected = Counter(
            "loraplex_requests_rejected", "Requests refused before reaching the engine, by gRPC "
            "status (NOT_FOUND, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, ...).",
            ["code"], registry=r)
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens", "Prompt tokens of finished requests.", ["adapter"], registry=r)
        self.generation_tokens = Counter(
            "loraplex_generation_tokens", "Tokens generated for finished requests.", ["adapter"],
            registry=r)
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds", "Arrival to first generated token.",
            buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(
            "loraplex_inter_token_latency_seconds", "Time between consecutive generated tokens "
            "of a request.", buckets=ITL_BUCKETS, registry=r)
        self.queue = Histogram(
            "loraplex_request_queue_seconds", "Arrival to first scheduled (waiting in the queue).",
            buckets=QUEUE_BUCKETS, registry=r)
        self.e2e = Histogram(
            "loraplex_request_duration_seconds", "Arrival to finished (end-to-end latency).",
            buckets=E2E_BUCKETS, registry=r)
        self.batch_seqs = Histogram(
            "loraplex_batch_sequences", "Sequences in one engine step.", buckets=BATCH_SEQ_BUCKETS,
            registry=r)
        self.batch_tokens = Histogram(
            "loraplex_batch_tokens", "Tokens (prefill chunks + decodes) in one engine step.",
            buckets=BATCH_TOKEN_BUCKETS, registry=r)
        self.batch_adapters = Histogram(
            "loraplex_batch_distinct_adapters", "Distinct LoRA adapters in one engine step "
            "(the base model not counted).", buckets=ADAPTER_BUCKETS, registry=r)
        # Pre-create the always-present label values so dashboards show 0 rather than no data.
        for reason in FinishReason:
            self.requests.labels(BASE_LABEL, reason.value)
        for lbl in (BASE_LABEL, OTHER_LABEL):
            self.prompt_tokens.labels(lbl)
            self.generation_tokens.labels(lbl)
        self._state = _StateCollector()
        r.register(self._state)

    def bind(self, engine: Any = None, lora_manager: Any = None, model: Any = None) -> None:
        """Give the scrape-time collector its sources (any may be None: those series are absent)."""
        self._state.bind(engine, lora_manager, model)

    # --- label policy ----------------------------------------------------------------------
    def adapter_label(self, adapter_id: str) -> str:
        """The `adapter` label value for `adapter_id`, admitting it while labels are left."""
        if not adapter_id:
            return BASE_LABEL
        own = self._own_label
        if adapter_id in own:  # the common case: no lock (set membership is atomic in CPython)
            return adapter_id
        with self._labels_lock:
            if adapter_id in own:
                return adapter_id
            if len(own) < self.top_adapters and adapter_id not in (BASE_LABEL, OTHER_LABEL):
                own.add(adapter_id)
                return adapter_id
        return OTHER_LABEL

    # --- engine observer (engine thread) ------------------------------------------------------
    def on_step(self, num_seqs: int, num_tokens: int, distinct_adapters: int) -> None:
        self.batch_seqs.observe(num_seqs)
        self.batch_tokens.observe(num_tokens)
        self.batch_adapters.observe(distinct_adapters)

    def on_finish(self, req) -> None:
        label = self.adapter_label(req.adapter_id)
        self.requests.labels(label, req.finish_reason.value).inc()
        self.prompt_tokens.labels(label).inc(req.prompt_tokens)
        if req.completion_tokens:
            self.generation_tokens.labels(label).inc(req.completion_tokens)
        t = req.timings
        if t is None:
            return
        self.e2e.observe(t.total_seconds)
        # A request cancelled or failed before it was scheduled / produced a token has no queue
        # end / first token: observing 0 would drag the percentiles down.
        if req.completion_tokens > 0:
            self.queue.observe(t.queue_seconds)
            self.ttft.observe(t.ttft_seconds)
        for gap in req.inter_token_gaps:
            self.itl.observe(gap)

    # --- servicer -------------------------------------------------------------------------------
    def record_rejected(self, status_name: str) -> None:
        """Count a request the servicer refused (grpc.StatusCode name, e.g. "NOT_FOUND")."""
        self.rejected.labels(str(status_name).removeprefix("StatusCode.")).inc()


class _StateCollector(Collector):
    """Reads engine/manager/model state at scrape time. Nothing here runs on the hot path."""

    def __init__(self):
        self._engine = self._manager = self._model = None
        self._model_bytes: int | None = None  # weights do not change: computed once
        self._lock = threading.Lock()  # collect() may run on several HTTP threads at once
        # Durations the manager keeps in bounded deques (stats.load_seconds, stats.wait_seconds)
        # become cumulative histograms here, so they stay monotonic though the deques are not.
        self._load_hist = _WindowHistogram(LOAD_BUCKETS)
        self._wait_hist = _WindowHistogram(WAIT_BUCKETS)
        self._compile_hist = _WindowHistogram(COMPILE_BUCKETS)

    def bind(self, engine, manager, model) -> None:
        self._engine, self._manager, self._model = engine, manager, model
        self._model_bytes = None

    def describe(self) -> Iterable:
        return []  # names are dynamic-free but we avoid a collect() at registration time

    def collect(self) -> Iterable:
        with self._lock:
            yield from self._engine_families()
            yield from self._manager_families()
            yield from self._bytes_families()

    def _engine_families(self):
        eng = self._engine
        if eng is None:
            return
        st = eng.stats()
        yield GaugeMetricFamily("loraplex_requests_running",
                                "Requests admitted to the running batch (hold KV blocks).",
                                value=st.num_running)
        yield GaugeMetricFamily("loraplex_requests_waiting",
                                "Requests queued, not yet admitted.", value=st.num_waiting)
        yield GaugeMetricFamily("loraplex_kv_cache_usage_ratio",
                                "Fraction of KV cache blocks in use (0-1).", value=st.kv_usage)
        yield GaugeMetricFamily("loraplex_kv_cache_blocks", "KV cache capacity in blocks.",
                                value=st.kv_blocks_total)
        yield CounterMetricFamily("loraplex_engine_steps", "Engine steps run.", value=st.steps_total)
        yield CounterMetricFamily(
            "loraplex_prefill_tokens", "Prompt tokens run through the model, recomputation after "
            "preemption included (compare loraplex_prompt_tokens_total).",
            value=st.prompt_tokens_total)
        yield CounterMetricFamily("loraplex_sampled_tokens", "Tokens sampled by the engine "
                                  "(counted every step; loraplex_generation_tokens_total counts at "
                                  "request end).", value=st.generation_tokens_total)
        yield CounterMetricFamily("loraplex_preemptions", "Running sequences preempted to free KV "
                                  "blocks.", value=st.preemptions_total)
        # Hit ratio in tokens = rate(hit) / rate(queried).
        yield CounterMetricFamily("loraplex_prefix_cache_queried_tokens", "Tokens of admitted "
                                  "requests looked up in the prefix cache (re-admissions after "
                                  "preemption included).", value=st.prefix_cache_queried_tokens_total)
        yield CounterMetricFamily("loraplex_prefix_cache_hit_tokens", "Looked-up tokens whose KV "
                                  "the prefix cache held (not computed again).",
                                  value=st.prefix_cache_hit_tokens_total)
        yield GaugeMetricFamily("loraplex_prefix_cache_blocks", "KV blocks holding a cached prefix "
                                "(in use or evictable).", value=st.prefix_cache_blocks)
        yield CounterMetricFamily("loraplex_prefix_cache_evictions", "Cached KV blocks evicted "
                                  "(least recently used first) to make room.",
                                  value=st.prefix_cache_evictions_total)
        # Structured output: hit ratio = rate(hits) / (rate(hits) + rate(misses)).
        yield CounterMetricFamily("loraplex_structured_output_cache_hits", "Constrained requests "
                                  "whose grammar was already compiled (or compiling) in the cache.",
                                  value=st.structured_output_cache_hits_total)
        yield CounterMetricFamily("loraplex_structured_output_cache_misses", "Constrained requests "
                                  "that started a grammar compile.",
                                  value=st.structured_output_cache_misses_total)
        yield CounterMetricFamily("loraplex_structured_output_compile_failures", "Grammar compiles "
                                  "that failed (invalid or unsupported constraint).",
                                  value=st.structured_output_compile_failures_total)
        yield GaugeMetricFamily("loraplex_structured_output_cached_grammars", "Compiled grammars "
                                "in the LRU cache (--structured-output-cache-size).",
                                value=st.structured_output_cached_grammars)
        grammars = getattr(eng, "grammars", None)
        if grammars is not None:
            yield self._compile_hist.family(
                "loraplex_structured_output_compile_seconds", "Time to compile a structured-output "
                "constraint into a grammar (first mask included), in the compile thread.",
                grammars.compile_seconds, grammars.compiled)

    def _manager_families(self):
        mgr = self._manager
        if mgr is None:
            return
        tiers = mgr.tier_counts()
        g = GaugeMetricFamily("loraplex_adapters_resident", "Registered adapters by the tier "
                              "holding them (each counted once, on its highest tier: device "
                              "adapters are also in host memory).", labels=["tier"])
        for tier, n in tiers.items():
            g.add_metric([tier.value], n)
        yield g
        slots = mgr.pool.num_slots
        device = sum(n for t, n in tiers.items() if t.value == "device")  # one slot each
        yield GaugeMetricFamily("loraplex_adapter_slots_used", "Adapters resident in the pool "
                                "(one kernel table row each).", value=device)
        yield GaugeMetricFamily("loraplex_adapter_slots", "Most adapters resident at once "
                                "(--max-loras, else the kernel tables' rows).", value=slots)
        s = mgr.stats
        loads = CounterMetricFamily("loraplex_adapter_loads", "Adapter reads into host memory by "
                                    "source (api, on_demand, disk_reload) and outcome; a failed "
                                    "read is counted with source=\"unknown\".",
                                    labels=["source", "outcome"])
        by_source = dict(s.loads)
        for src in LOAD_SOURCES:
            by_source.setdefault(src, 0)
        for src, n in sorted(by_source.items()):
            loads.add_metric([src, "success"], n)
        loads.add_metric(["unknown", "failure"], s.load_failures)
        yield loads
        ev = CounterMetricFamily("loraplex_adapter_evictions", "Adapters evicted from a tier "
                                 "(device: slot reused; host: weights dropped to disk).",
                                 labels=["tier"])
        ev.add_metric(["device"], s.device_evictions)
        ev.add_metric(["host"], s.host_evictions)
        yield ev
        yield CounterMetricFamily("loraplex_adapter_spill_refills", "Evicted adapters put back "
                                  "into the pool from the extent kept on the host tier at eviction "
                                  "(CPU), instead of read again from disk.", value=s.spill_refills)
        yield CounterMetricFamily("loraplex_adapter_cache_hits", "Requests whose adapter was "
                                  "in the adapter memory pool when they arrived.", value=s.hits)
        yield CounterMetricFamily("loraplex_adapter_cache_misses", "Requests whose adapter had "
                                  "to be brought into the pool.", value=s.misses)
        yield CounterMetricFamily("loraplex_adapter_prefetch_hits", "Adapters the background "
                                  "prefetcher had in the pool before the scheduler first asked "
                                  "for them (the load cost the request no step).",
                                  value=s.prefetch_hits)
        yield CounterMetricFamily("loraplex_adapter_unloads", "Adapters unloaded.", value=s.unloads)
        yield GaugeMetricFamily("loraplex_adapter_load_queue_depth", "Adapters waiting for the "
                                "prefetcher (queued, or waiting for room in the pool).",
                                value=mgr.load_queue_depth)
        yield GaugeMetricFamily("loraplex_adapter_pool_bytes", "Size of the adapter memory pool "
                                "(--adapter-memory).", value=mgr.device_bytes)
        yield GaugeMetricFamily("loraplex_adapter_pool_used_bytes", "Bytes of the adapter pool "
                                "held by adapters (loaded or loading).", value=mgr.pool_used_bytes)
        yield self._load_hist.family("loraplex_adapter_load_seconds",
                                     "Time to read and validate an adapter folder.",
                                     s.load_seconds, s.load_count)
        yield self._wait_hist.family("loraplex_adapter_wait_seconds",
                                     "Time a request waited in the queue for its adapter to reach "
                                     "the pool (0 when it was there), observed at admission.",
                                     s.wait_seconds, s.wait_count)

    def _bytes_families(self):
        if self._model is not None:
            if self._model_bytes is None:
                self._model_bytes = _base_model_bytes(self._model)
            yield GaugeMetricFamily("loraplex_base_model_bytes", "Base model weights resident "
                                    "(LoRA slot tensors excluded).", value=self._model_bytes)
        if self._manager is not None:
            yield GaugeMetricFamily("loraplex_adapter_slot_bytes", "Memory reserved for adapter "
                                    "weights: the adapter pool (same as loraplex_adapter_pool_bytes).",
                                    value=self._manager.device_bytes)
        runner = getattr(self._engine, "runner", None)
        kv = getattr(runner, "kv", None)
        if kv is not None:
            yield GaugeMetricFamily("loraplex_kv_cache_bytes", "KV cache tensors allocated.",
                                    value=kv.nbytes)


class _WindowHistogram:
    """A cumulative histogram fed from a bounded deque of durations plus the count of all
    durations ever appended: each scrape adds the entries appended since the previous one."""

    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.seen = 0

    def family(self, name: str, doc: str, window, total: int) -> HistogramMetricFamily:
        items = list(window)  # a copy: the manager appends from other threads
        new = min(total - self.seen, len(items))
        for v in items[len(items) - new:] if new > 0 else ():
            self.counts[bisect.bisect_left(self.bounds, v)] += 1
            self.sum += v
        self.seen = total
        buckets, acc = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            acc += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


def _base_model_bytes(model) -> int:
    """Parameters + buffers, each tensor once (tied embeddings share storage)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


# Every name this module exports (histograms as their base name; scrape adds _bucket/_sum/_count).
METRIC_NAMES = frozenset({
    "loraplex_requests_total", "loraplex_requests_rejected_total", "loraplex_prompt_tokens_total",
    "loraplex_generation_tokens_total", "loraplex_time_to_first_token_seconds",
    "loraplex_inter_token_latency_seconds", "loraplex_request_queue_seconds",
    "loraplex_request_duration_seconds", "loraplex_batch_sequences", "loraplex_batch_tokens",
    "loraplex_batch_distinct_adapters", "loraplex_requests_running", "loraplex_requests_waiting",
    "loraplex_kv_cache_usage_ratio", "loraplex_kv_cache_blocks", "loraplex_engine_steps_total",
    "loraplex_prefill_tokens_total", "loraplex_sampled_tokens_total", "loraplex_preemptions_total",
    "loraplex_adapters_resident", "loraplex_adapter_slots_used", "loraplex_adapter_slots",
    "loraplex_adapter_loads_total", "loraplex_adapter_evictions_total", "loraplex_adapter_spill_refills_total",
    "loraplex_adapter_cache_hits_total", "loraplex_adapter_cache_misses_total",
    "loraplex_adapter_unloads_total", "loraplex_adapter_load_seconds", "loraplex_base_model_bytes",
    "loraplex_adapter_prefetch_hits_total", "loraplex_adapter_load_queue_depth",
    "loraplex_adapter_pool_bytes", "loraplex_adapter_pool_used_bytes", "loraplex_adapter_wait_seconds",
    "loraplex_adapter_slot_bytes", "loraplex_kv_cache_bytes",
    "loraplex_prefix_cache_queried_tokens_total", "loraplex_prefix_cache_hit_tokens_total",
    "loraplex_prefix_cache_blocks", "loraplex_prefix_cache_evictions_total",
    "loraplex_structured_output_cache_hits_total", "loraplex_structured_output_cache_misses_total",
    "loraplex_structured_output_compile_failures_total", "loraplex_structured_output_cached_grammars",
    "loraplex_structured_output_compile_seconds",
})


def start_metrics_server(port: int, host: str = "127.0.0.1",
                         registry: CollectorRegistry | None = None):
    """Serve `registry` on http://host:port/metrics from a daemon thread. Returns
    (server, thread); port 0 picks a free port: read it from server.server_port."""
    from prometheus_client import REGISTRY

    server, thread = start_http_server(port, addr=host, registry=registry or REGISTRY)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, server.server_port)
    return server, thread
