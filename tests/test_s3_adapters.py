"""Adapters from S3-compatible object storage, against a real S3 server (moto's server mode on
loopback, IAM enforced; tests/fixtures/s3_server.py): LoadAdapter of s3:// paths and on-demand
loads through an s3:// --adapter-root, through a real gRPC server on the tiny random Llama; the
generated tokens must equal those of the same PEFT folder loaded from the local disk (and differ
from the base model's). Errors: a missing prefix or bucket -> NOT_FOUND, a bucket the server's
credentials may not read -> PERMISSION_DENIED, an unreachable store -> UNAVAILABLE, a path outside
the allowed s3:// roots -> INVALID_ARGUMENT. The download cache: a connection cut mid-download
leaves nothing usable and the next request downloads again; concurrent opens download once;
the size bound holds (least recently used copies evicted); leftovers of a crash are deleted.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch

from loraplex.api import adapter_ops
from loraplex.api.pb.loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc
from loraplex.config import EngineConfig, LoraConfig
from loraplex.lora.download_cache import MANIFEST, DownloadCache
from loraplex.lora.errors import AdapterCapacityError, AdapterSourceUnavailableError
from loraplex.lora.peft_format import AdapterFormatError
from loraplex.lora.s3_source import S3Client, S3Url
from loraplex.model.loader import load_model
from loraplex.serve import ServerThread, build_lora_manager, start_engine
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.s3_server import LOCKED_BUCKET, CuttingProxy, free_port, start_s3_server

pytest.importorskip("moto", reason="moto (test dependency) is not installed")
pytestmark = pytest.mark.timeout(300)

BUCKET = "team-adapters"
ENGINE = EngineConfig(block_size=16, num_kv_blocks=64, max_num_seqs=8, max_model_len=256)
NAMES = ("poet", "chef", "bard", "sage")


@pytest.fixture(scope="module")
def local(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("s3_local")
    for i, name in enumerate(NAMES):
        make_peft_adapter(tiny_model_dir, root / name, "qv_r4" if i % 2 else "patterns_r6", seed=40 + i)
    return root


@pytest.fixture(scope="module")
def s3(local):
    server = start_s3_server((BUCKET,))
    for name in NAMES:
        server.upload_folder(local / name, BUCKET, f"prod/{name}")
    server.upload_folder(local / "poet", LOCKED_BUCKET, "prod/poet")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The AWS environment boto3 reads (as the `reader` user); `set(endpoint)` points it elsewhere."""
    def set_env(endpoint=None):
        for k, v in s3.env(endpoint).items():
            monkeypatch.setenv(k, v)
    set_env()
    return set_env


@pytest.fixture(scope="module")
def proxy(s3):
    p = CuttingProxy(int(s3.url.rsplit(":", 1)[1]), cut_path="adapter_model.safetensors")
    yield p
    p.close()


@pytest.fixture(scope="module")
def srv(tiny_model_dir, local, s3, proxy, tmp_path_factory):
    """A gRPC server whose S3 traffic goes through `proxy` (which passes everything until told to cut)."""
    env = s3.env(proxy.url)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read when the manager's boto3 client is made (first use, below)
    cache = tmp_path_factory.mktemp("s3_cache")
    loaded = load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    manager = build_lora_manager(loaded, LoraConfig(
        max_lora_rank=8, adapter_root=f"s3://{BUCKET}/prod",
        allowed_roots=(str(local), f"s3://{LOCKED_BUCKET}/prod", "s3://no-such-bucket-here"),  # allowed, absent
        adapter_cache_dir=str(cache), adapter_cache_size="64MiB"))
    server = ServerThread(start_engine(loaded, ENGINE, manager)).start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            yield SimpleNamespace(gen=generation_pb2_grpc.GenerationStub(ch),
                                  adapters=adapters_pb2_grpc.AdaptersStub(ch), manager=manager, cache=cache)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def greedy(stub, adapter_id: str, n: int = 12) -> list[int]:
    resp = stub.Generate(pb.GenerateRequest(adapter_id=adapter_id, prompt="The quick brown fox", sampling=pb.SamplingParams(
        max_new_tokens=n, temperature=0.0, ignore_eos=True)), timeout=120)
    return list(resp.token_ids)


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        fn(*args, timeout=120, **kw)
    return exc.value


