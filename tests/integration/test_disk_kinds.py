"""Every kind of disk libvirt hands the tool, handled in every safety
decision or refused by name: hot-plugged disks, pool volumes, external
data files, LUKS encryption."""

import os
import subprocess
import uuid

import libvirt
import pytest
import rig

from vdsm_blockops.core.chain import parse_domain
from vdsm_blockops.engine.records import records_in_domain_xml


def records_of(vm):
    return records_in_domain_xml(parse_domain(vm.dom.XMLDesc(0)).metadata)


def test_a_hot_plugged_disk_is_merged_and_leaves_no_record(make_vm, config):
    vm = make_vm()
    vm.add_chain("vda", rig.four_layers()[:1])
    # ACPI: the pc machine's PCI bus takes hot-plugged devices only with it.
    vm.conn.defineXML(vm.xml().replace("</os>", "</os><features><acpi/></features>"))
    vm.created = True
    vm.dom.create()
    disk = vm.add_chain("vdb", rig.four_layers())
    A, B, C, D = disk.layers
    vm.dom.attachDeviceFlags(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{D}'/><target dev='vdb' bus='virtio'/></disk>",
        libvirt.VIR_DOMAIN_AFFECT_LIVE)
    assert "vdb" not in vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    disk.guest_write(0x71, 7, 1)
    for strategy, base in (("pull", B), ("commit", A)):
        rc, out, err = rig.cli("merge", vm.name, "vdb", "--base", base, "--strategy", strategy,
                               config=config)
        assert rc == 0, (out, err)
        assert out["verified"], out
        rc, out, err = rig.cli("verify", vm.name, "vdb", config=config)
        assert rc == 0 and out["ok"], out
    assert disk.live_chain() == [B, A]
    assert records_of(vm) == {}  # no record left behind
    disk.guest_write(0x72, 8, 1)
    disk.assert_guest_data()
    rc, out, err = rig.cli("verify", vm.name, config=config)
    assert rc == 0 and out["ok"], out


@pytest.fixture
def dir_pool(conn, workdir):
    """A libvirt directory pool over a folder of the test's."""
    name = f"{rig.DOMAIN_PREFIX}pool-{uuid.uuid4().hex[:6]}"
    path = os.path.join(workdir, "pool")
    os.makedirs(path, mode=0o755)
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>")
    pool.create()
    yield name, path
    pool = conn.storagePoolLookupByName(name)
    pool.destroy()
    pool.undefine()


def volume_vm(make_vm, conn, pool, volume, reference):
    """A domain whose disk is ``<disk type='volume'>`` in ``pool``."""
    conn.storagePoolLookupByName(pool).refresh()
    vm = make_vm()
    vm.disks["vda"] = rig.Disk(vm, "vda", 0, [], reference)
    xml = (
        f"<domain type='qemu'><name>{vm.name}</name><memory unit='MiB'>64</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
        "<on_crash>destroy</on_crash><devices>"
        "<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source pool='{pool}' volume='{volume}'/><target dev='vda' bus='virtio'/></disk>"
        "</devices></domain>")
    conn.defineXML(xml)
    vm.created = True
    return vm


def test_a_pool_volume_user_blocks_a_commit_into_its_template(make_vm, conn, config, dir_pool):
    pool, folder = dir_pool
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers(), directory=folder)
    vm.start()
    A, B, C, D = disk.layers
    clone = os.path.join(folder, "clone-top.qcow2")
    rig.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", B, "-F", "qcow2", clone)
    other = volume_vm(make_vm, conn, pool, "clone-top.qcow2", disk.reference)
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "commit",
                           config=config)
    assert rc == 2 and other.name in out["error"]["message"], (out, err)
    assert disk.live_chain() == [D, C, B, A]
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", A, config=config)  # auto: a pull
    assert rc == 0 and out["strategy"] == "pull", (out, err)
    disk.assert_guest_data()
    # The clone's chain is whole: B untouched under it.
    rig.run("qemu-img", "check", "-U", clone)


def test_the_hook_refuses_a_pool_volume_on_an_invalidated_image(make_vm, conn, config, dir_pool,
                                                               installed_hook):
    pool, folder = dir_pool
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers(), directory=folder)
    vm.start()
    A, B, C, D = disk.layers
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "commit",
                           config=config)
    assert rc == 0, err
    stale = volume_vm(make_vm, conn, pool, os.path.basename(D), disk.reference)
    with pytest.raises(libvirt.libvirtError) as refused:
        stale.dom.create()
    assert "invalidated" in str(refused.value) and D in str(refused.value)
    # A pool volume on a healthy chain boots with the hook installed.
    fresh = os.path.join(folder, "fresh.qcow2")
    rig.run("qemu-img", "create", "-q", "-f", "qcow2", fresh, "64M")
    healthy = volume_vm(make_vm, conn, pool, "fresh.qcow2", disk.reference)
    healthy.dom.create()
    assert healthy.dom.isActive()
    disk.assert_guest_data()


