"""The same verbs on shut-off VMs (defined, not running): qemu-img and file
copies instead of block jobs. Every image's data is compared with the
reference before the VM starts, and again once it runs."""

import os
import signal
import subprocess
import sys
import time

import libvirt
import pytest
import rig
from rig import LayerSpec, Write


def offline_vm(make_vm, size_mib=64, big=False):
    """A <- B <- C <- D, defined and never started."""
    vm = make_vm()
    mib = 48 if big else 4
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0xA1, 0, mib)]),
                                LayerSpec("B", [Write(0xB1, 1, 1), Write(0xB2, 20, 1)]),
                                LayerSpec("C", [Write(0xC1, 2, 1)]),
                                LayerSpec("D", [Write(0xD1, 3, 0.5)])], size_mib=size_mib)
    vm.define()
    return vm, disk


def stored_chain(vm, config):
    rc, out, _ = rig.cli("chain", vm.name, "vda", config=config)
    assert rc == 0, out
    return [layer["path"] for layer in out["disks"][0]["chain"]]


def settled(vm, disk, config):
    """verify clean, data right from the images, then the VM starts on them."""
    rc, out, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, out
    disk.assert_guest_data(active=stored_chain(vm, config)[0])
    vm.dom.create()
    disk.assert_guest_data()


def test_chain_of_a_shut_off_vm_comes_from_the_images(make_vm, config):
    vm, disk = offline_vm(make_vm)
    A, B, C, D = disk.layers
    rc, out, _ = rig.cli("chain", vm.name, config=config)
    assert rc == 0 and out["active"] is False
    vda = out["disks"][0]
    assert [l["path"] for l in vda["chain"]] == [D, C, B, A] and vda["metadata_agrees"]
    assert vda["chain_from"] == "image metadata"
    proc = subprocess.run([sys.executable, "-m", "vdsm_blockops", "chain", vm.name, "--config", config],
                          capture_output=True, text=True)
    assert "4 layer(s)" in proc.stdout
    rc, out, _ = rig.cli("merge", vm.name, "vda", "--base", "vda[2]", config=config)
    assert rc == 2 and "by its path" in out["error"]["message"]


CASES = {
    # name: (args, chain after as indexes into [A, B, C, D], retired invalid)
    "pull onto A": (["--base", "{A}", "--strategy", "pull"], "DA", ""),
    "flatten by pull": (["--strategy", "pull"], "D", ""),
    "active commit into B": (["--base", "{A}", "--strategy", "commit"], "BA", "DC"),
    "internal commit C into B": (["--top", "{C}", "--base", "{A}", "--strategy", "commit"], "DBA", "C"),
    "auto": (["--base", "{A}"], None, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_shut_off(make_vm, config, case):
    vm, disk = offline_vm(make_vm)
    layers = dict(zip("ABCD", disk.layers))
    args, after, invalid = CASES[case]
    rc, out, err = rig.cli("merge", vm.name, "vda", *[a.format(**layers) for a in args], config=config)
    assert rc == 0, (out, err)
    assert out["online"] is False and out["verified"] is True
    if after is not None:
        assert out["chain_after"] == [layers[c] for c in after]
        assert sorted(r["path"] for r in out["retired"] if not r["valid"]) == \
            sorted(layers[c] for c in invalid)
    assert stored_chain(vm, config) == out["chain_after"]
    settled(vm, disk, config)


@pytest.mark.parametrize("mode", ["chain", "full", "shallow"])
def test_relocate_shut_off(make_vm, config, workdir, mode):
    vm, disk = offline_vm(make_vm)
    A, B, C, D = disk.layers
    os.makedirs(f"{workdir}/dst", mode=0o755)
    rc, out, err = rig.cli("relocate", vm.name, "vda", f"{workdir}/dst/D.qcow2", "--mode", mode,
                           "--delete-source", config=config)
    assert rc == 0, (out, err)
    assert out["online"] is False
    expected = {"chain": [f"{workdir}/dst/D.qcow2"] + [f"{workdir}/dst/vda-{n}.qcow2" for n in "CBA"],
                "full": [f"{workdir}/dst/D.qcow2"],
                "shallow": [f"{workdir}/dst/D.qcow2", C, B, A]}[mode]
    assert out["chain_after"] == expected == stored_chain(vm, config)
    assert not os.path.exists(D)  # --delete-source
    settled(vm, disk, config)


def test_raw_full_copy_shut_off(make_vm, config, workdir):
    vm, disk = offline_vm(make_vm)
    rc, out, err = rig.cli("relocate", vm.name, "vda", f"{workdir}/flat.raw", "--mode", "full",
                           "--format", "raw", config=config)
    assert rc == 0, (out, err)
    settled(vm, disk, config)


def test_shared_layer_refused_shut_off(make_vm, config):
    vm, disk = offline_vm(make_vm)
    A, B, C, D = disk.layers
    other = make_vm()
    other.add_overlay_on("vda", disk, B)
    other.define()
    rc, out, _ = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "commit", config=config)
    assert rc == 2 and other.name in out["error"]["message"]
    assert stored_chain(vm, config) == [D, C, B, A]
    for refused in (["--no-wait"],):
        rc, out, _ = rig.cli("merge", vm.name, "vda", *refused, config=config)
        assert rc == 2, out


def wait_for_qemu_img(timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", "qemu-img (commit|convert)"], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError("qemu-img never started")


@pytest.mark.parametrize("verb", ["commit", "convert"])
def test_sigkill_mid_operation_then_recover(make_vm, config, workdir, verb, installed_hook):
    """Killed mid-commit or mid-convert: qemu-img dies with the command, the
    hook refuses to start the VM meanwhile, recover rolls back, and the VM
    then starts with its data."""
    vm, disk = offline_vm(make_vm, size_mib=256, big=True)
    A, B, C, D = disk.layers
    args = (["merge", vm.name, "vda", "--base", A, "--strategy", "commit"] if verb == "commit" else
            ["relocate", vm.name, "vda", f"{workdir}/full.qcow2", "--mode", "full"])
    proc = rig.cli_background(*args, "--bandwidth", "1", config=config)
    wait_for_qemu_img()
    with pytest.raises(libvirt.libvirtError) as refused:
        vm.dom.create()
    assert "unfinished" in str(refused.value)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", "qemu-img (commit|convert)"],
                          capture_output=True).returncode != 0, "qemu-img outlived its command"
    rc, out, err = rig.cli("recover", vm.name, config=config)
    assert rc == 0 and [r["result"] for r in out["records"]] == ["rolled-back"], (out, err)
    assert stored_chain(vm, config) == [D, C, B, A]
    assert not os.path.exists(f"{workdir}/full.qcow2")
    settled(vm, disk, config)


def test_progress_lines_offline(make_vm, config, workdir):
    vm, disk = offline_vm(make_vm)
    proc = subprocess.run([sys.executable, "-m", "vdsm_blockops", "relocate", vm.name, "vda",
                           f"{workdir}/p.qcow2", "--mode", "full", "--config", config],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "vda: copy" in proc.stderr and "100.0%" in proc.stderr
    assert "relocated (full mode" in proc.stdout
