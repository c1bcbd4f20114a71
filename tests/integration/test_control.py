"""The operator's verbs mean what they say (first part): numbers that are
no numbers and a pivot that cannot exist are refused; deletion acts on the
file that was decided on; a layer whose name holds a colon relocates."""

import json
import os
import signal
import time

import pytest
import rig
from rig import LayerSpec, Write
from test_merge import wait_for_job


def test_timeouts_that_are_no_numbers_are_refused(vm4, config):
    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    for value in ("nan", "inf", "-1", "0", "soon"):
        rc, out, err = rig.cli("merge", vm4.name, "vda", "--base", A, "--timeout", value,
                               config=config)
        assert rc == 2 and "timeout" in out["error"]["message"] + err, (value, out, err)
        rc, out, err = rig.cli("recover", vm4.name, "--timeout", value, config=config)
        assert rc == 2, (value, out, err)
    assert disk.live_chain() == [D, C, B, A]
    disk.assert_guest_data()


def test_abort_pivot_of_a_pull_is_refused_and_changes_nothing(make_vm, config):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 8)]),
                                LayerSpec("B", [Write(0x22, 8, 24)])])
    vm.start()
    A, B = disk.layers
    rc, out, err = rig.cli("merge", vm.name, "vda", "--strategy", "pull", "--no-wait",
                           "--bandwidth", "1", config=config)
    assert rc == 0, (out, err)
    rc, out, err = rig.cli("abort", vm.name, "vda", "--pivot", config=config)
    assert rc == 2 and "no pivot" in out["error"]["message"], (out, err)
    assert vm.dom.blockJobInfo("vda", 0), "the pull must still run"
    rc, out, err = rig.cli("speed", vm.name, "vda", "0", config=config)
    assert rc == 0, (out, err)
    deadline = time.monotonic() + 60
    while vm.dom.blockJobInfo("vda", 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    rc, out, err = rig.cli("recover", vm.name, config=config)
    assert rc == 0, (out, err)
    assert disk.live_chain() == [B]
    disk.assert_guest_data()


def test_delete_source_through_a_symlinked_active_image_leaves_no_orphan(make_vm, config,
                                                                          workdir):
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers())
    A, B, C, D = disk.layers
    link = os.path.join(vm.dir, "active-link.qcow2")
    os.symlink(D, link)
    disk.layers[-1] = link  # the definition names the link
    vm.start()
    disk.guest_write(0x5C, 5, 1)
    dest = os.path.join(workdir, "moved.qcow2")
    rc, out, err = rig.cli("relocate", vm.name, "vda", dest, "--mode", "full",
                           "--delete-source", config=config)
    assert rc == 0, (out, err)
    assert D in out["deleted"] and link not in out["deleted"], out["deleted"]
    assert not any(os.path.lexists(p) for p in (A, B, C, D, link)), os.listdir(vm.dir)
    disk.assert_guest_data()


def test_a_layer_named_with_a_colon_relocates(make_vm, config, workdir):
    vm = make_vm()
    layers = [LayerSpec("A", [Write(0xA1, 0, 4)]), LayerSpec("10:00", [Write(0xB1, 1, 1)]),
              LayerSpec("C", [Write(0xC1, 2, 1)])]
    folder = os.path.join(vm.dir, "base")
    os.makedirs(folder)
    paths = [os.path.join(folder, f"snap-{spec.name}.qcow2") for spec in layers]
    # relative names, as oVirt writes them; the colon one needs its ./
    backings = [None, "snap-A.qcow2", "./snap-10:00.qcow2"]
    disk = vm.add_layers("vda", list(zip(paths, backings, layers)))
    vm.start()
    dest_dir = os.path.join(workdir, "sd2")
    os.makedirs(dest_dir)
    rc, out, err = rig.cli("relocate", vm.name, "vda", os.path.join(dest_dir, "snap-C.qcow2"),
                           "--mode", "chain", config=config)
    assert rc == 0, (out, err)
    assert disk.live_chain() == [os.path.join(dest_dir, os.path.basename(p)) for p in paths[::-1]]
    disk.guest_write(0xD1, 3, 1)
    disk.assert_guest_data()
    vm.restart()
    disk.assert_guest_data()


