"""The persistent adapter registry (`serve --state-dir DIR`): which adapters were loaded through the
API, and which are pinned, so that a restart -- after a crash, a deploy, a node drain -- serves
them again.

The file is DIR/state.json, rewritten whole after every successful LoadAdapter (a new adapter or
a pin), UnloadAdapter, and at start-up after the replay; written atomically (lora/durable.py:
temp file, fsync, rename, fsync of DIR), so it is always either the state before a change or the
state after it. Version 1:

    {
      "format": "loraplex-adapter-registry",
      "version": 1,
      "adapters": [
        {"adapter_id": "poet", "source": "/srv/adapters/poet", "pinned": true},
        {"adapter_id": "chef", "source": "s3://team-adapters/prod/chef", "pinned": false}
      ]
    }

`source` is where the adapter was read from (a resolved folder or an s3:// URL). Adapters given
on the command line (`--adapter ID=PATH`) and those loaded on demand from --adapter-root are not
recorded: the flags bring them back. Replay re-resolves every source under the roots configured
now; one that has vanished, moved outside them or no longer reads is logged and listed as failed
(ListAdapters state FAILED with its error) and stays recorded until it is unloaded or loaded
again; it never stops the server from starting.

A file that is not valid JSON, not this format, or of another version is renamed aside to
`state.json.corrupt-<UTC time>` with an error log line naming both paths, and the server starts
with no recorded adapters (the next change writes a new file). A newer version than this server
reads is treated alike rather than half-read.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .durable import remove_temps, write_atomic

log = logging.getLogger(__name__)

FORMAT = "loraplex-adapter-registry"
VERSION = 1
FILE_NAME = "state.json"


@dataclass(frozen=True)
class Record:
    adapter_id: str
    source: str
    pinned: bool


class Registry:
    def __init__(self, state_dir: str | os.PathLike[str]):
        self.dir = Path(state_dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / FILE_NAME
        self._lock = threading.Lock()  # one write at a time, in the order they were asked for
        for tmp in remove_temps(self.path):
            log.info("state dir: deleted %s, left by an interrupted write", tmp)

    def read(self) -> list[Record]:
        """The recorded adapters; [] when there is no file or it was corrupt (then moved aside)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            return _parse(raw)
        except ValueError as err:
            aside = self.path.with_name(f"{FILE_NAME}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            os.replace(self.path, aside)
            log.error("adapter registry %s is unusable (%s); moved aside to %s, starting with no recorded "
                      "adapters", self.path, err, aside)
            return []

    def save(self, snapshot: Callable[[], Iterable[Record]]) -> None:
        """Write the state `snapshot()` returns. The snapshot is taken under the write lock, so
        writes land in the order of the states they record: the file never goes back to an older
        state because two changes raced."""
        with self._lock:
            records = sorted(snapshot(), key=lambda r: r.adapter_id)
            data = {"format": FORMAT, "version": VERSION,
                    "adapters": [{"adapter_id": r.adapter_id, "source": r.source, "pinned": r.pinned}
                                 for r in records]}
            write_atomic(self.path, (json.dumps(data, indent=2) + "\n").encode())


def _parse(raw: bytes) -> list[Record]:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    if data.get("version") != VERSION:
        raise ValueError(f"version {data.get('version')!r}; this server reads version {VERSION}")
    adapters = data.get("adapters")
    if not isinstance(adapters, list):
        raise ValueError("adapters: expected a list")
    records, seen = [], set()
    for i, item in enumerate(adapters):
        if not (isinstance(item, dict) and isinstance(item.get("adapter_id"), str)
                and isinstance(item.get("source"), str) and isinstance(item.get("pinned"), bool)):
            raise ValueError(f"adapters[{i}]: expected adapter_id (string), source (string), pinned (boolean)")
        if item["adapter_id"] in seen:
            raise ValueError(f"adapters[{i}]: adapter_id {item['adapter_id']!r} appears twice")
        seen.add(item["adapter_id"])
        records.append(Record(item["adapter_id"], item["source"], item["pinned"]))
    return records
