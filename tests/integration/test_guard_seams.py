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
