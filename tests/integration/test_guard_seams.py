"""The guard and the node's state at the seams (issue 34), on the real node
with the hook installed: a remount, an upgrade, a typo, a hostile marker,
another local user, a block-device layer, a hung command."""

from __future__ import annotations

import contextlib
import os

import libvirt
import pytest
import rig


@contextlib.contextmanager
def mounted_ext4(workdir: str):
    """An ext4 file system in a file, loop-mounted at ``workdir/mnt``;
    yields a function that mounts it again through another loop device."""
    image = os.path.join(workdir, "fs.ext4")
    rig.run("truncate", "-s", "512M", image)
    rig.run("mkfs.ext4", "-q", image)
    mnt = os.path.join(workdir, "mnt")
    os.makedirs(mnt)
    devices = [rig.run("losetup", "--find", "--show", image).strip()]
    rig.run("mount", devices[0], mnt)
    os.chmod(mnt, 0o755)

    def remount() -> None:
        rig.run("umount", mnt)
        rig.run("losetup", "-d", devices[-1])
        # Hold the freed loop device so the image comes back on another one.
        devices.append(rig.loop_device(workdir, f"hold{len(devices)}", 1))
        devices.append(rig.run("losetup", "--find", "--show", image).strip())
        rig.run("mount", devices[-1], mnt)

    try:
        yield mnt, remount
    finally:
        subprocess_quiet("umount", mnt)
        for dev in devices:
            rig.remove_loop_device(dev)


def subprocess_quiet(*argv: str) -> None:
    import subprocess

    subprocess.run(argv, capture_output=True)


def start_refused(make_vm, path: str, reference: str) -> str:
    """Start a new VM on ``path``; the hook's refusal."""
    stale = make_vm()
    stale.disks["vda"] = rig.Disk(stale, "vda", 0, [path], reference)
    with pytest.raises(libvirt.libvirtError) as refused:
        stale.start()
    return str(refused.value)


def test_a_retired_layer_stays_refused_after_a_remount_from_another_device(
        make_vm, config, installed_hook, workdir):
    with mounted_ext4(workdir) as (mnt, remount):
        vm = make_vm()
        disk = vm.add_chain("vda", rig.four_layers(), directory=os.path.join(mnt, vm.name))
        vm.start()
        A, B, C, D = disk.layers
        rc, out, err = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "commit",
                               config=config)
        assert rc == 0, err
        assert {r["path"] for r in out["retired"] if not r["valid"]} == {C, D}
        vm.destroy()  # the file system is unmounted under no VM
        before = os.stat(C).st_dev
        remount()
        assert os.stat(C).st_dev != before, "the same device number again: this proves nothing"
        assert "invalidated" in start_refused(make_vm, C, disk.reference)
        # And a registry write meanwhile (another retirement, here: none)
        # keeps the entry: its file system is mounted, the file is there.
        rc, out, err = rig.cli("recover", config=config)
        assert rc == 0, err
        assert "invalidated" in start_refused(make_vm, D, disk.reference)


def test_a_config_typo_still_refuses_an_invalidated_image(make_vm, config, installed_hook):
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers())
    vm.start()
    A, B, C, D = disk.layers
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", B, "--strategy", "commit",
                           config=config)
    assert rc == 0, err
    with open(config, "a") as handle:  # a typo, and a newer version's key
        handle.write("storage_root: [/srv]\nvolume_extend_command: [lvextend]\n")
    assert "invalidated" in start_refused(make_vm, D, disk.reference)
    vm.restart()  # its own verified chain still starts
    disk.assert_guest_data()


def test_hostile_markers_neither_stall_nor_open_the_guard(make_vm, config, installed_hook):
    from vdsm_blockops.core.migrate_plan import marker_name

    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers())
    vm.start()
    A, B, C, D = disk.layers
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", B, "--strategy", "commit",
                           config=config)
    assert rc == 0, err
    os.mkfifo(os.path.join(vm.dir, marker_name("fifo")))
    os.symlink("/dev/zero", os.path.join(vm.dir, marker_name("zero")))
    import time

    started = time.monotonic()
    assert "invalidated" in start_refused(make_vm, D, disk.reference)
    assert time.monotonic() - started < 10
    vm.restart()  # older than the markers: they could not name its images
    disk.assert_guest_data()


