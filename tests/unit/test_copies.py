"""A relocation without a pivot remembers its copy, so that a run again
knows DEST for it -- by identity, size and mtime, never by name alone."""

from __future__ import annotations

import os
import time

from vdsm_blockops.engine import copies
from vdsm_blockops.engine.state import StateDir


def made(tmp_path, name="copy.qcow2", data=b"x" * 4096):
    path = str(tmp_path / name)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def test_a_remembered_copy_is_known_while_it_is_unchanged(tmp_path):
    state = StateDir(str(tmp_path / "state"))
    os.makedirs(state.path)
    dest = made(tmp_path)
    assert copies.made_earlier(state, "vm", "vda", dest) is None  # not made by us
    copies.remember(state, "vm", "vda", dest)
    assert copies.made_earlier(state, "vm", "vda", dest) is not None
    assert copies.made_earlier(state, "vm", "vdb", dest) is None  # another disk's copy
    assert copies.made_earlier(state, "other", "vda", dest) is None


def test_a_copy_written_to_or_replaced_is_not_taken_as_ours(tmp_path):
    state = StateDir(str(tmp_path / "state"))
    os.makedirs(state.path)
    dest = made(tmp_path)
    copies.remember(state, "vm", "vda", dest)
    stamp = os.stat(dest).st_mtime_ns
    with open(dest, "r+b") as handle:
        handle.write(b"y")
    os.utime(dest, ns=(stamp, stamp + 1_000_000))  # written to since
    assert copies.made_earlier(state, "vm", "vda", dest) is None
    copies.remember(state, "vm", "vda", dest)
    other = made(tmp_path, "other.qcow2")
    os.utime(other, ns=(os.stat(dest).st_atime_ns, os.stat(dest).st_mtime_ns))
    os.replace(other, dest)  # another file took its name: same size and mtime
    assert copies.made_earlier(state, "vm", "vda", dest) is None
    os.unlink(dest)
    assert copies.made_earlier(state, "vm", "vda", dest) is None


def test_only_the_newest_copies_are_remembered(tmp_path, monkeypatch):
    state = StateDir(str(tmp_path / "state"))
    os.makedirs(state.path)
    monkeypatch.setattr(copies, "KEEP", 2)
    paths = [made(tmp_path, f"c{i}") for i in range(3)]
    for path in paths:
        copies.remember(state, "vm", "vda", path)
        time.sleep(0.001)
    assert [copies.made_earlier(state, "vm", "vda", p) is not None for p in paths] == [
        False, True, True]
