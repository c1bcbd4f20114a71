"""VMs that VDSM manages are not the tool's to change unless the operator
says so: refused with exit 2 and nothing changed, accepted with
--allow-vdsm-managed."""

import os

import libvirt
import rig

VDSM_VM = "http://ovirt.org/vm/1.0"


def test_a_vdsm_managed_domain_is_refused_unless_allowed(vm4, config, workdir):
    vm = vm4
    disk = vm.disks["vda"]
    A, B, C, D = disk.layers
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
    vm.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                       "<vm><clusterVersion>4.7</clusterVersion></vm>", "ovirt-vm", VDSM_VM, flags)
    overlay = os.path.join(workdir, "s1.qcow2")
    dest = os.path.join(workdir, "moved.qcow2")
    attempts = [("merge", vm.name, "vda", "--base", B),
                ("relocate", vm.name, "vda", dest, "--mode", "full"),
                ("snapshot", vm.name, "vda", overlay),
                ("speed", vm.name, "vda", "5")]
    for args in attempts:
        rc, out, err = rig.cli(*args, config=config)
        assert rc == 2 and "managed by VDSM" in out["error"]["message"], (args, out, err)
        assert "--allow-vdsm-managed" in out["error"]["message"]
    assert disk.live_chain() == [D, C, B, A]
    assert not os.path.exists(overlay) and not os.path.exists(dest)
    # reading is always fine
    rc, out, err = rig.cli("chain", vm.name, config=config)
    assert rc == 0, (out, err)
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", B, "--allow-vdsm-managed",
                           config=config)
    assert rc == 0, (out, err)
    merged = disk.live_chain()
    assert len(merged) == 3 and merged[1:] == [B, A]  # C and D now one layer, by either strategy
    rc, out, err = rig.cli("snapshot", vm.name, "vda", overlay, "--allow-vdsm-managed",
                           config=config)
    assert rc == 0, (out, err)
    assert disk.live_chain() == [overlay] + merged
    disk.guest_write(0x71, 50, 1)
    disk.assert_guest_data()
