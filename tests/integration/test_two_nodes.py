"""Two libvirt nodes on one machine, for cross-node work tested for real
(issue 28's ground): node B is a second libvirtd in its own mount and UTS
namespace (tests/node-b.sh), reached over TCP on loopback, whose image
folder shows other files than node A's under the same path. This first
test moves a running VM with a two-layer chain to node B the way libvirt
alone can (--copy-storage-inc after the read-only layer was put there),
and checks the guest's data on node B from outside the VM."""

import os
import shutil

import libvirt
import libvirt_qemu
import nodes
import rig
from rig import LayerSpec, Write


def on_b(root, test_root, path):
    return nodes.on_b(root, test_root, path)


def test_a_vm_moves_live_to_node_b_with_its_chain(make_vm, node_b, test_root):
    conn_b, root = node_b
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 8)]),
                                LayerSpec("B", [Write(0x22, 4, 2)])])
    vm.start()
    base, top = disk.layers
    # node B gets the read-only layer as it is and an empty top over it
    os.makedirs(os.path.dirname(on_b(root, test_root, base)), mode=0o755)
    shutil.copy(base, on_b(root, test_root, base))
    rig.run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", base, "-F", "qcow2",
            on_b(root, test_root, top), "64M")
    disk.guest_write(0x33, 20, 1)  # before the move
    flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
             | libvirt.VIR_MIGRATE_NON_SHARED_INC | libvirt.VIR_MIGRATE_PERSIST_DEST
             | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    vm.dom.migrateToURI3(nodes.URI, {libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda"],
                                  libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1"}, flags)
    vm.created = False  # node A has nothing left of it
    moved = conn_b.lookupByName(vm.name)
    assert moved.isActive()
    libvirt_qemu.qemuMonitorCommand(
        moved, f'qemu-io -d {disk.alias}/virtio-backend "write -P 0x44 30M 1M"',
        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    rig.run("qemu-io", "-f", "raw", "-c", "write -P 0x44 30M 1M", disk.reference)
    live = moved.XMLDesc(0)
    assert f"<source file='{top}'" in live and f"<source file='{base}'" in live  # both layers
    assert top in moved.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)  # defined on node B
    moved.destroy()
    rig.run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", on_b(root, test_root, top),
            disk.reference)  # node B's chain holds every write