def compare_encrypted(image, reference, passphrase):
    """qemu-img compare of a LUKS qcow2 (the secret given) with the raw
    reference: what the guest sees."""
    rig.run("qemu-img", "compare", "-U", "--object", f"secret,id=s0,data={passphrase}",
            "--image-opts", f"driver=qcow2,file.filename={image},encrypt.key-secret=s0",
            f"driver=raw,file.filename={reference}")


def create_luks(image, passphrase):
    """A LUKS-encrypted qcow2. QEMU 7.2 times PBKDF2 by the thread's CPU
    time before choosing its iteration count and gives up ("Unable to get
    accurate CPU usage") when its first 32768 iterations read as 0 ms --
    here about one try in five, by clock tick luck: tried again."""
    for _ in range(30):
        proc = subprocess.run(
            ["qemu-img", "create", "-q", "--object", f"secret,id=s0,data={passphrase}", "-f",
             "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100",
             image, "64M"], capture_output=True, text=True)
        if proc.returncode == 0:
            return
        assert "accurate CPU usage" in proc.stderr, proc.stderr
    raise AssertionError("qemu-img could not time PBKDF2 in 30 tries")


def test_luks_disks_are_never_copied_into_plaintext(make_vm, conn, config, workdir):
    passphrase = "vbo-test-passphrase"
    secret = conn.secretDefineXML(
        "<secret ephemeral='no' private='yes'><usage type='volume'>"
        f"<volume>{workdir}/luks</volume></usage></secret>")
    secret.setValue(passphrase.encode())
    try:
        vm = make_vm()
        image = os.path.join(vm.dir, "vda-luks.qcow2")
        create_luks(image, passphrase)
        disk = vm.add_layers("vda", [(image, None, rig.LayerSpec("luks", fmt="qcow2"))])
        xml = vm.xml().replace(
            f"<source file='{image}'/>",
            f"<source file='{image}'><encryption format='luks'>"
            f"<secret type='passphrase' uuid='{secret.UUIDString()}'/></encryption></source>")
        conn.defineXML(xml)
        vm.created = True
        vm.dom.create()
        disk.guest_write(0x4C, 0, 2)
        disk.flush()
        moved = os.path.join(workdir, "moved")
        os.makedirs(moved)
        dest = os.path.join(moved, "vda.qcow2")
        for mode in ("full", "chain", "shallow"):
            rc, out, err = rig.cli("relocate", vm.name, "vda", dest, "--mode", mode, config=config)
            assert rc == 2 and "encrypted" in out["error"]["message"], (mode, out, err)
        overlay = os.path.join(vm.dir, "overlay.qcow2")
        rc, out, err = rig.cli("snapshot", vm.name, "vda", overlay, config=config)
        assert rc == 2 and "plaintext" in out["error"]["message"], (out, err)
        assert os.listdir(moved) == [] and not os.path.exists(overlay)
        assert disk.live_chain() == [image]
        compare_encrypted(image, disk.reference, passphrase)
        # Shut off: qemu-img would need the secret -- refused as well.
        vm.dom.destroy()
        rc, out, err = rig.cli("relocate", vm.name, "vda", dest, "--mode", "full", config=config)
        assert rc == 2 and "encrypted" in out["error"]["message"], (out, err)
        assert os.listdir(moved) == []
        compare_encrypted(image, disk.reference, passphrase)
    finally:
        if vm.created:
            rig.remove_domain(vm.dom)
        secret.undefine()


def test_layers_with_an_external_data_file_never_leave_it_behind(make_vm, config, workdir):
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers()[:1])
    (A,) = disk.layers
    top = os.path.join(vm.dir, "vda-top.qcow2")
    data = os.path.join(vm.dir, "vda-top.data")
    rig.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", A, "-F", "qcow2",
            "-o", f"data_file={data}", top, "64M")
    rig.run("qemu-io", "-f", "qcow2", "-c", "write -P 0xDF 8M 2M", top)
    rig.run("qemu-io", "-f", "raw", "-c", "write -P 0xDF 8M 2M", disk.reference)
    disk.layers.append(top)
    vm.define()
    moved = os.path.join(workdir, "moved")
    os.makedirs(moved)
    dest = os.path.join(moved, "vda.qcow2")
    for argv in (["relocate", vm.name, "vda", dest, "--mode", "chain"],
                 ["relocate", vm.name, "vda", dest, "--mode", "full", "--delete-source"],
                 ["merge", vm.name, "vda", "--strategy", "pull"]):
        rc, out, err = rig.cli(*argv, config=config)
        assert rc == 2 and data in out["error"]["message"], (argv, out, err)
    assert os.listdir(moved) == []
    assert disk.chain() == [top, A]
    disk.assert_guest_data()
