"""Names the whole package shares, free of libvirt: what an operation is
asked to do (strategy, mode, method, format) and what a block job is
(type, status, progress, events), so that the pure parts and their tests
run without libvirt-python installed."""

from __future__ import annotations

import enum
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

# The choices of the options live apart (``choices.py``): the CLI's parser
# needs them, not the dataclasses and queues below.
from .choices import (  # noqa: E402 (re-exported: their old home)
    ImageFormat as ImageFormat,
)
from .choices import (
    Method as Method,
)
from .choices import (
    Mode as Mode,
)
from .choices import (
    Operation as Operation,
)
from .choices import (
    Strategy as Strategy,
)
from .choices import (
    StrEnum as StrEnum,
)


class JobStatus(enum.IntEnum):
    """virDomainBlockJobStatus, as libvirt numbers it (a stable ABI)."""

    COMPLETED = 0
    FAILED = 1
    CANCELED = 2
    READY = 3


# How long libvirtd may stay away (a restart) before a command gives up.
RECONNECT_GRACE_S = 120.0

JOB_TYPE_NAMES = {1: "pull", 2: "copy", 3: "commit", 4: "active-commit", 5: "backup"}


@dataclass(frozen=True)
class JobInfo:
    """One running block job, as ``blockJobInfo`` describes it."""

    disk: str
    job_type: str
    cur: int
    end: int
    bandwidth_bytes_s: int
    in_bytes: bool = True  # QEMU counts a job's work in bytes; qemu-img's -p in percent

    @property
    def percent(self) -> float | None:
        # cur/end are opaque cursors; only their ratio means something, and
        # 0/1 means "unknown yet" (libvirt docs).
        if self.end <= 0 or (self.cur == 0 and self.end == 1):
            return None
        # a figure never passes 100% (a cursor may run past a stale end)
        return round(min(100.0, 100.0 * self.cur / self.end), 1)


# Who hears a job's progress: (disk, info), from the waiting thread.
Observer = Callable[[str, JobInfo], None]


@dataclass(frozen=True)
class BlockJobEvent:
    domain_uuid: str
    disk: str
    job_type: str
    status: int

    @property
    def status_name(self) -> str:
        try:
            return JobStatus(self.status).name.lower()
        except ValueError:
            return str(self.status)


@dataclass(frozen=True)
class ThresholdEvent:
    """BLOCK_THRESHOLD: QEMU wrote past the offset set on one layer of a
    disk (``dev``: ``vda`` or ``vda[3]``); one-shot, set again to re-arm."""

    domain_uuid: str
    disk: str
    dev: str
    excess: int


DiskEvent = Union[BlockJobEvent, ThresholdEvent]  # a runtime alias: no X | Y before 3.10


class EventHub:
    """Fans BLOCK_JOB_2 and BLOCK_THRESHOLD events out to per-(domain, disk) queues.

    Callbacks run on libvirt's loop thread: they only put into queues. The
    hub outlives connections, so a waiter keeps its queue across a
    reconnect.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[tuple[str, str], list[queue.Queue[DiskEvent]]] = {}

    def subscribe(self, domain_uuid: str, disk: str) -> queue.Queue[DiskEvent]:
        q: queue.Queue[DiskEvent] = queue.Queue()
        with self._lock:
            self._queues.setdefault((domain_uuid, disk), []).append(q)
        return q

    def unsubscribe(self, domain_uuid: str, disk: str, q: queue.Queue[DiskEvent]) -> None:
        with self._lock:
            subs = self._queues.get((domain_uuid, disk), [])
            if q in subs:
                subs.remove(q)
            if not subs:
                self._queues.pop((domain_uuid, disk), None)

    def publish(self, event: DiskEvent) -> None:
        with self._lock:
            subs = list(self._queues.get((event.domain_uuid, event.disk), []))
        for q in subs:
            q.put(event)
