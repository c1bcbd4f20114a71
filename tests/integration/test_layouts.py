"""Real node layouts on real VMs: one image reached through several names
(symlinked folders, ``..`` in relative backing names), oVirt's file
storage-domain layout with a shared template, and block-device layers
(loop devices standing in for LVs). Every case either succeeds with the
guest data identical and ``verify`` clean, or is refused with nothing
changed; a shared layer is never written and never deleted."""

import hashlib
import json
import os

import pytest
import rig
from rig import LayerSpec, Write


def digest(path):
    """Bytes of one image file or device (to prove it was not written)."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def backing_name(path):
    return json.loads(rig.run("qemu-img", "info", "-U", "--output=json", path)).get("backing-filename")


def verify(vm, config):
    rc, out, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, out


# --------------------------------------------------------- folder aliases
@pytest.fixture
def aliased(make_vm, workdir):
    """vm1 runs on A <- B <- C <- D in vms/; vm2 is only defined, on an
    overlay over B named through alias/ -> vms/ (no QEMU lock protects it)."""
    vms = os.path.join(workdir, "vms")
    os.makedirs(vms, mode=0o755)
    os.symlink(vms, os.path.join(workdir, "alias"))
    vm1 = make_vm()
    d1 = vm1.add_layers("vda", [(f"{vms}/A.qcow2", None, LayerSpec("A", [Write(0xA1, 0, 4)])),
                                (f"{vms}/B.qcow2", f"{vms}/A.qcow2", LayerSpec("B", [Write(0xB1, 1, 1)])),
                                (f"{vms}/C.qcow2", f"{vms}/B.qcow2", LayerSpec("C", [Write(0xC1, 2, 1)])),
                                (f"{vms}/D.qcow2", f"{vms}/C.qcow2", LayerSpec("D", [Write(0xD1, 3, 1)]))])
    vm1.start()
    vm2 = make_vm()
    alias_b = os.path.join(workdir, "alias", "B.qcow2")
    d2 = vm2.add_layers("vda", [(alias_b, None, LayerSpec("B")),
                                (f"{vm2.dir}/top.qcow2", alias_b, LayerSpec("top", [Write(0x22, 5, 1)]))],
                        reference_from=alias_b)
    vm2.define()
    return vm1, d1, vm2, d2


def test_commit_into_a_layer_another_vm_names_through_a_symlinked_folder_is_refused(aliased, config):
    vm1, d1, vm2, d2 = aliased
    A, B, C, D = d1.layers
    before = digest(B)
    rc, out, _ = rig.cli("merge", vm1.name, "vda", "--base", A, "--strategy", "commit", config=config)
    assert rc == 2 and out["error"]["code"] == "unsafe-request", out
    assert vm2.name in out["error"]["message"]
    assert digest(B) == before and d1.live_chain() == [D, C, B, A]
    # auto sees the same user and pulls instead
    rc, out, _ = rig.cli("merge", vm1.name, "vda", "--base", A, "--dry-run", config=config)
    assert rc == 0 and out["strategy"] == "pull", out
    d1.assert_guest_data()
    d2.assert_guest_data(active=d2.layers[-1])


def test_delete_retired_keeps_a_layer_another_vm_names_through_an_alias(aliased, config):
    vm1, d1, vm2, d2 = aliased
    A, B, C, D = d1.layers
    rc, out, err = rig.cli("merge", vm1.name, "vda", "--base", A, "--strategy", "pull",
                           "--delete-retired", config=config)
    assert rc == 0, err
    assert out["deleted"] == [C] and os.path.exists(B)
    d1.assert_guest_data()
    d2.assert_guest_data(active=d2.layers[-1])
    verify(vm1, config)


def test_references_through_an_alias_and_malformed_ones(aliased, config, workdir):
    vm1, d1, _, _ = aliased
    A, B, C, D = d1.layers
    for args in (["--base", ""], ["--top", ""], ["--base", " "], ["--base", "vda[2]\n"],
                 ["--base", A + "\n"], ["--top", "vda[1]\t"]):
        rc, out, _ = rig.cli("merge", vm1.name, "vda", *args, config=config)
        assert rc == 2 and out["error"]["code"] == "unknown-image", (args, out)
    for dest in ("", f"{workdir}/x.qcow2\n", " /x"):
        rc, out, _ = rig.cli("relocate", vm1.name, "vda", dest, config=config)
        assert rc == 2, (dest, out)
    assert d1.live_chain() == [D, C, B, A]
    # the same image named through the alias is a valid reference
    rc, out, err = rig.cli("merge", vm1.name, "vda", "--base", os.path.join(workdir, "alias", "B.qcow2"),
                           "--strategy", "pull", config=config)
    assert rc == 0 and out["chain_after"] == [D, B, A], (out, err)
    d1.assert_guest_data()
    # DEST that is a source layer under another name is refused
    rc, out, _ = rig.cli("relocate", vm1.name, "vda", os.path.join(workdir, "alias", "D.qcow2"),
                         "--reuse-external", "--mode", "shallow", config=config)
    assert rc == 2 and "source chain" in out["error"]["message"], out


def both_intact(vm1, d1, d2, config):
    """vm1's data right and verified, again after a restart; the other VM,
    which shares a layer, unchanged."""
    d1.assert_guest_data()
    d2.assert_guest_data(active=d2.layers[-1])
    verify(vm1, config)
    vm1.restart()
    d1.assert_guest_data()


# ------------------------------------------------------ oVirt file domain
@pytest.fixture
def ovirt(make_vm, workdir):
    """An oVirt file storage domain: volumes without extensions in image
    folders, relative backing names (V1, ../img-tmpl/T), reached through the
    pool link. A template T shared by vm1 (running) and vm2 (defined only)."""
    mnt = os.path.join(workdir, "data-center", "mnt", "srv:_export")
    pool = os.path.join(workdir, "data-center", "pool-1")
    for sd in ("sd1", "sd2"):
        os.makedirs(os.path.join(mnt, sd, "images"), mode=0o755)
    os.makedirs(pool, mode=0o755)
    for sd in ("sd1", "sd2"):
        os.symlink(f"../mnt/srv:_export/{sd}", os.path.join(pool, sd))
    images = os.path.join(pool, "sd1", "images")
    for img in ("img-tmpl", "img-vm1", "img-vm2"):
        os.makedirs(os.path.join(images, img), mode=0o755)
    T = f"{images}/img-tmpl/T"
    vm1 = make_vm()
    d1 = vm1.add_layers("vda", [
        (T, None, LayerSpec("T", [Write(0x70, 0, 4), Write(0x71, 20, 1)])),
        (f"{images}/img-vm1/V1", "../img-tmpl/T", LayerSpec("V1", [Write(0x11, 1, 1)])),
        (f"{images}/img-vm1/V2", "V1", LayerSpec("V2", [Write(0x12, 2, 1)])),
        (f"{images}/img-vm1/V3", "V2", LayerSpec("V3", [Write(0x13, 3, 0.5)]))])
    vm1.start()
    vm2 = make_vm()
    d2 = vm2.add_layers("vda", [
        (f"{mnt}/sd1/images/img-tmpl/T", None, LayerSpec("T")),
        (f"{mnt}/sd1/images/img-vm2/W1", "../img-tmpl/T", LayerSpec("W1", [Write(0x21, 6, 1)]))],
        reference_from=T)
    vm2.define()
    return vm1, d1, vm2, d2, pool


def test_ovirt_libvirt_reports_dotted_names_and_the_tool_cleans_them(ovirt, config):
    vm1, d1, _, _, pool = ovirt
    assert "img-vm1/../img-tmpl/T" in vm1.dom.XMLDesc(0)  # libvirt does not normalise
    rc, out, _ = rig.cli("chain", vm1.name, config=config)
    assert rc == 0 and out["disks"][0]["metadata_agrees"], out
    assert [l["path"] for l in out["disks"][0]["chain"]] == d1.layers[::-1]
    verify(vm1, config)


def test_ovirt_commit_into_the_shared_template_is_refused(ovirt, config):
    vm1, d1, vm2, d2, _ = ovirt
    T = d1.layers[0]
    before = digest(T)
    rc, out, _ = rig.cli("merge", vm1.name, "vda", "--strategy", "commit", config=config)
    assert rc == 2 and vm2.name in out["error"]["message"], out
    assert digest(T) == before
    d2.assert_guest_data(active=d2.layers[-1])


@pytest.mark.parametrize("strategy", ["pull", "commit"])
def test_ovirt_merge_onto_the_template_keeps_relative_names(ovirt, config, strategy):
    vm1, d1, vm2, d2, _ = ovirt
    T, V1, V2, V3 = d1.layers
    before = digest(T)
    rc, out, err = rig.cli("merge", vm1.name, "vda", "--base", T,
                           "--strategy", strategy, config=config)
    assert rc == 0, (out, err)
    # a pull rewrites V3's backing name (relative flags); an active commit
    # rewrites none (V1 keeps its own)
    assert out["keep_relative"] is (strategy == "pull")
    result = V3 if strategy == "pull" else V1
    assert out["chain_after"] == [result, T]
    assert backing_name(result) == "../img-tmpl/T"
    assert digest(T) == before
    both_intact(vm1, d1, d2, config)


def test_ovirt_internal_commit_keeps_relative_names(ovirt, config):
    vm1, d1, _, _, _ = ovirt
    T, V1, V2, V3 = d1.layers
    rc, out, err = rig.cli("merge", vm1.name, "vda", "--top", V2, "--base", T, "--strategy", "commit",
                           config=config)
    assert rc == 0, (out, err)
    assert out["chain_after"] == [V3, V1, T]
    assert backing_name(V3) == "V1" and backing_name(V1) == "../img-tmpl/T"
    d1.assert_guest_data()
    verify(vm1, config)


def test_ovirt_flatten_pulls_and_never_deletes_the_template(ovirt, config):
    vm1, d1, vm2, d2, _ = ovirt
    T, V1, V2, V3 = d1.layers
    rc, out, err = rig.cli("merge", vm1.name, "vda", "--delete-retired", config=config)
    assert rc == 0 and out["strategy"] == "pull", (out, err)
    assert os.path.exists(T) and T not in out["deleted"]
    assert sorted(out["deleted"]) == sorted([V1, V2])
    d1.assert_guest_data()
    d2.assert_guest_data(active=d2.layers[-1])


def test_ovirt_relocate_to_another_storage_domain(ovirt, config):
    vm1, d1, vm2, d2, pool = ovirt
    T, V1, V2, V3 = d1.layers
    dest_dir = os.path.join(pool, "sd2", "images", "img-vm1")
    os.makedirs(dest_dir, mode=0o755)
    d1.guest_write(0x44, 8, 1)
    rc, out, err = rig.cli("relocate", vm1.name, "vda", f"{dest_dir}/V3", "--delete-source",
                           config=config)
    assert rc == 0, (out, err)
    new = [f"{dest_dir}/{n}" for n in ("V3", "V2", "V1", "T")]
    assert out["chain_after"] == new
    assert [backing_name(p) for p in new[:3]] == ["V2", "V1", "T"]  # relative stays relative
    assert os.path.exists(T) and T not in out["deleted"]  # vm2 still uses the template
    both_intact(vm1, d1, d2, config)


@pytest.mark.parametrize("mode", ["full", "shallow"])
def test_ovirt_relocate_other_modes_to_another_storage_domain(ovirt, config, mode):
    vm1, d1, vm2, d2, pool = ovirt
    T, V1, V2, V3 = d1.layers
    dest_dir = os.path.join(pool, "sd2", "images", "img-vm1")
    os.makedirs(dest_dir, mode=0o755)
    before = digest(T)
    d1.guest_write(0x45, 9, 1)
    rc, out, err = rig.cli("relocate", vm1.name, "vda", f"{dest_dir}/V3", "--mode", mode,
                           config=config)
    assert rc == 0, (out, err)
    expected = [f"{dest_dir}/V3"] + ([V2, V1, T] if mode == "shallow" else [])
    assert out["chain_after"] == expected
    assert digest(T) == before
    both_intact(vm1, d1, d2, config)


def test_ovirt_snapshot_then_merge_keeps_the_layout(ovirt, config):
    vm1, d1, _, _, _ = ovirt
    T, V1, V2, V3 = d1.layers
    V4 = os.path.join(os.path.dirname(V3), "V4")
    rc, out, err = rig.cli("snapshot", vm1.name, "vda", V4, config=config)
    assert rc == 0 and out["chain_after"] == [V4, V3, V2, V1, T], (out, err)
    d1.guest_write(0x46, 10, 1)
    rc, out, err = rig.cli("merge", vm1.name, "vda", "--top", V4, "--base", V1, config=config)
    assert rc == 0, (out, err)
    # V4's backing name is absolute (libvirt made V4), so a pull from V4
    # cannot keep a relative name; the names below stay as they were
    assert out["chain_after"][-2:] == [V1, T]
    assert backing_name(V1) == "../img-tmpl/T"
    d1.assert_guest_data()
    verify(vm1, config)
    vm1.restart()
    d1.assert_guest_data()


# ------------------------------------------------------ block-device layers
@pytest.fixture
def device_vm(make_vm, workdir):
    """A <- B <- C where A is a raw loop device (an LV on a block domain)."""
    devices = []
    vm = make_vm()
    dev = rig.loop_device(workdir, "A", 64)
    devices.append(dev)
    d = vm.add_layers("vda", [(dev, None, LayerSpec("A", [Write(0xA1, 0, 8), Write(0xA2, 40, 2)], "raw")),
                              (f"{vm.dir}/B.qcow2", dev, LayerSpec("B", [Write(0xB1, 2, 1)])),
                              (f"{vm.dir}/C.qcow2", f"{vm.dir}/B.qcow2", LayerSpec("C", [Write(0xC1, 4, 1)]))])
    vm.start()
    yield vm, d
    vm.destroy()
    for dev in devices:
        rig.remove_loop_device(dev)


@pytest.mark.parametrize("mode", ["chain", "full", "shallow"])
def test_device_layer_relocation(device_vm, config, workdir, mode):
    vm, d = device_vm
    A, B, C = d.layers
    os.makedirs(f"{workdir}/dst", mode=0o755)
    d.guest_write(0x55, 6, 1)
    rc, out, err = rig.cli("relocate", vm.name, "vda", f"{workdir}/dst/C.qcow2", "--mode", mode,
                           config=config)
    assert rc == 0, (out, err)
    if mode == "chain":
        copy_of_a = f"{workdir}/dst/{os.path.basename(A)}"
        assert out["chain_after"][-1] == copy_of_a
        assert os.path.getsize(copy_of_a) == 64 * rig.MIB  # every byte of the device
    d.assert_guest_data()
    verify(vm, config)
    vm.restart()
    d.assert_guest_data()


@pytest.mark.parametrize("strategy", ["pull", "commit"])
def test_device_layer_merge(device_vm, config, strategy):
    vm, d = device_vm
    A, B, C = d.layers
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", strategy, config=config)
    assert rc == 0, (out, err)
    assert out["chain_after"] == [C if strategy == "pull" else B, A]
    d.assert_guest_data()
    rc, out, err = rig.cli("merge", vm.name, "vda", "--strategy", strategy, config=config)
    assert rc == 0, (out, err)   # pull flattens into the top; commit goes into the device
    d.assert_guest_data()
    verify(vm, config)
    vm.restart()
    d.assert_guest_data()
