"""The shape every mover has.

A mover gets one ``Move`` -- what the relocation planned and the node's
handles -- and provides:

* ``prepare``: make, fill and prove the targets before any job starts (a
  target is recorded before it exists, so a roll-back removes it);
* ``start``: start the job that moves the data (a libvirt block job);
* ``guard``: watch a block-volume target while the job writes into it;
* ``run``: prepare, start and wait as the request asks (``None`` for
  ``--no-wait``), through the one job runner -- progress, bandwidth,
  timeout and abort of libvirt jobs are the runner's, written once;
* ``follow``: for ``recover``, wait on a job a killed command left, as
  ``run`` would have.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...core import errors
from ...engine.jobs import Guard, JobRunner, Outcome
from ...engine.storage import FileCreator

FULL_BELOW = 4 * 1024 * 1024  # bytes free on DEST's file system after a failed copy

if TYPE_CHECKING:
    from ...core.relocate_plan import RelocatePlan, RelocateRequest
    from ...engine.context import Context
    from ...engine.images import ImageInfo
    from ...engine.prepared import Prepared
    from ...engine.records import OperationRecord, RecordStore
    from ...virt import Domain


@dataclass
class Move:
    """One disk's relocation, as its mover sees it."""

    ctx: Context
    domain: Domain
    plan: RelocatePlan
    req: RelocateRequest
    store: RecordStore
    record: OperationRecord
    online: bool
    bandwidth: int = 0
    images: dict[str, ImageInfo] = field(default_factory=dict)  # as planned
    prepared: list[Prepared] | None = None  # --reuse-external files, checked
    device_room: dict[str, Any] | None = None  # DEST a pre-created device
    volume_sizes: dict[str, int] | None = None  # chain mode onto new block volumes

    @property
    def creator(self) -> FileCreator:
        return FileCreator(self.store, self.record)

    @property
    def runner(self) -> JobRunner:
        return JobRunner(self.ctx, self.domain, self.plan.disk, self.store, self.record)


class Mover:
    """A libvirt job that moves the data, waited on by the job runner.
    Subclasses say how it is prepared and started."""

    two_phase = True  # a copy converges (READY), then pivots
    phases = True  # the record goes through STARTED and COMPLETED

    def __init__(self, move: Move) -> None:
        self.move = move

    @property
    def pivot(self) -> bool:
        return self.move.req.pivot

    @property
    def wait(self) -> bool:
        return self.move.req.wait

    def prepare(self) -> None:
        """Targets made, filled and proven before any job starts."""

    def start(self) -> None:
        raise NotImplementedError

    def guard(self) -> Guard | None:
        return None

    @property
    def extensions(self) -> int | None:
        """How often a block-volume target was extended during the job
        (None: no target was watched)."""
        return None

    def run(self) -> Outcome | None:
        self.prepare()
        try:
            return self.move.runner.run(self.start, two_phase=self.two_phase, pivot=self.pivot,
                                        wait=self.wait, guard=self.guard())
        except errors.JobFailed as exc:
            raise self.with_cause(exc) from exc

    def with_cause(self, exc: errors.JobFailed) -> errors.JobFailed:
        """libvirt's event says only "failed" (QEMU's reason stays in its
        log): a DEST file system left (nearly) full is the likely cause, and
        is said so."""
        if self.move.device_room is not None or self.move.volume_sizes is not None:
            return exc  # block volumes are extended, or refused, by the guard
        folder = os.path.dirname(self.move.plan.dest)
        try:
            space = os.statvfs(folder)
        except OSError:
            return exc
        free = space.f_bavail * space.f_frsize
        if free >= FULL_BELOW:
            return exc
        return errors.JobFailed(f"{exc}: {folder} has {free} bytes free -- the copy most "
                                "likely ran out of space (ENOSPC)")

    def follow(self, timeout_s: float | None) -> Outcome | None:
        """Wait on the job a killed command left (None: there is none;
        FAILED: it ended badly and settle rolls back)."""
        move = self.move
        if not move.domain.is_active() or move.domain.block_job_info(move.plan.disk) is None:
            return None
        try:
            return move.runner.follow(two_phase=self.two_phase, pivot=self.pivot,
                                      timeout_s=timeout_s, guard=self.guard())
        except errors.JobFailed:
            return Outcome.FAILED
