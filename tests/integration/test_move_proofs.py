"""What a move to node B sends and proves: holes stay holes (a sparse raw
layer arrives as sparse as it left, nothing of its holes on the wire), and
each copy is proven as asked -- read back whole, or sampled."""

from __future__ import annotations

import os

import nodes
import pytest
from rig import LayerSpec, Write
from test_migrate import assert_b_holds, finish, migrate

MIB = 1024 * 1024


@pytest.mark.parametrize("proof", ["full", "sample"])
def test_a_raw_layer_keeps_its_holes_and_its_proof_is_reported(make_vm, node_b, config,
                                                                  workdir, test_root, proof):
    conn_b, root = node_b
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 2), Write(0x12, 300, 2)], "raw"),
                                LayerSpec("B", [Write(0x21, 40, 24)]),  # a qcow2 one too
                                LayerSpec("C", [Write(0x22, 100, 1)])], size_mib=512)
    vm.start()
    base = disk.layers[0]
    assert os.stat(base).st_blocks * 512 < 16 * MIB  # sparse here
    rc, out, err = finish(migrate(vm, config, vm.dir, "--proof", proof))
    assert rc == 0, (out, err)
    vm.created = False
    assert [(c["source"], c["proof"], c["reused"]) for c in out["copied"]] == [
        (base, proof, False), (disk.layers[1], proof, False)], out
    there = os.stat(nodes.on_b(root, test_root, base))
    assert there.st_size == 512 * MIB and there.st_blocks * 512 < 16 * MIB  # and sparse there
    conn_b.lookupByName(vm.name).destroy()
    assert_b_holds(disk, disk.layers[-1])
