"""Moves of VMs built on one template onto one destination folder: the
template crosses the wire once, a move that finds it being uploaded by
another waits for that upload to be proven and reuses it, and a roll-back
never deletes a file another domain on the destination runs on (asked
there, through node B's libvirt)."""

from __future__ import annotations

import json
import os
import sys
import time

import nodes
import rig
from rig import LayerSpec, Write
from test_migrate import (
    assert_b_holds,
    finish,
    migrate,
    one_running_copy,
    record_of,
    wait_for_phase,
)


def template_vms(make_vm, workdir, tops: list[list[LayerSpec]], base_mib: int = 8,
                 size_mib: int = 64):
    """One VM per entry of ``tops``, each a chain of those layers on the
    same template ``workdir``/tmpl/base.qcow2; started."""
    base = os.path.join(workdir, "tmpl", "base.qcow2")
    os.makedirs(os.path.dirname(base))
    vms = []
    for pos, layers in enumerate(tops):
        vm = make_vm()
        placed = [(base, None, LayerSpec("T", [] if pos else [Write(0x11, 0, base_mib)]))]
        for layer in layers:
            placed.append((os.path.join(vm.dir, f"{layer.name}.qcow2"), placed[-1][0], layer))
        disk = vm.add_layers("vda", placed, size_mib=size_mib,
                             reference_from=base if pos else None)
        vms.append((vm.start(), disk))
    return base, vms


def test_a_template_in_upload_is_awaited_reused_and_kept_by_a_roll_back(make_vm, node_b,
                                                                          config, workdir,
                                                                          test_root):
    """x1's move uploads the template slowly; x3's move to the same folder
    waits for it to be proven and reuses it (reported so), and runs on node
    B on it. x1's move is then aborted: its roll-back removes x1's own
    layers there and keeps the template, which x3 runs on -- x3 starts
    again there with every write. (Before: x3 was refused, or, once the
    template was proven, reused it and lost it to x1's roll-back.)"""
    conn_b, root = node_b
    base, [(x1, disk1), (x3, disk3)] = template_vms(make_vm, workdir, [
        [LayerSpec("mid", [Write(0x21, 8, 100)]), LayerSpec("top", [Write(0x31, 120, 1)])],
        [LayerSpec("top", [Write(0x32, 120, 1)])]], size_mib=128)
    dest_dir = os.path.join(workdir, "drained")
    base_on_b = nodes.on_b(root, test_root, os.path.join(dest_dir, "tmpl", "base.qcow2"))
    first = migrate(x1, config, dest_dir, "--bandwidth", "2")
    wait_for_phase(workdir, x1.dom.UUIDString(), ["copying"], first)
    deadline = time.monotonic() + 30
    while not os.path.exists(base_on_b):  # the template's upload has begun
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.02)
    rc, out, err = finish(migrate(x3, config, dest_dir))
    assert rc == 0, (out, err)
    x3.created = False
    assert [(c["dest"], c["reused"]) for c in out["copied"]] == [
        (os.path.join(dest_dir, "tmpl", "base.qcow2"), True)], out
    assert out["bytes_to_copy"] == 0
    # x1 still uploads its own layer (100 MiB at 2 MiB/s): aborted, it rolls back
    assert record_of(workdir, x1.dom.UUIDString())["phase"] == "copying"
    rc, aborted, err = rig.cli("abort", x1.name, "all", config=config)
    assert rc == 0 and [o["result"] for o in aborted["recover"]] == ["rolled-back"], (aborted, err)
    assert finish(first)[0] == 1
    assert one_running_copy(x1, conn_b) == "a"
    assert record_of(workdir, x1.dom.UUIDString()) is None
    assert not os.path.exists(nodes.on_b(root, test_root, os.path.join(dest_dir, x1.name)))
    assert os.path.exists(base_on_b)  # x3 runs on it
    disk1.assert_guest_data()
    assert rig.cli("verify", x1.name, config=config)[0] == 0
    # x3 restarts on node B, on the template it shares, with its data
    moved = conn_b.lookupByName(x3.name)
    moved.destroy()
    moved.create()
    moved.destroy()
    assert_b_holds(disk3, os.path.join(dest_dir, x3.name, "top.qcow2"))
    notes = [n for n in os.listdir(os.path.dirname(base_on_b)) if n.startswith(".vdsm")]
    assert notes == []  # no claim or marker left behind


