"""Waiting on block jobs: events first, polling only as a fallback.

A ``JobWatch`` subscribes to BLOCK_JOB_2 events for one (domain, disk)
*before* the job starts (short jobs end before the API call returns), then
``wait`` ends on the terminal event. Every ``poll_interval_s`` it asks
``blockJobInfo`` for progress; if the job is gone and no event came, the
outcome is ``VANISHED`` and the caller decides from the live XML -- a
vanished job is never success by itself.

If libvirtd goes away, the watch reconnects (the connection re-registers
its callbacks) and goes on polling; events missed while disconnected are
covered by the same "gone? then the XML decides" rule.
"""

from __future__ import annotations

import enum
import logging
import queue
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..core import errors
from ..core.model import (
    RECONNECT_GRACE_S,
    DiskEvent,
    JobInfo,
    JobStatus,
    Observer,
    ThresholdEvent,
)

if TYPE_CHECKING:  # the pure parts (and their tests) run without libvirt
    from ..virt import Domain
    from .context import Context
    from .records import OperationRecord, RecordStore

log = logging.getLogger(__name__)



class Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    READY = "ready"
    VANISHED = "vanished"


_FROM_STATUS = {
    JobStatus.COMPLETED: Outcome.COMPLETED,
    JobStatus.FAILED: Outcome.FAILED,
    JobStatus.CANCELED: Outcome.CANCELED,
    JobStatus.READY: Outcome.READY,
}


class Guard(Protocol):
    """Looks after the room a running job writes into (volumes.VolumeGuard)."""

    def arm(self) -> None: ...
    def on_threshold(self, event: ThresholdEvent) -> None: ...
    def tick(self) -> None: ...
    def disarm(self) -> None: ...


class _PollAgain(Exception):
    """A poll that should be repeated at once (reconnected, passing error)."""



