"""The JSON contract of every verb, pinned: each verb runs on the same kind
of chain and its report, with the run's names, sizes and times masked, must
equal the stored one (``tests/data/reports.json``). Restructuring the code
must not change what scripts and playbooks read.

``VDSM_BLOCKOPS_WRITE_REPORTS=1`` rewrites the stored file (only when the
contract changes on purpose, with the change in the same commit)."""

import json
import os
import re
import subprocess
import time

import rig
from rig import LayerSpec, Write

STORED = os.path.join(os.path.dirname(__file__), "..", "data", "reports.json")
VOLATILE_NUMBERS = {"allocation", "bytes_to_copy", "cur", "end", "percent", "virtual_size",
                    "duration_s", "bandwidth_mib_s", "pid", "started_at", "time",
                    "pull", "commit",  # the costs under "alternatives"
                    "copy", "verification"}  # the times under "phases_s"


def mask(value, names):
    """Replace what differs between runs by placeholders."""
    if isinstance(value, dict):
        return {k: ("<n>" if k in VOLATILE_NUMBERS and isinstance(v, (int, float)) and
                    not isinstance(v, bool) else
                    "<id>" if k in ("record", "id") and isinstance(v, str) else mask(v, names))
                for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v, names) for v in value]
    if isinstance(value, str):
        for real, placeholder in names.items():
            value = value.replace(real, placeholder)
        value = re.sub(r"\bpid \d+", "pid <n>", value)
        return re.sub(r"\b[0-9a-f]{12}\b", "<id>", value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return value


def chain_vm(make_vm):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0xA1, 0, 4)]),
                                LayerSpec("B", [Write(0xB1, 1, 1)]),
                                LayerSpec("C", [Write(0xC1, 2, 1)])])
    return vm, disk


def test_every_verb_reports_the_same_json(make_vm, config, workdir):
    reports = {}

    def run(label, *args, expect=0):
        rc, out, err = rig.cli(*args, config=config)
        assert rc == expect, (label, out, err)
        reports[label] = out
        return out

    vm, disk = chain_vm(make_vm)
    vm.define()
    A, B, C = disk.layers
    run("chain-shut-off", "chain", vm.name)
    vm.dom.create()
    run("chain", "chain", vm.name)
    run("verify", "verify", vm.name)
    run("merge-dry-run", "merge", vm.name, "vda", "--base", A, "--dry-run")
    run("merge-noop", "merge", vm.name, "vda", "--top", B, "--base", A)
    run("merge-pull", "merge", vm.name, "vda", "--base", A, "--strategy", "pull")
    run("snapshot", "snapshot", vm.name, "vda", f"{vm.dir}/vda-S.qcow2")
    run("merge-commit", "merge", vm.name, "vda", "--base", A, "--strategy", "commit")
    os.makedirs(f"{workdir}/dst", mode=0o755)
    run("relocate-dry-run", "relocate", vm.name, "vda", f"{workdir}/dst/new.qcow2", "--dry-run")
    run("relocate-chain", "relocate", vm.name, "vda", f"{workdir}/dst/new.qcow2")
    run("relocate-full", "relocate", vm.name, "vda", f"{workdir}/dst/full.qcow2", "--mode", "full")
    run("merge-unknown-image", "merge", vm.name, "vda", "--base", "/nope", expect=2)
    vm3, _ = chain_vm(make_vm)
    vm3.start()
    run("merge-no-wait", "merge", vm3.name, "vda", "--strategy", "pull", "--no-wait", "--bandwidth", "1")
    vm2, disk2 = chain_vm(make_vm)
    vm2.start()
    rig.cli("merge", vm2.name, "vda", "--strategy", "commit", "--no-wait", "--bandwidth", "1",
            config=config)
    for _ in range(400):
        if "ready='yes'" in vm2.dom.XMLDesc(0):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the active commit never became ready")
    run("jobs", "jobs", vm2.name)
    run("speed", "speed", vm2.name, "vda", "0")
    run("abort-pivot", "abort", vm2.name, "vda", "--pivot")
    # Unthrottle vm3's pull so recover need not wait (it may have ended already).
    throttle = subprocess.run(["virsh", "-c", rig.TEST_URI, "blockjob", vm3.name, "vda",
                               "--bandwidth", "0"], capture_output=True, text=True)
    assert throttle.returncode == 0 or "does not have an active block job" in throttle.stderr, \
        throttle.stderr
    run("recover", "recover", vm3.name, "--timeout", "120")
    run("recover-nothing", "recover", vm3.name)
    run("hook-install", "hook", "install", "--hooks-dir", f"{workdir}/hooks")
    run("units-install", "units", "install", "--unit-dir", f"{workdir}/units")

    names = {workdir: "<W>", vm.name: "<VM>", vm2.name: "<VM2>", vm3.name: "<VM3>",
             vm.dom.UUIDString(): "<UUID>", vm2.dom.UUIDString(): "<UUID2>",
             vm3.dom.UUIDString(): "<UUID3>", rig.sys.executable: "<PY>"}
    masked = mask(reports, names)
    if os.environ.get("VDSM_BLOCKOPS_WRITE_REPORTS"):
        with open(STORED, "w") as handle:
            json.dump(masked, handle, indent=1, sort_keys=True)
            handle.write("\n")
        # Rewriting is no test: this run compared nothing.
        raise AssertionError(f"{STORED} rewritten; review the diff and run again without "
                             "VDSM_BLOCKOPS_WRITE_REPORTS")
    with open(STORED) as handle:
        stored = json.load(handle)
    for label in stored:
        assert masked.get(label) == stored[label], label
    assert set(masked) == set(stored)
