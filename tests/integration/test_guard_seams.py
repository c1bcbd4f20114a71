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


def merged_vm(make_vm, config):
    """A running VM whose C and D were committed into B: D is retired,
    invalid."""
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers())
    vm.start()
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", disk.layers[1], "--strategy",
                           "commit", config=config)
    assert rc == 0, err
    return vm, disk


def test_a_config_typo_still_refuses_an_invalidated_image(make_vm, config, installed_hook):
    vm, disk = merged_vm(make_vm, config)
    A, B, C, D = disk.layers
    with open(config, "a") as handle:  # a typo, and a newer version's key
        handle.write("storage_root: [/srv]\nvolume_extend_command: [lvextend]\n")
    assert "invalidated" in start_refused(make_vm, D, disk.reference)
    vm.restart()  # its own verified chain still starts
    disk.assert_guest_data()


def test_hostile_markers_neither_stall_nor_open_the_guard(make_vm, config, installed_hook):
    from vdsm_blockops.core.migrate_plan import marker_name

    vm, disk = merged_vm(make_vm, config)
    A, B, C, D = disk.layers
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


VOLUME_TOOL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "volume-tool")


def chain_with_a_volume(make_vm, workdir, name: str, link: bool = False):
    """A (raw) <- B <- C (qcow2 on a loop device: a stand-in LV; through a
    symlink as LVM's /dev/vg/lv with ``link``) <- D, running."""
    from rig import LayerSpec, Write

    vm = make_vm()
    if link:
        rig.run(VOLUME_TOOL, "create", vm.dir, "C-volume", str(64 * rig.MIB))
        volume = os.path.join(vm.dir, "C-volume")
    else:
        volume = rig.loop_device(workdir, name, 64)
    disk = vm.add_layers("vda", [
        (f"{vm.dir}/A.raw", None, LayerSpec("A", [Write(0xA1, 0, 4)], fmt="raw")),
        (f"{vm.dir}/B.qcow2", f"{vm.dir}/A.raw", LayerSpec("B", [Write(0xB1, 4, 1)])),
        (volume, f"{vm.dir}/B.qcow2", LayerSpec("C", [Write(0xC1, 6, 2)])),
        (f"{vm.dir}/D.qcow2", volume, LayerSpec("D", [Write(0xD1, 9, 1)]))])
    vm.start()
    return vm, disk, volume


@pytest.mark.parametrize("remover", [False, True], ids=["no-remove-command", "remove-command"])
def test_delete_retired_never_unlinks_a_dev_node(make_vm, config, workdir, remover):
    vm, disk, volume = chain_with_a_volume(make_vm, workdir, "C", link=remover)
    A, B, C, D = disk.layers
    node = os.path.realpath(C)
    if remover:
        with open(config, "a") as handle:
            handle.write(f'volume_remove_command: [{VOLUME_TOOL}, remove, "{{path}}"]\n')
    try:
        rc, out, err = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "commit",
                               "--delete-retired", config=config)
        assert rc == 0, err
        assert {r["path"] for r in out["retired"] if not r["valid"]} == {C, D}
        assert os.path.exists(node) and rig.is_device(node)  # the /dev node stays
        if remover:  # removed as a volume, then forgotten
            assert set(out["deleted"]) == {C, D} and not os.path.lexists(C)
        else:  # kept, said so, and still refused
            assert out["deleted"] == [D]
            assert [k["path"] for k in out["kept"]] == [C] and "volume" in out["kept"][0]["why"]
            assert start_refused_by_registry(config, C) == "invalidated"
        disk.assert_guest_data()
    finally:
        if not remover:
            rig.remove_loop_device(volume)


def test_a_hung_extend_command_ends_within_the_timeout_with_its_children(
        make_vm, config, workdir):
    import subprocess
    import time

    from rig import LayerSpec, Write

    vm = make_vm()
    B = rig.loop_device(workdir, "B", 8)
    try:
        disk = vm.add_layers("vda", [
            (f"{vm.dir}/A.raw", None, LayerSpec("A", [Write(0xA1, 0, 8)], fmt="raw")),
            (B, f"{vm.dir}/A.raw", LayerSpec("B", [Write(0xB1, 4, 1)])),
            (f"{vm.dir}/C.qcow2", B, LayerSpec("C", [Write(0xC1, 10, 16)])),
            (f"{vm.dir}/D.qcow2", f"{vm.dir}/C.qcow2", LayerSpec("D", [Write(0xD1, 30, 1)]))])
        vm.start()
        A, _, C, D = disk.layers
        marker = f"hung-extend-{vm.name}"
        with open(config, "a") as handle:  # an lvextend waiting on a busy volume group
            handle.write("volume_margin_mib: 4\n"
                         f'volume_extend_command: [sh, -c, "sleep 60 # {marker}", "{{path}}", '
                         '"{size_bytes}"]\n')
        started = time.monotonic()
        rc, out, err = rig.cli("merge", vm.name, "vda", "--top", C, "--base", A, "--strategy",
                               "commit", "--timeout", "5", config=config)
        assert time.monotonic() - started < 15
        assert rc == 3 and "extension" in out["error"]["message"], out
        time.sleep(0.5)
        left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
        assert not left, f"the extend command outlived the operation: pids {left}"
        assert disk.chain() == [D, C, B, A]
        rc, out, err = rig.cli("verify", vm.name, config=config)
        assert rc == 0 and out["ok"], out
        disk.assert_guest_data()
    finally:
        vm.destroy()
        rig.remove_loop_device(B)


