"""The API's example programs (docs/examples/), run as a user would run
them, against real VMs: the guests' data is compared from outside after
each, and a move cancelled from another thread leaves the VM running here
on its own chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nodes
import rig
from rig import LayerSpec, Write

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "docs", "examples")


def example(name: str, *args: str, config: str, timeout_s: float = 300):
    """(exit code, the JSON line it printed or None, stderr)."""
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args,
                           "--uri", rig.TEST_URI, "--config", config],
                          capture_output=True, text=True, timeout=timeout_s)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else None, proc.stderr


def test_the_merge_example_pulls_live_and_keeps_the_data(vm4, config):
    disk = vm4.disks["vda"]
    A, B, C, D = disk.layers
    disk.guest_write(0x5a, 40, 2)
    rc, out, err = example("merge.py", vm4.name, "vda", "--base", A, config=config)
    assert rc == 0, err
    assert out == {"strategy": "pull", "chain_after": [D, A], "verified": True}
    assert disk.live_chain() == [D, A]
    disk.assert_guest_data()


def test_the_relocate_example_moves_the_chain_and_the_guest_writes_on(vm4, config, workdir):
    disk = vm4.disks["vda"]
    dest_dir = os.path.join(workdir, "moved")
    os.makedirs(dest_dir)
    dest = os.path.join(dest_dir, "D.qcow2")
    rc, out, err = example("relocate.py", vm4.name, "vda", dest, config=config)
    assert rc == 0, err
    assert out["verified"] and out["chain_after"][0] == dest
    assert disk.live_chain()[0] == dest and len(disk.live_chain()) == 4
    disk.guest_write(0x6b, 10, 1)  # on the copy now
    disk.assert_guest_data()


def test_the_refused_example_catches_a_typed_error_and_nothing_changed(vm4, config):
    before = vm4.disks["vda"].live_chain()
    rc, out, err = example("refused.py", vm4.name, "vda", "/nowhere/base.qcow2", config=config)
    assert rc == 0, err
    assert out["exit_code"] == 2 and out["refused"] in ("UnknownImage", "BadRequest")
    assert (out["domain"], out["disk"], out["unchanged"]) == (vm4.name, "vda", True)
    assert vm4.disks["vda"].live_chain() == before
    vm4.disks["vda"].assert_guest_data()


def test_the_migrate_example_cancelled_from_a_thread_rolls_back_then_moves(
        make_vm, node_b, config, workdir):
    conn_b, _root = node_b
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 8)]),
                                LayerSpec("B", [Write(0x22, 4, 2)])])
    vm.start()
    dest_dir = os.path.join(workdir, "on-b")
    move = ("migrate.py", vm.name, nodes.URI, "--dest-dir", dest_dir,
            "--migrate-uri", "tcp://127.0.0.1")
    # 1 MiB/s holds the migration of the RAM for a minute: the cancel, from
    # a timer thread 3 s in, lands before the switchover, wherever it is.
    rc, out, err = example(*move, "--bandwidth", "1", "--cancel-after", "3", config=config)
    assert rc == 1, err
    assert out["moved"] is False and out["cancelled"] is True, out
    assert out["settled"] == "rolled-back" and out["record"], out
    assert vm.dom.isActive() and vm.name not in [d.name() for d in conn_b.listAllDomains()]
    assert disk.live_chain() == list(reversed(disk.layers))
    disk.guest_write(0x33, 20, 1)  # the guest runs on here
    disk.assert_guest_data()
    rc, out, err = example(*move, config=config)
    assert rc == 0, err
    vm.created = False
    assert out["moved"] and out["verified"] and out["dest_host"] == "node-b", out
    assert "all: " in err  # the progress callback was called
    assert conn_b.lookupByName(vm.name).isActive()
