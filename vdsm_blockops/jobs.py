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
from typing import Callable

from . import errors
from .virt import (
    STATUS_CANCELED,
    STATUS_COMPLETED,
    STATUS_FAILED,
    STATUS_READY,
    BlockJobEvent,
    Domain,
    JobInfo,
)

log = logging.getLogger(__name__)

Observer = Callable[[str, JobInfo], None]  # (disk, info)


class Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    READY = "ready"
    VANISHED = "vanished"


_FROM_STATUS = {
    STATUS_COMPLETED: Outcome.COMPLETED,
    STATUS_FAILED: Outcome.FAILED,
    STATUS_CANCELED: Outcome.CANCELED,
    STATUS_READY: Outcome.READY,
}

# How long libvirtd may stay away before a waiting command gives up.
RECONNECT_GRACE_S = 120.0


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
        self._events: queue.Queue = domain.conn.events.subscribe(domain.uuid, disk)
        self.last_info: JobInfo | None = None
        self._errors = 0  # consecutive failed polls

    def close(self) -> None:
        self.domain.conn.events.unsubscribe(self.domain.uuid, self.disk, self._events)

    def __enter__(self) -> "JobWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next_event(self, wait_s: float) -> BlockJobEvent | None:
        try:
            return self._events.get(timeout=max(wait_s, 0.0))
        except queue.Empty:
            return None

    def _poll(self, give_up_at: float | None) -> JobInfo | None | bool:
        """Job info, None when no job, or False to poll again (after a
        reconnect or a passing error)."""
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
                return False
        log.warning("lost libvirt while waiting on %s %s; reconnecting",
                    self.domain.name, self.disk)
        grace = self.clock() + RECONNECT_GRACE_S
        self.domain.conn.reconnect(min(grace, give_up_at) if give_up_at else grace)
        return False

    def wait(
        self,
        *,
        until_ready: bool = False,
        timeout_s: float | None = None,
        observer: Observer | None = None,
        ready_check: Callable[[], bool] | None = None,
    ) -> Outcome:
        """Wait for the job's end (or READY when ``until_ready``).

        ``ready_check`` is the fallback for a missed READY event: it reads
        ``<mirror ready='yes'>`` from the live XML.
        Raises ``JobTimeout`` when ``timeout_s`` passes first.
        """
        give_up_at = self.clock() + timeout_s if timeout_s else None
        next_poll = self.clock()
        while True:
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
            if event is not None:
                outcome = _FROM_STATUS.get(event.status)
                log.debug("event %s on %s %s", event.status_name,
                          self.domain.name, self.disk)
                if outcome is Outcome.READY and not until_ready:
                    continue
                if outcome is not None:
                    return outcome
                continue
            next_poll = self.clock() + self.poll_interval_s
            info = self._poll(give_up_at)
            if info is False:
                next_poll = self.clock()  # reconnected: look again at once
                continue
            if info is None:
                # Gone. The terminal event may still be on its way from
                # the loop thread: give it a moment before saying VANISHED.
                event = self._next_event(0.2)
                if event is not None and event.status in _FROM_STATUS:
                    outcome = _FROM_STATUS[event.status]
                    if outcome is not Outcome.READY:
                        return outcome
                return Outcome.VANISHED
            self.last_info = info
            if observer is not None:
                observer(self.disk, info)
            if until_ready and ready_check is not None and ready_check():
                return Outcome.READY
