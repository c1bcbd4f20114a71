"""A crowded node: hundreds of defined domains. The bulk look at the node
(one stats call for the running ones, a definitions cache and header walks
for the others) must never miss a user of a layer -- not the last domain
defined, not a definition changed since the cache was filled."""

import os
import subprocess

import rig
from rig import LayerSpec, Write

CROWD = 300


def define(conn, name, image):
    try:  # redefining keeps the domain's UUID
        uuid = f"<uuid>{conn.lookupByName(name).UUIDString()}</uuid>"
    except Exception:
        uuid = ""
    conn.defineXML(
        f"<domain type='qemu'><name>{name}</name>{uuid}<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{image}'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>")


def test_a_user_among_hundreds_of_defined_domains_is_found(make_vm, conn, config, workdir):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0xA1, 0, 4)]), LayerSpec("B", [Write(0xB1, 1, 1)]),
                                LayerSpec("C", [Write(0xC1, 2, 1)])])
    vm.start()
    A, B, C = disk.layers
    base = os.path.join(workdir, "crowd-base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "64M"], check=True)
    names = [f"{rig.DOMAIN_PREFIX}crowd-{i:04d}" for i in range(CROWD)]
    try:
        for name in names[:-1]:
            image = os.path.join(workdir, f"{name}.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                            image], check=True)
            define(conn, name, image)
        # Fill the definitions cache before the last domain exists.
        rc, out, _ = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "commit",
                             "--dry-run", config=config)
        assert rc == 0, out
        last = os.path.join(workdir, "last-on-B.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", B, "-F", "qcow2", last],
                       check=True)
        define(conn, names[-1], last)
        rc, out, _ = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "commit",
                             config=config)
        assert rc == 2 and names[-1] in out["error"]["message"], out
        # Redefined onto another image: no longer a user of B.
        define(conn, names[-1], os.path.join(workdir, f"{names[0]}.qcow2"))
        rc, out, _ = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "commit",
                             "--dry-run", config=config)
        assert rc == 0 and out["strategy"] == "commit", out
        # ... and back onto B: a user again.
        define(conn, names[-1], last)
        rc, out, _ = rig.cli("merge", vm.name, "vda", "--base", A, "--dry-run", config=config)
        assert rc == 0 and out["strategy"] == "pull", out
        assert names[-1] in out["alternatives"]["commit"]
        assert disk.live_chain() == [C, B, A]
        disk.assert_guest_data()
    finally:
        for name in names:
            try:
                conn.lookupByName(name).undefine()
            except Exception:
                pass
