"""Several processes on one VM, and recover with the VM shut off."""

import os
import signal
import subprocess
import time

import rig
from rig import LayerSpec, Write
from test_faults import settle
from test_merge import registry, wait_for_job


def two_disk_vm(make_vm):
    vm = make_vm()
    disks = [vm.add_chain(t, [LayerSpec("A", [Write(0xA1, 0, 6)]),
                              LayerSpec("B", [Write(0xB1, 8, 6)]),
                              LayerSpec("C", [Write(0xC1, 16, 6)])]) for t in ("vda", "vdb")]
    vm.start()
    return vm, disks


def records(vm):
    from vdsm_blockops.core.chain import METADATA_NS
    from vdsm_blockops.engine.records import parse_records

    try:
        return parse_records(vm.dom.metadata(2, METADATA_NS, 0))  # 2: METADATA_ELEMENT
    except Exception:
        return {}


def test_two_disks_two_processes_killed_then_recovered(make_vm, config, workdir):
    """Each process keeps its own record (one lock around every change of
    the domain's records), and recover settles both after SIGKILL."""
    vm, (vda, vdb) = two_disk_vm(make_vm)
    os.makedirs(f"{workdir}/dst", mode=0o755)
    merging = rig.cli_background("merge", vm.name, "vda", "--strategy", "commit",
                                 "--top", vda.layers[1], "--bandwidth", "1", config=config)
    moving = rig.cli_background("relocate", vm.name, "vdb", f"{workdir}/dst/vdb.qcow2",
                                "--mode", "full", "--method", "mirror", "--bandwidth", "1",
                                config=config)
    wait_for_job(vm, "vda")
    wait_for_job(vm, "vdb")
    deadline = time.monotonic() + 30
    while set(records(vm)) != {"vda", "vdb"} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(records(vm)) == {"vda", "vdb"}
    vdb.guest_write(0x66, 30, 1)
    for proc in (merging, moving):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for target in ("vda", "vdb"):
        subprocess.run(["virsh", "-c", rig.TEST_URI, "blockjob", vm.name, target, "--bandwidth", "0"],
                       capture_output=True)
    settle(vm, vda, config)
    vdb.assert_guest_data()
    assert records(vm) == {}
    vm.restart()
    vda.assert_guest_data()
    vdb.assert_guest_data()


def test_two_no_wait_pulls_from_two_processes(make_vm, config):
    """The second --no-wait pull in one VM is refused (exit 4) naming the
    running one: QEMU 7.2 can crash when two pulls end together."""
    vm, (vda, vdb) = two_disk_vm(make_vm)
    rc, out, err = rig.cli("merge", vm.name, "vda", "--strategy", "pull", "--no-wait",
                           "--bandwidth", "1", config=config)
    assert rc == 0 and out["finished"] is False, err
    rc, out, _ = rig.cli("merge", vm.name, "vdb", "--strategy", "pull", "--no-wait", config=config)
    assert rc == 4 and out["error"]["code"] == "conflict", out
    assert "vda" in out["error"]["message"]
    assert vm.dom.blockJobInfo("vdb", 0) == {} and set(records(vm)) == {"vda"}
    # a waiting pull queues behind it instead
    subprocess.run(["virsh", "-c", rig.TEST_URI, "blockjob", vm.name, "vda", "--bandwidth", "0"],
                   capture_output=True)
    rc, out, err = rig.cli("merge", vm.name, "vdb", "--strategy", "pull", config=config)
    assert rc == 0, err
    settle(vm, vda, config)
    vdb.assert_guest_data()


def test_recover_with_the_vm_off_after_an_internal_commit_completed(make_vm, config):
    """The job completed, then the VM went down before the tool finished:
    the headers show the chain after; recover finishes and registers the
    committed-out layer as invalid (it used to look rolled back)."""
    vm, (vda, _) = two_disk_vm(make_vm)
    A, B, C = vda.layers
    rc, out, err = rig.cli("merge", vm.name, "vda", "--top", B, "--strategy", "commit", "--no-wait",
                           config=config)
    assert rc == 0, err
    deadline = time.monotonic() + 60
    while vm.dom.blockJobInfo("vda", 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    vm.dom.destroy()
    rc, out, err = rig.cli("recover", vm.name, config=config)
    assert rc == 0 and [r["result"] for r in out["records"]] == ["finished"], (out, err)
    assert list(registry(config)) == [B]
    rc, out, _ = rig.cli("chain", vm.name, "vda", config=config)
    assert [l["path"] for l in out["disks"][0]["chain"]] == [C, A]
    rc, out, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, out
    vm.dom.create()
    vda.assert_guest_data()


def test_recover_with_the_vm_off_after_a_pivoted_active_commit(make_vm, config):
    vm, (vda, _) = two_disk_vm(make_vm)
    A, B, C = vda.layers
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "commit", "--no-wait",
                           config=config)
    assert rc == 0, err
    for _ in range(400):
        if "ready='yes'" in vm.dom.XMLDesc(0):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the active commit never became ready")
    rig.run("virsh", "-c", rig.TEST_URI, "blockjob", vm.name, "vda", "--pivot")
    vm.dom.destroy()
    rc, out, err = rig.cli("recover", vm.name, config=config)
    assert rc == 0 and [r["result"] for r in out["records"]] == ["finished"], (out, err)
    assert sorted(registry(config)) == sorted([C])
    rc, out, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, out
    vm.dom.create()
    vda.assert_guest_data()
