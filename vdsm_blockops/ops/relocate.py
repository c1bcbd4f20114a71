"""Live disk relocation: move a disk's data elsewhere while the VM runs.

Modes:
* ``chain``   every layer moves into DEST's folder and the chain keeps its
  shape. The read-only layers are immutable while the VM runs, so they are
  copied as files (fast, proven against their sources) and relinked; the
  active layer is mirrored by a shallow blockCopy onto a pre-created overlay
  (SHALLOW + REUSE_EXT), then pivoted.
* ``full``    DEST is one standalone image with all the data: blockCopy
  (``mirror``); or ``flatten``, at file speed: the read-only layers (immutable
  while the VM runs and the disk lock is held) flattened into DEST by
  qemu-img, then only the active layer mirrored onto DEST itself and
  pivoted (``movers/flatten.py``) -- chosen by ``auto`` when the read-only layers
  hold most of the data; or
  with ``--method snapshot-stream`` a disk-only snapshot into DEST and a
  pull of the whole chain into it (the seed's "live block copy").
* ``shallow`` only the active layer moves; DEST backs onto the old chain.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..core import errors
from ..core.chain import Disk, check_reference
from ..core.identity import ImageSet, clean_path, image_key, is_block_device
from ..core.model import ImageFormat, Method, Mode, Operation
from ..core.relocate_plan import RelocateFacts, RelocatePlan, plan_relocation
from ..core.relocate_plan import RelocateRequest as RelocateRequest  # the entry point's request
from ..core.reports import RelocateReport, Report, Retired
from ..engine import copies, prepared, volumes
from ..engine.context import (
    Context,
    check_bandwidth,
    check_disk_supported,
    check_timeout,
    operation_domain,
    refuse_unsupported_images,
)
from ..engine.history import utc
from ..engine.images import ImageInfo
from ..engine.jobs import Outcome
from ..engine.node import current_chain, planned_disk
from ..engine.operation import run_operation
from ..engine.records import OperationRecord, Phase, RecordStore
from ..engine.storage import check_place, delete_unused, point_persistent_definition
from ..engine.verification import norm, require_chain
from . import movers, onto_devices

if TYPE_CHECKING:
    from ..virt import Domain


def already_done(ctx: Context, req: RelocateRequest) -> str | None:
    """Why a re-run has nothing to do (the disk, or every disk for ``all``,
    already runs on DEST; without a pivot: DEST is the copy an earlier run
    made, unchanged -- decided by identity), or None."""
    if not req.pivot:
        made = None if req.disk == "all" else copies.made_earlier(ctx.state, req.domain,
                                                                  req.disk, req.dest)
        return None if made is None else (
            f"{req.dest} is the copy of {req.domain} {req.disk} an earlier run made at "
            f"{utc(made)}, unchanged since")
    disks = ctx.conn.domain(req.domain).spec().select(req.disk)
    if req.disk == "all":
        folder = image_key(req.dest)
        done = bool(disks) and all(image_key(os.path.dirname(d.paths[0])) == folder for d in disks)
    else:
        done = bool(disks) and image_key(disks[0].paths[0]) == image_key(req.dest)
    return f"{req.domain} {req.disk} already runs on {req.dest}" if done else None


def relocate(ctx: Context, req: RelocateRequest) -> Report:
    report = run_operation(ctx, Relocate(req), req.disk, req.dry_run)
    if not req.pivot and not req.dry_run:  # a standalone copy: known again on a re-run
        for one in getattr(report, "results", [report]):
            if isinstance(one, RelocateReport) and one.verified and os.path.isfile(one.dest):
                copies.remember(ctx.state, one.domain, one.disk, one.dest)
    return report


def _enum(kind: type[Mode] | type[Method] | type[ImageFormat], value: str, what: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in kind)
        raise errors.BadRequest(f"unknown {what} {value!r} (choose from {allowed})") from None


class Relocate:
    """A relocation, as the operation skeleton drives it."""

    kind = Operation.RELOCATE

    def __init__(self, req: RelocateRequest) -> None:
        self.req = req
        self.online = True
        self.images: dict[str, dict[str, ImageInfo]] = {}  # per disk, as planned
        self.volumes: dict[str, dict[str, Any]] = {}  # per disk: DEST a block device, its room
        self.volume_sizes: dict[str, dict[str, int]] = {}  # per disk: chain mode onto volumes
        self.prepared: dict[str, list[prepared.Prepared]] = {}  # per disk: --reuse-external files
        self.into_files: dict[str, str] = {}  # per disk: the folder its copy is written into
        self.mode: Mode = _enum(Mode, req.mode, "mode")
        self.method: Method = _enum(Method, req.method, "method")
        if self.method in (Method.COPY, Method.CONVERT):
            raise errors.BadRequest(f"--method {self.method.value} is what a shut-off VM's "
                                    "relocation reports, not a choice: leave --method out")
        self.format: ImageFormat = _enum(ImageFormat, req.format, "format")
        if self.format is ImageFormat.RAW and self.mode is not Mode.FULL:
            raise errors.BadRequest(
                f"a raw destination holds no backing chain: use --mode full, not {req.mode}")
        if self.method is Method.SNAPSHOT_STREAM:
            if self.mode is not Mode.FULL:
                raise errors.BadRequest("--method snapshot-stream only makes a full copy: use --mode full")
            if self.format is not ImageFormat.QCOW2:
                raise errors.BadRequest("--method snapshot-stream needs a qcow2 destination "
                                        "(it is a snapshot overlay)")
            if not req.pivot:
                raise errors.BadRequest("--method snapshot-stream moves the VM at once; "
                                        "--no-pivot needs --method mirror")
        if self.method is Method.FLATTEN:
            if self.mode is not Mode.FULL:
                raise errors.BadRequest("--method flatten makes a full copy: use --mode full")
            refused = "--no-pivot" if not req.pivot else "--no-wait" if not req.wait else None
            if refused:
                raise errors.BadRequest(f"--method flatten ends on DEST in one go; "
                                        f"{refused} needs --method mirror")
        check_reference(req.dest, "DEST")
        if not os.path.isabs(req.dest):
            raise errors.BadRequest(f"DEST must be an absolute path, not {req.dest!r}")
        self.bandwidth = check_bandwidth(req.bandwidth_mib_s)
        check_timeout(req.timeout_s)
        self.timeout_s = req.timeout_s

    def domain(self, ctx: Context) -> Domain:
        domain = operation_domain(ctx, self.req.domain)
        self.online = domain.is_active()
        if not self.online:
            refused = ("--no-pivot" if not self.req.pivot else
                       "--method snapshot-stream" if self.method is Method.SNAPSHOT_STREAM else
                       "--no-wait" if not self.req.wait else None)
            if refused:
                raise errors.BadRequest(
                    f"domain {domain.name} is shut off: it is copied by qemu-img and files, "
                    f"and {refused} needs a running VM")
        return domain

    def _dest_for(self, disk: Disk) -> str:
        """DEST names the new active image; with ``all`` it is a folder."""
        if self.req.disk != "all":
            return clean_path(self.req.dest)
        if not os.path.isdir(self.req.dest):
            raise errors.BadRequest(f"with DISK 'all', DEST must be an existing folder: {self.req.dest}")
        name = os.path.basename(disk.paths[0])
        if self.format is ImageFormat.RAW:
            name = os.path.splitext(name)[0] + ".raw"
        return os.path.join(clean_path(self.req.dest), name)

    def plan(self, ctx: Context, domain: Domain, disk: Disk) -> RelocatePlan:
        check_disk_supported(disk)
        disk, images = planned_disk(disk)
        refuse_unsupported_images(disk, images, creates_images=True, offline=not self.online,
                                  copies_layers=self.mode is Mode.CHAIN,
                                  deletes=disk.paths if self.req.delete_source else ())
        self.images[disk.target] = {i.path: i for i in images}
        dest = self._dest_for(disk)
        sources = ImageSet(disk.paths)
        if dest in sources:
            raise errors.BadRequest(f"destination {dest} is an image of the source chain")
        chain = norm(disk.paths)
        # Only a full copy of a running chain may be flattened: only then
        # do its checkpoints matter to the plan (one libvirt call less).
        weighs_flatten = (self.mode is Mode.FULL and self.online and len(chain) > 1
                          and self.method in (Method.AUTO, Method.FLATTEN))
        facts = RelocateFacts(
            disk=disk.target, chain=chain,
            allocation={i.path: volumes.allocation(i) for i in images}, dest=dest,
            dest_is_folder=self.mode is Mode.CHAIN and self.req.disk != "all"
            and os.path.isdir(dest),
            dest_is_device=is_block_device(dest), online=self.online,
            persistent=domain.is_persistent(),
            checkpoints=tuple(domain.checkpoints().get(disk.target, {})) if weighs_flatten else ())
        plan = plan_relocation(self.req, self.mode, self.method, self.format, facts)
        self._check(ctx, domain, plan, facts, images, sources)
        return plan

    def _check(self, ctx: Context, domain: Domain, plan: RelocatePlan, facts: RelocateFacts,
               images: list[ImageInfo], sources: ImageSet) -> None:
        """What the plan needs of the node, before anything changes: the new
        places (by identity), room on devices and file systems, prepared
        targets."""
        owner = (domain.uuid, plan.disk)
        if facts.dest_is_folder:  # one new block volume per layer
            self.volume_sizes[plan.disk] = onto_devices.volume_sizes(
                plan, self.images[plan.disk], ctx.config)
            for path in plan.chain_after:  # the checks a file DEST gets
                check_place(ctx, path, False, sources, owner)
            return
        new_paths = [p for p in plan.chain_after
                     if not (plan.mode is Mode.SHALLOW and p in plan.chain_before[1:])]
        if plan.copies and any(path in sources for path in new_paths):
            raise errors.BadRequest(
                f"{plan.disk}: chain mode moves every layer into {os.path.dirname(plan.dest)}, "
                "where layers of the source chain already are; choose another folder")
        if facts.dest_is_device:
            self.volumes[plan.disk] = onto_devices.device_room(ctx, plan, images)
        for path in new_paths:
            check_place(ctx, path, self.req.reuse_external, sources, owner)
        if facts.dest_is_device:
            return  # the tool formats a prepared device itself
        if self.req.reuse_external:
            self.prepared[plan.disk] = self._prepared_targets(plan)
            prepared.check(self.prepared[plan.disk], "DEST")
        self.into_files[plan.disk] = os.path.dirname(plan.dest)

    def _prepared_targets(self, plan: RelocatePlan) -> list[prepared.Prepared]:
        """What the prepared DEST (and, chain mode, its prepared layers)
        must be: the shape of the copy, empty, backing by identity."""
        info = self.images[plan.disk]
        active = info[plan.chain_before[0]]
        if plan.method is Method.SNAPSHOT_STREAM:  # DEST becomes a snapshot overlay first
            return [prepared.Prepared(plan.dest, "qcow2", active.virtual_size, active.path,
                                      empty=True)]
        if plan.mode is Mode.FULL:
            return [prepared.Prepared(plan.dest, plan.format.value, active.virtual_size, None,
                                      empty=True)]
        copies = [(active.path, plan.dest)] + plan.copies
        below = plan.chain_before[1] if plan.mode is Mode.SHALLOW and len(plan.chain_before) > 1 \
            else None
        return prepared.layered(copies, below, {p: i.virtual_size for p, i in info.items()},
                                {p: i.format for p, i in info.items()})

    def check_plans(self, plans: list[RelocatePlan]) -> None:
        dests = []
        for plan in plans:
            sources = ImageSet(plan.chain_before)
            dests += [image_key(p) for p in plan.chain_after if p not in sources]
        if len(set(dests)) != len(dests):
            raise errors.BadRequest("two disks would be relocated onto the same file")
        self._check_room([p for p in plans if p.disk in self.into_files])

    def _check_room(self, plans: list[RelocatePlan]) -> None:
        """Room for every disk's copy, summed per file system (``all``
        copies them side by side), before anything starts."""
        needed: dict[int, tuple[str, int, list[str]]] = {}
        for plan in plans:
            folder = self.into_files[plan.disk]
            device = os.stat(folder).st_dev  # one file system: one free-space count
            place, total, disks = needed.get(device, (folder, 0, []))
            needed[device] = (place, total + plan.bytes_to_copy, disks + [plan.disk])
        for folder, total, disks in needed.values():
            space = os.statvfs(folder)
            free = space.f_bavail * space.f_frsize  # as shutil.disk_usage, without its imports
            if total > free:
                which = f" for {', '.join(disks)} together" if len(disks) > 1 else ""
                raise errors.BadRequest(f"not enough space at {folder}{which}: "
                                        f"{total} bytes to copy, {free} free")

    def request_json(self) -> dict[str, Any]:
        return asdict(self.req)

    def plan_json(self, plan: RelocatePlan) -> dict[str, Any]:
        return plan.to_json()

    def idle(self, domain: Domain, plan: RelocatePlan) -> None:
        return None

    def report(self, domain: Domain, plan: RelocatePlan, *, dry_run: bool = False,
               chain_now: list[str] | None = None, verified: bool = False) -> RelocateReport:
        if dry_run:
            chain_now = plan.chain_after if self.req.pivot else plan.chain_before
        from .offline import method_used

        return RelocateReport(
            domain=domain.name, disk=plan.disk, mode=plan.mode,
            method=plan.method if self.online else method_used(plan),
            format=plan.format, dest=plan.dest, dry_run=dry_run, changed=not dry_run,
            pivot=self.req.pivot, chain_before=plan.chain_before,
            chain_after=chain_now if chain_now is not None else plan.chain_before,
            copy_chain=plan.chain_after, bytes_to_copy=plan.bytes_to_copy, retired=[],
            verified=verified, finished=verified, online=self.online,
            volume=self.volumes.get(plan.disk))

    def execute(self, ctx: Context, domain: Domain, plan: RelocatePlan, store: RecordStore,
                record: OperationRecord) -> RelocateReport:
        """prepare -> run -> finish, on the mover the plan names."""
        mover = movers.choose(self.move(ctx, domain, plan, store, record))
        started = ctx.clock()
        outcome = mover.run()
        copied = ctx.clock()
        if mover.extensions is not None and plan.disk in self.volumes:
            self.volumes[plan.disk]["extensions_during_job"] = mover.extensions
        if not mover.phases:  # copied in one go (VM off): nothing to wait for
            return self._timed(self.finish(ctx, domain, plan, store, record), ctx, started, copied)
        if outcome is None:
            report = self.report(domain, plan)
            report.record = record.id
            return report
        if outcome is Outcome.CANCELED:  # --no-pivot: DEST is a consistent copy
            require_chain(domain, plan.disk, plan.chain_before)
            store.finish(record)
            return self.report(domain, plan, chain_now=plan.chain_before, verified=True)
        store.advance(record, Phase.COMPLETED)
        return self._timed(self.finish(ctx, domain, plan, store, record), ctx, started, copied)

    @staticmethod
    def _timed(report: RelocateReport, ctx: Context, started: float,
               copied: float) -> RelocateReport:
        """The report with the time of each phase: the copy (the job up to
        its pivot, or the shut-off VM's copies) and the verification."""
        report.phases_s = {"copy": round(copied - started, 3),
                           "verification": round(ctx.clock() - copied, 3)}
        return report

    def move(self, ctx: Context, domain: Domain, plan: RelocatePlan, store: RecordStore,
             record: OperationRecord, online: bool | None = None) -> movers.Move:
        """What a mover works with: this relocation's plan and what the
        planning learnt (recover has only the plan: the job runs already)."""
        return movers.Move(
            ctx=ctx, domain=domain, plan=plan, req=self.req, store=store, record=record,
            online=self.online if online is None else online, bandwidth=self.bandwidth,
            images=self.images.get(plan.disk, {}), prepared=self.prepared.get(plan.disk),
            device_room=self.volumes.get(plan.disk), volume_sizes=self.volume_sizes.get(plan.disk))

    def finish(self, ctx: Context, domain: Domain, plan: RelocatePlan, store: RecordStore,
               record: OperationRecord) -> RelocateReport:
        """After the pivot: the persistent definition on DEST, the chain
        verified, the source deleted when asked."""
        fixed = point_persistent_definition(domain, plan.disk, plan.dest, plan.format.value)
        require_chain(domain, plan.disk, plan.chain_after)
        report = self.report(domain, plan, chain_now=current_chain(domain, plan.disk),
                             verified=True)
        report.persistent_definition_fixed = fixed
        kept = ImageSet(plan.chain_after)
        report.retired = [Retired(p, True) for p in plan.chain_before if p not in kept]
        if record.request.get("delete_source"):
            report.deleted, report.kept = delete_unused(ctx, domain, plan.disk,
                                                        [r.path for r in report.retired])
        store.finish(record)
        return report
