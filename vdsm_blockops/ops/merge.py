"""Snapshot live merge: collapse a segment of a chain while the VM runs.

The operation skeleton (``operation.py``) plans every selected disk before
anything changes, then runs each disk's job (concurrently for ``all``),
waited on through events; ``finish`` checks the result against the live
XML, the images' metadata and the persistent definition, registers the
layers a commit invalidated, and deletes retired layers when asked.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from ..core import errors
from ..core.chain import Disk
from ..core.identity import ImageSet, image_key, is_block_device, same_images
from ..core.model import Operation, Strategy
from ..core.planner import MergePlan, plan_merge
from ..core.reports import MergeReport, Report, Retired
from ..engine import volumes
from ..engine.context import (
    Context,
    check_bandwidth,
    check_disk_supported,
    check_timeout,
    operation_domain,
    refuse_unsupported_images,
)
from ..engine.images import ImageInfo
from ..engine.jobs import JobRunner, Outcome
from ..engine.node import current_chain, libvirt_ref, planned_disk
from ..engine.operation import run_operation
from ..engine.pulls import exclusive_pull
from ..engine.records import OperationRecord, RecordStore
from ..engine.storage import delete_unused
from ..engine.users import chain_users
from ..engine.verification import require_chain

if TYPE_CHECKING:
    from ..virt import Domain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeRequest:
    domain: str
    disk: str
    base: str | None = None
    top: str | None = None
    strategy: str = "auto"
    bandwidth_mib_s: int = 0
    timeout_s: float | None = None
    wait: bool = True
    dry_run: bool = False
    # None: keep relative backing names when the chain already uses them.
    keep_relative: bool | None = None
    delete_retired: bool = False


def rewritten_span(images: list[ImageInfo], plan: MergePlan, top_pos: int,
                   base_pos: int | None) -> list[ImageInfo] | None:
    """The images whose backing names libvirt joins into the one name the
    merge rewrites (None: the merge rewrites no backing name -- an active
    commit, a pull of everything)."""
    if plan.strategy is Strategy.PULL and base_pos is not None:
        return images[top_pos:base_pos]  # TOP gets BASE as backing
    if plan.strategy is Strategy.COMMIT and not plan.active:
        lowest = (len(images) if base_pos is None else base_pos) - 1
        return images[top_pos - 1:lowest]  # the image above TOP gets L as backing
    return None


def relative_all_along(span: list[ImageInfo] | None) -> bool:
    """Whether the backing name the merge rewrites can stay relative, and
    should: libvirt builds it by joining the relative names from the image
    that gets the new backing down to its new backing file (oVirt's ``V1``,
    ``../<template-img>/<vol>``), and refuses when any of them is absolute
    (an overlay libvirt created for a snapshot names its backing by an
    absolute path)."""
    return bool(span) and all(i.names_backing_relatively for i in span or ())


def merge_guard(ctx: Context, domain: Domain, plan: MergePlan) -> volumes.VolumeGuard | None:
    """A threshold on the layer a live merge writes into (a commit's
    RESULT, a pull's TOP) when it is a qcow2 on a device and the node can
    extend it -- for the merge, and for recover following it. A raw device
    never: extended, it would show the guest a bigger disk next boot."""
    target = plan.top if plan.strategy is Strategy.PULL else plan.result
    if not (ctx.config.volume_extend_command and target and is_block_device(target)):
        return None
    key = image_key(target)
    layer = next((layer for layer in domain.spec().disk(plan.disk).chain
                   if layer.path and image_key(layer.path) == key), None)
    if layer is None or layer.format != "qcow2":
        return None
    return volumes.VolumeGuard.configured(
        ctx.config, domain, lambda: libvirt_ref(domain, plan.disk, target) or plan.disk, target)


def already_done(ctx: Context, req: MergeRequest) -> str | None:
    """Why a re-run has nothing to do (its TOP was merged away earlier by
    us, so it is a registered invalid image), or None."""
    top = req.top
    if top and top.startswith("/") and ctx.state.invalid_lookup().why(top) is not None:
        return f"{top} was already merged away"
    return None


def merge(ctx: Context, req: MergeRequest) -> Report:
    """Run (or with ``dry_run`` only plan) a merge; returns the report."""
    return run_operation(ctx, Merge(req), req.disk, req.dry_run)


class Merge:
    """A merge, as the operation skeleton drives it."""

    kind = Operation.MERGE

    def __init__(self, req: MergeRequest) -> None:
        self.req = req
        self.online = True
        self.images: dict[str, dict[str, ImageInfo]] = {}  # per disk, as planned
        self.volumes: dict[str, dict[str, Any]] = {}  # per disk: room in a block volume target
        self.bandwidth = check_bandwidth(req.bandwidth_mib_s)
        check_timeout(req.timeout_s)
        self.timeout_s = req.timeout_s
        if req.disk == "all" and (req.base is not None or req.top is not None):
            raise errors.BadRequest("--base and --top name images of one chain; they cannot go "
                                    "with 'all'")

    def domain(self, ctx: Context) -> Domain:
        domain = operation_domain(ctx, self.req.domain)
        self.online = domain.is_active()
        if not self.online and not self.req.wait:
            raise errors.BadRequest(f"domain {domain.name} is shut off: its merge runs to its end "
                                    "with qemu-img, so --no-wait has nothing to leave running")
        return domain

    def plan(self, ctx: Context, domain: Domain, disk: Disk) -> MergePlan:
        req = self.req
        check_disk_supported(disk)
        disk, images = planned_disk(disk)
        self.images[disk.target] = {i.path: i for i in images}
        # "" is a malformed reference, not "not given": position() refuses it.
        top_pos = disk.position(req.top) if req.top is not None else 0
        base_pos = disk.position(req.base) if req.base is not None else None
        end = len(disk.chain) if base_pos is None else base_pos
        # Who else uses the commit target only matters when a commit may run;
        # users are found by identity, whatever name their chains use.
        may_commit = end - top_pos > 1 and req.strategy != "pull"
        users = chain_users(ctx.conn, [disk.paths[end - 1]], exclude=(domain.uuid, disk.target),
                            cache_dir=ctx.state.path) if may_commit else {}
        allocation = {i.path: volumes.allocation(i) for i in images}
        plan = plan_merge(disk, top_pos=top_pos, base_pos=base_pos, strategy=req.strategy,
                          allocation=allocation, users=users)
        refuse_unsupported_images(disk, images, creates_images=False, offline=not self.online,
                                  deletes=[r.path for r in plan.retired] if req.delete_retired
                                  else ())
        span = rewritten_span(images, plan, top_pos, base_pos)
        if req.keep_relative and span and not relative_all_along(span):
            absolute = next(i for i in span if not i.names_backing_relatively)
            raise errors.BadRequest(
                f"--keep-relative: {absolute.path} names its backing by an absolute path, so "
                "libvirt cannot keep the rewritten name relative; merge without it")
        # Nothing to keep where no name is rewritten (an active commit).
        relative = relative_all_along(span) if req.keep_relative is None \
            else bool(req.keep_relative and span)
        room = self._room(ctx, plan, allocation)
        if room is not None:
            volumes.refuse_if_short(room, ctx.config.volume_extend_command)
            self.volumes[disk.target] = room.to_json()
        return replace(plan, keep_relative=relative)

    def _room(self, ctx: Context, plan: MergePlan,
              allocation: dict[str, int]) -> volumes.Room | None:
        """The room the layer written into needs when it is a qcow2 on a
        device: a commit writes the segment into RESULT, a pull the layers
        between TOP and BASE into TOP. ``allocation`` has where its data
        ends already (one ``qemu-img check``, not two)."""
        images, chain = self.images[plan.disk], plan.chain_before
        top_pos = chain.index(plan.top)
        if plan.strategy is Strategy.PULL:
            target = images[plan.top]
            incoming = chain[top_pos + 1:chain.index(plan.base) if plan.base else len(chain)]
        elif plan.strategy is Strategy.COMMIT and plan.result is not None:
            target = images[plan.result]
            incoming = chain[top_pos:chain.index(plan.result)]
        else:
            return None
        return volumes.room_for(target, [images[p] for p in incoming],
                                ctx.config.volume_margin_mib, end=allocation[target.path])

    def check_plans(self, plans: list[MergePlan]) -> None:
        if not self.req.wait and sum(p.strategy is Strategy.PULL for p in plans) > 1:
            raise errors.BadRequest(
                "pulls within one VM run one at a time (QEMU 7.2 can crash when two end "
                "together), which --no-wait cannot do; run without --no-wait or choose "
                "--strategy commit")

    def request_json(self) -> dict[str, Any]:
        return asdict(self.req)

    def plan_json(self, plan: MergePlan) -> dict[str, Any]:
        return plan.to_json()

    def report(self, domain: Domain, plan: MergePlan, *, dry_run: bool = False,
               chain_after: list[str] | None = None, verified: bool = False) -> MergeReport:
        return MergeReport(
            domain=domain.name, disk=plan.disk, strategy=plan.strategy, dry_run=dry_run,
            changed=not dry_run and plan.strategy is not Strategy.NOOP,
            finished=verified or plan.strategy is Strategy.NOOP, base=plan.base, top=plan.top,
            result_image=plan.result, chain_before=plan.chain_before,
            chain_after=chain_after if chain_after is not None else plan.chain_after,
            retired=[Retired(r.path, r.valid) for r in plan.retired],
            bytes_to_copy=plan.bytes_to_copy, alternatives=plan.alternatives,
            libvirt_call=plan.libvirt_call if self.online else self._qemu_img_call(plan),
            keep_relative=plan.keep_relative, verified=verified, online=self.online,
            volume=self.volumes.get(plan.disk))

    @staticmethod
    def _qemu_img_call(plan: MergePlan) -> str:
        if plan.strategy is Strategy.PULL:
            backing = plan.base or "''"
            return f"qemu-img rebase -b {backing} {plan.top}"
        if plan.strategy is Strategy.COMMIT:
            after = ", then point the definition at it" if plan.active else \
                ", then relink the layer above"
            return f"qemu-img commit -d -b {plan.result} {plan.top}{after}"
        return "none"

    def idle(self, domain: Domain, plan: MergePlan) -> MergeReport | None:
        """A segment of one layer: nothing to run, nothing to record."""
        if plan.strategy is Strategy.NOOP:
            return self.report(domain, plan, chain_after=plan.chain_before, verified=True)
        return None

    def _warn_invalid_bitmaps(self, plan: MergePlan) -> None:
        """A cold commit removes the target's unusable bitmaps first; a live
        one cannot: QEMU holds the target without sharing write access
        (qemu-img gets no write lock), and libvirt removes bitmaps only
        with a checkpoint. They stay, inconsistent ones unchanged by QEMU."""
        result = self.images[plan.disk].get(plan.result or "")
        invalid = [b.name for b in result.bitmaps if not b.usable] if result else []
        if result and invalid:
            log.warning("%s: bitmap(s) %s are inconsistent or disabled and stay while the VM runs "
                        "(a merge with the VM shut off removes them)", result.path, ", ".join(invalid))

    def execute(self, ctx: Context, domain: Domain, plan: MergePlan, store: RecordStore,
                record: OperationRecord) -> MergeReport:
        if plan.disk in self.volumes:
            volumes.make_room(self.volumes[plan.disk], ctx.config.volume_extend_command,
                              ctx.budget)
        if not self.online:
            # No phases: each would rewrite the persistent definition (the
            # only copy of a shut-off domain's record), and recover reads
            # the chain, not the phase.
            from . import offline  # shut-off domains only: spares live verbs the import

            offline.merge(ctx, domain, plan, self.images[plan.disk], self.bandwidth)
            return self.finish(ctx, domain, plan, store, record)
        if plan.strategy is Strategy.COMMIT:
            self._warn_invalid_bitmaps(plan)
        runner = JobRunner(ctx, domain, plan.disk, store, record)
        guard = merge_guard(ctx, domain, plan) if self.req.wait else None

        def start() -> None:
            if plan.strategy is Strategy.PULL:
                domain.pull(plan.disk, libvirt_ref(domain, plan.disk, plan.base), self.bandwidth,
                            relative=plan.keep_relative)
            else:
                domain.commit(plan.disk, libvirt_ref(domain, plan.disk, plan.result) or "",
                              libvirt_ref(domain, plan.disk, plan.top), active=plan.active,
                              bandwidth_mib_s=self.bandwidth,
                              relative=plan.keep_relative and not plan.active)

        req = self.req
        if plan.strategy is Strategy.PULL:
            # Waiting pulls hold the lock for their whole job; --no-wait ones
            # only while starting (and are refused if a pull runs).
            with exclusive_pull(ctx, domain, plan.disk, wait=req.wait):
                outcome = runner.run(start, two_phase=False, pivot=True,
                                     wait=req.wait, guard=guard)
        else:
            outcome = runner.run(start, two_phase=plan.two_phase, pivot=True,
                                 wait=req.wait, guard=guard)
        if guard is not None and plan.disk in self.volumes:
            self.volumes[plan.disk]["extensions_during_job"] = guard.extensions
        if outcome is None:  # --no-wait: jobs/recover follow up
            report = self.report(domain, plan)
            report.record = record.id
            return report
        if outcome is Outcome.VANISHED:
            log.info("%s %s: job gone without an event; the XML decides", domain.name, plan.disk)
        # No COMPLETED phase written: finish follows at once, and recover
        # decides by the chain, not by the phase (one metadata write less).
        return self.finish(ctx, domain, plan, store, record)

    def finish(self, ctx: Context, domain: Domain, plan: MergePlan, store: RecordStore,
               record: OperationRecord) -> MergeReport:
        """After the job ended (or, for recover, the VM stopped after it):
        check, register invalidated layers, clean up."""
        chain_now = current_chain(domain, plan.disk)
        if same_images(chain_now, plan.chain_before):
            raise errors.JobFailed(
                f"the block job on {domain.name} {plan.disk} is gone but the chain is unchanged")
        left_chain = ImageSet(chain_now)
        # Committed-out layers are invalid from the moment they leave the
        # chain, whatever verification says next.
        ctx.state.invalidate([r.path for r in plan.retired if not r.valid and r.path not in left_chain],
                             domain=domain.name, disk=plan.disk, operation=f"merge {record.id}")
        require_chain(domain, plan.disk, plan.chain_after)
        report = self.report(domain, plan, chain_after=chain_now, verified=True)
        if record.request.get("delete_retired"):
            report.deleted, report.kept = delete_unused(ctx, domain, plan.disk,
                                                        [r.path for r in plan.retired])
        store.finish(record)
        return report
