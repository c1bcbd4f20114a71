"""Identity has a lifetime: a re-used inode number is another image, a
record about a file ends with it, and node state does not grow with the
node's history."""

import json
import multiprocessing
import os

import pytest

from vdsm_blockops.core.identity import ImageKey, file_exists, image_key
from vdsm_blockops.engine.records import OperationRecord
from vdsm_blockops.engine.state import StateDir


def reuse_inode(folder, old_ino, prefix="new"):
    """A new file in ``folder`` that got ``old_ino`` (ext4 hands a freed
    number to the next file: measured here, the first try; tmpfs counts
    up, so there a number comes back only after it wraps)."""
    for n in range(200):
        path = os.path.join(folder, f"{prefix}-{n}")
        with open(path, "wb") as handle:
            handle.write(b"a new, unrelated image")
        if os.stat(path).st_ino == old_ino:
            return path
    pytest.fail(f"no file in {folder} got inode {old_ino} again: the test proves nothing here")


@pytest.fixture(params=["ext4", "tmpfs"])
def folder(request, tmp_path):
    if request.param == "tmpfs":
        path = os.path.join("/dev/shm", f"lifetime-{os.getpid()}-{tmp_path.name}")
        os.makedirs(path)
        yield path
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
    else:
        yield str(tmp_path)


def retire(state, path):
    state.invalidate([path], domain="web01", disk="vda", operation="merge 1")


def test_a_reused_inode_number_is_a_new_image(tmp_path):
    folder = str(tmp_path)
    state = StateDir(str(tmp_path / "state"))
    retired = os.path.join(folder, "C.qcow2")
    with open(retired, "wb") as handle:
        handle.write(b"retired layer")
    old = image_key(retired)
    retire(state, retired)
    assert state.invalid_lookup().why(retired) is not None
    os.unlink(retired)  # the operator deletes it by hand
    new = reuse_inode(folder, old.ino)
    assert image_key(new)[:3] == old[:3]  # the same number...
    assert image_key(new) != old  # ...is not the same file
    assert state.invalid_lookup().why(new) is None
    # the entry of the file that is gone goes with the next write
    assert file_exists(old) is False
    state.forget([])
    assert state.invalidated() == {}


def test_a_new_file_at_a_retired_path_is_a_new_image(folder, tmp_path):
    state = StateDir(str(tmp_path / "state"))
    retired = os.path.join(folder, "C.qcow2")
    with open(retired, "wb") as handle:
        handle.write(b"old")
    retire(state, retired)
    os.unlink(retired)
    with open(retired, "wb") as handle:
        handle.write(b"new")
    assert state.invalid_lookup().why(retired) is None


def test_a_retired_file_renamed_or_linked_is_still_refused(folder, tmp_path):
    state = StateDir(str(tmp_path / "state"))
    retired = os.path.join(folder, "C.qcow2")
    with open(retired, "wb") as handle:
        handle.write(b"old")
    key = image_key(retired)
    retire(state, retired)
    os.link(retired, os.path.join(folder, "hard"))
    os.rename(retired, os.path.join(folder, "renamed"))
    lookup = state.invalid_lookup()
    assert lookup.why(os.path.join(folder, "hard")) is not None
    assert lookup.why(os.path.join(folder, "renamed")) is not None
    assert file_exists(key) is True
    state.forget([])  # pruning keeps an entry whose file lives under another name
    assert state.invalid_lookup().why(os.path.join(folder, "renamed")) is not None


def test_entries_of_an_earlier_version_are_taken_over_or_kept(tmp_path):
    state = StateDir(str(tmp_path / "state"))
    kept, gone = tmp_path / "kept", tmp_path / "gone"
    kept.write_bytes(b"k")
    gone.write_bytes(b"g")
    old_ids = {p: ["file", os.stat(p).st_dev, os.stat(p).st_ino] for p in (kept, gone)}
    os.makedirs(state.path)
    with open(state.registry_path, "w") as handle:  # keyed by path, no lifetime
        json.dump({str(p): {"domain": "vm", "id": old_ids[p]} for p in (kept, gone)}, handle)
    os.unlink(gone)
    reused = reuse_inode(str(tmp_path), old_ids[gone][2])
    lookup = state.invalid_lookup()
    assert lookup.why(str(kept)) is not None
    assert lookup.why(reused) is None
    state.forget([])
    entries = state.invalidated()
    taken_over = [e for e in entries.values() if e.get("path") == str(kept)]
    assert [ImageKey.from_json(e["id"]) for e in taken_over] == [image_key(str(kept))]
    # The entry whose file is not where it was is kept as it was: whether
    # that file is gone cannot be proven from an earlier version's key.
    assert entries[str(gone)] == {"domain": "vm", "id": old_ids[gone]}


def test_a_created_file_is_ours_only_while_it_is_the_same_file(tmp_path):
    folder = str(tmp_path)
    path = os.path.join(folder, "dest.qcow2")
    with open(path, "wb") as handle:
        handle.write(b"ours")
    key = image_key(path)
    record = OperationRecord(operation="relocate", disk="vda", request={}, plan={},
                             created_files=[{"path": path, "id": key.to_json()}])
    assert record.still_ours(record.created_files[0])
    os.unlink(path)
    os.rename(reuse_inode(folder, key.ino), path)  # the admin's new file, at our path, on our number
    assert not record.still_ours(record.created_files[0])
    legacy = dict(record.created_files[0], id=record.created_files[0]["id"][:3])
    assert ImageKey.from_json(legacy["id"]) is None  # not today's form
    assert record.still_ours(legacy)  # an old record can only compare numbers


