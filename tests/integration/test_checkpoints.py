"""Incremental-backup checkpoints survive every operation, judged by
libvirt's own incremental backup: after the operation, a push-mode backup
from a checkpoint taken before it must copy exactly the guest's writes since
(domjobinfo's "File processed") and hold their patterns."""

import os
import signal
import subprocess
import time

import pytest
import rig
from rig import Write
from test_relocate import chain_vm, relocate

# 1 MiB per write, plus at most one 64 KiB bitmap granule of slack
INCREMENTAL = {2: ("2.000 MiB", "2.062 MiB"), 3: ("3.000 MiB", "3.062 MiB")}

# Run on A <- B <- C <- D <- E, E a snapshot taken after the checkpoint:
# the checkpoint's bitmap then lives in D and E, and each operation must
# merge or carry both copies.
LIVE_CASES = {
    "pull": ("merge", "vda", "--base", "{B}", "--strategy", "pull"),
    "active-commit": ("merge", "vda", "--base", "{B}", "--strategy", "commit"),
    "internal-commit": ("merge", "vda", "--top", "{C}", "--base", "{A}", "--strategy", "commit"),
    "snapshot": ("snapshot", "vda", "{dest}"),
    "relocate-chain": ("relocate", "vda", "{dest}", "--mode", "chain"),
    "relocate-shallow": ("relocate", "vda", "{dest}", "--mode", "shallow"),
    "relocate-full-mirror": ("relocate", "vda", "{dest}", "--mode", "full", "--method", "mirror"),
    "relocate-full-snapshot-stream": ("relocate", "vda", "{dest}", "--mode", "full",
                                      "--method", "snapshot-stream"),
}


def checkpoint(vm, name="cp1"):
    rig.virsh("checkpoint-create-as", vm.name, name, "--diskspec", "vda,checkpoint=bitmap")


def assert_checkpoints_clean(vm, config):
    rc, out, _ = rig.cli("verify", vm.name, "--checkpoints", config=config)
    assert rc == 0 and out["broken_checkpoints"] == [], out


def write_since(disk, writes, pattern, offset_mib):
    disk.guest_write(pattern, offset_mib, 1)
    writes.append(Write(pattern, offset_mib, 1))


def checkpoint_then_snapshot(vm, disk, config, workdir):
    """cp1, a guest write, a snapshot E, a guest write: cp1's bitmap now
    lives in D and E. Returns the writes since cp1."""
    checkpoint(vm)
    since: list[Write] = []
    write_since(disk, since, 0x91, 50)
    rc, _, err = rig.cli("snapshot", vm.name, "vda", f"{workdir}/E.qcow2", config=config)
    assert rc == 0, err
    write_since(disk, since, 0x92, 60)
    return since


@pytest.mark.parametrize("case", list(LIVE_CASES))
def test_live_operations_keep_a_checkpoint(make_vm, config, workdir, case):
    vm, disk = chain_vm(make_vm)
    A, B, C, D = disk.layers
    since = checkpoint_then_snapshot(vm, disk, config, workdir)
    os.makedirs(f"{workdir}/pool2")
    args = [a.format(A=A, B=B, C=C, dest=f"{workdir}/pool2/moved.qcow2") for a in LIVE_CASES[case]]
    rc, out, err = rig.cli(args[0], vm.name, *args[1:], config=config)
    assert rc == 0, (out, err)
    assert_checkpoints_clean(vm, config)
    write_since(disk, since, 0x93, 40)
    disk.assert_guest_data()
    backup = f"{workdir}/inc.qcow2"
    assert rig.incremental_backup(vm, "cp1", backup) in INCREMENTAL[3]
    rig.assert_backup_holds(backup, since)


