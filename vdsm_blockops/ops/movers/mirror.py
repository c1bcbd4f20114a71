"""libvirt's block copy (``blockCopy``): the mirror of full, shallow and
chain mode, onto files, a pre-created device or new block volumes.

Prepared before the job: chain mode's read-only layers copied as files,
proven and relinked, with a new overlay on top (or, ``--reuse-external``,
each prepared layer filled with its layer's data and proven); a full
copy's DEST made empty; a device formatted; new block volumes written
layer by layer. Then the active layer (or all, for full) is mirrored, and
pivoted when the request wants it."""

from __future__ import annotations

from ...core.chain import disk_xml
from ...core.model import Mode
from ...engine import prepared
from ...engine.copying import prepare_chain_copy, prepare_full_copy, prepare_shallow_copy
from ...engine.records import Phase
from ...engine.volumes import VolumeGuard
from .. import onto_devices
from .base import Mover


class Mirror(Mover):
    _guard: VolumeGuard | None = None  # on a block-volume target during the job

    @property
    def extensions(self) -> int | None:
        """How often the block-volume target was extended during the job."""
        return self._guard.extensions if self._guard is not None else None

    def prepare(self) -> None:
        move, plan, req = self.move, self.move.plan, self.move.req
        images = move.images
        if move.device_room is not None:
            onto_devices.prepare_device(move.ctx, plan, images, move.device_room)
        if move.volume_sizes is not None:
            onto_devices.copy_onto_volumes(plan, images, move.volume_sizes,
                                           move.ctx.config.volume_create_command,
                                           with_active=False, creator=move.creator,
                                           rate_mib_s=move.bandwidth,
                                           budget=move.ctx.budget)
        elif plan.copies and not req.reuse_external:
            prepare_chain_copy(plan, images, move.creator, move.bandwidth, move.ctx.budget)
        elif plan.copies and move.prepared is not None:
            # Prepared layers: each read-only layer's data goes into its
            # counterpart, proven, before the mirror relinks the VM.
            prepared.fill(plan.copies, {p: i.format for p, i in images.items()},
                          prepared.backings(move.prepared), move.bandwidth, move.ctx.budget)
        elif plan.mode is Mode.SHALLOW and len(plan.chain_before) > 1 \
                and not req.reuse_external and move.device_room is None:
            prepare_shallow_copy(plan, images, move.creator)
        elif not req.reuse_external and move.device_room is None:
            prepare_full_copy(plan, images, move.creator)  # full, or a chain of one layer
        else:
            return  # DEST given as it is: nothing was prepared
        move.store.advance(move.record, Phase.PREPARED)

    def start(self) -> None:
        move, plan, req = self.move, self.move.plan, self.move.req
        move.domain.copy(
            plan.disk, disk_xml(plan.dest, plan.format.value),
            shallow=plan.mode is not Mode.FULL and len(plan.chain_before) > 1,
            reuse_external=(req.reuse_external or bool(move.record.created_files)
                            or move.volume_sizes is not None),
            transient=plan.persistent, sync_writes=req.sync_writes,
            bandwidth_mib_s=move.bandwidth)

    def guard(self) -> VolumeGuard | None:
        self._guard = onto_devices.mirror_guard(self.move.ctx, self.move.domain, self.move.plan)
        return self._guard
