"""A disk's lock held by a process on its way out (SIGKILL pending while
its disk I/O finishes, or a zombie) is waited for, not refused; a live
holder is refused at once."""

import os
import subprocess
import threading
import time

import pytest

from vdsm_blockops.core.errors import Conflict
from vdsm_blockops.core.lifetime import process_exiting
from vdsm_blockops.engine.state import StateDir


def zombie() -> subprocess.Popen:
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while not process_exiting(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return child


def test_a_process_on_its_way_out_is_told_apart_from_a_live_one():
    assert not process_exiting(os.getpid())
    child = zombie()
    try:
        assert process_exiting(child.pid)  # exited, not yet reaped
    finally:
        child.wait()
    assert process_exiting(child.pid)  # gone
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert not process_exiting(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()


def hold(state: StateDir, holder: str, release: threading.Event, held: threading.Event):
    with state._lock_file("u-vda.lock", wait=False) as handle:
        handle.seek(0)
        handle.truncate()
        handle.write(holder)
        handle.flush()
        held.set()
        release.wait(10)


@pytest.mark.parametrize("dying", [True, False])
def test_the_lock_of_a_dying_holder_is_waited_for(tmp_path, dying):
    state = StateDir(str(tmp_path / "state"))
    child = zombie()
    pid = child.pid if dying else os.getpid()
    release, held = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold, args=(state, f"relocate of vm vda (pid {pid})",
                                                 release, held))
    holder.start()
    held.wait(5)
    threading.Timer(0.5, release.set).start()  # its I/O returns: the lock goes
    started = time.monotonic()
    try:
        if dying:
            with state.disk_lock("u", "vda", "merge of vm vda"):
                assert 0.4 < time.monotonic() - started < 10
        else:
            with pytest.raises(Conflict, match="busy"):
                with state.disk_lock("u", "vda", "merge of vm vda"):
                    pass
            assert time.monotonic() - started < 0.4  # refused at once
    finally:
        release.set()
        holder.join()
        child.wait()
