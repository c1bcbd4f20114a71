"""Two libvirt nodes on one machine, for cross-node work tested for real
(issue 28's ground): node B is a second libvirtd in its own mount and UTS
namespace (tests/node-b.sh), reached over TCP on loopback, whose image
folder shows other files than node A's under the same path. This first
test moves a running VM with a two-layer chain to node B the way libvirt
alone can (--copy-storage-inc after the read-only layer was put there),
and checks the guest's data on node B from outside the VM."""

import os
import shutil
import signal
import subprocess
import time

import libvirt
import libvirt_qemu
import pytest
import rig
from rig import LayerSpec, Write

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = 16510
NODE_B = f"qemu+tcp://127.0.0.1:{PORT}/system"


def _namespaced_daemons():
    """Pids of libvirtd and virtlogd in another mount namespace than ours."""
    ours = os.readlink("/proc/self/ns/mnt")
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as handle:
                name = handle.read().strip()
            if name in ("libvirtd", "virtlogd") and os.readlink(f"/proc/{pid}/ns/mnt") != ours:
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def _stop(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.fixture(scope="module")
def node_b(test_root):
    """Node B, started for this module and stopped by pid: (uri, the folder
    that node B sees at ``test_root``)."""
    _stop(_namespaced_daemons())  # a node B a killed run left
    root = os.path.join(os.path.dirname(test_root), "node-b-" + os.path.basename(test_root))
    proc = subprocess.run(["unshare", "--mount", "--uts", "--fork", "bash",
                           os.path.join(HERE, "node-b.sh"), root, test_root, str(PORT)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    images = os.path.join(root, "images")
    os.chmod(images, 0o755)
    conn = None
    for _ in range(50):
        try:
            conn = libvirt.open(NODE_B)
            break
        except libvirt.libvirtError:
            time.sleep(0.2)
    assert conn is not None, "node B's libvirtd cannot be reached"
    assert conn.getHostname() == "node-b"
    try:
        yield conn, images
    finally:
        for dom in conn.listAllDomains():
            rig.remove_domain(dom)
        conn.close()
        _stop(_namespaced_daemons())
        shutil.rmtree(root, ignore_errors=True)


def on_b(images, test_root, path):
    """Where node A finds the file node B sees at ``path``."""
    return os.path.join(images, os.path.relpath(path, test_root))


def test_a_vm_moves_live_to_node_b_with_its_chain(make_vm, node_b, test_root):
    conn_b, images = node_b
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 8)]),
                                LayerSpec("B", [Write(0x22, 4, 2)])])
    vm.start()
    base, top = disk.layers
    # node B gets the read-only layer as it is and an empty top over it
    os.makedirs(os.path.dirname(on_b(images, test_root, base)), mode=0o755)
    shutil.copy(base, on_b(images, test_root, base))
    rig.run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", base, "-F", "qcow2",
            on_b(images, test_root, top), "64M")
    disk.guest_write(0x33, 20, 1)  # before the move
    flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
             | libvirt.VIR_MIGRATE_NON_SHARED_INC | libvirt.VIR_MIGRATE_PERSIST_DEST
             | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    vm.dom.migrateToURI3(NODE_B, {libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda"],
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
    rig.run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", on_b(images, test_root, top),
            disk.reference)  # node B's chain holds every write
