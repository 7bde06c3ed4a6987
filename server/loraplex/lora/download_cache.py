"""A bounded local cache of adapters downloaded from object storage.

    cache = DownloadCache(Path("~/.cache/loraplex/adapters"), max_bytes=10 << 30, client=S3Client())
    with cache.open(S3Url.parse("s3://bucket/adapters/poet")) as folder:
        read_adapter(folder, ...)       # a complete, verified copy; not evicted while open

Layout: one folder per adapter URL (`<last part>-<sha256 of the URL>`), holding the adapter's
files and `.loraplex-manifest.json` (the URL and each object's name, size and ETag). A folder
exists under its final name only once every file in it was downloaded, verified (s3_source:
size, and MD5 = ETag for single-part uploads), fsynced and the manifest written: it is built
under `.tmp-...` and renamed in one step. So a download cut by a dropped connection or a crash
leaves only a `.tmp-...` folder, which nothing ever reads and which is deleted at the next
start; the next request downloads again.

Each open() lists the adapter's objects first: a copy whose manifest matches the listing is
used as it is (no download); a changed adapter is downloaded again. When the store cannot be
reached (UNAVAILABLE) but a complete copy is here, the copy is used and a warning logged.

Concurrent open()s of one URL download it once: they queue on a per-URL lock, which the
download holds, and the later ones find the fresh copy. Different URLs download in parallel.

Bound: the cache holds at most `max_bytes` of adapter files. Before a download, least recently
used copies that no one has open are deleted until the new one fits (copies are needed only
while an adapter is read: the LoRA manager keeps the weights in memory and opens the copy again
-- downloading it again if it was evicted -- only to re-read it). An adapter larger than the
whole cache, or one that cannot fit because every other copy is open, is refused
(AdapterCapacityError, RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

from loraplex.atomic_dir import fsync_dir

from .durable import write_synced
from .errors import AdapterCapacityError, AdapterSourceNotFoundError, AdapterSourceUnavailableError
from .peft_format import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, AdapterFormatError
from .s3_source import S3Client, S3Object, S3Url, local_name

log = logging.getLogger(__name__)

MANIFEST = ".loraplex-manifest.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
# What a PEFT adapter folder needs; other objects under the prefix (READMEs, checkpoints) are
# not downloaded.
ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME)


class DownloadCache:
    def __init__(self, root: Path, max_bytes: int, client: S3Client | None = None,
                 max_file_bytes: int | None = None):
        if max_bytes < 1:
            raise ValueError(f"max_bytes: must be >= 1, got {max_bytes}")
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.client = client or S3Client()
        self.max_file_bytes = max_file_bytes  # larger objects are refused before any download
        self._lock = threading.Lock()
        self._url_locks: dict[str, threading.Lock] = {}
        self._sizes: OrderedDict[str, int] = OrderedDict()  # complete copies, least recently used first
        self._open: dict[str, int] = {}  # name -> open() calls holding it
        self._reserved = 0  # bytes of downloads in progress
        self.downloads = 0  # objects downloaded, ever (tests and logs)
        self._scan()

    # ------------------------------------------------------------------ public
    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values()) + self._reserved

    @contextlib.contextmanager
    def open(self, url: S3Url) -> Iterator[Path]:
        """The local folder of a complete, verified copy of the adapter at `url`."""
        name = local_name(url)
        with self._url_lock(name):
            with self._lock:
                self._open[name] = self._open.get(name, 0) + 1
            try:
                folder = self._ensure(url, name)
                yield folder
            finally:
                with self._lock:
                    self._open[name] -= 1
                    if not self._open[name]:
                        del self._open[name]

    # ------------------------------------------------------------------ internals
    def _url_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._url_locks.setdefault(name, threading.Lock())

    def _ensure(self, url: S3Url, name: str) -> Path:
        folder = self.root / name
        try:
            objects = [o for o in self.client.list_adapter(url) if o.name in ADAPTER_FILES]
        except AdapterSourceUnavailableError as err:
            if self._manifest(folder) is not None:
                log.warning("adapter store unreachable (%s); using the cached copy %s", err, folder)
                self._touch(name)
                return folder
            raise
        if not objects:
            raise AdapterSourceNotFoundError("path", f"{url}: no {CONFIG_NAME} / {SAFETENSORS_NAME} under this prefix")
        too_big = [o for o in objects if self.max_file_bytes is not None and o.size > self.max_file_bytes]
        if too_big:  # what read_adapter would refuse after the download: refuse before it
            raise AdapterFormatError(too_big[0].name, f"{too_big[0].size} bytes, more than max_adapter_bytes "
                                     f"({self.max_file_bytes}) allows")
        wanted = sorted((o.name, o.size, o.etag) for o in objects)
        manifest = self._manifest(folder)
        if manifest is not None and manifest.get("objects") == [list(w) for w in wanted]:
            self._touch(name)
            return folder
        self._download(url, name, objects)
        return folder

    def _download(self, url: S3Url, name: str, objects: list[S3Object]) -> None:
        need = sum(o.size for o in objects)
        self._reserve(name, need, url)
        tmp = self.root / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            for obj in objects:
                with open(tmp / obj.name, "wb") as f:
                    self.client.download(url, obj, f)
                    f.flush()
                    os.fsync(f.fileno())
                self.downloads += 1
            manifest = {"url": str(url), "objects": sorted([o.name, o.size, o.etag] for o in objects)}
            write_synced(tmp / MANIFEST, json.dumps(manifest).encode())
            fsync_dir(tmp)
            self._commit(name, tmp, need)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            with self._lock:
                self._reserved -= need
            raise
        log.info("adapter %s downloaded into %s (%d bytes)", url, self.root / name, need)

    def _reserve(self, name: str, need: int, url: S3Url) -> None:
        """Room for `need` more bytes: evict idle copies, least recently used first (the old copy
        of this very adapter counts as idle: the new one replaces it)."""
        if need > self.max_bytes:
            raise AdapterCapacityError(
                "adapter_cache_size", f"{url} is {need / 2**20:.1f} MiB, more than the whole adapter download "
                f"cache ({self.max_bytes / 2**20:.1f} MiB); raise --adapter-cache-size")
        with self._lock:
            for victim in list(self._sizes):
                if sum(self._sizes.values()) + self._reserved + need <= self.max_bytes:
                    break
                if victim == name or victim not in self._open:
                    self._remove(victim)
            if sum(self._sizes.values()) + self._reserved + need > self.max_bytes:
                raise AdapterCapacityError(
                    "adapter_cache_size", f"no room for {url} ({need / 2**20:.1f} MiB) in the adapter download "
                    "cache: the other cached adapters are being read now; retry, or raise --adapter-cache-size")
            self._reserved += need

    def _commit(self, name: str, tmp: Path, size: int) -> None:
        """Put the complete copy `tmp` in place under `name` (one rename)."""
        final = self.root / name
        with self._lock:
            if final.exists():  # an older version: out of the way first
                self._delete(name)
                self._sizes.pop(name, None)
            os.rename(tmp, final)
            fsync_dir(self.root)
            self._reserved -= size
            self._sizes[name] = size
            self._sizes.move_to_end(name)

    def _remove(self, name: str) -> None:
        """Under the lock: delete a complete copy and forget it."""
        self._sizes.pop(name, None)
        if (self.root / name).exists():
            self._delete(name)
        log.info("adapter download cache: evicted %s", name)

    def _delete(self, name: str) -> None:
        """Delete the copy `name`: renamed aside first (rename is atomic; rmtree is not), so no
        half-deleted folder keeps its final name."""
        old = self.root / f"{OLD_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        os.rename(self.root / name, old)
        shutil.rmtree(old, ignore_errors=True)

    def _touch(self, name: str) -> None:
        with self._lock:
            if name in self._sizes:
                self._sizes.move_to_end(name)
        with contextlib.suppress(OSError):  # the order survives a restart (manifest mtime)
            os.utime(self.root / name / MANIFEST)

    @staticmethod
    def _manifest(folder: Path) -> dict | None:
        try:
            data = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _scan(self) -> None:
        """At start: delete what a crash or a cut download left (`.tmp-`, `.old-` folders, a copy
        without a readable manifest or with a file of the wrong size); register the complete copies,
        least recently used first; evict down to the bound (it may have been lowered)."""
        found = []
        for child in self.root.iterdir():
            if child.name.startswith((TMP_PREFIX, OLD_PREFIX)):
                log.info("adapter download cache: deleting the unfinished %s", child.name)
                shutil.rmtree(child, ignore_errors=True)
                continue
            if not child.is_dir():
                continue
            manifest = self._manifest(child)
            try:
                objects = manifest["objects"] if manifest else None
                ok = objects is not None and all((child / n).stat().st_size == s for n, s, _ in objects)
            except (OSError, TypeError, ValueError, KeyError):
                ok = False
            if not ok:
                log.warning("adapter download cache: deleting %s (incomplete or unreadable)", child.name)
                shutil.rmtree(child, ignore_errors=True)
                continue
            found.append(((child / MANIFEST).stat().st_mtime, child.name, sum(s for _, s, _ in objects)))
        for _, name, size in sorted(found):
            self._sizes[name] = size
        with self._lock:
            while self._sizes and sum(self._sizes.values()) > self.max_bytes:
                self._remove(next(iter(self._sizes)))

