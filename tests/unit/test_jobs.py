"""The job waiter and runner against a stateful fake domain."""

import pytest
from fake_domain import FakeDomain

from vdsm_blockops.core import errors
from vdsm_blockops.core.budget import Budget
from vdsm_blockops.core.config import Config
from vdsm_blockops.core.model import JobStatus
from vdsm_blockops.engine.context import Context
from vdsm_blockops.engine.jobs import JobRunner, JobWatch, Outcome
from vdsm_blockops.engine.records import OperationRecord, Phase, RecordStore


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 0.01
        return self.now


def watch(dom, **kw):
    return JobWatch(dom, "vda", poll_interval_s=0.01, sleep=lambda s: None, **kw)


def test_event_ends_the_wait_before_any_poll_result():
    dom = FakeDomain()
    with watch(dom) as w:
        dom.start()
        dom.finish(with_event=True)
        dom.job = object()  # polling would say "still running"
        assert w.wait(timeout_s=5) is Outcome.COMPLETED


def test_vanished_job_without_event_is_not_success():
    dom = FakeDomain()
    with watch(dom) as w:
        dom.start()
        dom.finish(with_event=False)
        assert w.wait(timeout_s=5) is Outcome.VANISHED


def test_failed_event():
    dom = FakeDomain()
    with watch(dom) as w:
        dom.start()
        dom.emit(JobStatus.FAILED)
        assert w.wait(timeout_s=5) is Outcome.FAILED


def test_passing_info_errors_are_ridden_out():
    dom = FakeDomain()
    dom.start()
    dom.info_script.extend([errors.OperationFailed("monitor hiccup")] * 2 +
                           [None, lambda d: d.finish(with_event=False)])
    with watch(dom) as w:
        assert w.wait(timeout_s=30) is Outcome.VANISHED


def test_persistent_info_errors_are_raised():
    dom = FakeDomain()
    dom.start()
    dom.info_script.extend([errors.OperationFailed("broken")] * 3)
    with watch(dom) as w, pytest.raises(errors.OperationFailed, match="broken"):
        w.wait(timeout_s=30)


def test_vm_gone_mid_job_is_a_clear_failure():
    dom = FakeDomain()
    dom.start()

    def crash(d):
        d.active = False
        raise errors.OperationFailed("Unable to read from monitor")

    dom.info_script.append(lambda d: crash(d))
    with watch(dom) as w, pytest.raises(errors.JobFailed, match="stopped"):
        w.wait(timeout_s=5)


def test_connection_lost_reconnects_and_goes_on():
    dom = FakeDomain()
    dom.start()

    def drop(d):
        d.conn.alive = False
        raise errors.ConnectionLost("client socket is closed")

    dom.info_script.extend([drop, lambda d: d.finish(with_event=False)])
    with watch(dom) as w:
        assert w.wait(timeout_s=5) is Outcome.VANISHED
    assert dom.conn.reconnects == 1


def test_timeout():
    dom = FakeDomain()
    dom.start()
    with watch(dom, clock=FakeClock()) as w, pytest.raises(errors.JobTimeout):
        w.wait(timeout_s=1)


def test_ready_from_xml_when_the_event_is_missed():
    dom = FakeDomain(two_phase=True)
    dom.start()
    dom.info_script.extend([None, lambda d: setattr(d, "ready", True)])
    with watch(dom) as w:
        ready_check = lambda: dom.spec().disk("vda").mirror.is_ready  # noqa: E731
        assert w.wait(until_ready=True, timeout_s=5, ready_check=ready_check) is Outcome.READY


def runner(dom, retries=3, tmp_path=None):
    ctx = Context(conn=dom.conn, config=Config(pivot_retries=retries, poll_interval_s=0.01,
                                               state_dir=str(tmp_path)), sleep=lambda s: None)
    store = RecordStore(dom)
    record = OperationRecord(operation="merge", disk="vda", request={}, plan={})
    store.begin(record)
    return JobRunner(ctx, dom, "vda", store, record), store, record


