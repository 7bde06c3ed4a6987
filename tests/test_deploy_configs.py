"""The shipped deployment files, checked offline.

* deploy/k8s: the kustomization expanded (by our own small renderer of the few kustomize features
  it uses; where a `kubectl` with built-in kustomize is installed, its output must be the same),
  every object validated against the Kubernetes OpenAPI schemas of `kubernetes-validate` (shipped
  in the package, strict: no unknown field) for the oldest version with gRPC probes (1.27) and the
  newest it knows; then what the schemas cannot see: selectors, ports, probes, the drain timing,
  the server flags (parsed by loraplex's own CLI parser), the Prometheus annotations.
* deploy/envoy and deploy/k8s/envoy.yaml: parsed into Envoy's own Bootstrap protobuf (xds-protos,
  Envoy's data-plane API; every typed_config resolved), then routes -> clusters, the ring hash on
  `x-adapter-id`, health checks, bounded retries; the two files differ only in endpoint discovery.
  No Envoy binary runs here (none is packaged for Debian): validation rules Envoy applies beyond
  the proto schema (protoc-gen-validate bounds) are not checked.
* deploy/nginx: `nginx -t` on the shipped file (the running test is tests/test_scale_out.py);
  deploy/prometheus: `promtool check config`.
"""

from __future__ import annotations

import copy
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
ENVOY = ROOT / "deploy" / "envoy" / "envoy.yaml"
K8S_VERSIONS = ("1.27", "1.37")
HEADER = "x-adapter-id"


# --- kustomize -----------------------------------------------------------------------------------
KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator", "generatorOptions"}


def render_kustomization(folder: Path) -> list[dict]:
    """The objects `kustomize build folder` emits, for the features our kustomization uses
    (resources files, configMapGenerator from files without a name hash); anything else is
    refused, so this renderer cannot silently drift from kustomize."""
    kz = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kz) - KUSTOMIZE_KEYS
    assert not unknown, f"kustomization uses {unknown}: teach render_kustomization or kubectl"
    assert kz["kind"] == "Kustomization"
    assert kz.get("generatorOptions") == {"disableNameSuffixHash": True}
    objects = []
    for name in kz["resources"]:
        objects += [d for d in yaml.safe_load_all((folder / name).read_text()) if d]
    for gen in kz.get("configMapGenerator", []):
        assert set(gen) <= {"name", "files"}, gen
        data = {}
        for entry in gen["files"]:
            key, _, path = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
            data[key] = (folder / path).read_text()
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return objects


def by_kind_name(objects: list[dict]) -> dict[tuple[str, str], dict]:
    out = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(out) == len(objects), "two objects with one kind and name"
    return out


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    return by_kind_name(render_kustomization(K8S))


def test_our_rendering_matches_kubectl_kustomize(k8s):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl (its built-in kustomize cross-checks our renderer where installed)")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = by_kind_name([d for d in yaml.safe_load_all(out.stdout) if d])
    assert theirs == k8s


