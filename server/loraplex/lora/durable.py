"""Writes that survive a crash or a power cut: a file is either its old or its new content.

    write_atomic(path, data)   # temp file beside it, write, fsync, rename over, fsync the folder

POSIX rename() replaces the target in one step; the fsyncs make the data (file) and the rename
(its folder's entry) durable before we say the change is recorded. A crash in between leaves the
old file plus a `<name>.tmp-<pid>-<random>` file, which readers ignore and `remove_temps` deletes.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from loraplex.atomic_dir import fsync_dir

TMP_MARK = ".tmp-"


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_temps(path: Path) -> list[Path]:
    """Delete what an interrupted write_atomic(path) left; returns what was deleted."""
    gone = sorted(path.parent.glob(f"{path.name}{TMP_MARK}*"))
    for tmp in gone:
        tmp.unlink(missing_ok=True)
    return gone