def test_the_drain_role_copies_a_shared_template_once(make_vm, node_b, config, workdir,
                                                       test_root):
    """Three running VMs on one template drained by the role with
    ``source_root``, all three at once: the template is uploaded by one
    move (the others wait for it and reuse it), every VM runs on node B on
    it and starts again there with its data."""
    from test_ansible import PLAYBOOKS, play

    conn_b, root = node_b
    base, vms = template_vms(make_vm, workdir, [[LayerSpec("top", [Write(0x40 + i, 20, 1)])]
                                                for i in range(3)], base_mib=24)
    inventory = os.path.join(workdir, "nodes.ini")
    with open(inventory, "w") as handle:
        handle.write(f"[nodes]\nnode1 ansible_connection=local ansible_python_interpreter="
                     f"{sys.executable} blockops_uri={rig.TEST_URI} blockops_config={config}\n")
    dest_dir = os.path.join(workdir, "drained")
    extra = json.dumps({"target_hosts": "node1", "destinations": [nodes.URI],
                        "dest_dir": dest_dir, "source_root": workdir, "per_node_limit": 3,
                        "migrate_uris": {nodes.URI: "tcp://127.0.0.1"}})
    rc, recap, out = play(inventory, os.path.join(PLAYBOOKS, "drain.yml"), "-e", extra)
    assert rc == 0 and recap["node1"]["failed"] == 0, out
    moves = [e for e in rig.cli("history", config=config)[1]["entries"]
             if e["operation"] == "migrate"]
    assert len(moves) == 3 and all(e["outcome"] == "ok" for e in moves), moves
    template = os.path.getsize(base)
    assert sorted(e["bytes"] >= template for e in moves) == [False, False, True], moves
    base_on_b = nodes.on_b(root, test_root, os.path.join(dest_dir, "tmpl", "base.qcow2"))
    assert os.listdir(os.path.dirname(base_on_b)) == ["base.qcow2"]  # no note left
    for vm, disk in vms:
        vm.created = False
        moved = conn_b.lookupByName(vm.name)
        assert moved.isActive()
        moved.destroy()
        moved.create()
        moved.destroy()
        assert_b_holds(disk, os.path.join(dest_dir, vm.name, "top.qcow2"))


def test_delete_source_waits_for_the_destination_and_keeps_layers_if_it_restarted(
        make_vm, node_b, config, workdir, test_root):
    """--delete-source unlinks the source layers only after the destination
    had time to write its copies to disk (libvirt's upload does not fsync)
    and ran on meanwhile: the layers of a VM whose domain on node B was
    restarted in that window are kept (retired), those of one that ran on
    are deleted. Before, both were unlinked at once."""
    from test_migrate import big_vm

    conn_b, root = node_b
    with open(config, "a") as handle:
        handle.write("dest_writeback_s: 25\n")  # past the migration itself
    for restart in (True, False):
        vm, disk = big_vm(make_vm, base_mib=4, top_mib=1)
        layers = list(disk.layers)
        proc = migrate(vm, config, vm.dir, "--delete-source")
        wait_for_phase(workdir, vm.dom.UUIDString(), ["deleting"], proc)
        assert all(os.path.exists(p) for p in layers)  # not before the wait
        moved = conn_b.lookupByName(vm.name)
        if restart:  # a crash of node B in the window, as far as the move can tell
            moved.destroy()
            moved.create()
        rc, out, err = finish(proc)
        assert rc == 0, (out, err)
        vm.created = False
        if restart:
            assert out.get("deleted") is None, out
            assert sorted(k["path"] for k in out.get("kept", [])) == sorted(layers), out
            assert all(os.path.exists(p) for p in layers)
        else:
            assert sorted(out["deleted"]) == sorted(layers) and "kept" not in out, out
            assert not any(os.path.exists(p) for p in layers)
        assert record_of(workdir, vm.name) is None
        conn_b.lookupByName(vm.name).destroy()
        assert_b_holds(disk, disk.layers[-1])
