"""Scale-out for real on loopback: three `loraplex serve` replicas behind nginx running the shipped
deploy/nginx/loraplex.conf (only its addresses replaced), 50 adapters under one --adapter-root
(each loads on first use), 330 requests through loraplex.client, a real Prometheus scraping the
three as one job with the shipped deploy/prometheus/prometheus.yml (targets and interval replaced).

  phase 1  150 adapter requests (3 per adapter) + 30 base-model requests, 12 at a time: every
           adapter's requests land on exactly one replica, which alone loaded it (the replicas'
           own /metrics and ListAdapters); base requests (no header) reach every replica.
  latency  direct vs through nginx, interleaved, same adapter and replica: what the proxy adds.
  phase 2  150 more adapter requests; one replica is SIGKILLed once 40 of them have completed.
           Every request completes exactly once at the client (by request id); the replicas' own
           request logs hold each id; the survivors keep their adapters (only the victim's move),
           each moved adapter lands on one survivor; Prometheus sees the victim go down.

nginx (Debian package) and prometheus are installed by `make test-deps`; the test skips with the
reason where they are not.
"""

from __future__ import annotations

import collections
import json
import random
import signal
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from loraplex.client import Client
from tests.fixtures import scale_out as so
from tests.fixtures.prometheus import DEADLINE, PROMETHEUS, query, start_prometheus, stop, wait_for
pytestmark = [
    pytest.mark.slow, pytest.mark.timeout(420),
    pytest.mark.skipif(so.NGINX is None, reason="nginx not installed (Debian: apt-get install -y nginx; make test-deps)"),
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian: apt-get install -y prometheus)"),
]

REPLICAS = 3
ADAPTERS = 50
PER_ADAPTER = 3  # requests per adapter and phase
BASE_REQUESTS = 30
KILL_AFTER = 40  # phase-2 completions before the SIGKILL
WORKERS = 12
NEW_TOKENS = 4
LATENCY_ROUNDS = 40


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale_out")
    names = so.make_adapters(tiny_model_dir, tmp / "adapters", ADAPTERS)
    replicas = so.start_replicas(tiny_model_dir, tmp / "adapters", REPLICAS, tmp)
    procs = []
    try:
        grpc_port, http_port = so.free_port(), so.free_port()
        conf = so.render_nginx(so.NGINX_CONF.read_text(), replicas, grpc_port, http_port)
        procs.append(so.start_nginx(conf, tmp, (grpc_port, http_port)))
        prom_proc, prom = start_prometheus(prometheus_config([r.metrics_url for r in replicas]), tmp)
        procs.append(prom_proc)
        yield dict(tmp=tmp, names=names, replicas=replicas, proxy=f"127.0.0.1:{grpc_port}",
                   proxy_http=f"http://127.0.0.1:{http_port}", prom=prom)
    finally:
        for p in procs:
            stop(p)
        for r in replicas:
            r.stop()