def test_recover_with_a_timeout_stops_waiting_and_leaves_the_job_running(make_vm, config):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 8)]),
                                LayerSpec("B", [Write(0x22, 8, 24)]),
                                LayerSpec("C", [Write(0x33, 40, 1)])])
    vm.start()
    A, B, C = disk.layers
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "pull",
                           "--no-wait", "--bandwidth", "1", config=config)
    assert rc == 0, (out, err)
    started = time.monotonic()
    rc, out, err = rig.cli("recover", vm.name, "--timeout", "2", config=config)
    assert rc == 3 and out["error"]["code"] == "timeout", (out, err)
    assert [r["result"] for r in out["records"]] == ["waiting"]
    assert "still runs" in out["records"][0]["message"]
    assert time.monotonic() - started < 30
    assert vm.dom.blockJobInfo("vda", 0), "recover must not abort a healthy job"
    disk.guest_write(0x44, 50, 1)
    rc, out, err = rig.cli("speed", vm.name, "vda", "0", config=config)
    assert rc == 0, (out, err)
    rc, out, err = rig.cli("recover", vm.name, "--timeout", "120", config=config)
    assert rc == 0 and [r["result"] for r in out["records"]] == ["finished"], (out, err)
    assert disk.live_chain() == [C, A]
    disk.assert_guest_data()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_command_keeps_the_error_contract(make_vm, config, sig):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 8)]),
                                LayerSpec("B", [Write(0x22, 8, 24)])])
    vm.start()
    A, B = disk.layers
    proc = rig.cli_background("merge", vm.name, "vda", "--strategy", "pull", "--bandwidth", "1",
                              config=config)
    wait_for_job(vm)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    lines = out.strip().splitlines()
    assert len(lines) == 1, (out, err)
    body = json.loads(lines[0])
    assert proc.returncode == 1 and body["error"]["code"] == "interrupted", (body, err)
    message = body["error"]["message"]
    assert "recover" in message and vm.name in message and "(record " in message, message
    assert ("Ctrl-C" if sig == signal.SIGINT else "SIGTERM") in message
    # What it started is handed over: recover finishes it.
    rc, out, err = rig.cli("speed", vm.name, "vda", "0", config=config)
    assert rc == 0 or "no block job" in json.dumps(out), (out, err)
    rc, out, err = rig.cli("recover", vm.name, "--timeout", "120", config=config)
    assert rc == 0, (out, err)
    assert disk.live_chain() == [B]
    disk.assert_guest_data()


@pytest.mark.parametrize("mode", ["shallow", "full"])
def test_a_timed_out_copy_leaves_nothing_behind(make_vm, config, workdir, mode):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 4)]),
                                LayerSpec("B", [Write(0x22, 8, 24)])])
    vm.start()
    A, B = disk.layers
    dest = os.path.join(workdir, "moved.qcow2")
    rc, out, err = rig.cli("relocate", vm.name, "vda", dest, "--mode", mode, "--method", "mirror",
                           "--bandwidth", "1", "--timeout", "2", config=config)
    assert rc == 3 and out["error"]["code"] == "timeout", (out, err)
    assert not os.path.lexists(dest), "the timed-out copy left its DEST behind"
    assert disk.live_chain() == [B, A]
    rc, out, err = rig.cli("verify", vm.name, config=config)
    assert rc == 0 and out["ok"], out
    rc, out, err = rig.cli("relocate", vm.name, "vda", dest, "--mode", mode, "--method", "mirror",
                           config=config)
    assert rc == 0, (out, err)
    assert disk.live_chain() == ([dest, A] if mode == "shallow" else [dest])
    disk.guest_write(0x33, 40, 1)
    disk.assert_guest_data()


def test_abort_keeps_a_finished_no_pivot_copy_and_drops_an_unfinished_one(make_vm, config,
                                                                            workdir):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 4)]),
                                LayerSpec("B", [Write(0x22, 8, 4)])])
    vm.start()
    A, B = disk.layers
    kept = os.path.join(workdir, "kept.qcow2")
    rc, out, err = rig.cli("relocate", vm.name, "vda", kept, "--mode", "full", "--method",
                           "mirror", "--no-pivot", "--no-wait", config=config)
    assert rc == 0, (out, err)
    deadline = time.monotonic() + 60
    while "ready='yes'" not in vm.dom.XMLDesc(0):
        assert time.monotonic() < deadline, "the copy never became ready"
        time.sleep(0.05)
    disk.guest_write(0x33, 20, 1)  # mirrored into the copy too
    rc, out, err = rig.cli("abort", vm.name, "vda", config=config)
    assert rc == 0 and [r["result"] for r in out["recover"]] == ["finished"], (out, err)
    assert disk.live_chain() == [B, A] and os.path.exists(kept)
    disk.assert_guest_data()
    rig.run("qemu-img", "compare", "-U", "-F", "raw", kept, disk.reference)  # the copy is whole
    # An unfinished copy aborted: rolled back, its DEST removed.
    dropped = os.path.join(workdir, "dropped.qcow2")
    rc, out, err = rig.cli("relocate", vm.name, "vda", dropped, "--mode", "full", "--method",
                           "mirror", "--no-pivot", "--no-wait", "--bandwidth", "1", config=config)
    assert rc == 0, (out, err)
    rc, out, err = rig.cli("abort", vm.name, "vda", config=config)
    assert rc == 0 and [r["result"] for r in out["recover"]] == ["rolled-back"], (out, err)
    assert not os.path.exists(dropped) and disk.live_chain() == [B, A]
    disk.assert_guest_data()


