"""Adapters in S3-compatible object storage: `s3://bucket/prefix` URLs, listing an adapter's
objects and downloading one object, verified.

Endpoint, region and credentials come from boto3's usual chain only -- AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3), AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws/config -- never from a request: a client names a URL, the
operator decides where it is fetched from and with whose rights.

Errors, as the API maps them (api/adapter_ops.py):
  no such bucket / key / an empty prefix        -> AdapterSourceNotFoundError  (NOT_FOUND)
  AccessDenied, bad or expired credentials      -> AdapterAccessDeniedError    (PERMISSION_DENIED)
  no connection, a read cut short, a timeout,
  a body whose size or MD5 does not match       -> AdapterSourceUnavailableError (UNAVAILABLE: retry)
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from typing import BinaryIO

from .errors import (AdapterAccessDeniedError, AdapterPathError, AdapterSourceNotFoundError,
                     AdapterSourceUnavailableError)

SCHEME = "s3://"
# Bucket names: 3-63 of [a-z0-9.-] (S3's rules, loosely; S3-compatible stores accept the same set).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_DENIED = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "ExpiredToken", "InvalidToken", "AccountProblem", "403", "Forbidden"}
_MISSING = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
_CHUNK = 1 << 20


def is_s3_url(path: str | os.PathLike[str]) -> bool:
    return str(path).startswith(SCHEME)


@dataclass(frozen=True)
class S3Url:
    """s3://bucket/key-prefix, normalised: no empty path parts, no trailing slash."""

    bucket: str
    prefix: str  # "" = the whole bucket

    @classmethod
    def parse(cls, url: str, field: str = "path") -> "S3Url":
        if not is_s3_url(url):
            raise AdapterPathError(field, f"{url[:200]!r} is not an s3:// URL")
        bucket, _, key = url[len(SCHEME):].partition("/")
        if not _BUCKET_RE.match(bucket):
            raise AdapterPathError(field, f"{url[:200]!r}: {bucket[:70]!r} is not a bucket name")
        parts = [p for p in key.split("/") if p]
        # '.'/'..' parts would let a URL look inside an allowed prefix while naming another.
        if any(p in (".", "..") for p in parts) or any(ord(c) < 32 for c in key):
            raise AdapterPathError(field, f"{url[:200]!r}: '.', '..' and control characters are not allowed")
        return cls(bucket, "/".join(parts))

    def child(self, name: str) -> "S3Url":
        return S3Url(self.bucket, f"{self.prefix}/{name}" if self.prefix else name)

    def is_under(self, root: "S3Url") -> bool:
        return self.bucket == root.bucket and (
            not root.prefix or self.prefix == root.prefix or self.prefix.startswith(root.prefix + "/"))

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"


@dataclass(frozen=True)
class S3Object:
    name: str  # the key below the adapter's prefix, e.g. "adapter_config.json"
    key: str
    size: int
    etag: str  # without quotes


class S3Client:
    """A boto3 S3 client made on first use (boto3 is imported only by servers that name s3://)."""

    def __init__(self) -> None:
        self._client = None
        self._lock = threading.Lock()

    def _get(self):
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                # Few retries: a request that cannot reach the store should fail (UNAVAILABLE) in
                # seconds, and the client's own retry is the next request.
                self._client = boto3.session.Session().client("s3", config=Config(
                    retries={"total_max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30))
            return self._client

    def list_adapter(self, url: S3Url) -> list[S3Object]:
        """The objects directly under `url` (its "folder"), or AdapterSourceNotFoundError if none."""
        prefix = f"{url.prefix}/" if url.prefix else ""
        objects: list[S3Object] = []
        with _mapped(url):
            pages = self._get().get_paginator("list_objects_v2").paginate(
                Bucket=url.bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                for item in page.get("Contents", ()):
                    name = item["Key"][len(prefix):]
                    if name:
                        objects.append(S3Object(name, item["Key"], int(item["Size"]), item["ETag"].strip('"')))
        if not objects:
            raise AdapterSourceNotFoundError("path", f"{url}: no objects under this prefix")
        return objects

    def download(self, url: S3Url, obj: S3Object, out: BinaryIO) -> None:
        """Write `obj` into `out`, verified: exactly obj.size bytes (the listing's size, and the
        response's Content-Length), and for a single-part upload (an ETag of 32 hex digits) their
        MD5 equal to the ETag. Multipart ETags are not a digest of the bytes: size only. IfMatch
        pins the listed version, so an object replaced meanwhile fails instead of mixing versions."""
        md5 = hashlib.md5(usedforsecurity=False)
        got = 0
        with _mapped(url):
            resp = self._get().get_object(Bucket=url.bucket, Key=obj.key, IfMatch=f'"{obj.etag}"')
            if int(resp.get("ContentLength", -1)) != obj.size:
                raise AdapterSourceUnavailableError(
                    "path", f"{url}/{obj.name}: Content-Length {resp.get('ContentLength')} != listed size {obj.size}")
            body = resp["Body"]
            try:
                while chunk := body.read(_CHUNK):
                    md5.update(chunk)
                    out.write(chunk)
                    got += len(chunk)
            finally:
                body.close()
        if got != obj.size:
            raise AdapterSourceUnavailableError(
                "path", f"{url}/{obj.name}: download cut short ({got} of {obj.size} bytes); retry")
        if re.fullmatch(r"[0-9a-f]{32}", obj.etag) and md5.hexdigest() != obj.etag:
            raise AdapterSourceUnavailableError(
                "path", f"{url}/{obj.name}: MD5 {md5.hexdigest()} does not match the ETag {obj.etag}; retry")


class _mapped:
    """Context manager: botocore/urllib3 failures -> our adapter errors (see the module doc)."""

    def __init__(self, url: S3Url):
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            detail = f"{self.url}: {code or status}: {error.get('Message', '')}".rstrip(": ")
            if code in _MISSING or status == 404:
                raise AdapterSourceNotFoundError("path", detail) from None
            if code in _DENIED or status == 403:
                raise AdapterAccessDeniedError("path", detail) from None
            raise AdapterSourceUnavailableError("path", detail) from None
        if isinstance(exc, (BotoCoreError, OSError)) or type(exc).__module__.startswith("urllib3"):
            raise AdapterSourceUnavailableError("path", f"{self.url}: {type(exc).__name__}: {exc}") from None
        return False


def local_name(url: S3Url) -> str:
    """A file-system-safe, collision-free folder name for `url` in the download cache."""
    digest = hashlib.sha256(str(url).encode()).hexdigest()[:16]
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", url.prefix.rsplit("/", 1)[-1] or url.bucket)[:48]
    return f"{tail}-{digest}"

