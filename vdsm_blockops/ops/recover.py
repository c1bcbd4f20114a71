"""Finish or roll back operations a crash interrupted.

For every unfinished record the real state is read -- is the job still
there, is its mirror ready, what is the chain now (live, or from the
images' headers when the VM is off) -- rather than trusted from the
record's phase. A job still running is followed with the operation's own
runner (pivoted when the request wanted it); then ``operation.settle``
decides, as it does after a failure: chain as planned -> finish like the
original command; chain as before -> roll back; anything else -> the
record stays and the reason is reported.

Idempotent: a record goes only after its disk verified, and a disk whose
lock is held (the original command is still alive) is left alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core import errors
from ..core.planner import MergePlan
from ..core.relocate_plan import RelocatePlan, RelocateRequest
from ..core.settled import RecordOutcome, RecoverReport
from ..engine import aborts
from ..engine.context import Context, check_timeout
from ..engine.jobs import Guard, JobRunner, Outcome
from ..engine.operation import settle
from ..engine.records import OperationRecord, RecordStore
from ..engine.verification import require_chain
from . import movers
from .merge import Merge, MergeRequest, merge_guard
from .moved import recover_moves
from .relocate import Relocate
from .snapshot import Snapshot, SnapshotPlan, SnapshotRequest

if TYPE_CHECKING:
    from ..virt import Domain

log = logging.getLogger(__name__)


def recover(ctx: Context, domain_name: str | None = None, timeout_s: float | None = None,
            disk: str | None = None) -> RecoverReport:
    """Settle every unfinished record of one domain (or of all), or only
    the record of ``disk``."""
    check_timeout(timeout_s)
    if domain_name is None:
        ctx.state.sweep_locks()
        aborts.sweep(ctx.state)
    # moves to another node first: their domain may have left this node
    outcomes = [] if disk else recover_moves(ctx, domain_name, timeout_s)
    try:
        domains = [ctx.conn.domain(domain_name)] if domain_name else ctx.conn.domains()
    except errors.UnknownDomain:
        if not outcomes:
            raise
        domains = []
    for domain in domains:
        store = RecordStore(domain, ctx.state)
        try:
            records = store.load()
        except (errors.BlockOpsError, OSError, ValueError) as exc:  # one domain never stops the rest
            log.warning("recover %s: cannot read its records: %s", domain.name, exc)
            outcomes.append(RecordOutcome(domain=domain.name, disk=disk or "?", record="?",
                                          operation="?", phase="?", result="failed",
                                          message=f"cannot read the records: {exc}"))
            continue
        for target, record in sorted(records.items()):
            if disk in (None, target):
                outcomes.append(_recover_one(ctx, domain, store, record, timeout_s))
    failed = [o for o in outcomes if not o.settled]
    waiting = [o for o in failed if o.result == "waiting"]
    error = None
    if failed and len(waiting) == len(failed):
        error = {"code": "timeout", "message": f"{len(waiting)} job(s) still running: "
                                               + "; ".join(o.message or "" for o in waiting)}
    elif failed:
        error = {"code": "recover-incomplete",
                 "message": f"{len(failed)} record(s) could not be settled"}
    return RecoverReport(domain=domain_name or "all", records=outcomes, error=error)


def recover_queued(ctx: Context, timeout_s: float | None = None) -> RecoverReport:
    """Work the queue the hook fills (reconnect/started/release events), and
    retry earlier failures. A domain that cannot be settled moves to
    ``failed/`` with the reason (beside ``queue/``, which the path unit
    watches: a bad entry must not re-trigger it forever); the timer retries
    it, and a success removes it."""
    ctx.state.sweep_locks()
    queue = os.path.join(ctx.state.path, "queue")
    failed_dir = os.path.join(ctx.state.path, "failed")
    entries = [(folder, name) for folder in (queue, failed_dir) if os.path.isdir(folder)
               for name in sorted(os.listdir(folder))]
    outcomes: list[RecordOutcome] = []
    failed = []
    for folder, name in entries:
        try:
            report = recover(ctx, name, timeout_s)
        except errors.UnknownDomain:
            report = RecoverReport(domain=name, records=[])  # gone: nothing left to do
        except errors.BlockOpsError as exc:
            report = RecoverReport(domain=name, records=[], error=exc.to_json())
        except Exception as exc:  # one entry never stops the queue
            log.exception("recover of queued %s: internal error", name)
            report = RecoverReport(domain=name, records=[], error={
                "code": "failed", "message": f"internal error: {type(exc).__name__}: {exc}"})
        outcomes += report.records
        if not report.ok:
            failed.append(name)
            reasons = [o.message or o.result for o in report.records if not o.settled] \
                or [str(report.error)]
            os.makedirs(failed_dir, exist_ok=True)
            with open(os.path.join(failed_dir, name), "w", encoding="utf-8") as handle:
                handle.write("\n".join(reasons) + "\n")
        if folder == queue or report.ok:
            os.unlink(os.path.join(folder, name))
    return RecoverReport(domain="queued", records=outcomes, queued=[name for _, name in entries],
                         error={"code": "recover-incomplete",
                                "message": f"{len(failed)} queued domain(s) not settled: "
                                           f"{', '.join(failed)} (see {failed_dir})"}
                         if failed else None)


def _recover_one(ctx: Context, domain: Domain, store: RecordStore, record: OperationRecord,
                 timeout_s: float | None) -> RecordOutcome:
    outcome = RecordOutcome(domain=domain.name, disk=record.disk, record=record.id,
                            operation=record.operation, phase=record.phase.value, result="")
    if record.unreadable:
        outcome.phase, outcome.result = "?", "unreadable"
        outcome.message = (f"record {record.id} of {domain.name} {record.disk} was written by "
                           f"another version of vdsm-blockops ({record.unreadable}); left in "
                           "place, the disk stays blocked: recover it with that version")
        log.warning("recover %s", outcome.message)
        return outcome
    try:
        with ctx.state.disk_lock(domain.uuid, record.disk, f"recover of {domain.name} {record.disk}"):
            if record.operation == "merge":
                outcome.result = _recover_merge(ctx, domain, store, record, timeout_s)
            elif record.operation == "snapshot":
                outcome.result = _recover_snapshot(ctx, domain, store, record)
            else:
                outcome.result = _recover_relocate(ctx, domain, store, record, timeout_s)
    except errors.Conflict as exc:
        outcome.result, outcome.message = "busy", str(exc)
    except errors.JobTimeout as exc:  # stopped waiting: the job is healthy and runs on
        outcome.result, outcome.message = "waiting", str(exc)
    except (errors.BlockOpsError, OSError) as exc:
        log.warning("recover %s %s: %s", domain.name, record.disk, exc)
        outcome.result, outcome.message = "failed", str(exc)
    except Exception as exc:  # a record this code mis-reads must not stop the others
        log.exception("recover %s %s: internal error", domain.name, record.disk)
        outcome.result, outcome.message = "failed", f"internal error: {type(exc).__name__}: {exc}"
    else:
        log.info("recover %s %s %s: %s", domain.name, record.disk, record.id, outcome.result)
    return outcome


def _follow(ctx: Context, domain: Domain, store: RecordStore, record: OperationRecord,
            two_phase: bool, pivot: bool, timeout_s: float | None,
            guard: Callable[[], Guard | None] = lambda: None) -> Outcome | None:
    """Wait on the record's job if it still runs, watching the block volume
    it writes into as the interrupted command did (``guard``); None when
    there is none, FAILED when it ended badly (settle then rolls back)."""
    if not domain.is_active() or domain.block_job_info(record.disk) is None:
        return None
    runner = JobRunner(ctx, domain, record.disk, store, record)
    try:
        return runner.follow(two_phase=two_phase, pivot=pivot, timeout_s=timeout_s,
                             guard=guard())
    except errors.JobFailed as exc:
        log.info("%s %s: the job ended without success: %s", domain.name, record.disk, exc)
        return Outcome.FAILED


def _recover_merge(ctx: Context, domain: Domain, store: RecordStore, record: OperationRecord,
                   timeout_s: float | None) -> str:
    plan = MergePlan.from_json(record.plan)
    _follow(ctx, domain, store, record, plan.two_phase, True, timeout_s,
            guard=lambda: merge_guard(ctx, domain, plan))
    op = Merge(MergeRequest(**record.request))
    return settle(domain, store, record,
                  finish=lambda: op.finish(ctx, domain, plan, store, record),
                  remove_volume=ctx.config.volume_remove_command).value


def _recover_snapshot(ctx: Context, domain: Domain, store: RecordStore,
                      record: OperationRecord) -> str:
    plan = SnapshotPlan.from_json(record.plan)
    op = Snapshot(SnapshotRequest(**record.request))
    return settle(domain, store, record,
                  finish=lambda: op.finish(ctx, domain, plan, store, record),
                  remove_volume=ctx.config.volume_remove_command).value


def _recover_relocate(ctx: Context, domain: Domain, store: RecordStore, record: OperationRecord,
                      timeout_s: float | None) -> str:
    """Follow the interrupted relocation through the mover that ran it."""
    plan = RelocatePlan.from_json(record.plan)
    op = Relocate(RelocateRequest(**record.request))
    outcome = movers.choose(op.move(ctx, domain, plan, store, record,
                                    online=record.online)).follow(timeout_s)
    if outcome is Outcome.CANCELED:
        # --no-pivot: the job converged, DEST is the finished copy and the
        # VM stays on its source.
        require_chain(domain, record.disk, plan.chain_before)
        store.finish(record)
        return "finished"
    return settle(domain, store, record,
                  finish=lambda: op.finish(ctx, domain, plan, store, record),
                  remove_volume=ctx.config.volume_remove_command).value
