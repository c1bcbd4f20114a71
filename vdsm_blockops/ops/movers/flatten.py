"""Full-mode relocation at file speed (``--method flatten``).

QEMU's mirror copies at a few hundred MiB/s; a file copy runs at the
disk's speed. While the VM runs and the disk lock is held, every layer
below the active one is immutable, so:

1. ``prepare``: qemu-img flattens that read-only part into DEST (a new
   standalone image, or the one given with --reuse-external), flushed;
2. ``start``: the active layer alone is mirrored onto DEST itself (SHALLOW
   + REUSE_EXT): the mirror writes only what the active layer holds (and
   every guest write), DEST already holds the rest; pivoted, the VM runs
   on DEST alone.

Before the pivot the source chain is intact (settle rolls back, removing
DEST); after it the disk is on the planned chain (settle finishes). A job
still running is followed by ``recover`` like any mirror.
"""

from __future__ import annotations

import os

from ...core.chain import disk_xml
from ...engine import qemuimg
from ...engine.images import create_image
from ...engine.records import Phase
from ...engine.state import fsync_dir
from .base import Mover


class Flatten(Mover):
    @property
    def pivot(self) -> bool:
        return True  # flatten ends on DEST in one go (the request was checked)

    @property
    def wait(self) -> bool:
        return True

    def prepare(self) -> None:
        move, plan = self.move, self.move.plan
        active, below = move.images[plan.chain_before[0]], move.images[plan.chain_before[1]]
        reuse = move.req.reuse_external
        if not reuse:
            move.creator.reserve(plan.dest)
            create_image(plan.dest, plan.format.value, active.virtual_size)
        observer = move.ctx.observer
        progress = qemuimg.Progress(plan.disk, "copy", observer) if observer else None
        qemuimg.convert(below.path, below.format, plan.dest, plan.format.value, progress,
                        rate_mib_s=move.bandwidth, dest_is_new=not reuse, budget=move.ctx.budget)
        qemuimg.fsync(plan.dest)
        fsync_dir(os.path.dirname(plan.dest))
        move.store.advance(move.record, Phase.PREPARED)

    def start(self) -> None:
        # Shallow: only what the active layer holds is mirrored; where it
        # holds nothing, DEST's own data (the flattened layers below) shows
        # through, on both sides alike.
        move, plan = self.move, self.move.plan
        move.domain.copy(plan.disk, disk_xml(plan.dest, plan.format.value), shallow=True,
                         reuse_external=True, transient=plan.persistent,
                         sync_writes=move.req.sync_writes, bandwidth_mib_s=move.bandwidth)
