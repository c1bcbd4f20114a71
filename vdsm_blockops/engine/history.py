"""The node's trail of what ran: one JSON line per operation -- from the
CLI, an Ansible module, ``recover`` (the units run it through the CLI) or
a start the hook refused -- appended to ``<state_dir>/history.jsonl``.

Each line: id (the operation's record, else a new one), source, operation,
domain, disk, method, start and end (UTC, ISO 8601), outcome (``ok`` or the
error code), bytes, exit code, and the error's message. The file is
rotated by size (one older file, ``history.jsonl.1``), so the trail of a
busy node stays bounded; ``vdsm-blockops history [DOMAIN]`` reads both.
Writing it never fails an operation: a trail that cannot be written is
logged and the operation's own outcome stands.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from .state import StateDir, open_private

log = logging.getLogger(__name__)

FILE = "history.jsonl"
MAX_BYTES = 4 * 1024 * 1024  # then rotated: the trail keeps at most about twice this


def utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def entry(*, source: str, operation: str, domain: str | None, disk: str | None,
          started: float, exit_code: int, outcome: str, body: dict[str, Any] | None = None,
          message: str | None = None) -> dict[str, Any]:
    """One line of the trail; ``body`` is the operation's JSON report (its
    record id, method and bytes are taken from it)."""
    body = body or {}
    return {
        "id": body.get("record") or os.urandom(6).hex(),  # (uuid costs 4 ms to import)
        "source": source,
        "operation": operation,
        "domain": domain,
        "disk": disk,
        "method": body.get("method") or body.get("strategy"),
        "start": utc(started),
        "end": utc(time.time()),
        "outcome": outcome,
        "bytes": body.get("bytes_to_copy"),
        "exit_code": exit_code,
        "message": message,
    }


def append(state: StateDir, line: dict[str, Any]) -> None:
    path = os.path.join(state.path, FILE)
    try:
        with state.lock("history.lock"):
            if os.path.exists(path) and os.path.getsize(path) > MAX_BYTES:
                os.replace(path, path + ".1")
            fd = open_private(path, os.O_WRONLY | os.O_APPEND)
            with os.fdopen(fd, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line, sort_keys=True) + "\n")
    except Exception as exc:  # an unwritable trail, a lock held past its bound
        log.warning("history not written (%s): %s", path, exc)


def read(state: StateDir, domain: str | None = None) -> list[dict[str, Any]]:
    """The trail in the order the operations started (each line is written
    when its operation ends: a long one comes after shorter ones it began
    before)."""
    return sorted(_lines(state, domain), key=lambda line: str(line.get("start") or ""))


def _lines(state: StateDir, domain: str | None) -> Iterator[dict[str, Any]]:
    """The lines as written (the rotated file, then the current one)."""
    path = os.path.join(state.path, FILE)
    for name in (path + ".1", path):
        try:
            handle = open(name, encoding="utf-8")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            continue
        with handle:
            for text in handle:
                try:
                    line = json.loads(text)
                except ValueError:
                    continue  # a line cut by a crash: the others stand
                if domain is None or line.get("domain") == domain:
                    yield line
