"""Disk-only external snapshots: the ``snapshot`` verb (the seed's
``snapshot_blkdev``) and the first step of a snapshot-stream relocation."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from ..core import errors
from ..core.chain import Disk, check_reference, source_kind, xml_attr
from ..core.identity import ImageSet, clean_path, image_key, is_block_device
from ..core.model import Operation
from ..core.reports import Report, SnapshotReport
from ..engine import prepared, volumes
from ..engine.context import (
    Context,
    check_disk_supported,
    operation_domain,
    refuse_unsupported_images,
)
from ..engine.node import planned_disk
from ..engine.operation import run_operation
from ..engine.records import OperationRecord, Phase, RecordStore
from ..engine.storage import FileCreator, check_place, point_persistent_definition
from ..engine.verification import norm, require_chain

if TYPE_CHECKING:
    from ..virt import Domain


def snapshot_xml(domain: Domain, overlays: dict[str, str]) -> str:
    """Disk-only external snapshot XML: ``overlays`` maps target -> new file
    (or device); every other disk is left out of the snapshot."""
    disks = []
    for disk in domain.spec().disks:
        if disk.target in overlays:
            path = overlays[disk.target]
            kind, attr = source_kind(path)
            disks.append(f"<disk name='{disk.target}' snapshot='external' type='{kind}'>"
                         f"<driver type='qcow2'/><source {attr}={xml_attr(path)}/></disk>")
        else:
            disks.append(f"<disk name='{disk.target}' snapshot='no'/>")
    name = f"vdsm-blockops-{int(time.time() * 1000)}"
    return (f"<domainsnapshot><name>{name}</name><memory snapshot='no'/>"
            f"<disks>{''.join(disks)}</disks></domainsnapshot>")


def already_done(ctx: Context, domain_name: str, target: str, overlay: str) -> SnapshotReport | None:
    """The report of a re-run that has nothing to do: OVERLAY (by identity)
    is already the disk's active image."""
    chain = ctx.conn.domain(domain_name).spec().disk(target).paths
    if chain and image_key(chain[0]) == image_key(overlay):
        return SnapshotReport(domain=domain_name, disk=target, overlay=overlay,
                              chain_before=chain, chain_after=chain)
    return None


@dataclass(frozen=True)
class SnapshotRequest:
    domain: str
    disk: str
    overlay: str
    reuse_external: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class SnapshotPlan:
    disk: str
    overlay: str
    chain_before: list[str]
    chain_after: list[str]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SnapshotPlan:
        return cls(**{k: v for k, v in body.items() if k in {f.name for f in fields(cls)}})


def snapshot(ctx: Context, req: SnapshotRequest) -> Report:
    """Disk-only external snapshot of one disk: a new qcow2 overlay."""
    return run_operation(ctx, Snapshot(req), req.disk, req.dry_run)


class Snapshot:
    """A snapshot, as the operation skeleton drives it: recorded before the
    snapshot is taken, so recover can finish it (persistent definition,
    verification) after a crash."""

    kind = Operation.SNAPSHOT
    timeout_s: float | None = None  # a snapshot has no job to wait on

    def __init__(self, req: SnapshotRequest) -> None:
        self.req = req
        self.online = True
        self.volume: dict[str, Any] | None = None  # OVERLAY a block device: its room
        if req.disk == "all":
            raise errors.BadRequest("a snapshot names one OVERLAY: give one disk, not 'all'")
        check_reference(req.overlay, "OVERLAY")
        if not os.path.isabs(req.overlay):
            raise errors.BadRequest(f"OVERLAY must be an absolute path, not {req.overlay!r}")

    def domain(self, ctx: Context) -> Domain:
        domain = operation_domain(ctx, self.req.domain)
        self.online = domain.is_active()
        return domain

    def plan(self, ctx: Context, domain: Domain, disk: Disk) -> SnapshotPlan:
        check_disk_supported(disk)
        disk, images = planned_disk(disk)
        refuse_unsupported_images(disk, images, creates_images=True, offline=not self.online)
        overlay = clean_path(self.req.overlay)
        check_place(ctx, overlay, self.req.reuse_external, ImageSet(disk.paths),
                    (domain.uuid, disk.target))
        if is_block_device(overlay):  # a pre-created volume: the tool writes the overlay onto it
            room = volumes.overlay_room(overlay, images[0].virtual_size,
                                        ctx.config.volume_margin_mib)
            volumes.refuse_if_short(room, ctx.config.volume_extend_command)
            self.volume = room.to_json()
        elif self.req.reuse_external:  # a prepared file: an empty overlay on the active image
            prepared.check([prepared.Prepared(overlay, "qcow2", images[0].virtual_size,
                                              disk.paths[0], empty=True)], "OVERLAY")
        return SnapshotPlan(disk=disk.target, overlay=overlay, chain_before=norm(disk.paths),
                            chain_after=[overlay] + norm(disk.paths))

    def check_plans(self, plans: list[SnapshotPlan]) -> None:
        pass

    def idle(self, domain: Domain, plan: SnapshotPlan) -> None:
        return None

    def request_json(self) -> dict[str, Any]:
        return asdict(self.req)

    def plan_json(self, plan: SnapshotPlan) -> dict[str, Any]:
        return asdict(plan)

    def report(self, domain: Domain, plan: SnapshotPlan, *, dry_run: bool = False,
               verified: bool = True) -> SnapshotReport:
        return SnapshotReport(domain=domain.name, disk=plan.disk, overlay=plan.overlay,
                              chain_before=plan.chain_before, chain_after=plan.chain_after,
                              verified=verified and not dry_run, online=self.online,
                              volume=self.volume)

    def _prepare_volume(self, ctx: Context, domain: Domain, plan: SnapshotPlan,
                        room: dict[str, Any]) -> None:
        """Extend OVERLAY's device where it is short, and write the empty
        overlay onto it (over the active image), for libvirt to reuse."""
        volumes.make_room(room, ctx.config.volume_extend_command, ctx.budget)
        active = planned_disk(domain.spec().disk(plan.disk))[1][0]
        volumes.format_destination(plan.overlay, "qcow2", active.virtual_size, active.path,
                                   active.format)

    def execute(self, ctx: Context, domain: Domain, plan: SnapshotPlan, store: RecordStore,
                record: OperationRecord) -> SnapshotReport:
        if self.volume is not None:
            self._prepare_volume(ctx, domain, plan, self.volume)
        if self.online:
            store.advance(record, Phase.STARTED)
            domain.snapshot(snapshot_xml(domain, {plan.disk: plan.overlay}),
                            reuse_external=self.req.reuse_external or self.volume is not None)
        else:  # qemu-img create, then the definition on the new overlay
            active = planned_disk(domain.spec().disk(plan.disk))[1][0]
            from . import offline  # shut-off domains only: spares live verbs the import

            offline.snapshot(domain, plan.disk, plan.overlay, active, self.req.reuse_external,
                             FileCreator(store, record))
        return self.finish(ctx, domain, plan, store, record)

    def finish(self, ctx: Context, domain: Domain, plan: SnapshotPlan, store: RecordStore,
               record: OperationRecord) -> SnapshotReport:
        point_persistent_definition(domain, plan.disk, plan.overlay, "qcow2")
        require_chain(domain, plan.disk, plan.chain_after)
        store.finish(record)
        return self.report(domain, plan)
