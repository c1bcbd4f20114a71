"""A shut-off domain's relocation: no job, the files are copied (chain,
shallow: each chunk compared as written; prepared targets filled and
proven with qemu-img; full: qemu-img convert, flushed) or written onto new
block volumes, then the persistent definition is pointed at DEST. It runs
to its end in one go; there is nothing for ``recover`` to follow."""

from __future__ import annotations

from ...engine.jobs import Outcome
from ...engine.storage import point_persistent_definition
from .. import onto_devices
from .base import Mover


class ColdCopy(Mover):
    phases = False  # as an offline merge: no job, no phases

    def run(self) -> Outcome | None:
        move, plan = self.move, self.move.plan
        if move.device_room is not None:
            onto_devices.prepare_device(move.ctx, plan, move.images, move.device_room)
        if move.volume_sizes is not None:  # every layer onto its new volume
            onto_devices.copy_onto_volumes(plan, move.images, move.volume_sizes,
                                           move.ctx.config.volume_create_command,
                                           with_active=True, creator=move.creator,
                                           rate_mib_s=move.bandwidth,
                                           budget=move.ctx.budget)
            point_persistent_definition(move.domain, plan.disk, plan.dest, plan.format.value)
        else:
            from .. import offline  # shut-off domains only: spares live verbs the import

            offline.relocate(move.ctx, move.domain, plan, move.images, move.creator,
                             move.req.reuse_external, move.prepared, move.bandwidth)
        return Outcome.COMPLETED

    def follow(self, timeout_s: float | None) -> Outcome | None:
        return None
