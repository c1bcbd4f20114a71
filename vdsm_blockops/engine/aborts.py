"""Who stopped an operation: ``abort`` leaves a note in the state folder
(``aborts/<record id>.json``: its own pid, the owner's) before it stops the
owner or its block job. The stopped command reads it (and removes it) to
say what happened -- stopped by ``abort`` from another process, which rolls
back or finishes what it started -- instead of the Ctrl-C text or "the
block job ended canceled". The owner may read it after ``abort`` is done
(it sees its job's end when it sees it), so ``abort`` removes the note only
when the owner is gone; ``recover`` sweeps notes a day old."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from .state import StateDir, write_json_atomic


def _folder(state: StateDir) -> str:
    return os.path.join(state.path, "aborts")


@contextlib.contextmanager
def noted(state: StateDir, record_id: str, owner_pid: int,
          owner_running: Callable[[], bool]) -> Iterator[None]:
    """While ``abort`` stops the operation of record ``record_id``; the note
    stays for the owner to read while ``owner_running()``."""
    path = os.path.join(_folder(state), f"{record_id}.json")
    if owner_pid == os.getpid():  # a library caller aborting its own call: no one to tell
        yield
        return
    try:
        state.ensure()
        os.makedirs(_folder(state), mode=0o700, exist_ok=True)
        write_json_atomic(path, {"record": record_id, "owner_pid": owner_pid,
                                 "by_pid": os.getpid()}, durable=False)
    except OSError:
        pass  # the note only improves the stopped command's words
    try:
        yield
    finally:
        if not owner_running():
            with contextlib.suppress(OSError):
                os.unlink(path)


def find(state: StateDir, record_id: str | None = None,
         owner_pid: int | None = None) -> dict[str, Any] | None:
    """The note about record ``record_id``, or about an operation of the
    process ``owner_pid`` -- read once: it is removed."""
    try:  # a record's note by its name; an owner's among them all
        names = [f"{record_id}.json"] if record_id is not None else os.listdir(_folder(state))
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(_folder(state), name), encoding="utf-8") as handle:
                note = json.load(handle)
        except (OSError, ValueError):
            continue
        if isinstance(note, dict) and (owner_pid is None or note.get("owner_pid") == owner_pid):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(_folder(state), name))
            return note
    return None


def sweep(state: StateDir, older_than_s: float = 86400.0) -> None:
    """Remove the notes no stopped command read (it died first)."""
    try:
        names = os.listdir(_folder(state))
    except OSError:
        return
    for name in names:
        path = os.path.join(_folder(state), name)
        with contextlib.suppress(OSError):
            if time.time() - os.stat(path).st_mtime > older_than_s:
                os.unlink(path)


def stopped_by_abort(note: dict[str, Any], what: str) -> str:
    return (f"{what} was stopped by 'vdsm-blockops abort' (pid {note.get('by_pid')}) from "
            f"another process, which settles it: rolled back, or finished where it was past "
            f"its switchover (record {note.get('record')}; 'jobs' and 'history' show the rest)")