COLD_CASES = {
    "snapshot": ("snapshot", "vda", "{dest}"),
    "chain-relocation": ("relocate", "vda", "{dest}", "--mode", "chain"),
    "shallow-relocation": ("relocate", "vda", "{dest}", "--mode", "shallow"),
    "full-relocation": ("relocate", "vda", "{dest}", "--mode", "full"),
    "commit": ("merge", "vda", "--base", "{B}", "--strategy", "commit"),
    "pull": ("merge", "vda", "--base", "{B}", "--strategy", "pull"),
}


@pytest.mark.parametrize("case", list(COLD_CASES))
def test_cold_operations_keep_a_checkpoint_across_a_snapshot(make_vm, config, workdir, case):
    """A checkpoint older than a snapshot has its bitmap in two layers;
    qemu-img moves data, not bitmaps: the copies are carried and merged
    (and a cold snapshot's overlay gets its own), so after each cold
    operation the next backup from the checkpoint is still incremental and
    holds both writes."""
    vm, disk = chain_vm(make_vm)
    B = disk.layers[1]
    since = checkpoint_then_snapshot(vm, disk, config, workdir)
    vm.dom.destroy()  # QEMU stores the bitmaps as it closes the images
    os.makedirs(f"{workdir}/pool2")
    args = [a.format(dest=f"{workdir}/pool2/moved.qcow2", B=B) for a in COLD_CASES[case]]
    rc, out, err = rig.cli(args[0], vm.name, *args[1:], config=config)
    assert rc == 0, (out, err)
    assert out["online"] is False
    assert_checkpoints_clean(vm, config)
    vm.dom.create()
    disk.assert_guest_data()
    backup = f"{workdir}/inc.qcow2"
    assert rig.incremental_backup(vm, "cp1", backup) in INCREMENTAL[2]
    rig.assert_backup_holds(backup, since)


def test_full_relocation_mirrors_a_disk_with_a_checkpoint(make_vm, config, workdir):
    """qemu-img would drop the bitmaps of the layers it flattens: auto picks
    the mirror for a disk a checkpoint tracks (libvirt keeps the checkpoint
    usable), explicit flatten is refused."""
    vm, disk = chain_vm(make_vm)

    def bitmaps():
        rc, out, _ = rig.cli("chain", vm.name, "vda", config=config)
        assert rc == 0, out
        return [[b["name"] for b in layer["bitmaps"]] for layer in out["disks"][0]["chain"]]

    checkpoint(vm)
    assert bitmaps() == [["cp1"], [], [], []]  # QEMU's, not yet in the file: libvirt says
    since: list[Write] = []
    write_since(disk, since, 0x81, 50)
    dest = f"{workdir}/full.qcow2"
    rc, out, err = relocate(vm, config, "vda", dest, "--mode", "full", "--method", "flatten")
    assert rc == 2 and "cp1" in out["error"]["message"] and not os.path.exists(dest)
    rc, out, err = relocate(vm, config, "vda", dest, "--mode", "full")
    assert rc == 0, err
    assert out["method"] == "mirror" and disk.live_chain() == [dest]
    assert bitmaps() == [["cp1"]]
    write_since(disk, since, 0x82, 60)
    backup = f"{workdir}/inc.qcow2"
    assert rig.incremental_backup(vm, "cp1", backup) in INCREMENTAL[2]
    rig.assert_backup_holds(backup, since)
    disk.assert_guest_data()
    vm.dom.destroy()  # QEMU stores the bitmap in DEST as it closes it
    assert bitmaps() == [["cp1"]]


def test_verify_tells_a_broken_checkpoint_apart(make_vm, config, workdir):
    """A checkpoint whose bitmap is gone from the active layer: verify
    warns (exit 0), ``verify --checkpoints`` fails; a good one passes both."""
    vm, disk = chain_vm(make_vm)
    D = disk.layers[-1]
    for name in ("good", "lost"):
        checkpoint(vm, name)
    assert_checkpoints_clean(vm, config)
    vm.dom.destroy()  # QEMU stores both bitmaps in D as it closes it
    subprocess.run(["qemu-img", "bitmap", "--remove", D, "lost"], check=True, capture_output=True)
    rc, out, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, out
    (broken,) = out["broken_checkpoints"]
    assert "checkpoint lost is broken" in broken and "must be full" in broken
    rc, out, _ = rig.cli("verify", vm.name, "--checkpoints", config=config)
    assert rc == 1 and out["problems"] == [broken]