def test_lock_files_go_with_their_lock(tmp_path):
    state = StateDir(str(tmp_path / "state"))
    with state.disk_lock("u1", "vda", "merge"), state.domain_lock("u1"):
        assert sorted(os.listdir(os.path.join(state.path, "locks"))) == ["u1-records.lock",
                                                                          "u1-vda.lock"]
    with state.stream_lock("u1"):
        pass
    assert os.listdir(os.path.join(state.path, "locks")) == []


def _count(path, rounds, counter):
    state = StateDir(path)
    for _ in range(rounds):
        with state.domain_lock("u"):
            with open(counter) as handle:
                value = int(handle.read())
            with open(counter, "w") as handle:
                handle.write(str(value + 1))


def test_removed_lock_files_still_exclude_each_other(tmp_path):
    """Takers that waited on a file its holder removed start again on the
    new one: no two are ever inside at once (else increments get lost)."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_count, args=(str(tmp_path / "state"), 200, str(counter)))
             for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert counter.read_text() == "800"


def test_recover_sweeps_lock_files_no_one_holds(tmp_path):
    state = StateDir(str(tmp_path / "state"))
    folder = os.path.join(state.path, "locks")
    os.makedirs(folder)
    for n in range(5):  # as earlier versions left them, one per disk ever seen
        open(os.path.join(folder, f"uuid{n}-vda.lock"), "w").close()
    with state.disk_lock("busy", "vda", "merge of busy vda"):
        assert state.sweep_locks() == 5
        assert os.listdir(folder) == ["busy-vda.lock"]  # a held lock is left alone
    assert os.listdir(folder) == []


def test_a_records_owner_is_its_process_for_its_whole_life_only():
    """Liveness by the kernel's identity of the owner (boot, pid, start
    time), whatever its command line (a pipelined Ansible module runs as
    plain python3) or the wall clock says; a zombie is gone; a later
    process on the same pid is not the owner."""
    import subprocess
    import sys
    import time

    from vdsm_blockops.core.lifetime import process_identity
    from vdsm_blockops.engine.node import owner_alive

    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        owner = process_identity(plain.pid)
        assert owner_alive(plain.pid, time.time() - 3600, owner)  # a clock step: still alive
        boot, pid, ticks = owner.split("/")
        later = f"{boot}/{pid}/{int(ticks) + 1}"  # the same pid, another process
        assert not owner_alive(plain.pid, time.time(), later)
        assert not owner_alive(plain.pid, time.time(), f"another-boot/{pid}/{ticks}")
        plain.kill()
        time.sleep(0.3)
        assert not owner_alive(plain.pid, time.time(), owner)  # a zombie is gone
    finally:
        plain.kill()
        plain.wait()
    # An earlier version's record (no owner): the pid, started before it.
    old = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.3)
        assert owner_alive(old.pid, time.time())
        assert not owner_alive(old.pid, time.time() - 3600)  # started after the record
    finally:
        old.kill()
        old.wait()


def test_a_registry_of_0_1_0_still_refuses_its_images(tmp_path):
    """0.1.0 keyed its registry by path, with no identity at all."""
    state = StateDir(str(tmp_path / "state"))
    image = tmp_path / "retired.qcow2"
    image.write_bytes(b"r")
    os.makedirs(state.path)
    old = {str(image): {"domain": "vm", "disk": "vda", "operation": "merge 1",
                        "time": "2026-11-25T20:00:00Z"}}
    with open(state.registry_path, "w") as handle:
        json.dump(old, handle)
    assert state.invalid_lookup().why(str(image))["operation"] == "merge 1"
    state.forget([])  # the next write converts it to today's key
    (entry,) = state.invalidated().values()
    assert ImageKey.from_json(entry["id"]) == image_key(str(image))
    assert state.invalid_lookup().why(str(image)) is not None


def test_a_key_of_an_earlier_device_number_still_matches(tmp_path):
    """A key written with st_dev (before homes): the file system was
    mounted again from another device since; inode and handle still match."""
    state = StateDir(str(tmp_path / "state"))
    image = tmp_path / "retired.qcow2"
    image.write_bytes(b"r")
    now = image_key(str(image))
    os.makedirs(state.path)
    with open(state.registry_path, "w") as handle:
        json.dump({"k": {"path": str(image), "id": ["file", 12345, now.ino, now.life]}}, handle)
    assert state.invalid_lookup().why(str(image)) is not None
    state.forget([])
    assert [ImageKey.from_json(e["id"]) for e in state.invalidated().values()] == [now]


def test_an_entry_of_a_later_version_is_kept_and_matched_by_path(tmp_path):
    state = StateDir(str(tmp_path / "state"))
    image = tmp_path / "retired.qcow2"
    image.write_bytes(b"r")
    os.makedirs(state.path)
    later = {"k9": {"path": str(image), "id": ["file3", {"uuid": "x"}, 1], "domain": "vm"}}
    with open(state.registry_path, "w") as handle:
        json.dump(later, handle)
    assert state.invalid_lookup().why(str(image)) is not None
    state.forget([])
    assert state.invalidated() == later


def test_the_home_of_a_file_is_not_its_device_number(tmp_path):
    key = image_key(str(tmp_path))
    assert key.home and str(os.stat(tmp_path).st_dev) not in key.home.split(":")