def test_bandwidth_bounds_the_layer_copies_of_a_live_chain_relocation(make_vm, config, workdir):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 8)]),
                                LayerSpec("B", [Write(0x22, 8, 1)])])
    vm.start()
    A, B = disk.layers
    dest_dir = os.path.join(workdir, "sd2")
    os.makedirs(dest_dir)
    started = time.monotonic()
    rc, out, err = rig.cli("relocate", vm.name, "vda", os.path.join(dest_dir, "vda-B.qcow2"),
                           "--mode", "chain", "--bandwidth", "2", config=config)
    took = time.monotonic() - started
    assert rc == 0, (out, err)
    assert took >= 3.5, f"8 MiB of layer data at 2 MiB/s took {took:.1f} s"
    disk.assert_guest_data()


def test_jobs_lists_the_tools_own_work_and_abort_stops_it(make_vm, config, workdir):
    """A shut-off domain copied by qemu-img: no libvirt job, yet 'jobs'
    shows the operation and 'abort' stops it and rolls it back."""
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 16)]),
                                LayerSpec("B", [Write(0x22, 16, 4)])])
    vm.define()
    A, B = disk.layers
    dest = os.path.join(workdir, "moved.qcow2")
    proc = rig.cli_background("relocate", vm.name, "vda", dest, "--mode", "full",
                              "--bandwidth", "1", config=config)
    deadline = time.monotonic() + 30
    while True:
        rc, out, err = rig.cli("jobs", config=config)
        assert rc == 0, (out, err)
        mine = [op for op in out["operations"] if op["domain"] == vm.name]
        if mine:
            break
        assert proc.poll() is None and time.monotonic() < deadline, "never listed"
        time.sleep(0.1)
    assert mine[0]["operation"] == "relocate" and mine[0]["online"] is False
    assert mine[0]["running"] is True and mine[0]["pid"] == proc.pid
    rc, out, err = rig.cli("abort", vm.name, "vda", config=config)
    assert rc == 0 and [r["result"] for r in out["recover"]] == ["rolled-back"], (out, err)
    assert proc.wait(timeout=10) == 1  # the command stopped, as by Ctrl-C
    assert not os.path.exists(dest)
    assert disk.chain() == [B, A]
    rc, out, err = rig.cli("jobs", vm.name, config=config)
    assert rc == 0 and out["operations"] == [], out
    disk.assert_guest_data()


def test_snapshot_stream_stopped_by_timeout_or_abort_is_undone(make_vm, config, workdir):
    """The VM is on DEST over its old chain while the pull runs; stopped,
    it goes back onto the chain before (DEST committed back, removed):
    exit 3 for the timeout, verify clean, the guest's writes kept."""
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 24)]),
                                LayerSpec("B", [Write(0x22, 30, 1)])])
    vm.start()
    A, B = disk.layers
    dest = os.path.join(workdir, "moved.qcow2")
    args = ["relocate", vm.name, "vda", dest, "--mode", "full", "--method", "snapshot-stream",
            "--bandwidth", "1"]
    proc = rig.cli_background(*args, "--timeout", "4", config=config)
    deadline = time.monotonic() + 30
    while disk.live_chain()[0] != dest:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    disk.guest_write(0x33, 40, 1)  # lands in DEST: must survive the undo
    out, err = proc.communicate(timeout=120)
    body = json.loads(out)
    assert proc.returncode == 3 and body["error"]["code"] == "timeout", (body, err)
    assert disk.live_chain() == [B, A] and not os.path.exists(dest)
    rc, out, err = rig.cli("verify", vm.name, config=config)
    assert rc == 0 and out["ok"], out
    disk.assert_guest_data()
    # --no-wait, then abort: within seconds, back on the chain before.
    rc, out, err = rig.cli(*args, "--no-wait", config=config)
    assert rc == 0, (out, err)
    disk.guest_write(0x44, 42, 1)
    started = time.monotonic()
    rc, out, err = rig.cli("abort", vm.name, "vda", config=config)
    assert rc == 0 and [r["result"] for r in out["recover"]] == ["rolled-back"], (out, err)
    assert time.monotonic() - started < 60
    assert disk.live_chain() == [B, A] and not os.path.exists(dest)
    disk.assert_guest_data()
