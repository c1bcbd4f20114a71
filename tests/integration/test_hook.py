"""The hook on the real libvirtd: a VM on an invalidated image is refused,
a healthy one starts."""

import os

import libvirt
import pytest
import rig


def test_vm_on_invalidated_image_is_refused(make_vm, config, installed_hook, workdir):
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers())
    vm.start()
    A, B, C, D = disk.layers
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "commit", config=config)
    assert rc == 0, err
    # An operator's stale copy of the old definition still points at D.
    stale = make_vm()
    stale.disks["vda"] = rig.Disk(stale, "vda", 0, [D], disk.reference)
    with pytest.raises(libvirt.libvirtError) as refused:
        stale.start()
    assert "invalidated" in str(refused.value) and D in str(refused.value)
    # The merged VM itself restarts fine on its verified chain.
    vm.restart()
    disk.assert_guest_data()
    healthy = make_vm()
    healthy.add_chain("vda", rig.four_layers()[:2])
    healthy.start()
    assert healthy.dom.isActive()
    rc, out, _ = rig.cli("hook", "uninstall", "--reload", config=config)
    assert rc == 0 and not os.path.exists(installed_hook)
