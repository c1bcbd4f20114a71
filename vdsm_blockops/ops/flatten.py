"""Full-mode relocation at file speed (``--method flatten``).

QEMU's mirror copies at a few hundred MiB/s; a file copy runs at the
disk's speed. While the VM runs and the disk lock is held, every layer
below the active one is immutable, so:

1. qemu-img flattens that read-only part into DEST (a new standalone image,
   or the one given with --reuse-external), flushed;
2. the active layer alone is mirrored onto DEST itself (SHALLOW +
   REUSE_EXT): the mirror writes only what the active layer holds (and
   every guest write), DEST already holds the rest; pivoted, the VM runs on
   DEST alone.

Before the pivot the source chain is intact (settle rolls back, removing
DEST); after it the disk is on the planned chain (settle finishes). A job
still running is followed by ``recover`` like any mirror.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..core.chain import disk_xml
from ..engine import qemuimg
from ..engine.images import ImageInfo, create_image
from ..engine.jobs import JobRunner, Outcome
from ..engine.records import Phase
from ..engine.state import fsync_dir

if TYPE_CHECKING:
    from ..core.relocate_plan import RelocatePlan
    from ..engine.context import Context
    from ..engine.records import OperationRecord, RecordStore
    from ..engine.storage import FileCreator
    from ..virt import Domain


def run(ctx: Context, domain: Domain, plan: RelocatePlan, images: dict[str, ImageInfo],
        runner: JobRunner, store: RecordStore, record: OperationRecord, creator: FileCreator, *,
        reuse_external: bool, sync_writes: bool, timeout_s: float | None,
        rate_mib_s: int) -> Outcome | None:
    active, below = images[plan.chain_before[0]], images[plan.chain_before[1]]
    if not reuse_external:
        creator.reserve(plan.dest)
        create_image(plan.dest, plan.format.value, active.virtual_size)
    progress = qemuimg.Progress(plan.disk, "copy", ctx.observer) if ctx.observer else None
    qemuimg.convert(below.path, below.format, plan.dest, plan.format.value, progress,
                    rate_mib_s=rate_mib_s, dest_is_new=not reuse_external)
    qemuimg.fsync(plan.dest)
    fsync_dir(os.path.dirname(plan.dest))
    store.advance(record, Phase.PREPARED)
    # Shallow: only what the active layer holds is mirrored; where it holds
    # nothing, DEST's own data (the flattened layers below) shows through,
    # on both sides alike.
    return runner.run(lambda: domain.copy(plan.disk, disk_xml(plan.dest, plan.format.value),
                                          shallow=True, reuse_external=True,
                                          transient=plan.persistent, sync_writes=sync_writes,
                                          bandwidth_mib_s=rate_mib_s),
                      two_phase=True, pivot=True, timeout_s=timeout_s, wait=True)
