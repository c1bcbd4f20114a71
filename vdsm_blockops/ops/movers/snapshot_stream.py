"""``--method snapshot-stream``, the seed's live block copy: a disk-only
snapshot into DEST (the VM writes there at once, over its old chain), then
a pull of the whole chain into DEST. The pull is one-phase: it ends with
the VM on DEST alone. ``recover`` after a crash between the two pulls
again."""

from __future__ import annotations

import logging

from ...core import errors
from ...core.identity import same_images
from ...engine.images import create_overlay
from ...engine.jobs import JobWatch, Outcome
from ...engine.node import current_chain, image_chain, libvirt_ref
from ...engine.pulls import exclusive_pull
from ...engine.records import Phase
from ...engine.storage import point_persistent_definition
from ..snapshot import snapshot_xml
from .base import Mover

log = logging.getLogger(__name__)
UNDO_TIMEOUT_S = 600.0  # the commit back copies only the writes since the snapshot


class SnapshotStream(Mover):
    two_phase = False

    def prepare(self) -> None:
        move, plan = self.move, self.move.plan
        if not move.req.reuse_external:
            disk = move.domain.spec().disk(plan.disk)
            move.creator.reserve(plan.dest)
            create_overlay(plan.dest, disk.chain[0].path, disk.chain[0].format or "qcow2",
                           image_chain(disk)[0].virtual_size)
        move.domain.snapshot(snapshot_xml(move.domain, {plan.disk: plan.dest}),
                             reuse_external=True)
        move.store.advance(move.record, Phase.PREPARED)

    def start(self) -> None:
        self.move.domain.pull(self.move.plan.disk, None, self.move.bandwidth)

    def run(self) -> Outcome | None:
        move, plan = self.move, self.move.plan
        self.prepare()
        try:
            with exclusive_pull(move.ctx, move.domain, plan.disk, wait=self.wait):
                outcome = move.runner.run(self.start, two_phase=False, pivot=False,
                                          wait=self.wait)
        except (errors.JobTimeout, errors.JobFailed):
            # the pull stopped or never started (timeout while queued, abort):
            # back onto the chain before
            self.undo()
            raise
        if outcome is not None and not same_images(move.domain.spec().disk(plan.disk).paths,
                                                   [plan.dest]):
            raise errors.JobFailed(f"{plan.disk}: the pull into {plan.dest} did not finish")
        return outcome

    def follow(self, timeout_s: float | None) -> Outcome | None:
        outcome = super().follow(timeout_s)
        move, plan = self.move, self.move.plan
        if outcome is not Outcome.CANCELED and same_images(
                current_chain(move.domain, plan.disk), [plan.dest] + plan.chain_before):
            self._pull_again(timeout_s)
        return outcome

    def undo(self) -> None:
        """Back onto the chain before, after the pull was stopped (timeout,
        abort): DEST, the snapshot's overlay, holds the guest's writes since
        the snapshot (and what the pull copied, the same data as below): an
        active commit writes it into the old active image and pivots there.
        Settlement then finds the chain as before and removes DEST."""
        move, plan = self.move, self.move.plan
        domain = move.domain
        if not (domain.is_active() and same_images(current_chain(domain, plan.disk),
                                                   [plan.dest] + plan.chain_before)):
            return
        log.info("%s %s: committing %s back into %s", domain.name, plan.disk, plan.dest,
                 plan.chain_before[0])
        domain.commit(plan.disk, libvirt_ref(domain, plan.disk, plan.chain_before[0]) or "",
                      libvirt_ref(domain, plan.disk, plan.dest), active=True)
        move.runner.follow(two_phase=True, pivot=True, timeout_s=UNDO_TIMEOUT_S)
        # The snapshot pointed the persistent definition at DEST: back too.
        active = domain.spec().disk(plan.disk).chain[0]
        point_persistent_definition(domain, plan.disk, plan.chain_before[0],
                                    active.format or "qcow2")

    def _pull_again(self, timeout_s: float | None) -> None:
        """The snapshot happened but the pull did not: the VM is on DEST
        over its old chain (consistent); pull it all in."""
        move, plan = self.move, self.move.plan
        if not move.domain.is_active():
            raise errors.OperationFailed(
                f"{plan.disk}: the VM is off on {plan.dest} over its old chain (consistent); "
                "start it and run recover again to finish the copy")
        with exclusive_pull(move.ctx, move.domain, plan.disk, wait=True), \
                JobWatch(move.domain, plan.disk, clock=move.ctx.clock,
                         sleep=move.ctx.sleep) as watch:
            move.domain.pull(plan.disk, None, 0)
            watch.wait(timeout_s=timeout_s)