def load(srv, adapter_id: str, path: str, pinned: bool = False):
    return srv.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id=adapter_id, path=path, pinned=pinned),
                                    timeout=120).adapter


def cache_folders(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


# --- through the API -----------------------------------------------------------------------------
def test_load_from_s3_generates_like_the_local_folder(srv, local):
    info = load(srv, "poet-local", str(local / "poet"))
    assert info.state == apb.ADAPTER_STATE_READY
    reference = greedy(srv.gen, "poet-local")
    assert reference != greedy(srv.gen, "")  # the adapter changes the output: the test can fail
    info = load(srv, "poet", f"s3://{BUCKET}/prod/poet/")  # a trailing slash names the same prefix
    assert info.source == f"s3://{BUCKET}/prod/poet" and info.max_rank == 6
    assert greedy(srv.gen, "poet") == reference
    # Only the adapter's files were downloaded (not its README), complete, with a manifest.
    [folder] = [p for p in srv.cache.iterdir() if p.name.startswith("poet-")]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MANIFEST, "adapter_config.json", "adapter_model.safetensors"])
    assert (folder / "adapter_model.safetensors").read_bytes() == (local / "poet" / "adapter_model.safetensors").read_bytes()


def test_on_demand_load_through_an_s3_adapter_root(srv, local):
    load(srv, "chef-local", str(local / "chef"))
    assert greedy(srv.gen, "chef") == greedy(srv.gen, "chef-local")
    listed = {a.adapter_id: a for a in srv.adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=60).adapters}
    assert listed["chef"].source == f"s3://{BUCKET}/prod/chef"


