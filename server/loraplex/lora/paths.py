"""Adapter ids and folders: what a client may name, and where the server may read from.

An adapter id is a plain name (it becomes <adapter_root>/<id> for on-demand loads), so it must not
be able to walk out of the root. Folders given to LoadAdapter must resolve (symlinks followed)
to a place under one of the configured roots.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import AdapterPathError

# Letters, digits, '.', '_', '-', and at most 128 of them; not starting with '.' (no '..', no hidden).
_ID_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,127}$")


def validate_adapter_id(adapter_id: str) -> str:
    if not _ID_RE.match(adapter_id or "") or ".." in adapter_id:
        raise AdapterPathError(
            "adapter_id",
            f"{adapter_id[:64]!r} is not a plain name (letters, digits, '.', '_', '-'; no path separators, no '..')")
    return adapter_id


def resolve_under_roots(path: str | Path, roots: tuple[str, ...]) -> Path:
    """The real folder behind `path`, refused unless it lies under one of `roots`."""
    if not roots:
        raise AdapterPathError("path", "no adapter root is configured (--adapter-root / --allowed-adapter-root)")
    real = Path(path).expanduser().resolve(strict=False)
    for root in roots:
        real_root = Path(root).expanduser().resolve(strict=False)
        if real == real_root or real_root in real.parents:
            if not real.is_dir():
                raise AdapterPathError("path", f"{path} is not a folder")
            return real
    raise AdapterPathError("path", f"{path} lies outside the configured adapter roots")


def destination_under_roots(path: str | Path, roots: tuple[str, ...]) -> Path:
    """Where a folder may be WRITTEN: `path` resolved (it need not exist yet), strictly inside one
    of `roots` (not a root itself)."""
    if not roots:
        raise AdapterPathError("path", "no adapter root is configured (--adapter-root / --allowed-adapter-root)")
    real = Path(path).expanduser().resolve(strict=False)
    for root in roots:
        if Path(root).expanduser().resolve(strict=False) in real.parents:
            return real
    raise AdapterPathError("path", f"{path} lies outside the configured adapter roots")