def test_k8s_objects_validate_against_the_kubernetes_schemas(k8s):
    import kubernetes_validate

    kinds = sorted(kind for kind, _ in k8s)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "PersistentVolumeClaim", "PodDisruptionBudget",
                     "Service", "Service"]
    for version in K8S_VERSIONS:
        for obj in k8s.values():
            kubernetes_validate.validate(obj, version, strict=True)  # raises ValidationError
    # The validator does catch mistakes (a typo'd field, a wrong type), offline.
    deployment = copy.deepcopy(k8s["Deployment", "loraplex"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(k8s["Deployment", "loraplex"])
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_schema_validation_needs_no_network():
    """The same validation in a process with no network at all (a new network namespace)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        pytest.skip("cannot create a network namespace here (unshare -n)")
    code = ("import sys; sys.path.insert(0, %r); from tests.test_deploy_configs import render_kustomization, K8S; "
            "import kubernetes_validate as kv; [kv.validate(o, '1.37', strict=True) for o in "
            "render_kustomization(K8S)]; print('ok')" % str(ROOT))
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_k8s_wiring(k8s):
    from loraplex.cli import build_parser

    server = k8s["Deployment", "loraplex"]
    pod = server["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert server["spec"]["selector"]["matchLabels"] == {k: labels[k] for k in server["spec"]["selector"]["matchLabels"]}
    c = _container(server)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    # The flags are real serve flags (the image's entrypoint is `loraplex serve --host 0.0.0.0 ...`).
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", *c["args"]])
    assert (args.port, args.http_port, args.metrics_port) == (ports["grpc"], ports["http"], ports["metrics"])
    assert args.adapter_root and any(m["mountPath"] == args.adapter_root for m in c["volumeMounts"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"] == {"port": ports["grpc"]}, probe  # grpc.health.v1 on the server
    # Drain: the preStop sleep, then SIGTERM and --drain-timeout, all inside the grace period.
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] >= int(command[1]) + args.drain_timeout + 1
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == args.metrics_port
    assert ann["prometheus.io/path"] == "/metrics"
    claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in k8s

    headless = k8s["Service", "loraplex-replicas"]
    assert headless["spec"]["clusterIP"] == "None" and _matches(headless["spec"]["selector"], labels)
    assert {p["targetPort"] for p in headless["spec"]["ports"]} == set(ports)
    pdb = k8s["PodDisruptionBudget", "loraplex"]
    assert _matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert not _matches(pdb["spec"]["selector"]["matchLabels"], k8s["Deployment", "loraplex-envoy"]["spec"][
        "template"]["metadata"]["labels"])

    proxy = k8s["Deployment", "loraplex-envoy"]
    proxy_labels = proxy["spec"]["template"]["metadata"]["labels"]
    front = k8s["Service", "loraplex"]
    assert _matches(front["spec"]["selector"], proxy_labels) and not _matches(front["spec"]["selector"], labels)
    envoy_c = _container(proxy)
    volume = next(v for v in proxy["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    config_map = k8s["ConfigMap", volume["configMap"]["name"]]
    mount = next(m for m in envoy_c["volumeMounts"] if m["name"] == volume["name"])["mountPath"]
    config_path = envoy_c["args"][envoy_c["args"].index("-c") + 1]
    assert config_path == f"{mount}/envoy.yaml" and "envoy.yaml" in config_map["data"]
    # Envoy's listeners are the ports its Service and container expose; its clusters reach the
    # replicas through the headless Service's name and ports.
    envoy = yaml.safe_load(config_map["data"]["envoy.yaml"])
    listen = {ln["address"]["socket_address"]["port_value"] for ln in envoy["static_resources"]["listeners"]}
    assert listen == {p["containerPort"] for p in envoy_c["ports"]}
    for cluster in envoy["static_resources"]["clusters"]:
        (ep,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        addr = ep["endpoint"]["address"]["socket_address"]
        assert addr["address"] == headless["metadata"]["name"]
        assert addr["port_value"] in {p["port"] for p in headless["spec"]["ports"]}


# --- Envoy -----------------------------------------------------------------------------------------
def parse_envoy(config: dict):
    """`config` as Envoy's Bootstrap message (raises json_format.ParseError on any unknown field,
    wrong type or unresolvable typed_config)."""
    from google.protobuf import json_format
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    # typed_config messages the files use, registered in the descriptor pool by their imports.
    from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
    from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401

    return json_format.ParseDict(config, bootstrap_pb2.Bootstrap())


def envoy_files() -> dict[str, dict]:
    return {"deploy/envoy/envoy.yaml": yaml.safe_load(ENVOY.read_text()),
            "deploy/k8s/envoy.yaml": yaml.safe_load((K8S / "envoy.yaml").read_text())}


@pytest.mark.parametrize("name", sorted(envoy_files()))
def test_envoy_config_is_a_valid_bootstrap_with_affinity_health_and_bounded_retries(name):
    from google.protobuf import json_format
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    config = envoy_files()[name]
    boot = parse_envoy(config)
    clusters = {c.name: c for c in boot.static_resources.clusters}
    routed = set()
    for listener in boot.static_resources.listeners:
        (chain,) = listener.filter_chains
        (flt,) = chain.filters
        manager = hcm.HttpConnectionManager()
        assert flt.typed_config.Unpack(manager)
        for vhost in manager.route_config.virtual_hosts:
            for route in vhost.routes:
                r = route.route
                assert r.cluster in clusters, f"{listener.name} routes to unknown cluster {r.cluster}"
                routed.add(r.cluster)
                assert [h.header.header_name for h in r.hash_policy] == [HEADER]
                retry = r.retry_policy
                assert 1 <= retry.num_retries.value <= 3 and retry.retry_host_predicate
                assert retry.retry_back_off.max_interval.ToTimedelta().total_seconds() <= 2
                grpc = "grpc" in r.cluster
                assert ("unavailable" in retry.retry_on.split(",")) if grpc else (503 in retry.retriable_status_codes)
        assert manager.http_filters[-1].name == "envoy.filters.http.router"
    assert routed == set(clusters)  # every cluster is reached by a route
    for cname, cluster in clusters.items():
        assert cluster.lb_policy == cluster_pb2.Cluster.RING_HASH, cname
        (hc,) = cluster.health_checks
        if "grpc" in cname:
            assert hc.HasField("grpc_health_check") and hc.grpc_health_check.service_name == ""
            assert "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" in cluster.typed_extension_protocol_options
        else:
            assert hc.http_health_check.path == "/health"
    # The parser refuses what Envoy would refuse at the schema level.
    broken = copy.deepcopy(config)
    broken["static_resources"]["clusters"][0]["lb_polcy"] = "RING_HASH"
    with pytest.raises(json_format.ParseError):
        parse_envoy(broken)


def _without_discovery(config: dict) -> dict:
    out = copy.deepcopy(config)
    for cluster in out["static_resources"]["clusters"]:
        for key in ("type", "dns_lookup_family", "dns_refresh_rate", "load_assignment"):
            cluster.pop(key, None)
    return out


def test_k8s_envoy_differs_only_in_how_replicas_are_found():
    files = envoy_files()
    standalone, k8s = files["deploy/envoy/envoy.yaml"], files["deploy/k8s/envoy.yaml"]
    assert _without_discovery(standalone) == _without_discovery(k8s)
    assert {c["type"] for c in standalone["static_resources"]["clusters"]} == {"STATIC"}
    assert {c["type"] for c in k8s["static_resources"]["clusters"]} == {"STRICT_DNS"}


# --- nginx, Prometheus -------------------------------------------------------------------------------
def test_nginx_config_passes_nginx_t(tmp_path):
    from tests.fixtures.scale_out import NGINX, NGINX_CONF

    text = NGINX_CONF.read_text()
    assert text.count(f"hash $loraplex_affinity_key consistent;") == 2
    assert "map $http_x_adapter_id $loraplex_affinity_key" in text
    if NGINX is None:
        pytest.skip("nginx not installed (Debian: apt-get install -y nginx; make test-deps)")
    main = tmp_path / "nginx.conf"
    main.write_text(f"events {{}}\nhttp {{ include {NGINX_CONF}; }}\n")
    out = subprocess.run([NGINX, "-t", "-c", str(main), "-p", str(tmp_path), "-g",
                          f"pid {tmp_path / 'nginx.pid'}; error_log stderr;"], capture_output=True, text=True)
    assert out.returncode == 0 and "syntax is ok" in out.stderr, out.stderr


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install -y prometheus)")
    out = subprocess.run([promtool, "check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, shlex.join(out.args) + "\n" + out.stdout + out.stderr
