"""Riding out faults: the command killed, libvirtd restarted, the VM
destroyed. Afterwards recover and verify leave a verified chain, and the
guest's data is intact."""

import os
import signal
import subprocess
import time

import pytest
import rig
from rig import LayerSpec, Write
from test_merge import finish, wait_for_job


def slow_vm(make_vm, persistent=True):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0xA1, 0, 6)]),
                                LayerSpec("B", [Write(0xB1, 8, 6)]),
                                LayerSpec("C", [Write(0xC1, 16, 6)])])
    vm.start(persistent=persistent)
    return vm, disk


def settle(vm, disk, config):
    """recover, then verify, then the guest data."""
    rc, out, err = rig.cli("recover", vm.name, "--timeout", "120", config=config)
    assert rc == 0, (out, err)
    rc, out, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, out
    disk.assert_guest_data()
    return out


KILL_CASES = {
    "pull": ("merge", "--strategy", "pull"),
    "commit": ("merge", "--top", "{B}", "--strategy", "commit"),
    "active-commit": ("merge", "--strategy", "commit"),
    "copy": ("relocate", "{dest}", "--mode", "full", "--method", "mirror"),
    "flatten": ("relocate", "{dest}", "--mode", "full", "--method", "flatten"),  # in its mirror
    "chain-copy": ("relocate", "{dest}"),
}


@pytest.mark.parametrize("case", list(KILL_CASES))
def test_sigkill_then_recover(make_vm, config, workdir, case):
    vm, disk = slow_vm(make_vm)
    A, B, C = disk.layers
    os.makedirs(f"{workdir}/dst", mode=0o755)
    verb, *args = [a.format(B=B, dest=f"{workdir}/dst/new.qcow2") for a in KILL_CASES[case]]
    proc = rig.cli_background(verb, vm.name, "vda", *args, "--bandwidth", "1", config=config)
    wait_for_job(vm)
    disk.guest_write(0x66, 30, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rc, out, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 1 and any("unfinished" in p for p in out["problems"])
    subprocess.run(["virsh", "-c", rig.TEST_URI, "blockjob", vm.name, "vda", "--bandwidth", "0"],
                   capture_output=True)
    settle(vm, disk, config)
    rc, out, _ = rig.cli("recover", vm.name, config=config)   # idempotent
    assert rc == 0 and out["records"] == []
    vm.restart()
    disk.assert_guest_data()


def restart_libvirtd():
    subprocess.run(["pkill", "-x", "libvirtd"], check=True)
    for _ in range(100):
        if subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("libvirtd did not stop")
    subprocess.run(["/usr/sbin/libvirtd", "-d"], check=True)
    for _ in range(100):
        if subprocess.run(["virsh", "-c", rig.TEST_URI, "version"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("libvirtd did not come back")


@pytest.mark.parametrize("strategy", ["pull", "commit"])
def test_libvirtd_restart_while_waiting(make_vm, config, strategy, conn):
    vm, disk = slow_vm(make_vm)
    A, B, C = disk.layers
    proc = rig.cli_background("merge", vm.name, "vda", "--base", A, "--strategy", strategy,
                              "--bandwidth", "1", config=config)
    wait_for_job(vm)
    restart_libvirtd()
    # Let the job finish quickly now (it may have ended already).
    subprocess.run(["virsh", "-c", rig.TEST_URI, "blockjob", vm.name, "vda", "--bandwidth", "0"],
                   capture_output=True)
    rc, out, err = finish(proc)
    assert rc == 0, (out, err)
    assert disk.live_chain() == out["chain_after"]
    disk.assert_guest_data()
    rc, out, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, out


@pytest.mark.parametrize("verb", ["active-commit", "copy"])
def test_vm_destroyed_mid_job(make_vm, config, workdir, verb):
    vm, disk = slow_vm(make_vm)
    args = (["merge", vm.name, "vda", "--strategy", "commit"] if verb == "active-commit"
            else ["relocate", vm.name, "vda", f"{workdir}/copy.qcow2", "--mode", "full"])
    proc = rig.cli_background(*args, "--bandwidth", "1", config=config)
    wait_for_job(vm)
    vm.dom.destroy()
    rc, out, err = finish(proc)
    # exit 1 (never 2: the job had started); libvirt says "not running" or the
    # waiter "stopped", depending on which call meets the dead VM first
    assert rc == 1 and ("stopped" in out["error"]["message"] or
                        "not running" in out["error"]["message"]), out
    vm.dom.create()
    assert disk.live_chain() == disk.layers[::-1]
    settle(vm, disk, config)
    assert not os.path.exists(f"{workdir}/copy.qcow2")


def test_vm_shut_down_between_ready_and_pivot(make_vm, config):
    vm, disk = slow_vm(make_vm)
    rc, out, err = rig.cli("merge", vm.name, "vda", "--strategy", "commit", "--no-wait", config=config)
    assert rc == 0, err
    for _ in range(200):
        if "ready='yes'" in vm.dom.XMLDesc(0):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the active commit never became ready: nothing here would be tested")
    vm.dom.destroy()
    vm.dom.create()
    settle(vm, disk, config)
    assert disk.live_chain() == disk.layers[::-1]   # rolled back: old chain, data intact


def test_second_operation_on_a_busy_disk_is_refused(make_vm, config, workdir):
    vm, disk = slow_vm(make_vm)
    proc = rig.cli_background("merge", vm.name, "vda", "--strategy", "pull", "--bandwidth", "1",
                              config=config)
    wait_for_job(vm)
    for args in (["merge", vm.name, "vda"], ["relocate", vm.name, "vda", f"{workdir}/x.qcow2"],
                 ["snapshot", vm.name, "vda", f"{workdir}/s.qcow2"]):
        rc, out, _ = rig.cli(*args, config=config)
        assert rc == 4 and out["error"]["code"] == "conflict", out
        assert f"pid {proc.pid}" in out["error"]["message"]
    subprocess.run(["virsh", "-c", rig.TEST_URI, "blockjob", vm.name, "vda", "--bandwidth", "0"],
                   capture_output=True)
    rc, out, err = finish(proc)
    assert rc == 0, err
    disk.assert_guest_data()