def prometheus_config(metrics_urls: list[str]) -> str:
    """The shipped deploy/prometheus/prometheus.yml with the replicas as targets, scraped every second."""
    cfg = yaml.safe_load((so.ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = "1s"
    (job,) = cfg["scrape_configs"]
    job["static_configs"][0]["targets"] = [urllib.parse.urlsplit(u).netloc for u in metrics_urls]
    return yaml.safe_dump(cfg)


def adapter_counts(replica: so.Replica) -> dict[str, float]:
    """adapter -> finished requests on this replica (its own per-adapter counter; the test runs
    with --metrics-top-adapters 64 >= 50 adapters, so none counts under "other")."""
    counts = replica.metric("loraplex_requests_total", "adapter")
    assert counts.get("other", 0) == 0
    return {k: v for k, v in counts.items() if v}


def run(proxy: str, jobs: list[tuple[str, str]], on_done=None) -> collections.Counter:
    """Send (request_id, adapter) jobs through `proxy`, WORKERS at a time; every one must succeed.
    Returns how many times each request id completed."""
    done = collections.Counter()
    lock = threading.Lock()
    with Client(proxy, timeout=DEADLINE) as client:
        def one(job):
            rid, adapter = job
            out = client.generate("Once upon a time", adapter=adapter, max_new_tokens=NEW_TOKENS,
                                  ignore_eos=True, request_id=rid)
            assert out.request_id == rid and out.usage.completion_tokens == NEW_TOKENS
            with lock:
                done[rid] += 1
                n = sum(done.values())
            if on_done is not None:
                on_done(n)

        with ThreadPoolExecutor(WORKERS) as pool:
            for future in [pool.submit(one, job) for job in jobs]:
                future.result()  # raises the first failure
    return done


def owners(replicas: list[so.Replica], names: list[str]) -> dict[str, int]:
    """adapter -> index of the one replica that served it; asserts there is exactly one."""
    counts = [adapter_counts(r) for r in replicas]
    owner = {}
    for name in names:
        holders = [i for i, c in enumerate(counts) if c.get(name)]
        assert len(holders) == 1, f"{name} served by replicas {holders}"
        owner[name] = holders[0]
    return owner


def listed(replica: so.Replica) -> set[str]:
    with Client(replica.grpc, timeout=DEADLINE) as c:
        return {a.adapter_id for a in c.list_adapters()}


def test_affinity_failover_and_one_prometheus_job(cluster):
    names, replicas, proxy, prom = cluster["names"], cluster["replicas"], cluster["proxy"], cluster["prom"]
    rng = random.Random(18)

    # --- phase 1: affinity ---------------------------------------------------------------------
    jobs = [(f"p1-{a}-{k}", a) for a in names for k in range(PER_ADAPTER)]
    jobs += [(f"p1-base-{k}", "") for k in range(BASE_REQUESTS)]
    rng.shuffle(jobs)
    done = run(proxy, jobs)
    assert set(done) == {rid for rid, _ in jobs} and set(done.values()) == {1}
    owner = owners(replicas, names)
    counts = [adapter_counts(r) for r in replicas]
    for name in names:
        assert counts[owner[name]][name] == PER_ADAPTER
    held = [{n for n in names if owner[n] == i} for i in range(REPLICAS)]
    assert all(len(h) >= 3 for h in held), [len(h) for h in held]  # the ring spreads adapters
    for i, r in enumerate(replicas):
        assert listed(r) == held[i]  # each adapter loaded on its replica only, on first use
        loads = r.metric("loraplex_adapter_loads_total", "source")
        assert loads.get("on_demand") == len(held[i]) and loads.get("api", 0) == 0
        assert counts[i].get("base", 0) >= 1  # no header: requests spread over every replica
    assert sum(c.get("base", 0) for c in counts) == BASE_REQUESTS

    # Prometheus: one job, three instances, the same totals as the replicas' own counters.
    total = ADAPTERS * PER_ADAPTER + BASE_REQUESTS
    wait_for(prom, 'count(up{job="loraplex"} == 1)', REPLICAS)
    wait_for(prom, 'count(count by (instance) (loraplex_requests_total{job="loraplex"}))', REPLICAS)
    wait_for(prom, 'sum(loraplex_requests_total{job="loraplex"})', total)
    wait_for(prom, 'sum(loraplex_adapters_resident{job="loraplex"})', ADAPTERS)
    check_per_replica_panels(prom, {urllib.parse.urlsplit(r.metrics_url).netloc for r in replicas}, held)

    # --- what the proxy adds: the same adapter, its replica direct vs through nginx, interleaved ---
    direct, proxied = measure_latency(proxy, replicas[owner[names[0]]].grpc, names[0], LATENCY_ROUNDS)
    p50_d, p50_p = so.percentile(direct, 50), so.percentile(proxied, 50)
    print(f"\nlatency over {LATENCY_ROUNDS} rounds: direct p50 {p50_d * 1e3:.2f} ms p99 "
          f"{so.percentile(direct, 99) * 1e3:.2f} ms; via nginx p50 {p50_p * 1e3:.2f} ms p99 "
          f"{so.percentile(proxied, 99) * 1e3:.2f} ms")
    assert p50_p < p50_d + 0.05, (p50_d, p50_p)  # a proxy hop on loopback: far below 50 ms

    # --- phase 2: one replica killed mid-run --------------------------------------------------
    victim = max(range(REPLICAS), key=lambda i: len(held[i]))
    survivors = [i for i in range(REPLICAS) if i != victim]
    before = [adapter_counts(replicas[i]) for i in range(REPLICAS)]
    jobs2 = [(f"p2-{a}-{k}", a) for a in names for k in range(PER_ADAPTER)]
    rng.shuffle(jobs2)
    killed = threading.Event()

    def kill_once(n: int) -> None:
        if n >= KILL_AFTER and not killed.is_set():
            killed.set()
            replicas[victim].proc.send_signal(signal.SIGKILL)

    done2 = run(proxy, jobs2, kill_once)
    assert killed.is_set() and replicas[victim].proc.wait(10) == -signal.SIGKILL
    # Nothing lost, nothing duplicated at the client: each request id completed exactly once.
    assert set(done2) == {rid for rid, _ in jobs2} and set(done2.values()) == {1}

    # Server side: each replica's own request log (one JSON line per finished request).
    logged = {i: [row for row in replicas[i].finished() if row["request_id"].startswith("p2-")]
              for i in range(REPLICAS)}
    on_survivors = collections.Counter(row["request_id"] for i in survivors for row in logged[i])
    on_victim = {row["request_id"] for row in logged[victim]}
    assert all(row["finish_reason"] == "length" for i in survivors for row in logged[i])
    assert set(on_survivors.values()) == {1}  # no survivor ran a request twice
    assert set(on_survivors) | on_victim == set(done2)  # every request ran to the end somewhere
    # A request the victim finished in the instant before the kill, whose answer never left it,
    # was run again on a survivor (its client saw it once); at most what was in flight.
    replayed = on_victim & set(on_survivors)
    assert len(replayed) <= WORKERS, replayed
    assert all(owner[rid.split("-", 1)[1].rsplit("-", 1)[0]] == victim for rid in replayed)

    # Only the victim's adapters moved, each to one survivor; the survivors kept their own.
    after = {i: adapter_counts(replicas[i]) for i in survivors}
    moved_to: dict[str, set[int]] = collections.defaultdict(set)
    for name in names:
        for i in survivors:
            grew = after[i].get(name, 0) - before[i].get(name, 0)
            if owner[name] != victim:
                assert grew == (PER_ADAPTER if owner[name] == i else 0), (name, i, grew)
            elif grew:
                moved_to[name].add(i)
        if owner[name] == victim:
            assert len(moved_to[name]) <= 1, (name, moved_to[name])
            ran = sum(1 for rid in on_victim if rid.startswith(f"p2-{name}-")) + sum(
                after[i].get(name, 0) - before[i].get(name, 0) for i in survivors)
            assert ran == PER_ADAPTER + sum(1 for rid in replayed if rid.startswith(f"p2-{name}-"))
    assert moved_to, "no adapter of the killed replica was served after the kill"
    for i in survivors:
        extra = listed(replicas[i]) - held[i]
        assert extra == {n for n, to in moved_to.items() if i in to}, (i, extra)
    # nginx saw the victim fail (refused or dropped connections) and routed around it.
    err = [line for line in (cluster["tmp"] / "nginx-error.log").read_text().splitlines()
           if replicas[victim].grpc in line]
    assert err, "nginx never saw the killed replica fail"
    refused = sum("Connection refused" in line for line in err)
    dropped = sum("prematurely closed" in line or "reset by peer" in line for line in err)
    print(f"killed replica {victim} (held {len(held[victim])} adapters) after {KILL_AFTER} completions; "
          f"{len(moved_to)} of its adapters served by survivors; {len(replayed)} request(s) ran on both; "
          f"nginx: {dropped} call(s) dropped by it while running (passed to the next replica), "
          f"{refused} connection(s) refused")

    # Prometheus: still one job of three targets, the killed one down.
    wait_for(prom, 'count(up{job="loraplex"})', REPLICAS)
    wait_for(prom, 'sum(up{job="loraplex"})', REPLICAS - 1)


def check_per_replica_panels(prom: str, instances: set[str], held: list[set[str]]) -> None:
    """Every query of the dashboard's per-replica panels, run on this Prometheus, gives one series
    per replica; the residency panel shows each replica's own adapters."""
    dash = json.loads((so.ROOT / "deploy" / "grafana" / "loraplex-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if "by (instance" in t["expr"]]
    assert len(exprs) >= 10
    for expr in exprs:
        promql = expr.replace("$__rate_interval", "30s").replace('"$job"', '"loraplex"').replace('"$replica"', '".*"')
        deadline = time.monotonic() + DEADLINE
        while True:
            result = query(prom, promql)["data"]["result"]
            if {row["metric"].get("instance") for row in result} == instances:
                break
            assert time.monotonic() < deadline, (expr, result)
            time.sleep(0.5)
        if "loraplex_adapter_slots_used" in expr:  # adapters in each replica's pool
            by_instance = {row["metric"]["instance"]: float(row["value"][1]) for row in result}
            assert sorted(by_instance.values()) == sorted(float(len(h)) for h in held), by_instance


def measure_latency(proxy: str, direct: str, adapter: str, rounds: int) -> tuple[list[float], list[float]]:
    """End-to-end seconds of a 1-token Generate for `adapter`, straight to its replica and through
    the proxy, alternating which goes first each round."""
    times = {direct: [], proxy: []}
    with Client(direct, timeout=DEADLINE) as a, Client(proxy, timeout=DEADLINE) as b:
        clients = {direct: a, proxy: b}
        for target in (direct, proxy):  # warm both connections
            clients[target].generate("Hi", adapter=adapter, max_new_tokens=1)
        for k in range(rounds):
            order = (direct, proxy) if k % 2 == 0 else (proxy, direct)
            for target in order:
                t0 = time.perf_counter()
                clients[target].generate("Hi", adapter=adapter, max_new_tokens=1, ignore_eos=True)
                times[target].append(time.perf_counter() - t0)
    return times[direct], times[proxy]


def test_openai_http_through_nginx_follows_the_same_header(cluster):
    """The HTTP upstream of the same file hashes on the same header: an adapter's requests reach the
    replica that serves it over gRPC (checked on the replicas' own counters)."""
    import httpx

    names, replicas = cluster["names"], [r for r in cluster["replicas"] if r.proc.poll() is None]
    name = names[-1]
    before = [adapter_counts(r).get(name, 0) for r in replicas]
    with httpx.Client(base_url=cluster["proxy_http"], timeout=DEADLINE) as http:
        for _ in range(4):
            r = http.post("/v1/completions", headers={"x-adapter-id": name},
                          json={"model": name, "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
        bad = http.post("/v1/completions", headers={"x-adapter-id": names[0]},
                        json={"model": name, "prompt": "Hi", "max_tokens": 2})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-adapter-id"
    grew = [adapter_counts(r).get(name, 0) - b for r, b in zip(replicas, before)]
    assert sorted(grew) == [0] * (len(replicas) - 1) + [4], grew
