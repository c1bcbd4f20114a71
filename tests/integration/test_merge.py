"""Snapshot live merge on real VMs. Every test checks guest-visible data."""

import json
import os
import subprocess
import sys
import time

import pytest
import rig
from rig import LayerSpec, Write


def paths(disk):
    return list(reversed(disk.layers))  # active first, as the contract says


def merge(vm, config, *args):
    return rig.cli("merge", vm.name, *args, config=config)


def registry(config):
    """The invalidated images' entries, by the path each was entered under
    (the registry itself is keyed by identity)."""
    state = open(config).read().split("state_dir: ")[1].split("\n")[0]
    path = os.path.join(state, "invalidated.json")
    entries = json.load(open(path)) if os.path.exists(path) else {}
    return {entry["path"]: entry for entry in entries.values()}


def wait_for_job(vm, target="vda", timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if vm.dom.blockJobInfo(target, 0):
            return
        time.sleep(0.05)
    raise AssertionError("job never started")


def finish(proc):
    out, err = proc.communicate(timeout=300)
    return proc.returncode, json.loads(out), err


def test_seed_example_pull_keeps_base(vm4, config):
    """merge vm vda --base A turns A <- B <- C <- D into A <- D."""
    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    rc, out, err = merge(vm4, config, "vda", "--base", A, "--strategy", "pull")
    assert rc == 0, err
    assert out["strategy"] == "pull" and out["verified"] is True
    assert out["chain_before"] == [D, C, B, A] and out["chain_after"] == [D, A]
    assert out["retired"] == [{"path": C, "valid": True}, {"path": B, "valid": True}]
    assert disk.live_chain() == [D, A]
    disk.assert_guest_data()
    assert registry(config) == {}  # pulled-out layers stay valid


def test_active_commit_with_guest_writes_during_the_job(make_vm, config):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0xA1, 0, 8)]),
                                LayerSpec("B", [Write(0xB1, 8, 2)]),
                                LayerSpec("C", [Write(0xC1, 10, 2)]),
                                LayerSpec("D", [Write(0xD1, 12, 6)])])
    vm.start()
    A, B, C, D = disk.layers
    proc = rig.cli_background("merge", vm.name, "vda", "--base", A, "--strategy", "commit",
                              "--bandwidth", "2", config=config)
    wait_for_job(vm)
    disk.guest_write(0x77, 1, 1)        # into the part already below
    disk.guest_write(0x78, 11, 2)       # over data being committed
    disk.guest_write(0x79, 40, 1)       # fresh area
    rc, out, err = finish(proc)
    assert rc == 0, err
    assert out["strategy"] == "commit" and out["chain_after"] == [B, A]
    assert out["retired"] == [{"path": D, "valid": False}, {"path": C, "valid": False}]
    assert disk.live_chain() == [B, A]
    disk.assert_guest_data()
    assert set(registry(config)) == {C, D}
    # The persistent definition follows the pivot: a restart keeps the data.
    vm.restart()
    assert disk.live_chain() == [B, A]
    disk.assert_guest_data()


def test_pull_with_guest_writes_during_the_job(make_vm, config):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0xA1, 0, 4)]),
                                LayerSpec("B", [Write(0xB1, 4, 4)]),
                                LayerSpec("C", [Write(0xC1, 8, 4)]),
                                LayerSpec("D")])
    vm.start()
    A, B, C, D = disk.layers
    proc = rig.cli_background("merge", vm.name, "vda", "--base", A, "--strategy", "pull",
                              "--bandwidth", "2", config=config)
    wait_for_job(vm)
    disk.guest_write(0x55, 5, 2)
    disk.guest_write(0x56, 30, 1)
    rc, out, err = finish(proc)
    assert rc == 0, err
    assert out["chain_after"] == [D, A] and disk.live_chain() == [D, A]
    disk.assert_guest_data()


def test_internal_top_by_index_notation(vm4, config):
    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    spec = json.loads(subprocess.check_output(
        [sys.executable, "-m", "vdsm_blockops", "chain", vm4.name, "vda", "--json", "--config", config]))
    index = {l["path"]: l["index"] for l in spec["disks"][0]["chain"]}
    rc, out, err = merge(vm4, config, "vda", "--top", f"vda[{index[C]}]", "--base", f"vda[{index[A]}]")
    assert rc == 0, err
    assert out["strategy"] == "commit" and out["result_image"] == B
    assert out["chain_after"] == [D, B, A] and disk.live_chain() == [D, B, A]
    assert out["retired"] == [{"path": C, "valid": False}]
    disk.assert_guest_data()


@pytest.mark.parametrize("strategy", ["pull", "commit"])
def test_flatten_without_base_onto_a_raw_bottom(make_vm, config, strategy):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0xA1, 0, 4)], fmt="raw"),
                                LayerSpec("B", [Write(0xB1, 2, 4)]),
                                LayerSpec("C", [Write(0xC1, 5, 1)])])
    vm.start()
    A, B, C = disk.layers
    rc, out, err = merge(vm, config, "vda", "--strategy", strategy)
    assert rc == 0, err
    expected = [C] if strategy == "pull" else [A]
    assert out["chain_after"] == expected and disk.live_chain() == expected
    disk.assert_guest_data()
    vm.restart()
    disk.assert_guest_data()