def test_missing_prefix_or_bucket_is_not_found(srv):
    for path in (f"s3://{BUCKET}/prod/nope", "s3://no-such-bucket-here/prod/x"):
        err = rpc_error(srv.adapters.LoadAdapter, apb.LoadAdapterRequest(adapter_id="x", path=path))
        assert err.code() == grpc.StatusCode.NOT_FOUND and err.details().startswith("path: "), err.details()
    err = rpc_error(srv.gen.Generate, pb.GenerateRequest(adapter_id="nope", prompt="hi"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.details(), err.details()
    assert "x" not in {a.adapter_id for a in srv.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}


def test_access_denied_is_permission_denied(srv):
    err = rpc_error(srv.adapters.LoadAdapter,
                    apb.LoadAdapterRequest(adapter_id="locked", path=f"s3://{LOCKED_BUCKET}/prod/poet"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    assert "AccessDenied" in err.details() and err.details().startswith("path: ")


def test_outside_the_allowed_s3_roots_is_invalid_argument(srv):
    for path in (f"s3://{BUCKET}/other/poet", f"s3://{BUCKET}/prod/../other/poet", f"s3://{BUCKET}/production/x"):
        err = rpc_error(srv.adapters.LoadAdapter, apb.LoadAdapterRequest(adapter_id="x", path=path))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("path: "), (path, err.details())


def test_a_download_cut_midway_is_never_used_and_the_next_request_retries(srv, local, proxy):
    proxy.cuts, before = 1, proxy.cut_done
    err = rpc_error(srv.adapters.LoadAdapter, apb.LoadAdapterRequest(adapter_id="bard", path=f"s3://{BUCKET}/prod/bard"))
    assert proxy.cut_done == before + 1  # the proxy really dropped the connection mid-body
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    # Nothing of the cut download is left: no folder for it, no temp folder.
    assert not [n for n in cache_folders(srv.cache) if n.startswith("bard-") or n.startswith(".tmp-")]
    assert "bard" not in {a.adapter_id for a in srv.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}
    info = load(srv, "bard", f"s3://{BUCKET}/prod/bard")  # the retry downloads again, whole
    assert info.state == apb.ADAPTER_STATE_READY
    load(srv, "bard-local", str(local / "bard"))
    assert greedy(srv.gen, "bard") == greedy(srv.gen, "bard-local")


def test_unreachable_store_is_unavailable(s3_env, tmp_path):
    s3_env(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    cache = DownloadCache(tmp_path, 1 << 20, S3Client())
    with pytest.raises(AdapterSourceUnavailableError) as exc:
        with cache.open(S3Url.parse(f"s3://{BUCKET}/prod/poet")):
            pass
    code, message = adapter_ops.adapter_status(exc.value, "path")
    assert code == grpc.StatusCode.UNAVAILABLE and message.startswith("path: s3://"), message


# --- the download cache --------------------------------------------------------------------------
def test_concurrent_opens_download_once(s3_env, tmp_path, local):
    cache = DownloadCache(tmp_path, 1 << 26, S3Client())
    url = S3Url.parse(f"s3://{BUCKET}/prod/sage")
    barrier, results, errors = threading.Barrier(8), [], []

    def worker():
        barrier.wait()
        try:
            with cache.open(url) as folder:
                results.append((folder / "adapter_model.safetensors").read_bytes())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert cache.downloads == 2  # adapter_config.json + adapter_model.safetensors, once
    want = (local / "sage" / "adapter_model.safetensors").read_bytes()
    assert len(results) == 8 and all(r == want for r in results)


def test_cache_size_bound_evicts_least_recently_used(s3_env, tmp_path, local):
    sizes = {n: sum((local / n / f).stat().st_size for f in ("adapter_config.json", "adapter_model.safetensors"))
             for n in NAMES}
    bound = sizes["poet"] + max(sizes["chef"], sizes["bard"], sizes["sage"]) + 1  # poet + one more, not three
    cache = DownloadCache(tmp_path, bound, S3Client())

    def use(name):
        with cache.open(S3Url.parse(f"s3://{BUCKET}/prod/{name}")) as folder:
            assert (folder / "adapter_model.safetensors").read_bytes() == \
                (local / name / "adapter_model.safetensors").read_bytes()

    def on_disk() -> int:
        return sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file() and f.name != MANIFEST)

    use("poet")
    use("chef")
    use("poet")  # poet is now the most recently used: chef goes first
    use("bard")
    names = {n.split("-")[0] for n in cache_folders(tmp_path)}
    assert names == {"poet", "bard"}, names
    assert cache.used_bytes <= bound and on_disk() <= bound
    # A copy being read is never evicted: with poet open, sage may only push out bard.
    with cache.open(S3Url.parse(f"s3://{BUCKET}/prod/poet")):
        use("sage")
        assert {n.split("-")[0] for n in cache_folders(tmp_path)} == {"poet", "sage"}
    assert on_disk() <= bound
    tiny = DownloadCache(tmp_path / "tiny", 100, S3Client())
    with pytest.raises(AdapterCapacityError, match="adapter_cache_size"):
        with tiny.open(S3Url.parse(f"s3://{BUCKET}/prod/poet")):
            pass
    assert cache_folders(tmp_path / "tiny") == []


def test_crash_leftovers_are_deleted_and_a_truncated_copy_is_downloaded_again(s3_env, tmp_path, local):
    cache = DownloadCache(tmp_path, 1 << 26, S3Client())
    url = S3Url.parse(f"s3://{BUCKET}/prod/chef")
    with cache.open(url) as folder:
        final = folder
    # What a crash mid-download leaves: a temp folder with half a file; and a damaged final copy.
    tmp = tmp_path / ".tmp-chef-deadbeef"
    tmp.mkdir()
    (tmp / "adapter_model.safetensors").write_bytes(b"half")
    weights = final / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])
    cache = DownloadCache(tmp_path, 1 << 26, S3Client())  # a restart
    assert cache_folders(tmp_path) == []  # both deleted at start
    with cache.open(url) as folder:
        assert (folder / "adapter_model.safetensors").read_bytes() == \
            (local / "chef" / "adapter_model.safetensors").read_bytes()
    assert cache.downloads == 2


def test_an_object_over_max_adapter_bytes_is_refused_before_download(s3_env, tmp_path, local):
    limit = (local / "poet" / "adapter_config.json").stat().st_size  # the config fits, the weights do not
    assert (local / "poet" / "adapter_model.safetensors").stat().st_size > limit
    cache = DownloadCache(tmp_path, 1 << 26, S3Client(), max_file_bytes=limit)
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors: .* max_adapter_bytes"):
        with cache.open(S3Url.parse(f"s3://{BUCKET}/prod/poet")):
            pass
    assert cache.downloads == 0 and cache_folders(tmp_path) == []
