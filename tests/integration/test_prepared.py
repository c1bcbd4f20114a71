"""Prepared targets (--reuse-external), the way oVirt's engine prepares a
storage migration: empty images of the chain's shape at the destination.
Each gets its source layer's data before the VM is relinked onto it --
live and shut off -- and one that does not fit is refused, nothing
changed."""

import os

import pytest
import rig


def prepare_chain(folder, layers, size_mib=64, below=None):
    """Empty qcow2 images named as ``layers``, each backing onto the one
    before it (the first onto ``below``): the engine's prepared volumes."""
    os.makedirs(folder, exist_ok=True)
    made = []
    for path in layers:
        new = os.path.join(folder, os.path.basename(path))
        backing = made[-1] if made else below
        argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if backing:
            argv += ["-b", backing, "-F", "qcow2"]
        rig.run(*argv, new, f"{size_mib}M")
        made.append(new)
    return made


@pytest.mark.parametrize("running", [True, False], ids=["live", "cold"])
def test_chain_onto_prepared_layers_carries_every_layer(vm4, config, workdir, running):
    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    disk.guest_write(0x61, 6, 1)
    if not running:
        vm4.dom.destroy()
    new = prepare_chain(os.path.join(workdir, "sd2"), [A, B, C, D])
    args = ["relocate", vm4.name, "vda", new[-1], "--mode", "chain", "--reuse-external"]
    if not running:
        args.append("--delete-source")
    rc, out, err = rig.cli(*args, config=config)
    assert rc == 0 and out["verified"], (out, err)
    assert disk.chain() == new[::-1]
    if running:
        disk.guest_write(0x62, 7, 1)
    else:
        assert not any(os.path.exists(p) for p in (A, B, C, D))  # the only copy is the new one
    disk.assert_guest_data()
    rc, out, err = rig.cli("verify", vm4.name, config=config)
    assert rc == 0 and out["ok"], out
    if not running:
        vm4.dom.create()
        disk.guest_write(0x63, 8, 1)
        disk.assert_guest_data()


def test_cold_shallow_onto_a_prepared_overlay_carries_the_latest_writes(vm4, config, workdir):
    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    disk.guest_write(0x64, 9, 2)  # only in D
    vm4.dom.destroy()
    (dest,) = prepare_chain(os.path.join(workdir, "sd2"), [D], below=C)
    rc, out, err = rig.cli("relocate", vm4.name, "vda", dest, "--mode", "shallow",
                           "--reuse-external", "--delete-source", config=config)
    assert rc == 0 and out["verified"], (out, err)
    assert disk.chain() == [dest, C, B, A] and not os.path.exists(D)
    disk.assert_guest_data()
    vm4.dom.create()
    disk.assert_guest_data()


@pytest.mark.parametrize("running", [True, False], ids=["live", "cold"])
def test_a_prepared_target_that_does_not_fit_is_refused(vm4, config, workdir, running):
    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    if not running:
        vm4.dom.destroy()
    folder = os.path.join(workdir, "sd2")
    wrong_backing = os.path.join(folder, "on-B.qcow2")
    wrong_size = os.path.join(folder, "small.qcow2")
    with_data = os.path.join(folder, "used.qcow2")
    os.makedirs(folder)
    rig.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", B, "-F", "qcow2", wrong_backing, "64M")
    rig.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", D, "-F", "qcow2", wrong_size, "32M")
    # data written first, then linked (the running VM holds D's lock)
    rig.run("qemu-img", "create", "-q", "-f", "qcow2", with_data, "64M")
    rig.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x66 0 1M", with_data)
    rig.run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", D, "-F", "qcow2", with_data)
    before = {p: os.stat(p).st_mtime_ns for p in (wrong_backing, wrong_size, with_data)}
    for overlay, why in ((wrong_backing, "not " + D), (wrong_size, "virtual size"),
                         (with_data, "holds data")):
        rc, out, err = rig.cli("snapshot", vm4.name, "vda", overlay, "--reuse-external",
                               config=config)
        assert rc == 2 and why in out["error"]["message"], (overlay, out, err)
    # A shallow DEST must back onto C (the old chain below the active layer).
    rc, out, err = rig.cli("relocate", vm4.name, "vda", wrong_backing, "--mode", "shallow",
                           "--reuse-external", config=config)
    assert rc == 2 and "not " + C in out["error"]["message"], (out, err)
    # A prepared chain whose middle layer backs onto the wrong image.
    new = prepare_chain(os.path.join(workdir, "sd3"), [A, B])
    rig.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", new[0], "-F", "qcow2",
            os.path.join(workdir, "sd3", os.path.basename(C)), "64M")
    rig.run("qemu-img", "create", "-q", "-f", "qcow2", "-b",
            os.path.join(workdir, "sd3", os.path.basename(C)), "-F", "qcow2",
            os.path.join(workdir, "sd3", os.path.basename(D)), "64M")
    rc, out, err = rig.cli("relocate", vm4.name, "vda", os.path.join(workdir, "sd3",
                                                                     os.path.basename(D)),
                           "--mode", "chain", "--reuse-external", config=config)
    assert rc == 2 and "backs onto" in out["error"]["message"], (out, err)
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
    assert disk.chain() == [D, C, B, A]
    disk.assert_guest_data()
