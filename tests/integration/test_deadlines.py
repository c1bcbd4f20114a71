"""The operator's verbs mean what they say (second part): --timeout bounds
the whole operation whatever runs underneath -- qemu-img, the tool's own
copies, a wait in a VM's pull queue -- and rolls back like abort; Ctrl-C
stops every disk of 'all' at once; --bandwidth holds qemu-img rebase too."""

import json
import os
import signal
import subprocess
import time

import rig
from rig import LayerSpec, Write
from test_merge import wait_for_job


def _two_layers(data_mib=24):
    return [LayerSpec("A", [Write(0x11, 0, data_mib)]), LayerSpec("B", [Write(0x22, 30, 1)])]


def _verified(vm, config):
    rc, out, err = rig.cli("verify", vm.name, config=config)
    assert rc == 0 and out["ok"], (out, err)


def _own_operation(vm, config, proc, deadline_s=30):
    """The tool's own operation on ``vm`` as 'jobs' lists it, once it runs."""
    deadline = time.monotonic() + deadline_s
    while True:
        rc, out, err = rig.cli("jobs", vm.name, config=config)
        assert rc == 0, (out, err)
        if out["operations"]:
            return out["operations"][0]
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)


def test_flatten_honours_timeout_and_abort(make_vm, config, workdir):
    vm = make_vm()
    disk = vm.add_chain("vda", _two_layers())
    vm.start()
    A, B = disk.layers
    dest = os.path.join(workdir, "flat.qcow2")
    args = ["relocate", vm.name, "vda", dest, "--mode", "full", "--method", "flatten",
            "--bandwidth", "1"]
    started = time.monotonic()
    rc, out, err = rig.cli(*args, "--timeout", "3", config=config)
    took = time.monotonic() - started
    assert rc == 3 and out["error"]["code"] == "timeout", (out, err)
    assert took < 15, f"24 MiB at 1 MiB/s with --timeout 3 took {took:.1f} s"
    assert not os.path.exists(dest) and disk.live_chain() == [B, A]
    _verified(vm, config)
    disk.assert_guest_data()
    # A running flatten is listed by 'jobs' and stopped by 'abort'.
    proc = rig.cli_background(*args, config=config)
    listed = _own_operation(vm, config, proc)
    assert listed["operation"] == "relocate" and listed["pid"] == proc.pid and listed["running"]
    disk.guest_write(0x33, 40, 1)
    rc, out, err = rig.cli("abort", vm.name, "vda", config=config)
    assert rc == 0 and [r["result"] for r in out["recover"]] == ["rolled-back"], (out, err)
    assert proc.wait(timeout=10) == 1
    stopped = json.loads(proc.stdout.read())["error"]  # says who stopped it, not Ctrl-C's text
    assert stopped["code"] == "aborted" and "'vdsm-blockops abort'" in stopped["message"], stopped
    assert not os.path.exists(dest) and disk.live_chain() == [B, A]
    disk.assert_guest_data()
    # Nothing was left behind: the same relocation runs now.
    rc, out, err = rig.cli("relocate", vm.name, "vda", dest, "--mode", "full", "--method",
                           "flatten", config=config)
    assert rc == 0, (out, err)
    assert disk.live_chain() == [dest]
    disk.assert_guest_data()


def test_cold_operations_honour_timeout_and_bandwidth(make_vm, config, workdir):
    vm = make_vm()
    disk = vm.add_chain("vda", _two_layers())
    vm.define()
    A, B = disk.layers
    dest = os.path.join(workdir, "cold.qcow2")
    started = time.monotonic()
    rc, out, err = rig.cli("relocate", vm.name, "vda", dest, "--mode", "full", "--bandwidth", "1",
                           "--timeout", "2", config=config)
    assert rc == 3 and out["error"]["code"] == "timeout", (out, err)
    assert time.monotonic() - started < 15
    assert not os.path.exists(dest) and disk.chain() == [B, A]
    # qemu-img rebase has no -r: it is held to --bandwidth all the same,
    # and stopped at the timeout.
    rc, out, err = rig.cli("merge", vm.name, "vda", "--strategy", "pull", "--bandwidth", "1",
                           "--timeout", "2", config=config)
    assert rc == 3 and out["error"]["code"] == "timeout", (out, err)
    assert disk.chain() == [B, A]
    _verified(vm, config)
    disk.assert_guest_data()
    started = time.monotonic()
    rc, out, err = rig.cli("merge", vm.name, "vda", "--strategy", "pull", "--bandwidth", "8",
                           config=config)
    took = time.monotonic() - started
    assert rc == 0, (out, err)
    assert took >= 2.5, f"a 24 MiB pull at 8 MiB/s took {took:.1f} s"
    assert disk.chain() == [B]
    disk.assert_guest_data()


