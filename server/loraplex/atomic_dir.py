"""Write a folder all at once: a crash or a failure leaves either no folder or the complete one.

    with atomic_folder(dest, overwrite=False) as tmp:   # tmp: a fresh sibling of dest
        write files into tmp
    # here dest holds them (fsynced, then renamed into place)

The files are written into a hidden temporary sibling (same file system, so the final rename is
atomic), fsynced with their folder, then renamed to `dest`. With overwrite, an existing `dest` is
first renamed aside and removed only once the new folder is in place. On any exception the
temporary folder is removed and `dest` is untouched.

Used for every folder loraplex writes: a merged model (lora/merge.py), a saved adapter
(lora/save.py), the converted default model (model/default_model.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator



def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderExistsError(FileExistsError):
    """`dest` exists and overwrite was not asked for."""


def _fsync_tree(folder: Path) -> None:
    # mkdtemp makes the folder 0700 (and some writers make files 0600): give the result the usual
    # modes of a model folder, readable by the other users a model is shared with.
    folder.chmod(0o755)
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            path.chmod(0o755)
        elif path.is_file():
            path.chmod(0o644)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FolderExistsError(f"{dest} exists (pass --force / overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if dest.exists():
            if not overwrite:  # appeared while we wrote
                raise FolderExistsError(f"{dest} exists (pass --force / overwrite to replace it)")
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, old / "x")
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
