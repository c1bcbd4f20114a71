"""One skeleton for every operation on a domain's disks, and one way to
settle a disk after anything went wrong.

Skeleton (``run_operation``): validate the request -> plan every selected
disk (refusals happen here, before anything changes) -> with ``--dry-run``
report the plans -> per disk (concurrently for ``all``): take the disk's
lock, check the chain is still the planned one (by identity: else exit 4),
write the record, run, and on failure settle.

Settlement (``settle``): the chain the disk is on now decides, never the
record's phase: the planned chain after -> finish (verify, register, clean
up); the chain before -> roll back (remove created files) and drop the
record; anything else -> the record stays for ``recover``. Used by the
operations after a failure and by ``recover``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from ..core import errors
from ..core.budget import Budget, wait_all
from ..core.chain import Disk
from ..core.identity import ImageKey, image_key, same_images
from ..core.model import Operation
from ..core.reports import DiskFailure, MultiReport, Report
from .context import Context, as_failure, check_no_job
from .node import current_chain
from .records import OperationRecord, Phase, RecordStore
from .storage import remove_created_files
from .verification import require_chain

if TYPE_CHECKING:
    from ..virt import Domain

log = logging.getLogger(__name__)


class DiskPlan(Protocol):
    """What every plan has: the disk and the chains before and after."""

    @property
    def disk(self) -> str: ...
    @property
    def chain_before(self) -> list[str]: ...
    @property
    def chain_after(self) -> list[str]: ...


PlanT = TypeVar("PlanT", bound=DiskPlan)


class DiskOperation(Protocol, Generic[PlanT]):
    """What merge and relocate provide to the skeleton."""

    kind: Operation
    online: bool  # known once domain() answered
    timeout_s: float | None  # the whole operation's, from its start

    def domain(self, ctx: Context) -> Domain: ...
    def plan(self, ctx: Context, domain: Domain, disk: Disk) -> PlanT: ...
    def check_plans(self, plans: list[PlanT]) -> None: ...
    def report(self, domain: Domain, plan: PlanT, *, dry_run: bool) -> Report: ...
    def idle(self, domain: Domain, plan: PlanT) -> Report | None: ...
    def request_json(self) -> dict[str, Any]: ...
    def plan_json(self, plan: PlanT) -> dict[str, Any]: ...
    def execute(self, ctx: Context, domain: Domain, plan: PlanT, store: RecordStore,
                record: OperationRecord) -> Report: ...
    def finish(self, ctx: Context, domain: Domain, plan: PlanT, store: RecordStore,
               record: OperationRecord) -> Report: ...


def run_operation(ctx: Context, op: DiskOperation[PlanT], target: str, dry_run: bool) -> Report:
    started = ctx.clock()
    ctx = ctx.timed(op.timeout_s)
    domain = op.domain(ctx)
    disks = domain.spec().select(target)
    if not disks:
        raise errors.BadRequest(f"domain {domain.name} has no disk with an image chain")
    for disk in disks:
        check_no_job(domain, disk)
    plans = [op.plan(ctx, domain, disk) for disk in disks]
    # The identities the plans were made on, taken now: a file replaced
    # at the same path before the lock is another chain.
    planned_on = {plan.disk: [image_key(p) for p in plan.chain_before] for plan in plans}
    op.check_plans(plans)
    if dry_run:
        results: list[Report | BaseException] = [op.report(domain, p, dry_run=True) for p in plans]
    else:
        results = run_per_disk(plans, lambda plan: _run_disk(ctx, op, domain, plan,
                                                             planned_on[plan.disk]),
                               ctx.budget)
    return combine(op.kind, domain, target, [p.disk for p in plans], results,
                   ctx.clock() - started)


def _run_disk(ctx: Context, op: DiskOperation[PlanT], domain: Domain, plan: PlanT,
              planned_on: list[ImageKey]) -> Report:
    nothing_to_do = op.idle(domain, plan)
    if nothing_to_do is not None:
        return nothing_to_do
    with ctx.state.disk_lock(domain.uuid, plan.disk, f"{op.kind.value} of {domain.name} {plan.disk}"):
        # Another command may have changed the chain between our plan and
        # our lock (it held the lock then): a plan made on the old chain
        # would undo its work.
        now = current_chain(domain, plan.disk)
        if [image_key(p) for p in now] != planned_on:
            raise errors.Conflict(
                f"the chain of {plan.disk} changed while the {op.kind.value} was planned "
                f"(now {now}): nothing was changed; run the command again")
        store = RecordStore(domain, ctx.state)
        record = OperationRecord(operation=op.kind.value, disk=plan.disk,
                                 request=op.request_json(), plan=op.plan_json(plan),
                                 online=op.online)
        store.begin(record)  # the hook refuses a start of a shut-off domain from here on
        try:
            if not op.online and domain.is_active():
                raise errors.Conflict(f"{domain.name} was started while the {op.kind.value} was "
                                      "planned for it shut off: nothing was changed; run the "
                                      "command again")
            return op.execute(ctx, domain, plan, store, record)
        except (errors.VerificationFailed, errors.Interrupted):
            # The chain moved but does not check out, or the command was
            # interrupted (handed over as it stands): the record stays for recover.
            raise
        except (errors.BlockOpsError, OSError) as exc:
            settled = None
            try:
                settled = settle(domain, store, record,
                                 finish=lambda: op.finish(ctx, domain, plan, store, record),
                                 remove_volume=ctx.config.volume_remove_command).value
            except (errors.BlockOpsError, OSError) as why:
                log.warning("%s %s left for recover: %s", domain.name, plan.disk, why)
            failure = as_failure(exc)
            raise failure.with_message(failure.message, settled=settled,
                                       record=failure.record or record.id) from exc


class Settlement(enum.Enum):
    FINISHED = "finished"
    ROLLED_BACK = "rolled-back"


def settle(domain: Domain, store: RecordStore, record: OperationRecord,
           finish: Callable[[], object], remove_volume: Sequence[str] = ()) -> Settlement:
    """Finish or roll back ``record`` from the chain the disk is on now
    (live, or from the images' headers when the VM is off). Raises
    VerificationFailed, and keeps the record, when the chain is neither the
    one before nor the one planned after, or does not check out."""
    before, after = record.plan["chain_before"], record.plan["chain_after"]
    now = current_chain(domain, record.disk)
    is_before = same_images(now, before)
    if same_images(now, after) and not is_before:
        finish()
        return Settlement.FINISHED
    if not is_before:
        problem = f"{record.disk}: chain is {now}, neither before nor after the operation"
        raise errors.VerificationFailed(problem, problems=[problem])
    store.advance(record, Phase.ROLLING_BACK)
    remove_created_files(record, now, remove_volume)
    require_chain(domain, record.disk, before)
    store.finish(record)
    return Settlement.ROLLED_BACK


T = TypeVar("T")


def run_per_disk(items: list[T], work: Callable[[T], Report],
                 budget: Budget | None = None) -> list[Report | BaseException]:
    """Run ``work(item)`` for each disk concurrently (one libvirt event loop
    serves them all); results in input order, exceptions returned in place
    after every disk finished. Ctrl-C (main thread only) is passed to the
    other threads through ``budget``: each stops at its next step, and the
    interrupt is raised once they have."""
    if len(items) == 1:
        return [work(items[0])]
    import concurrent.futures  # only for several disks

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(items)) as pool:
        futures = [pool.submit(work, item) for item in items]
        wait_all(futures, budget)
    return [f.exception() or f.result() for f in futures]


def combine(kind: Operation, domain: Domain, target: str, disks: list[str],
            results: list[Report | BaseException], duration_s: float) -> Report:
    """One report for one disk, or a report with ``results`` for ``all``.
    With ``all``, a failure of any disk fails the whole (the worst exit
    code wins), its message names each failed disk with its own error, and
    it carries every disk's result in its details."""
    failures = [r for r in results if isinstance(r, BaseException)]
    if target != "all":
        if failures:
            raise failures[0]
        report = results[0]
        assert isinstance(report, Report)
        if hasattr(report, "duration_s"):
            report.duration_s = round(duration_s, 3)
        return report
    reports: list[Report] = [
        DiskFailure(disk=disk, error=as_failure(r).to_json()) if isinstance(r, BaseException)
        else r for disk, r in zip(disks, results)]
    if failures:
        worst = max((as_failure(f) for f in failures), key=lambda e: e.exit_code)
        each = "; ".join(f"{r.disk} ({r.error['code']}): {r.error['message']}"
                         for r in reports if isinstance(r, DiskFailure))
        raise worst.with_message(f"{len(failures)} of {len(results)} disks failed: {each}",
                                 results=[r.to_json() for r in reports])
    return MultiReport(operation=kind.value, domain=domain.name, results=reports,
                       duration_s=round(duration_s, 3))