def test_a_queued_pull_honours_its_timeout(make_vm, config):
    vm = make_vm()
    vda = vm.add_chain("vda", _two_layers())
    vdb = vm.add_chain("vdb", _two_layers(4))
    vm.start()
    rc, out, err = rig.cli("merge", vm.name, "vda", "--strategy", "pull", "--no-wait",
                           "--bandwidth", "1", config=config)
    assert rc == 0, (out, err)
    started = time.monotonic()
    rc, out, err = rig.cli("merge", vm.name, "vdb", "--strategy", "pull", "--timeout", "3",
                           config=config)
    took = time.monotonic() - started
    assert rc == 3 and out["error"]["code"] == "timeout", (out, err)
    assert "pulls of" in out["error"]["message"], out
    assert took < 15, f"queued with --timeout 3, it came back after {took:.1f} s"
    assert vdb.live_chain() == vdb.layers[::-1]
    rc, out, err = rig.cli("jobs", vm.name, config=config)
    assert [op["disk"] for op in out["operations"]] == ["vda"], out
    assert vm.dom.blockJobInfo("vda", 0), "the pull of vda must run on"
    rc, out, err = rig.cli("speed", vm.name, "vda", "0", config=config)
    assert rc == 0, (out, err)
    rc, out, err = rig.cli("recover", vm.name, "--timeout", "120", config=config)
    assert rc == 0, (out, err)
    assert vda.live_chain() == [vda.layers[-1]]
    for disk in (vda, vdb):
        disk.assert_guest_data()


