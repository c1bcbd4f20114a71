"""A stateful fake of ``virt.Domain`` for failure paths a real libvirtd
cannot produce on demand. It models one disk's block job as a small state
machine driven by scripted answers; everything else is left out."""

from __future__ import annotations

import collections

from vdsm_blockops.core import errors
from vdsm_blockops.core.chain import parse_domain
from vdsm_blockops.core.model import BlockJobEvent, EventHub, JobInfo, JobStatus


class FakeConnection:
    def __init__(self):
        self.events = EventHub()
        self.alive = True
        self.generation = 1
        self.reconnects = 0

    def reconnect(self, give_up_at=None):
        self.reconnects += 1
        self.alive = True
        self.generation += 1


class FakeDomain:
    name = "fake"
    uuid = "00000000-0000-0000-0000-000000000001"

    def __init__(self, two_phase=False):
        self.conn = FakeConnection()
        self.two_phase = two_phase
        self.job = None           # JobInfo while a job exists
        self.ready = False        # what <mirror ready=..> says
        self.active = True
        self.info_script = collections.deque()   # exceptions/None to raise/return first
        self.pivot_refusals = 0   # how many pivots to refuse with "not ready"
        # whether the mirror is ready at each pivot, in turn (flipping under writes)
        self.ready_at_pivot = collections.deque()
        self.calls = []
        self.metadata = None

    # -- driving the fake
    def start(self, disk="vda"):
        self.job = JobInfo(disk=disk, job_type="active-commit" if self.two_phase else "pull",
                           cur=0, end=100, bandwidth_bytes_s=0)

    def emit(self, status, disk="vda"):
        self.conn.events.publish(BlockJobEvent(self.uuid, disk, "x", status))

    def finish(self, with_event=True):
        self.job = None
        if with_event:
            self.emit(JobStatus.COMPLETED)

    # -- the Domain surface
    def block_job_info(self, disk):
        self.calls.append("info")
        if self.info_script:
            step = self.info_script.popleft()
            if isinstance(step, Exception):
                raise step
            if callable(step):
                step(self)
        return self.job

    def abort_job(self, disk, pivot=False, wait=True):
        self.calls.append("pivot" if pivot else "abort")
        if pivot and self.pivot_refusals:
            self.pivot_refusals -= 1
            raise errors.PivotNotReady("block copy still active: not ready for pivot yet")
        if pivot and self.ready_at_pivot and not self.ready_at_pivot.popleft():
            raise errors.PivotNotReady("block copy still active: not ready for pivot yet")
        self.job = None

    def is_active(self):
        return self.active

    def checkpoints(self):
        return {}

    def spec(self, inactive=False):
        ready = " ready='yes'" if self.ready else ""
        mirror = f"<mirror type='file' job='active-commit'{ready}><source file='/b'/></mirror>" \
            if self.job and self.two_phase else ""
        return parse_domain(f"<domain><name>fake</name><uuid>{self.uuid}</uuid><devices>"
                            f"<disk type='file' device='disk'><source file='/a'/>{mirror}"
                            f"<target dev='vda'/></disk></devices></domain>")

    def get_metadata(self, namespace):
        return self.metadata

    def set_metadata(self, xml, key, namespace, config=True):
        self.metadata = xml

    READY = JobStatus.READY
