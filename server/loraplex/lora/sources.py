"""Where adapters may be read from: local folders under the allowed roots, and s3:// prefixes under
the allowed s3:// roots (--adapter-root and --allowed-adapter-root take either kind).

    sources = AdapterSources(config)
    source = sources.resolve("s3://bucket/team/poet")   # Path | S3Url, refused outside the roots
    with sources.folder(source) as folder:              # a local folder to read (downloaded if s3)
        read_adapter(folder, ...)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Union

from loraplex.config import LoraConfig, parse_memory

from .errors import AdapterPathError
from .paths import resolve_under_roots
from .s3_source import S3Url, is_s3_url

Source = Union[Path, S3Url]


class AdapterSources:
    def __init__(self, config: LoraConfig):
        self.config = config
        self.local_roots = tuple(r for r in config.roots if not is_s3_url(r))
        self.s3_roots = tuple(S3Url.parse(r, "allowed_roots") for r in config.roots if is_s3_url(r))
        self._cache = None
        if self.s3_roots:
            from .download_cache import DownloadCache

            size, _ = parse_memory(config.adapter_cache_size)
            self._cache = DownloadCache(Path(config.cache_dir()), size, max_file_bytes=config.max_adapter_bytes)

    @property
    def cache(self):
        """The download cache (lora/download_cache.py); None without s3:// roots."""
        return self._cache

    def resolve(self, path: str | Path) -> Source:
        """What `path` names, refused (AdapterPathError "path: ...") outside every root."""
        if is_s3_url(path):
            url = S3Url.parse(str(path))
            if not any(url.is_under(root) for root in self.s3_roots):
                raise AdapterPathError("path", f"{url} lies outside the configured adapter roots")
            return url
        if not self.local_roots and self.s3_roots:
            raise AdapterPathError("path", f"{path} lies outside the configured adapter roots")
        return resolve_under_roots(path, self.local_roots)

    def on_demand(self, adapter_id: str) -> Source | None:
        """--adapter-root/<adapter_id>, or None when there is no root or (local) no such folder.
        An s3:// root is not listed here: a missing prefix fails when it is read (NOT_FOUND)."""
        root = self.config.adapter_root
        if not root:
            return None
        if is_s3_url(root):
            return S3Url.parse(root, "adapter_root").child(adapter_id)
        if not (Path(root) / adapter_id).is_dir():
            return None
        return resolve_under_roots(Path(root) / adapter_id, self.local_roots)

    @contextlib.contextmanager
    def folder(self, source: Source) -> Iterator[Path]:
        if isinstance(source, S3Url):
            with self._cache.open(source) as folder:
                yield folder
        else:
            yield source
