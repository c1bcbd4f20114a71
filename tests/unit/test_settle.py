"""Every branch of the one settlement path, on a stateful fake domain whose
chains are real qcow2 files (no libvirt): finish, roll back, leave for
recover -- including a snapshot-stream that failed after its snapshot --
and the operation skeleton's failure path around it."""

import os
import subprocess

import pytest

from vdsm_blockops.core import errors
from vdsm_blockops.core.chain import parse_domain
from vdsm_blockops.core.config import Config
from vdsm_blockops.core.identity import image_key
from vdsm_blockops.core.model import Operation
from vdsm_blockops.core.reports import Report
from vdsm_blockops.engine.context import Context
from vdsm_blockops.engine.operation import Settlement, combine, run_operation, settle
from vdsm_blockops.engine.records import OperationRecord, RecordStore
from vdsm_blockops.engine.state import StateDir


def qcow2(path, backing=None):
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-b", backing, "-F", "qcow2"]
    subprocess.run(argv + [path, "16M"], check=True)
    return path


class ChainDomain:
    """One disk whose live chain is whatever the test says it is."""

    name = "fake"
    uuid = "00000000-0000-0000-0000-0000000000aa"

    def __init__(self, chain):
        self.chain = list(chain)  # active first
        self.active = True
        self.metadata = None
        self.jobs = {}

    def spec(self, inactive=False):
        xml = "<backingStore/>"
        for path in reversed(self.chain[1:]):
            xml = (f"<backingStore type='file' index='1'><format type='qcow2'/>"
                   f"<source file='{path}'/>{xml}</backingStore>")
        return parse_domain(
            f"<domain><name>{self.name}</name><uuid>{self.uuid}</uuid><devices>"
            f"<disk type='file' device='disk'><driver type='qcow2'/>"
            f"<source file='{self.chain[0]}'/>{xml}<target dev='vda'/></disk></devices></domain>")

    def is_active(self):
        return self.active

    def is_persistent(self):
        return False

    def block_job_info(self, disk):
        return self.jobs.get(disk)

    def get_metadata(self, namespace):
        return self.metadata

    def set_metadata(self, xml, key, namespace, config=True):
        self.metadata = xml


@pytest.fixture
def chain(tmp_path):
    a = qcow2(str(tmp_path / "A.qcow2"))
    b = qcow2(str(tmp_path / "B.qcow2"), a)
    c = qcow2(str(tmp_path / "C.qcow2"), b)
    return a, b, c


def begun(domain, tmp_path, before, after, created=()):
    store = RecordStore(domain, StateDir(str(tmp_path / "state")))
    record = OperationRecord(operation="relocate", disk="vda", request={},
                             plan={"chain_before": before, "chain_after": after})
    store.begin(record)
    for path in created:
        store.add_created(record, path)
    return store, record


def test_chain_as_planned_finishes(tmp_path, chain):
    a, b, c = chain
    domain = ChainDomain([c, a])
    store, record = begun(domain, tmp_path, [c, b, a], [c, a])
    finished = []
    assert settle(domain, store, record, finish=lambda: finished.append(True)) is Settlement.FINISHED
    assert finished == [True]


def test_chain_as_before_rolls_back_and_removes_only_our_files(tmp_path, chain):
    a, b, c = chain
    dest = qcow2(str(tmp_path / "new.qcow2"))
    moved = qcow2(str(tmp_path / "moved.qcow2"))
    domain = ChainDomain([c, b, a])
    store, record = begun(domain, tmp_path, [c, b, a], [dest], created=[dest, moved])
    os.rename(moved, str(tmp_path / "elsewhere.qcow2"))
    open(moved, "w").close()  # someone else's file now stands at that name
    assert settle(domain, store, record, finish=pytest.fail) is Settlement.ROLLED_BACK
    assert not os.path.exists(dest) and os.path.exists(moved)
    assert store.load() == {}


def test_snapshot_stream_failed_after_the_snapshot_is_left_for_recover(tmp_path, chain):
    """The VM runs on DEST over its old chain: neither before nor after.
    The record stays and DEST, which the VM now writes to, stays too."""
    a, b, c = chain
    dest = qcow2(str(tmp_path / "dest.qcow2"), c)
    domain = ChainDomain([dest, c, b, a])
    store, record = begun(domain, tmp_path, [c, b, a], [dest], created=[dest])
    with pytest.raises(errors.VerificationFailed, match="neither before nor after"):
        settle(domain, store, record, finish=pytest.fail)
    assert os.path.exists(dest) and "vda" in store.load()


