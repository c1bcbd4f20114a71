"""Identity has a lifetime, on the real node: a retired layer deleted by
hand hands its inode number (and its path) to the next image, and that new
image is another image -- its VM boots with the hook installed, verify
passes -- while the retired file itself, under any name, stays refused.
And one damaged neighbour never blocks the node."""

import os
import subprocess

import libvirt
import pytest
import rig
from rig import LayerSpec


def test_new_images_on_retired_numbers_and_paths_boot(make_vm, config, installed_hook):
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers())
    vm.start()
    A, B, C, D = disk.layers
    retired_numbers = {os.stat(p).st_ino for p in (C, D)}
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "commit",
                           config=config)
    assert rc == 0, err
    assert {r["path"] for r in out["retired"] if not r["valid"]} == {C, D}
    new = make_vm()  # its folder first: a folder takes an inode number too
    # The operator deletes one retired layer by hand and keeps the other
    # under another name (and a hard link).
    os.unlink(C)
    kept = os.path.join(vm.dir, "old-D.qcow2")
    os.rename(D, kept)
    os.link(kept, os.path.join(vm.dir, "D-link.qcow2"))
    # A new VM whose images are made where the retired ones were: at their
    # paths, and in their folder (ext4 hands the freed numbers on to the
    # next files made there).
    spare = os.path.join(vm.dir, "vdz-N0.qcow2")
    for path, backing, pattern in ((spare, None, 0x31), (C, spare, 0x32), (D, C, 0x33)):
        rig.run("qemu-img", "create", "-q", "-f", "qcow2", *(["-b", backing, "-F", "qcow2"]
                                                             if backing else []), path, "64M")
        rig.run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {pattern - 0x31}M 1M", path)
    new_disk = new.add_layers("vda", [(spare, None, LayerSpec("N0")), (C, spare, LayerSpec("N1")),
                                      (D, C, LayerSpec("N2"))], reference_from=D)
    reused = [p for p in new_disk.layers if os.stat(p).st_ino in retired_numbers]
    assert reused, "no new image got a retired inode number: this run proves nothing"
    new.start()  # the hook lets it boot
    new_disk.guest_write(0x34, 3, 1)
    new_disk.assert_guest_data()
    rc, out, err = rig.cli("verify", new.name, config=config)
    assert rc == 0 and out["ok"], out
    # The retired file itself is refused under any of its names.
    for name in (kept, os.path.join(vm.dir, "D-link.qcow2")):
        stale = make_vm()
        stale.disks["vda"] = rig.Disk(stale, "vda", 0, [name], disk.reference)
        with pytest.raises(libvirt.libvirtError) as refused:
            stale.start()
        assert "invalidated" in str(refused.value)
    # The merged VM restarts on its verified chain, its data intact.
    vm.restart()
    disk.assert_guest_data()


def nul_in_backing_name(path: str, good_backing: str) -> None:
    """Write ``good_backing + "\\0junk"`` as ``path``'s backing name (a
    header a buggy tool or a bit flip could leave)."""
    rig.run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", good_backing + "XXXXX",
            "-F", "qcow2", path, "64M")
    with open(path, "r+b") as handle:
        header = handle.read(4096)
        at = header.index((good_backing + "XXXXX").encode())
        handle.seek(at + len(good_backing))
        handle.write(b"\0junk")


def test_a_damaged_neighbour_does_not_block_the_node(make_vm, config, workdir):
    damaged = make_vm()
    base = os.path.join(damaged.dir, "base.qcow2")
    rig.run("qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
    top = os.path.join(damaged.dir, "top.qcow2")
    nul_in_backing_name(top, base)
    damaged.add_layers("vda", [(base, None, LayerSpec("base")), (top, base, LayerSpec("top"))])
    damaged.define()
    # Its header is read as QEMU reads it: the name ends at the NUL byte.
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", top],
                          capture_output=True, text=True, check=True).stdout
    assert base in info
    # Operations elsewhere on the node go on.
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers())
    vm.start()
    A, B, C, D = disk.layers
    disk.guest_write(0x5A, 5, 1)
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "pull",
                           config=config)
    assert rc == 0, (out, err)
    assert disk.live_chain() == [D, A]
    disk.assert_guest_data()
    # The damaged VM's own chain is reported, one JSON object.
    rc, out, err = rig.cli("chain", damaged.name, config=config)
    assert rc in (0, 1, 4), err
    assert isinstance(out, dict)
    # What the damaged header names still counts as used: no commit into it.
    sharer = make_vm()
    sharer.add_overlay_on("vda", damaged.disks["vda"], base)
    sharer.start()
    rc, out, err = rig.cli("merge", sharer.name, "vda", "--strategy", "commit", config=config)
    assert rc == 2 and damaged.name in out["error"]["message"], (out, err)
    sharer.disks["vda"].assert_guest_data()


def test_a_plan_made_on_a_chain_another_command_changed_is_refused(vm4, config, workdir,
                                                                     monkeypatch):
    """A relocation planned on A <- B <- C <- D; before it takes the disk's
    lock, another command commits the chain into A. Run on its old plan,
    the relocation would copy the retired layers and pivot the VM back onto
    them: it must stop with a conflict, nothing changed."""
    from vdsm_blockops.core import errors
    from vdsm_blockops.core.config import load_config
    from vdsm_blockops.engine.context import Context
    from vdsm_blockops.ops.relocate import Relocate, RelocateRequest, relocate
    from vdsm_blockops.virt import open_connection

    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    folder = os.path.join(workdir, "moved")
    os.makedirs(folder)
    dest = os.path.join(folder, "vda.qcow2")
    planned = Relocate.check_plans

    def meanwhile(self, plans):
        planned(self, plans)
        rc, out, err = rig.cli("merge", vm4.name, "vda", "--base", A, "--strategy", "commit",
                               config=config)
        assert rc == 0, err

    monkeypatch.setattr(Relocate, "check_plans", meanwhile)
    conn = open_connection(rig.TEST_URI)
    try:
        with pytest.raises(errors.Conflict, match="changed while"):
            relocate(Context(conn=conn, config=load_config(config)),
                     RelocateRequest(domain=vm4.name, disk="vda", dest=dest, mode="chain"))
    finally:
        conn.close()
    assert disk.live_chain() == [B, A]  # the commit's result: nothing undone
    assert os.listdir(folder) == []
    disk.guest_write(0x6B, 6, 1)
    disk.assert_guest_data()