class JobWatch:
    """Events and progress of the block job on one disk of one domain."""

    def __init__(
        self,
        domain: Domain,
        disk: str,
        *,
        poll_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.domain = domain
        self.sleep = sleep
        self.disk = disk
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self._events: queue.Queue[DiskEvent] = domain.conn.events.subscribe(domain.uuid, disk)
        self.last_info: JobInfo | None = None
        self._errors = 0  # consecutive failed polls

    def close(self) -> None:
        self.domain.conn.events.unsubscribe(self.domain.uuid, self.disk, self._events)

    def __enter__(self) -> JobWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_event(self, wait_s: float) -> DiskEvent | None:
        try:
            return self._events.get(timeout=max(wait_s, 0.0))
        except queue.Empty:
            return None

    def _poll(self, give_up_at: float | None) -> JobInfo | None:
        """Job info, or None when no job. Raises _PollAgain after a
        reconnect or a passing error."""
        try:
            info = self.domain.block_job_info(self.disk)
            self._errors = 0
            return info
        except errors.ConnectionLost:
            pass
        except errors.BlockOpsError:
            if self.domain.conn.alive:
                # A VM being torn down first fails monitor calls ("Unable
                # to read from monitor") and only then reads as inactive.
                for _ in range(20):
                    if not self.domain.is_active():
                        raise errors.JobFailed(
                            f"domain {self.domain.name} stopped while the block "
                            f"job on {self.disk} was running") from None
                    self.sleep(0.1)
                self._errors += 1
                if self._errors >= 3:
                    raise
                raise _PollAgain() from None
        log.warning("lost libvirt while waiting on %s %s; reconnecting",
                    self.domain.name, self.disk)
        grace = self.clock() + RECONNECT_GRACE_S
        self.domain.conn.reconnect(min(grace, give_up_at) if give_up_at else grace)
        raise _PollAgain()

    def wait(
        self,
        *,
        until_ready: bool = False,
        timeout_s: float | None = None,
        observer: Observer | None = None,
        ready_check: Callable[[], bool] | None = None,
        guard: Guard | None = None,
        stop: Callable[[], None] | None = None,
    ) -> Outcome:
        """Wait for the job's end (or READY when ``until_ready``).

        ``ready_check`` is the fallback for a missed READY event: it reads
        ``<mirror ready='yes'>`` from the live XML. ``guard`` hears the
        disk's threshold events and looks at every poll. ``stop`` is asked
        every round (at most a poll interval apart) and raises to stop the
        wait (the command was interrupted).
        Raises ``JobTimeout`` when ``timeout_s`` passes first.
        """
        give_up_at = self.clock() + timeout_s if timeout_s is not None else None
        next_poll = self.clock()
        while True:
            if stop is not None:
                stop()
            now = self.clock()
            if give_up_at is not None and now >= give_up_at:
                raise errors.JobTimeout(
                    f"block job on {self.domain.name} {self.disk} did not "
                    f"finish within {timeout_s:g} s"
                )
            wait_s = next_poll - now
            if give_up_at is not None:
                wait_s = min(wait_s, give_up_at - now)
            event = self._next_event(wait_s)
            if isinstance(event, ThresholdEvent):
                if guard is not None:
                    guard.on_threshold(event)
                continue
            if event is not None:
                outcome = _FROM_STATUS.get(JobStatus(event.status)) \
                    if event.status in tuple(JobStatus) else None
                log.debug("event %s on %s %s", event.status_name,
                          self.domain.name, self.disk)
                if outcome is Outcome.READY and not until_ready:
                    continue
                if outcome is not None:
                    return outcome
                continue
            next_poll = self.clock() + self.poll_interval_s
            try:
                info = self._poll(give_up_at)
            except _PollAgain:
                next_poll = self.clock()  # reconnected: look again at once
                continue
            if info is None:
                # Gone. The terminal event may still be on its way from
                # the loop thread: give it a moment before saying VANISHED.
                event = self._next_event(0.2)
                if event is not None and not isinstance(event, ThresholdEvent) and \
                        event.status in tuple(JobStatus):
                    outcome = _FROM_STATUS[JobStatus(event.status)]
                    if outcome is not Outcome.READY:
                        return outcome
                return Outcome.VANISHED
            self.last_info = info
            if guard is not None:
                guard.tick()
            if observer is not None:
                observer(self.disk, info)
            if until_ready and ready_check is not None and ready_check():
                return Outcome.READY


class JobRunner:
    """Runs one block job on one disk to its end -- pivot included -- and
    records its phases; or follows a job that is already running (recover)."""

    def __init__(self, ctx: Context, domain: Domain, disk: str,
                 store: RecordStore, record: OperationRecord) -> None:
        self.ctx = ctx
        self.domain = domain
        self.disk = disk
        self.store = store
        self.record = record

    def _watch(self) -> JobWatch:
        return JobWatch(self.domain, self.disk, poll_interval_s=self.ctx.config.poll_interval_s,
                        clock=self.ctx.clock, sleep=self.ctx.sleep)

    def mirror_ready(self) -> bool:
        disk = self.domain.spec().disk(self.disk)
        return bool(disk.mirror and disk.mirror.is_ready)

    def run(self, start: Callable[[], None], *, two_phase: bool, pivot: bool,
            wait: bool, guard: Guard | None = None) -> Outcome | None:
        """Start the job and wait, within what is left of the operation's
        timeout (none left: the job is not started). Returns COMPLETED /
        VANISHED (caller checks the XML), CANCELED for a two-phase job
        deliberately ended without pivot, or None with ``wait=False``.
        Raises JobFailed, JobTimeout (after aborting the job)."""
        from .records import Phase

        budget = self.ctx.budget
        with self._watch() as watch:
            budget.check(f"the block job on {self.domain.name} {self.disk}")
            start()
            self.store.advance(self.record, Phase.STARTED)
            if not wait:
                return None
            if guard is not None:  # the job's target has its libvirt name now
                guard.arm()
            return self._wait(watch, two_phase, pivot, budget.left(), guard)

    def follow(self, *, two_phase: bool, pivot: bool, timeout_s: float | None,
               guard: Guard | None = None) -> Outcome:
        """Wait on the job already running on the disk, as ``run`` would --
        except at ``timeout_s``: a job someone else started is healthy, so
        the wait stops (JobTimeout) and the job runs on."""
        with self._watch() as watch:
            if guard is not None:
                guard.arm()
            return self._wait(watch, two_phase, pivot, timeout_s, guard, abort_at_timeout=False)

    def _wait(self, watch: JobWatch, two_phase: bool, pivot: bool,
              timeout_s: float | None, guard: Guard | None = None,
              abort_at_timeout: bool = True) -> Outcome:
        try:
            outcome = watch.wait(until_ready=two_phase, timeout_s=timeout_s,
                                 observer=self.ctx.observer,
                                 ready_check=self.mirror_ready if two_phase else None,
                                 guard=guard, stop=self._interrupted)
        except errors.JobTimeout:
            if not abort_at_timeout:
                raise errors.JobTimeout(
                    f"stopped waiting after {timeout_s:g} s; the block job on {self.domain.name} "
                    f"{self.disk} still runs (see 'jobs'; 'recover' again to follow it)") from None
            self._abort_job()
            if self.ctx.budget.timeout_s is not None:
                raise errors.JobTimeout(
                    f"the block job on {self.domain.name} {self.disk} did not finish within the "
                    f"timeout of {self.ctx.budget.timeout_s:g} s; it was aborted") from None
            raise
        except errors.VolumeNotExtended as exc:  # the guard could not make room
            self._abort_job()
            raise errors.JobFailed(f"{self.domain.name} {self.disk}: {exc}; the block job was "
                                   "aborted, the chain is as before") from exc
        finally:
            if guard is not None:
                guard.disarm()
        if outcome is Outcome.CANCELED and self.record is not None:
            from .aborts import find, stopped_by_abort

            note = find(self.ctx.state, self.record.id)
            if note is not None:
                raise errors.Aborted(stopped_by_abort(
                    note, f"the {self.record.operation} of {self.domain.name} {self.disk}"))
        if outcome in (Outcome.FAILED, Outcome.CANCELED):
            raise errors.JobFailed(
                f"the block job on {self.domain.name} {self.disk} ended {outcome.value}")
        if not two_phase:
            return outcome
        if outcome is not Outcome.READY:
            raise errors.JobFailed(
                f"the block job on {self.domain.name} {self.disk} ended "
                f"({outcome.value}) before it was ready to pivot")
        # Neither READY nor PIVOTED is written: the pivot (or the cancel)
        # and the caller's finish follow at once, and recover decides by
        # the chain, not by the phase (each write is a libvirt round trip).
        if not pivot:
            self.domain.abort_job(self.disk, pivot=False)
            return Outcome.CANCELED
        self.pivot()
        return Outcome.COMPLETED

    def _interrupted(self) -> None:
        """Another disk's thread saw Ctrl-C: stop waiting (the job runs on,
        handed over to recover as for one disk)."""
        if self.ctx.budget.interrupted.is_set():
            self.ctx.budget.check()

    def pivot(self) -> None:
        """Pivot once ready, retrying libvirt's "not ready" a bounded number
        of times (QEMU may drop out of ready briefly under guest writes)."""
        retries = self.ctx.config.pivot_retries
        for attempt in range(retries + 1):
            try:
                self.domain.abort_job(self.disk, pivot=True)
                return
            except errors.PivotNotReady:
                if attempt == retries:
                    raise errors.JobFailed(
                        f"{self.domain.name} {self.disk}: mirror never became "
                        f"ready for pivot after {retries} retries") from None
                log.info("pivot not ready yet on %s %s (try %d)", self.domain.name,
                         self.disk, attempt + 1)
                self.ctx.sleep(0.5)

    def _abort_job(self) -> None:
        try:
            self.domain.abort_job(self.disk, pivot=False)
        except errors.BlockOpsError as exc:
            log.warning("abort of the block job on %s %s: %s", self.domain.name, self.disk, exc)