def test_rolled_back_chain_that_does_not_check_out_keeps_the_record(tmp_path, chain):
    a, b, c = chain
    domain = ChainDomain([c, b, a])
    store, record = begun(domain, tmp_path, [c, b, a], [c, a])
    os.unlink(a)  # the chain before is no longer whole
    with pytest.raises(errors.VerificationFailed, match="does not exist"):
        settle(domain, store, record, finish=pytest.fail)
    assert "vda" in store.load()


class FailingOp:
    """An operation whose run creates a file and then meets a refusal --
    the kind libvirt gives for a VM destroyed mid-job."""

    kind = Operation.RELOCATE
    online = True
    timeout_s = None

    def __init__(self, domain, dest, error):
        self._domain, self.dest, self.error = domain, dest, error

    def domain(self, ctx):
        return self._domain

    def plan(self, ctx, domain, disk):
        from types import SimpleNamespace
        return SimpleNamespace(disk="vda", chain_before=domain.spec().disk("vda").paths,
                               chain_after=[self.dest])

    def check_plans(self, plans):
        pass

    def idle(self, domain, plan):
        return None

    def request_json(self):
        return {}

    def plan_json(self, plan):
        return {"chain_before": plan.chain_before, "chain_after": plan.chain_after}

    def report(self, domain, plan, *, dry_run):
        return Report()

    def execute(self, ctx, domain, plan, store, record):
        from vdsm_blockops.engine.storage import FileCreator
        FileCreator(store, record).reserve(self.dest)
        raise self.error

    def finish(self, *args):
        pytest.fail("nothing finished")


@pytest.mark.parametrize("error", [errors.BadRequest("domain is not running"),
                                   OSError(28, "No space left on device")])
def test_a_failure_after_a_change_rolls_back_and_is_exit_1(tmp_path, chain, error):
    a, b, c = chain
    domain = ChainDomain([c, b, a])
    dest = str(tmp_path / "dest.qcow2")
    ctx = Context(conn=None, config=Config(state_dir=str(tmp_path / "state")))
    before = {p: (image_key(p), open(p, "rb").read()) for p in chain}
    with pytest.raises(errors.OperationFailed) as caught:
        run_operation(ctx, FailingOp(domain, dest, error), "vda", dry_run=False)
    assert caught.value.exit_code == 1
    assert not os.path.exists(dest)                    # created, then rolled back
    assert RecordStore(domain).load() == {}            # settled: no record left
    # the chain is untouched: the same files, byte for byte
    assert {p: (image_key(p), open(p, "rb").read()) for p in chain} == before


class _Named:
    name = "vm1"


def test_a_failure_of_all_names_each_failed_disk_its_code_and_cause():
    ok = Report()
    results = [errors.JobTimeout("the block job did not finish"), ok,
               errors.JobFailed("the block job ended failed: /sd has 0 bytes free (ENOSPC)")]
    with pytest.raises(errors.JobTimeout) as caught:  # the worst exit code wins
        combine(Operation.RELOCATE, _Named(), "all", ["vda", "vdb", "vdc"], results, 1.0)
    message = caught.value.message
    assert message.startswith("2 of 3 disks failed: ")
    assert "vda (timeout): the block job did not finish" in message
    assert "vdc (job-failed): the block job ended failed: /sd has 0 bytes free (ENOSPC)" in message
    assert "vdb" not in message
    each = caught.value.results
    assert [r.get("disk") for r in each] == ["vda", None, "vdc"]
    assert each[2]["error"]["code"] == "job-failed"


def test_a_move_past_its_switchover_is_never_rolled_back(monkeypatch):
    """Phase moved: the guest wrote to the destination's copies. Whatever
    became of the VM since, recover finishes or waits -- never rolls back."""
    from vdsm_blockops.engine.migrations import MigrationRecord, MovePhase
    from vdsm_blockops.ops import moved

    record = MigrationRecord(domain="web01", uuid="u1", dest_uri="qemu+tls://b/system",
                             request={}, plan={}, phase=MovePhase.MOVED)
    rolled = []
    monkeypatch.setattr(moved, "where", lambda ctx, rec, dest: moved.Where.SOURCE)
    monkeypatch.setattr(moved, "roll_back", lambda *args: rolled.append(args))
    with pytest.raises(errors.VerificationFailed, match="never rolled back"):
        moved.settle(None, None, record, None)
    assert rolled == []
    record.phase = MovePhase.MIGRATING  # before the switchover: rolled back as before
    assert moved.settle(None, None, record, None) == ("rolled-back", None)
    assert len(rolled) == 1