def test_transient_domain(make_vm, config):
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers())
    vm.start(persistent=False)
    A, B, C, D = disk.layers
    rc, out, err = merge(vm, config, "vda", "--base", B, "--strategy", "commit")
    assert rc == 0, err
    assert out["chain_after"] == [C, B, A] and disk.live_chain() == [C, B, A]
    disk.assert_guest_data()


def test_two_vms_sharing_a_layer(make_vm, config):
    vm1 = make_vm()
    disk1 = vm1.add_chain("vda", rig.four_layers())
    A, B, C, D = disk1.layers
    vm2 = make_vm()
    disk2 = vm2.add_overlay_on("vda", disk1, B)   # vm2 is a clone of B
    vm1.start()
    vm2.start()
    rc, out, _ = merge(vm1, config, "vda", "--base", A, "--strategy", "commit")
    assert rc == 2 and out["error"]["code"] == "unsafe-request"
    assert vm2.name in out["error"]["message"]
    assert disk1.live_chain() == [D, C, B, A]
    rc, out, err = merge(vm1, config, "vda", "--base", A)  # auto: pull is safe
    assert rc == 0, err
    assert out["strategy"] == "pull" and out["alternatives"]["commit"].startswith(B)
    disk1.assert_guest_data()
    disk2.assert_guest_data()
    vm2.dom.destroy()   # a defined-only domain still counts as a user
    rc, out, _ = rig.cli("merge", vm1.name, "vda", "--strategy", "commit", config=config)
    assert rc == 2 and vm2.name in out["error"]["message"]


def test_refusals_change_nothing(vm4, config, workdir):
    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    cases = [
        (["no-such-domain-x", "vda"], "unknown-domain"),
        ([vm4.name, "vdz"], "unknown-disk"),
        ([vm4.name, "vda", "--base", os.path.join(workdir, "nope.qcow2")], "unknown-image"),
        ([vm4.name, "vda", "--base", "vda-A.qcow2"], "unknown-image"),
        ([vm4.name, "vda", "--base", "vda[99]"], "unknown-image"),
        ([vm4.name, "vda", "--top", B, "--base", C], "bad-request"),
        ([vm4.name, "vda", "--top", B, "--base", B], "bad-request"),
        ([vm4.name, "vda", "--top", C, "--base", A, "--strategy", "pull"], "bad-request"),
        ([vm4.name, "vda", "--bandwidth", "-5"], "bad-request"),
        ([vm4.name, "vda", "--bandwidth", str(2**40)], "bad-request"),
        ([vm4.name, "vda", "--strategy", "stream"], "bad-request"),
        ([vm4.name, "all", "--base", A], "bad-request"),
        ([vm4.name, "vda", "--timeout", "0"], "bad-request"),
        ([vm4.name], "bad-request"),
    ]
    for args, code in cases:
        rc, out, _ = rig.cli("merge", *args, config=config)
        assert (rc, out["ok"], out["error"]["code"]) == (2, False, code), (args, out)
        assert out["error"]["message"]
    assert disk.live_chain() == [D, C, B, A]
    assert vm4.dom.blockJobInfo("vda", 0) == {}
    disk.assert_guest_data()


def test_dry_run_changes_nothing(vm4, config):
    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    before = {p: os.stat(p).st_mtime_ns for p in disk.layers}
    rc, out, _ = merge(vm4, config, "vda", "--base", A, "--dry-run")
    assert rc == 0 and out["dry_run"] and not out["changed"]
    assert out["chain_after"] == ([B, A] if out["strategy"] == "commit" else [D, A])
    assert disk.live_chain() == [D, C, B, A]
    assert {p: os.stat(p).st_mtime_ns for p in disk.layers} == before
    disk.assert_guest_data()


def test_all_disks_concurrently(make_vm, config):
    vm = make_vm()
    vda = vm.add_chain("vda", rig.four_layers())
    vdb = vm.add_chain("vdb", [LayerSpec("A", [Write(0x31, 0, 3)]), LayerSpec("B", [Write(0x32, 1, 1)])])
    vm.start()
    rc, out, err = merge(vm, config, "all")
    assert rc == 0, err
    assert [r["disk"] for r in out["results"]] == ["vda", "vdb"]
    assert len(vda.live_chain()) == 1 and len(vdb.live_chain()) == 1
    vda.assert_guest_data()
    vdb.assert_guest_data()


def test_noop_when_segment_is_one_layer(vm4, config):
    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    rc, out, _ = merge(vm4, config, "vda", "--base", C)
    assert rc == 0 and out["strategy"] == "noop" and not out["changed"]
    assert disk.live_chain() == [D, C, B, A]