def test_another_user_holding_a_lock_delays_no_operation_past_its_timeout(vm4, config, workdir):
    import subprocess
    import time

    state = os.path.join(workdir, "state")
    locks = os.path.join(state, "locks")
    os.makedirs(locks)
    for folder in (state, locks):  # as earlier versions left it
        os.chmod(folder, 0o755)
    lock = os.path.join(locks, "registry.lock")
    open(lock, "a").close()
    os.chmod(lock, 0o644)
    holder = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3",
         "-c", "import fcntl,sys,time; f=open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); "
               "print('held', flush=True); time.sleep(300)", lock], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        disk = vm4.disks["vda"]
        A, B, C, D = disk.layers
        started = time.monotonic()
        rc, out, err = rig.cli("merge", vm4.name, "vda", "--base", B, "--strategy", "commit",
                               "--timeout", "10", config=config)
        assert time.monotonic() - started < 20
        assert rc == 3 and "registry.lock" in out["error"]["message"], out
    finally:
        holder.kill()
        holder.wait()
    # The folder is root's alone now: that user cannot open a lock again.
    assert os.stat(state).st_mode & 0o077 == 0
    probe = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3",
         "-c", "import sys; open(sys.argv[1], 'a')", lock], capture_output=True, text=True)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr
    rc, out, err = rig.cli("recover", vm4.name, config=config)
    assert rc == 0, err
    rc, out, err = rig.cli("verify", vm4.name, config=config)
    assert rc == 0 and out["ok"], out
    disk.assert_guest_data()
    assert "invalidated" in start_refused_by_registry(config, D)


def start_refused_by_registry(config: str, path: str) -> str:
    """The registry's entry for ``path``, as the guard would read it."""
    from vdsm_blockops.core.config import load_config
    from vdsm_blockops.engine.state import StateDir

    why = StateDir(load_config(config).state_dir).invalid_lookup().why(path)
    return "invalidated" if why else "not invalidated"


def test_a_move_record_of_a_later_version_stops_only_its_own_domain(vm4, config, workdir):
    import json

    folder = os.path.join(workdir, "state", "migrations")
    os.makedirs(folder, mode=0o700)
    later = os.path.join(folder, "0b5e8f2e-0000-4000-8000-000000000001.json")
    body = json.dumps({"domain": "elsewhere", "uuid": "0b5e8f2e-0000-4000-8000-000000000001",
                       "dest_uri": "qemu+tcp://node-c/system", "phase": "moved", "request": {},
                       "plan": {}, "proof": "sample"})  # a field this version does not know
    with open(later, "w") as handle:
        handle.write(body)
    rc, out, err = rig.cli("jobs", config=config)
    assert rc == 0, err
    assert [o["phase"] for o in out["operations"] if o["domain"] == "elsewhere"] == ["unreadable"]
    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    rc, out, err = rig.cli("merge", vm4.name, "vda", "--base", B, config=config)
    assert rc == 0, err
    rc, out, err = rig.cli("recover", vm4.name, config=config)
    assert rc == 0, err
    queue = os.path.join(workdir, "state", "queue")
    os.makedirs(queue)
    open(os.path.join(queue, vm4.name), "w").close()
    rc, out, err = rig.cli("recover", "--queued", config=config)
    assert rc == 0, err
    assert not os.path.exists(os.path.join(workdir, "state", "failed", vm4.name))
    rc, out, err = rig.cli("recover", config=config)  # every domain: that one is reported
    assert rc != 0 and [r["result"] for r in out["records"]
                        if r["domain"] == "elsewhere"] == ["unreadable"], out
    rc, out, err = rig.cli("abort", "elsewhere", "all", config=config)
    assert rc == 1 and "cannot read" in out["error"]["message"], out
    with open(later) as handle:
        assert handle.read() == body  # kept byte for byte
    disk.assert_guest_data()