def test_abort_stops_an_operation_whose_command_line_does_not_name_the_tool(
        make_vm, config, workdir):
    """As an Ansible module run with pipelining: plain python reading its
    program from stdin; its command line names no vdsm-blockops."""
    import subprocess
    import sys
    import time

    from rig import LayerSpec, Write

    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 24)]),
                                LayerSpec("B", [Write(0x22, 30, 1)])])
    vm.start()
    A, B = disk.layers
    dest = os.path.join(workdir, "flat.qcow2")
    program = ("import sys\nfrom vdsm_blockops.shells.cli import main\n"
               f"sys.exit(main({['relocate', vm.name, 'vda', dest, '--mode', 'full', '--method', 'flatten', '--bandwidth', '1', '--json', '--config', config]!r}))\n")
    proc = subprocess.Popen([sys.executable], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write(program)
    proc.stdin.close()
    with open(f"/proc/{proc.pid}/cmdline", "rb") as handle:
        assert b"blockops" not in handle.read()
    deadline = time.monotonic() + 30
    while True:
        rc, out, err = rig.cli("jobs", vm.name, config=config)
        if out["operations"]:
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    assert out["operations"][0]["running"] is True, out
    rc, out, err = rig.cli("abort", vm.name, "vda", config=config)
    assert rc == 0 and [r["result"] for r in out["recover"]] == ["rolled-back"], (out, err)
    assert proc.wait(timeout=10) != 0  # stopped, not left copying on
    assert not os.path.exists(dest) and disk.live_chain() == [B, A]
    disk.assert_guest_data()


def test_a_latin1_backing_name_passes_the_guard_and_hostile_names_are_escaped(make_vm, config,
                                                                   installed_hook, workdir):
    import json
    import subprocess

    from rig import LayerSpec, Write

    vm = make_vm()
    base = os.path.join(vm.dir, "caf\udce9.raw")  # b"caf\xe9.raw": no UTF-8, QEMU opens it
    subprocess.run([b"qemu-img", b"create", b"-q", b"-f", b"raw", os.fsencode(base), b"64M"],
                   check=True)
    subprocess.run([b"qemu-io", b"-f", b"raw", b"-c", b"write -P 0x41 0 4M", os.fsencode(base)],
                   check=True, capture_output=True)
    top = os.path.join(vm.dir, "vda-top.qcow2")
    subprocess.run([b"qemu-img", b"create", b"-q", b"-f", b"qcow2", b"-F", b"raw", b"-b",
                    b"caf\xe9.raw", os.fsencode(top)], check=True)
    disk = vm.add_layers("vda", [(top, None, LayerSpec("top", [Write(0x42, 8, 1)]))])
    # The guard finds the file QEMU would open and lets the start go on;
    # libvirt 9.0 itself then fails on the name (it puts it into QMP JSON
    # as text: "failed to convert virJSONValue to yajl data").
    with pytest.raises(libvirt.libvirtError) as failed:
        vm.start()
    assert "vdsm-blockops" not in str(failed.value) and "yajl" in str(failed.value)
    rc, out, err = rig.cli("chain", vm.name, config=config)
    assert rc == 0 and out["disks"][0]["chain"][1]["path"] == base, out
    # A name with a newline and an ESC, missing: one history line, no
    # escape sequence printed.
    hostile = make_vm()
    evil = os.path.join(hostile.dir, "vda-evil.qcow2")
    rig.run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-u", "-b",
            "gone\n{\"forged\": 1}\x1b[2J.qcow2", evil, "64M")
    hostile.disks["vda"] = rig.Disk(hostile, "vda", 0, [evil], disk.reference)
    history = os.path.join(workdir, "state", "history.jsonl")
    before = open(history).read().count("\n") if os.path.exists(history) else 0
    with pytest.raises(libvirt.libvirtError) as refused:
        hostile.start()
    assert "missing" in str(refused.value) and "\x1b" not in str(refused.value)
    with open(history) as handle:
        lines = handle.read().splitlines()
    assert len(lines) == before + 1 and json.loads(lines[-1])["outcome"] == "refused"
    import sys

    shown = subprocess.run([sys.executable, "-m", "vdsm_blockops", "history", "--config", config],
                           capture_output=True, text=True)
    assert shown.returncode == 0 and "refused" in shown.stdout
    assert "\x1b" not in shown.stdout and "gone\\x0a" in shown.stdout, shown.stdout


def test_a_start_racing_a_shut_off_relocation_loses_no_write(make_vm, config, workdir):
    """No hook installed: the copies' image locks alone make the start
    fail while they run; the relocation then completes and the VM starts
    on the copy with every write."""
    import time

    from rig import LayerSpec, Write

    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 12)]),
                                LayerSpec("B", [Write(0x22, 20, 4)])])
    vm.define()
    dest = os.path.join(workdir, "moved", "vda.qcow2")
    os.makedirs(os.path.dirname(dest))
    proc = rig.cli_background("relocate", vm.name, "vda", dest, "--bandwidth", "2",
                              config=config)
    deadline = time.monotonic() + 30
    while not os.path.exists(dest) or os.path.getsize(dest) < 1024 * 1024:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    with pytest.raises(libvirt.libvirtError) as refused:
        vm.dom.create()
    assert "lock" in str(refused.value), refused.value
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out, err)
    vm.dom.create()
    assert disk.live_chain()[0] == dest
    disk.guest_write(0x33, 30, 1)
    disk.assert_guest_data()