def test_timeout_aborts_and_leaves_a_consistent_chain(make_vm, config):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0xA1, 0, 40)]), LayerSpec("B")])
    vm.start()
    A, B = disk.layers
    rc, out, _ = merge(vm, config, "vda", "--strategy", "pull", "--bandwidth", "1", "--timeout", "1")
    assert rc == 3 and out["error"]["code"] == "timeout"
    assert disk.live_chain() == [B, A] and vm.dom.blockJobInfo("vda", 0) == {}
    disk.assert_guest_data()
    rc, out, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, out


def test_conflict_with_a_running_job(vm4, config):
    disk = vm4.disks["vda"]
    subprocess.run(["virsh", "-c", rig.TEST_URI, "blockpull", vm4.name, "vda", "--bandwidth", "1"],
                   check=True, capture_output=True)
    try:
        rc, out, _ = merge(vm4, config, "vda")
        assert rc == 4 and out["error"]["code"] == "conflict"
    finally:
        subprocess.run(["virsh", "-c", rig.TEST_URI, "blockjob", vm4.name, "vda", "--abort"],
                       capture_output=True)
    disk.assert_guest_data()


def test_no_wait_then_speed_and_abort_pivot(make_vm, config):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0xA1, 0, 8)]), LayerSpec("B", [Write(0xB1, 0, 16)]),
                                LayerSpec("C", [Write(0xC1, 20, 1)])])
    vm.start()
    A, B, C = disk.layers
    rc, out, err = merge(vm, config, "vda", "--base", A, "--strategy", "commit",
                         "--bandwidth", "1", "--no-wait")
    assert rc == 0 and out["finished"] is False, err
    rc, out, _ = rig.cli("jobs", vm.name, config=config)
    assert out["jobs"][0]["type"] == "active-commit"
    rc, out, _ = rig.cli("speed", vm.name, "vda", "0", config=config)
    assert rc == 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, out, _ = rig.cli("jobs", vm.name, config=config)
        if out["jobs"] and out["jobs"][0]["ready"]:
            break
        time.sleep(0.2)
    rc, out, err = rig.cli("abort", vm.name, "vda", "--pivot", config=config)
    assert rc == 0, err
    assert disk.live_chain() == [B, A]
    disk.assert_guest_data()


def test_delete_retired(vm4, config):
    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    rc, out, err = merge(vm4, config, "vda", "--base", A, "--strategy", "commit", "--delete-retired")
    assert rc == 0, err
    assert sorted(out["deleted"]) == sorted([C, D])
    assert not os.path.exists(C) and not os.path.exists(D) and os.path.exists(B)
    disk.assert_guest_data()


def test_pulls_of_several_disks_do_not_crash_qemu(make_vm, config):
    """QEMU 7.2 segfaults now and then when two block-stream jobs of one VM
    end together; 'all' runs pulls one at a time within a domain."""
    for _ in range(3):
        vm = make_vm()
        disks = [vm.add_chain(t, [LayerSpec("A", [Write(0x11, 0, 32)]), LayerSpec("B", [Write(0x22, 40, 16)])])
                 for t in ("vda", "vdb", "vdc")]
        vm.start()
        rc, out, err = merge(vm, config, "all", "--strategy", "pull")
        assert rc == 0, (out, err)
        assert vm.dom.isActive()
        for disk in disks:
            assert len(disk.live_chain()) == 1
            disk.assert_guest_data()
        vm.destroy()


def test_keep_relative_backing_names(make_vm, config):
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers(), relative=True)
    vm.start()
    A, B, C, D = disk.layers

    def backing_name(path):
        info = json.loads(subprocess.check_output(["qemu-img", "info", "-U", "--output=json", path]))
        return info.get("backing-filename")

    rc, out, err = merge(vm, config, "vda", "--top", C, "--base", A, "--strategy", "commit",
                         "--keep-relative")
    assert rc == 0, err
    assert disk.live_chain() == [D, B, A]
    assert backing_name(D) == os.path.basename(B)   # still relative
    rc, out, err = merge(vm, config, "vda", "--base", A, "--strategy", "pull", "--keep-relative")
    assert rc == 0, err
    assert disk.live_chain() == [D, A] and backing_name(D) == os.path.basename(A)
    disk.assert_guest_data()
    vm.restart()
    disk.assert_guest_data()


def test_keep_relative_that_libvirt_cannot_honour_is_refused(vm4, config):
    """vm4's layers name their backings by absolute paths: libvirt cannot
    keep a rewritten name relative -- refused before anything changes."""
    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    rc, out, err = merge(vm4, config, "vda", "--top", C, "--base", A, "--strategy", "commit",
                         "--keep-relative")
    assert rc == 2 and "absolute" in out["error"]["message"], (out, err)
    assert disk.live_chain() == [D, C, B, A]
    rc, out, err = merge(vm4, config, "vda", "--base", A, "--strategy", "commit",
                         "--keep-relative")  # an active commit rewrites no name
    assert rc == 0 and out["keep_relative"] is False, (out, err)
    disk.assert_guest_data()