def start_ready(dom):
    def go():
        dom.start()
        dom.ready = True
        dom.emit(JobStatus.READY)
    return go


def test_pivot_refused_a_few_times_then_done(tmp_path):
    dom = FakeDomain(two_phase=True)
    dom.pivot_refusals = 2
    run, store, record = runner(dom, retries=3, tmp_path=tmp_path)
    assert run.run(start_ready(dom), two_phase=True, pivot=True, wait=True) \
        is Outcome.COMPLETED
    assert dom.calls.count("pivot") == 3 and record.phase is Phase.STARTED  # until finish


def test_pivot_refused_forever_is_bounded(tmp_path):
    dom = FakeDomain(two_phase=True)
    dom.pivot_refusals = 100
    run, store, record = runner(dom, retries=4, tmp_path=tmp_path)
    with pytest.raises(errors.JobFailed, match="never became ready"):
        run.run(start_ready(dom), two_phase=True, pivot=True, wait=True)
    assert dom.calls.count("pivot") == 5


def test_job_flipping_between_ready_and_not_ready(tmp_path):
    """QEMU may leave READY under heavy writes: a pivot refused while the
    mirror is not ready is tried again until it lands in a ready moment."""
    dom = FakeDomain(two_phase=True)
    dom.ready_at_pivot.extend([False, True, False, False, True])
    run, store, record = runner(dom, retries=5, tmp_path=tmp_path)
    assert run.run(start_ready(dom), two_phase=True, pivot=True, wait=True) \
        is Outcome.COMPLETED
    assert dom.calls.count("pivot") == 2 and list(dom.ready_at_pivot) == [False, False, True]
    dom = FakeDomain(two_phase=True)
    dom.ready_at_pivot.extend([False] * 6)
    run, store, record = runner(dom, retries=5, tmp_path=tmp_path)
    with pytest.raises(errors.JobFailed, match="never became ready"):
        run.run(start_ready(dom), two_phase=True, pivot=True, wait=True)
    assert dom.calls.count("pivot") == 6 and not dom.ready_at_pivot


def test_timeout_aborts_the_job(tmp_path):
    dom = FakeDomain()
    run, store, record = runner(dom, tmp_path=tmp_path)
    run.ctx.clock = FakeClock()
    run.ctx.budget = Budget.starting_now(0.5, run.ctx.clock)
    with pytest.raises(errors.JobTimeout, match="within the timeout of 0.5 s; it was aborted"):
        run.run(dom.start, two_phase=False, pivot=False, wait=True)
    assert "abort" in dom.calls and dom.job is None


def test_a_record_write_is_repeated_after_libvirtd_came_back():
    """libvirtd restarted while the command wrote its record (after the
    job started, before the waiter): the write is repeated once the
    connection is back, instead of failing the whole command."""
    import libvirt

    from vdsm_blockops.virt.domain import Domain

    class Host:
        generation, events, alive = 1, None, True
        reconnects = 0

        @property
        def raw(self):
            return self

        def lookupByUUIDString(self, uuid):
            return dom

        def reconnect(self, give_up_at=None, pause_s=0.5):
            self.reconnects += 1
            self.generation += 1

        def volume_path(self, pool, volume):
            return None

    class VirDomain:
        writes = []

        def name(self):
            return "vm"

        def UUIDString(self):
            return "u"

        def isActive(self):
            return True

        def isPersistent(self):
            return True

        def setMetadata(self, *args):
            if not self.writes:
                self.writes.append("lost")
                error = libvirt.libvirtError("End of file while reading data")
                error.err = (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, "eof", 2,
                             None, None, None, 0, 0)
                raise error
            self.writes.append(args[1])

    dom = VirDomain()
    host = Host()
    Domain(host, dom).set_metadata("<x/>", "blockops", "ns")
    assert dom.writes == ["lost", "<x/>"] and host.reconnects == 1
