"""The standalone copies relocations made without a pivot (``--no-pivot``):
each by its image's identity (the file, on its file system), size and
mtime, with the domain and disk it copies, in ``<state_dir>/copies.json``.

So a run again (an Ansible play, a retried script) knows DEST for the copy
it made rather than refusing an existing file: a copy written to since,
or another file that took its name, no longer matches and is refused as
any existing DEST is. The newest ``KEEP`` copies are remembered.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ..core.identity import ImageKey, fingerprint
from .state import StateDir, write_json_atomic

FILE = "copies.json"
KEEP = 256


def _read(state: StateDir) -> list[dict[str, Any]]:
    try:
        with open(os.path.join(state.path, FILE), encoding="utf-8") as handle:
            body = json.load(handle)
    except (FileNotFoundError, ValueError):
        return []  # none yet, or unreadable: no copy is taken as ours
    return [e for e in body if isinstance(e, dict)] if isinstance(body, list) else []


def remember(state: StateDir, domain: str, disk: str, dest: str) -> None:
    """``dest`` is the finished, verified copy of ``domain`` ``disk``."""
    key, size, mtime_ns = fingerprint(dest)
    entry = {"key": key.to_json(), "size": size, "mtime_ns": mtime_ns, "domain": domain,
             "disk": disk, "dest": dest, "at": time.time()}
    with state.lock("copies.lock"):
        kept = [e for e in _read(state) if e.get("key") != entry["key"]]
        write_json_atomic(os.path.join(state.path, FILE), (kept + [entry])[-KEEP:])


def made_earlier(state: StateDir, domain: str, disk: str, dest: str) -> float | None:
    """When ``dest`` was made as the copy of ``domain`` ``disk`` by an
    earlier relocation, if it is still that file, unchanged; else None."""
    try:
        key, size, mtime_ns = fingerprint(dest)
    except OSError:
        return None
    for entry in reversed(_read(state)):
        if ImageKey.from_json(entry.get("key")) == key and key.kind != "path":
            same = (entry.get("size"), entry.get("mtime_ns"), entry.get("domain"),
                    entry.get("disk")) == (size, mtime_ns, domain, disk)
            return float(entry.get("at") or 0) if same else None
    return None