def _to_a_worker_thread(pid, sig):
    import ctypes

    tid = min(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    SYS_TGKILL = 234  # x86_64
    assert ctypes.CDLL(None, use_errno=True).syscall(SYS_TGKILL, pid, tid, sig) == 0


def _ctrl_c(proc):
    """Ctrl-C to a thread other than the main one, as the kernel may pick
    for a process-wide Ctrl-C (Python runs the handler on the main thread
    only when it next runs: a main thread blocked without timeout held it
    64 s); the command ends with one JSON object, code interrupted. The
    seconds it took."""
    interrupted = time.monotonic()
    _to_a_worker_thread(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - interrupted
    lines = out.strip().splitlines()
    assert len(lines) == 1, (out, err)
    body = json.loads(lines[0])
    assert proc.returncode == 1 and body["error"]["code"] == "interrupted", (body, err)
    return took


def test_ctrl_c_stops_the_tools_own_copies_at_once(make_vm, config, workdir):
    """Ctrl-C (to a thread other than the main one) during a shut-off VM's
    chain copy -- the tool's own copies, paced: the command stops within
    seconds, not when the copies end; recover rolls it back."""
    vm = make_vm()
    disk = vm.add_chain("vda", _two_layers())
    vm.define()
    A, B = disk.layers
    dest_dir = os.path.join(workdir, "dst")
    os.makedirs(dest_dir)
    proc = rig.cli_background("relocate", vm.name, "vda", os.path.join(dest_dir, "B.qcow2"),
                              "--mode", "chain", "--bandwidth", "1", config=config)
    _own_operation(vm, config, proc)
    time.sleep(1)  # copying at 1 MiB/s: ~25 s to go
    took = _ctrl_c(proc)
    assert took < 5, f"the command stopped {took:.1f} s after Ctrl-C"
    rc, out, err = rig.cli("recover", vm.name, "--timeout", "60", config=config)
    assert rc == 0 and [r["result"] for r in out["records"]] == ["rolled-back"], (out, err)
    assert disk.chain() == [B, A] and os.listdir(dest_dir) == []
    _verified(vm, config)
    disk.assert_guest_data()


def test_an_interrupted_all_stops_every_disk_at_once(make_vm, config, workdir):
    vm = make_vm()
    vda = vm.add_chain("vda", _two_layers())
    vdb = vm.add_chain("vdb", _two_layers())
    vm.start()
    dest_dir = os.path.join(workdir, "sd2")
    os.makedirs(dest_dir)
    proc = rig.cli_background("relocate", vm.name, "all", dest_dir, "--mode", "full",
                              "--method", "mirror", "--bandwidth", "1", config=config)
    wait_for_job(vm, "vda")
    wait_for_job(vm, "vdb")
    took = _ctrl_c(proc)
    assert took < 10, f"the command stopped {took:.1f} s after Ctrl-C"
    # Handed over as documented: abort rolls one back, recover finishes the other.
    rc, out, err = rig.cli("abort", vm.name, "vda", config=config)
    assert rc == 0 and [r["result"] for r in out["recover"]] == ["rolled-back"], (out, err)
    assert vda.live_chain() == vda.layers[::-1]
    assert not os.path.exists(os.path.join(dest_dir, os.path.basename(vda.layers[-1])))
    vdb.guest_write(0x44, 50, 1)
    rc, out, err = rig.cli("speed", vm.name, "vdb", "0", config=config)
    assert rc == 0, (out, err)
    rc, out, err = rig.cli("recover", vm.name, "--timeout", "120", config=config)
    assert rc == 0, (out, err)
    assert vdb.live_chain() == [os.path.join(dest_dir, os.path.basename(vdb.layers[-1]))]
    for disk in (vda, vdb):
        disk.assert_guest_data()


def _tmpfs(path, size_mib):
    os.makedirs(path, mode=0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", path],
                   check=True)
    return path


def test_all_is_checked_together_and_each_failed_disk_named(make_vm, config, workdir):
    """Room for all disks summed per file system before anything starts;
    a failure mid-way names each failed disk, its code and its cause."""
    # Mounted before the VM starts (QEMU's mount namespace, see test_relocate).
    tight = _tmpfs(os.path.join(workdir, "tight"), 40)
    roomy = _tmpfs(os.path.join(workdir, "roomy"), 64)
    try:
        vm = make_vm()
        disks = {t: vm.add_chain(t, _two_layers()) for t in ("vda", "vdb")}
        vm.start()
        rc, out, err = rig.cli("relocate", vm.name, "all", tight, "--mode", "full", config=config)
        assert rc == 2 and "for vda, vdb together" in out["error"]["message"], (out, err)
        assert os.listdir(tight) == []
        proc = rig.cli_background("relocate", vm.name, "all", roomy, "--mode", "full",
                                  "--method", "mirror", "--bandwidth", "4", config=config)
        wait_for_job(vm, "vda")
        wait_for_job(vm, "vdb")
        disks["vdb"].guest_write(0x5A, 32, 20)  # now more than the folder holds
        out, err = proc.communicate(timeout=120)
        body = json.loads(out)
        assert proc.returncode == 1 and "disks failed: " in body["error"]["message"], (body, err)
        failed = [r for r in body["error"]["details"]["results"] if "error" in r]
        assert "vdb" in [r["disk"] for r in failed], body
        for result in failed:
            assert f"{result['disk']} ({result['error']['code']})" in body["error"]["message"]
            assert "ENOSPC" in result["error"]["message"], result
            disk = disks[result["disk"]]
            assert disk.live_chain() == disk.layers[::-1]
            assert not os.path.exists(os.path.join(roomy, os.path.basename(disk.layers[-1])))
        _verified(vm, config)
        for disk in disks.values():
            disk.assert_guest_data()
    finally:
        for folder in (tight, roomy):
            subprocess.run(["umount", "-l", folder])
