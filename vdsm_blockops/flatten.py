"""Full-mode relocation at file speed (``--method flatten``).

QEMU's mirror copies at a few hundred MiB/s; a file copy runs at the
disk's speed. While the VM runs and the disk lock is held, every layer
below the active one is immutable, so:

1. qemu-img flattens that read-only part into DEST (a new standalone image,
   or the one given with --reuse-external), flushed;
2. a temporary overlay on DEST (``DEST.flatten-overlay``) receives the
   active layer by a shallow mirror (SHALLOW + REUSE_EXT), pivoted: the VM
   runs on overlay -> DEST, which holds exactly its disk;
3. the overlay is actively committed into DEST and pivoted: the VM runs on
   DEST alone, with every guest write; the overlay is removed by finish.

Each step is in the operation's record: before 2's pivot the source chain
is intact (settle rolls back); on overlay -> DEST, ``recover`` runs step 3
(by qemu-img if the VM is off: the definition names the overlay from the
first pivot on); on DEST it finishes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import qemuimg
from .chain import disk_xml
from .images import ImageInfo, create_image, create_overlay
from .jobs import JobRunner, Outcome
from .records import Phase
from .state import fsync_dir
from .storage import point_persistent_definition

if TYPE_CHECKING:
    from .context import Context
    from .records import OperationRecord, RecordStore
    from .relocate import RelocatePlan
    from .storage import FileCreator
    from .virt import Domain


def run(ctx: Context, domain: Domain, plan: RelocatePlan, images: dict[str, ImageInfo],
        runner: JobRunner, store: RecordStore, record: OperationRecord, creator: FileCreator, *,
        reuse_external: bool, sync_writes: bool, timeout_s: float | None,
        rate_mib_s: int) -> Outcome:
    overlay = plan.overlay
    assert overlay is not None
    active, below = images[plan.chain_before[0]], images[plan.chain_before[1]]
    if not reuse_external:
        creator.reserve(plan.dest)
        create_image(plan.dest, plan.format.value, active.virtual_size)
    progress = qemuimg.Progress(plan.disk, "copy", ctx.observer) if ctx.observer else None
    qemuimg.convert(below.path, below.format, plan.dest, plan.format.value, progress,
                    rate_mib_s=rate_mib_s, dest_is_new=not reuse_external)
    qemuimg.fsync(plan.dest)
    creator.reserve(overlay)
    create_overlay(overlay, plan.dest, plan.format.value, active.virtual_size)
    fsync_dir(os.path.dirname(plan.dest))
    store.advance(record, Phase.PREPARED)
    runner.run(lambda: domain.copy(plan.disk, disk_xml(overlay, "qcow2"), shallow=True,
                                   reuse_external=True, transient=plan.persistent,
                                   sync_writes=sync_writes, bandwidth_mib_s=rate_mib_s),
               two_phase=True, pivot=True, timeout_s=timeout_s, wait=True)
    # The VM writes into the overlay now: a stop from here on must find it
    # in the definition (its chain is complete: overlay -> DEST).
    point_persistent_definition(domain, plan.disk, overlay, "qcow2")
    return commit_overlay(ctx, domain, plan, store, record, timeout_s, rate_mib_s)


def commit_overlay(ctx: Context, domain: Domain, plan: RelocatePlan, store: RecordStore,
                   record: OperationRecord, timeout_s: float | None, rate_mib_s: int) -> Outcome:
    """Step 3: the overlay (the VM's active image) actively committed into
    DEST and pivoted. Also what recover runs when it finds overlay -> DEST."""
    from .merge import libvirt_ref

    base = libvirt_ref(domain, plan.disk, plan.dest) or plan.dest
    runner = JobRunner(ctx, domain, plan.disk, store, record)
    outcome = runner.run(lambda: domain.commit(plan.disk, base, None, active=True,
                                               bandwidth_mib_s=rate_mib_s),
                         two_phase=True, pivot=True, timeout_s=timeout_s, wait=True)
    assert outcome is not None
    return outcome


def commit_overlay_offline(domain: Domain, plan: RelocatePlan) -> None:
    """Step 3 with the VM off: qemu-img commits the overlay into DEST, then
    the definition names DEST."""
    assert plan.overlay is not None
    qemuimg.commit(plan.overlay, "qcow2", plan.dest)
    point_persistent_definition(domain, plan.disk, plan.dest, plan.format.value)
