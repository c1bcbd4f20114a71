"""What the operator reads is true (issue 38): only this node's daemons
are signalled, -q is quiet on success, history is in the order it says."""

from __future__ import annotations

import os
import subprocess
import sys

import nodes
import rig
from rig import LayerSpec, Write


def test_hook_reload_signals_only_this_nodes_libvirtd(node_b, config):
    conn_b, _ = node_b
    other = nodes.libvirtd_pid()
    for action in ("install", "uninstall"):
        rc, out, err = rig.cli("hook", action, "--reload", config=config)
        assert rc == 0, err
        assert out["reloaded"], out  # this node's libvirtd
        assert not [r for r in out["reloaded"] if r.endswith(f"[{other}]")], out
    assert conn_b.getVersion()


def test_quiet_prints_nothing_on_a_successful_shut_off_operation(make_vm, config, workdir):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 2)]),
                                LayerSpec("B", [Write(0x22, 4, 1)])])
    vm.define()
    A, B = disk.layers
    for args in (["snapshot", vm.name, "vda", os.path.join(vm.dir, "C.qcow2")],
                 ["merge", vm.name, "vda", "--base", A],
                 ["relocate", vm.name, "vda", os.path.join(workdir, "moved.qcow2")]):
        proc = subprocess.run([sys.executable, "-m", "vdsm_blockops", "-q", *args,
                               "--config", config], capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", (args, proc)
    disk.assert_guest_data()


def test_connect_to_another_node_on_this_host_is_refused(node_b, vm4, config):
    """Node B answers on loopback: the address says local, its host UUID
    says another node. Verbs on local files refuse it before anything."""
    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    for args in (["chain", vm4.name], ["verify", vm4.name],
                 ["merge", vm4.name, "vda", "--base", B]):
        rc, out, err = rig.cli("--connect", nodes.URI, *args, config=config)
        assert rc == 2 and "another node" in out["error"]["message"], (args, out)
    assert disk.live_chain() == [D, C, B, A]


def test_a_live_pull_stopped_by_abort_says_so_and_is_logged_so(make_vm, config, workdir):
    import json
    import time

    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 2)]),
                                LayerSpec("B", [Write(0x22, 4, 24)]),
                                LayerSpec("C", [Write(0x33, 30, 1)])])
    vm.start()
    A, B, C = disk.layers
    proc = rig.cli_background("merge", vm.name, "vda", "--base", A, "--strategy", "pull",
                              "--bandwidth", "1", config=config)
    deadline = time.monotonic() + 30
    while not vm.dom.blockJobInfo("vda", 0):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    rc, out, err = rig.cli("abort", vm.name, "vda", config=config)
    # Rolled back by whichever settles first: the abort, or the command
    # itself once it sees its job end (then the abort finds nothing left).
    assert rc == 0 and [r["result"] for r in out["recover"]] in (["rolled-back"], ["busy"],
                                                                   []), (out, err)
    stdout, stderr = proc.communicate(timeout=30)
    stopped = json.loads(stdout)["error"]
    assert stopped["code"] == "aborted" and "'vdsm-blockops abort'" in stopped["message"], stopped
    assert "ended canceled" not in stopped["message"]
    with open(os.path.join(workdir, "state", "history.jsonl")) as handle:
        merges = [json.loads(line) for line in handle if '"merge"' in line]
    assert merges[-1]["outcome"] == "aborted", merges
    rc, jobs, err = rig.cli("jobs", vm.name, config=config)
    assert jobs["operations"] == [] and jobs["jobs"] == [], jobs
    assert disk.live_chain() == [C, B, A]
    disk.assert_guest_data()


def test_a_paced_relocation_reports_each_phase_and_never_passes_100(make_vm, config, workdir):
    import re

    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 6)]),
                                LayerSpec("B", [Write(0x22, 8, 2)])])
    vm.start()
    dest = os.path.join(workdir, "paced.qcow2")
    proc = subprocess.run([sys.executable, "-m", "vdsm_blockops", "relocate", vm.name, "vda", dest,
                           "--mode", "full", "--method", "mirror", "--bandwidth", "4",
                           "--config", config], capture_output=True, text=True)
    assert proc.returncode == 0, proc
    shown = [float(p) for p in re.findall(r"([0-9.]+)%", proc.stdout + proc.stderr)]
    assert shown and max(shown) <= 100.0, proc.stdout + proc.stderr
    assert re.search(r"copied in [0-9.]+ s, verified in [0-9.]+ s", proc.stdout), proc.stdout
    rc, out, err = rig.cli("relocate", vm.name, "vda", os.path.join(workdir, "back.qcow2"),
                           "--mode", "full", "--bandwidth", "4", config=config)
    assert rc == 0, (out, err)
    phases = out["phases_s"]
    assert set(phases) == {"copy", "verification"} and phases["copy"] > 0, out
    assert phases["copy"] + phases["verification"] <= out["duration_s"]
    disk.assert_guest_data()


def test_completion_offers_domain_and_disk_names(vm4, config):
    """bash completion asks the tool ('names'), which asks libvirt."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "share", "bash-completion", "completions", "vdsm-blockops")

    def complete(*words: str) -> list[str]:
        line = " ".join(("vdsm-blockops",) + words)
        program = (f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words)}; "
                   f"_shtab_vdsm_blockops vdsm-blockops '{words[-1]}' '{words[-2]}'; "
                   'printf "%s\\n" "${COMPREPLY[@]}"')
        env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               "VDSM_BLOCKOPS_CONFIG": config}
        proc = subprocess.run(["bash", "-c", program], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc
        return proc.stdout.split()

    assert vm4.name in complete("chain", "")
    assert complete("merge", "--bandwidth", "3", vm4.name, "") == ["vda", "all"]


def test_a_shut_off_relocation_reports_the_method_it_ran(make_vm, config, workdir):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 2)]),
                                LayerSpec("B", [Write(0x22, 4, 1)])])
    vm.define()
    for mode, method in (("chain", "copy"), ("full", "convert")):
        dest = os.path.join(workdir, mode, "vda.qcow2")
        os.makedirs(os.path.dirname(dest))
        rc, out, err = rig.cli("relocate", vm.name, "vda", dest, "--mode", mode, config=config)
        assert rc == 0 and out["method"] == method and out["online"] is False, (out, err)
    rc, out, err = rig.cli("relocate", vm.name, "vda", os.path.join(workdir, "x.qcow2"),
                           "--method", "copy", config=config)
    assert rc == 2, out  # reported, never asked for
    disk.assert_guest_data()


def test_a_paced_shut_off_copy_shows_progress_by_the_bytes_written(make_vm, config, workdir):
    """qemu-img's own percentage runs over the whole disk, holes included
    (22% after 3 s of a 44 s paced copy); shown instead: bytes written
    against bytes to copy, looked at twice a second."""
    import re

    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 6)]),
                                LayerSpec("B", [Write(0x22, 40, 2)])], size_mib=256)
    vm.define()
    dest = os.path.join(workdir, "full.qcow2")
    proc = subprocess.run([sys.executable, "-m", "vdsm_blockops", "relocate", vm.name, "vda", dest,
                           "--mode", "full", "--bandwidth", "2", "--config", config],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc
    shown = [float(p) for p in re.findall(r"copy +([0-9.]+)%", proc.stdout + proc.stderr)]
    between = [p for p in shown if 0 < p < 100]
    assert len(between) >= 2 and max(shown) <= 100, proc.stdout + proc.stderr
    disk.assert_guest_data()
