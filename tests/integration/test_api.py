"""The public API against real VMs: one node object used from several
threads at once, progress through the callback, a cancellation from
another thread taking the path Ctrl-C takes, and the node's history naming
the API as the source. Guest data is compared from outside every time."""

from __future__ import annotations

import threading

import pytest
import rig
from rig import LayerSpec, Write

from vdsm_blockops import api


def node_for(config: str) -> api.Node:
    return api.Node(rig.TEST_URI, config=config, source="test")


def test_one_node_merges_two_disks_from_two_threads(make_vm, config):
    vm = make_vm()
    for target in ("vda", "vdb"):
        vm.add_chain(target, rig.four_layers())
    vm.start()
    seen: dict[str, list[api.JobInfo]] = {"vda": [], "vdb": []}
    results: dict[str, object] = {}
    with node_for(config) as node:
        def merge(target: str) -> None:
            disk = vm.disks[target]
            try:
                results[target] = node.merge(vm.name, target, base=disk.layers[0],
                                             strategy="pull",
                                             progress=lambda d, info: seen[d].append(info))
            except api.BlockOpsError as error:  # pragma: no cover - the assert says it
                results[target] = error
        threads = [threading.Thread(target=merge, args=(t,)) for t in ("vda", "vdb")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for target in ("vda", "vdb"):
            report = results[target]
            assert isinstance(report, api.MergeReport), report
            disk = vm.disks[target]
            assert report.chain_after == [disk.layers[-1], disk.layers[0]] and report.verified
            assert disk.live_chain() == report.chain_after
            disk.assert_guest_data()
            assert seen[target] and all(info.disk == target for info in seen[target])
        with pytest.raises(AttributeError):  # frozen (FrozenInstanceError): as it happened
            report.verified = False  # type: ignore[misc]
        lines = [e for e in node.history(vm.name).entries if e["operation"] == "merge"]
        assert sorted(e["disk"] for e in lines) == ["vda", "vdb"]
        assert {(e["source"], e["outcome"]) for e in lines} == {("test", "ok")}


def test_a_cancelled_merge_is_handed_over_and_settled_by_abort(make_vm, config):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 4)]),
                                LayerSpec("B", [Write(0x22, 4, 24)]),
                                LayerSpec("C", [Write(0x33, 30, 1)])])
    vm.start()
    A, B, C = disk.layers
    cancel = api.CancelToken()
    started = threading.Event()

    def progress(_disk: str, _info: api.JobInfo) -> None:
        started.set()

    timer = threading.Thread(target=lambda: started.wait(60) and cancel.cancel())
    timer.start()
    with node_for(config) as node:
        with pytest.raises(api.Interrupted) as caught:
            # 1 MiB/s: the 24 MiB of B take long enough for the cancel to land mid-job
            node.merge(vm.name, "vda", base=A, strategy="pull", bandwidth=1,
                       progress=progress, cancel=cancel)
        timer.join()
        stopped = caught.value
        assert cancel.cancelled and "stopped by cancellation" in str(stopped)
        assert (stopped.domain, stopped.disk, stopped.exit_code) == (vm.name, "vda", 1)
        assert stopped.record and stopped.settled is None  # the job runs on, under its record
        jobs = node.jobs(vm.name)
        assert [op.record for op in jobs.operations] == [stopped.record]
        aborted = node.abort(vm.name, "vda")
        assert aborted.ok and [r.result for r in aborted.recover or []] == ["rolled-back"]
        assert disk.live_chain() == [C, B, A]
        disk.guest_write(0x44, 40, 1)
        disk.assert_guest_data()
        assert node.verify(vm.name, "vda").ok
        line = [e for e in node.history(vm.name).entries if e["operation"] == "merge"][-1]
        assert (line["source"], line["outcome"]) == ("test", "interrupted")


def test_a_conflict_and_a_refusal_are_typed_and_change_nothing(vm4, config):
    disk = vm4.disks["vda"]
    before = disk.live_chain()
    with node_for(config) as node:
        with pytest.raises(api.UnknownDisk) as unknown:
            node.merge(vm4.name, "vdz", base="vda[1]")
        assert unknown.value.exit_code == 2 and unknown.value.disk == "vdz"
        with pytest.raises(api.BadRequest):
            node.relocate(vm4.name, "vda", "/nonexistent-folder/x.qcow2")
        assert node.chains(vm4.name) == {"vda": before}
    disk.assert_guest_data()