def test_an_operation_on_a_disk_with_a_broken_checkpoint(make_vm, config, workdir):
    """A checkpoint already broken before a merge: the merge still
    succeeds, verify keeps reporting it, and the good checkpoint still
    gives an exact incremental backup."""
    vm, disk = chain_vm(make_vm)
    A, B, C, D = disk.layers
    for name in ("good", "lost"):
        checkpoint(vm, name)
    vm.dom.destroy()
    subprocess.run(["qemu-img", "bitmap", "--remove", D, "lost"], check=True, capture_output=True)
    vm.dom.create()
    since: list[Write] = []
    write_since(disk, since, 0x71, 50)
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", B, "--strategy", "commit", config=config)
    assert rc == 0, (out, err)
    rc, out, _ = rig.cli("verify", vm.name, "--checkpoints", config=config)
    assert rc == 1 and len(out["broken_checkpoints"]) == 1, out
    assert "checkpoint lost is broken" in out["broken_checkpoints"][0]
    write_since(disk, since, 0x72, 60)
    disk.assert_guest_data()
    backup = f"{workdir}/inc.qcow2"
    assert rig.incremental_backup(vm, "good", backup) in INCREMENTAL[2]
    rig.assert_backup_holds(backup, since)


def spoil_bitmaps(image):
    """A disabled bitmap, and one a writer died holding (in-use, inconsistent)."""
    rig.run("qemu-img", "bitmap", "--add", image, "off", "--disable")
    rig.run("qemu-img", "bitmap", "--add", image, "stale")
    writer = subprocess.Popen(["qemu-io", "-f", "qcow2", "-c", "sleep 60000", image])
    time.sleep(1)  # opened read-write: every bitmap marked in-use
    writer.send_signal(signal.SIGKILL)
    writer.wait()


def file_bitmaps(image):
    from vdsm_blockops.engine.images import read_chain

    return {b.name: set(b.flags) for b in read_chain(image, "qcow2")[0].bitmaps}


def test_commits_and_unusable_bitmaps_in_the_base(make_vm, config, workdir):
    """With the VM running, a commit into a base holding unusable bitmaps
    succeeds and says they stay (QEMU gives no write access to the base);
    with the VM off they are removed first and the checkpoint's bitmaps
    carried: its next backup is exact."""
    vm, disk = chain_vm(make_vm)
    A, B, C, D = disk.layers
    vm.dom.destroy()
    spoil_bitmaps(B)
    assert file_bitmaps(B) == {"off": {"in-use"}, "stale": {"in-use", "auto"}}
    vm.dom.create()
    rc, out, err = rig.cli("merge", vm.name, "vda", "--top", C, "--base", A, "--strategy", "commit",
                           config=config)
    assert rc == 0 and out["result_image"] == B, (out, err)
    assert "off, stale are inconsistent or disabled and stay" in err
    checkpoint(vm)
    since: list[Write] = []
    write_since(disk, since, 0x61, 50)
    vm.dom.destroy()
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "commit", config=config)
    assert rc == 0 and out["chain_after"] == [B, A], (out, err)
    assert "removing bitmap off" in err and "removing bitmap stale" in err
    assert file_bitmaps(B) == {"cp1": {"auto"}}
    assert_checkpoints_clean(vm, config)
    vm.dom.create()
    write_since(disk, since, 0x62, 60)
    disk.assert_guest_data()
    backup = f"{workdir}/inc.qcow2"
    assert rig.incremental_backup(vm, "cp1", backup) in INCREMENTAL[2]
    rig.assert_backup_holds(backup, since)
