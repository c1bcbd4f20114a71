"""Controlling a running block job: abort (or pivot) and throttle."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import TYPE_CHECKING

from ..core import errors
from ..core.reports import SpeedReport
from ..core.settled import AbortReport, RecordOutcome
from ..engine import aborts
from ..engine.context import Context, check_bandwidth, refuse_vdsm_managed
from ..engine.migrations import MigrationRecord, MigrationStore
from ..engine.node import current_chain, owner_alive
from ..engine.records import OperationRecord, RecordStore

if TYPE_CHECKING:
    from ..virt import Domain

# Two-phase jobs: they converge, then pivot (a pull or an inner commit ends
# by itself and cannot).
PIVOTING_JOBS = ("copy", "active-commit")
STOP_WAIT_S = 60.0  # for a command told to stop (SIGTERM) to be gone


def abort(ctx: Context, domain_name: str, target: str, pivot: bool) -> AbortReport:
    """Abort the job on ``target`` (or pivot a ready one). A job of ours
    (started with --no-wait) has its record settled at once -- that disk's
    only -- so retired layers get registered and verify passes. A domain
    being moved to another node has its move stopped instead."""
    move = _unfinished_move(ctx, domain_name)
    if move is not None:
        return _abort_move(ctx, move, target, pivot)
    domain = ctx.conn.domain(domain_name)
    domain.spec().disk(target)
    _refuse_foreign_vdsm_job(ctx, domain, target)
    job = domain.block_job_info(target) if domain.is_active() else None
    if job is None:
        return _abort_own_operation(ctx, domain, target, pivot)
    if pivot and job.job_type not in PIVOTING_JOBS:
        raise errors.BadRequest(f"the {job.job_type} job on {domain.name} {target} ends by "
                                "itself and has no pivot: abort it without --pivot")
    record = RecordStore(domain).load().get(target)
    report = AbortReport(domain=domain.name, disk=target, pivot=pivot, chain_after=[])
    with contextlib.ExitStack() as note:
        if record is not None and not pivot:
            note.enter_context(aborts.noted(ctx.state, record.id, record.pid,
                                            lambda: _alive(record)))
        if pivot or record is None or not _finished_copy_kept(domain, target, record):
            domain.abort_job(target, pivot=pivot)
            if record is not None and _is_snapshot_stream(record):
                _undo_snapshot_stream(ctx, domain, record)
        # Settled at once: a finished --no-pivot copy is ended by recover as
        # the command would have (the job cancelled, DEST kept); anything
        # else aborted is rolled back (what the operation made removed).
        return _settled(ctx, domain, target, report, record is not None)


def _settled(ctx: Context, domain: Domain, target: str, report: AbortReport,
             has_record: bool) -> AbortReport:
    """``report`` with the disk's record settled by recover, and its chain."""
    if has_record:
        from .recover import recover

        report.recover = recover(ctx, domain.name, disk=target).records
    report.chain_after = current_chain(domain, target)
    return report


def _abort_own_operation(ctx: Context, domain: Domain, target: str, pivot: bool) -> AbortReport:
    """No libvirt job: the tool's own work (qemu-img, its file copies, a
    shut-off domain) is stopped by stopping the command that does it, as
    Ctrl-C would (its child qemu-img dies with it); then its record is
    settled -- rolled back, what it made removed."""
    record = RecordStore(domain).load().get(target)
    if record is None:
        raise errors.BadRequest(f"disk {target} of {domain.name} has no block job and no "
                                "operation of this tool")
    if pivot:
        raise errors.BadRequest(f"{record.operation} {record.id} on {domain.name} {target} runs "
                                "no block job: there is nothing to pivot")
    with aborts.noted(ctx.state, record.id, record.pid, lambda: _alive(record)):
        _stop_owner(ctx, record.pid, record.started_at, record.owner,
                    f"{record.operation} {record.id}")
        report = AbortReport(domain=domain.name, disk=target, pivot=False, chain_after=[])
        return _settled(ctx, domain, target, report, True)


def _alive(record: OperationRecord | MigrationRecord) -> bool:
    return owner_alive(record.pid, record.started_at, record.owner)


def _stop_owner(ctx: Context, pid: int, since: float, owner: str, what: str) -> None:
    """The command that runs ``what`` stopped as Ctrl-C would stop it
    (it hands over or rolls back what it started), and gone."""
    if pid == os.getpid() or not owner_alive(pid, since, owner):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = ctx.clock() + STOP_WAIT_S
    while owner_alive(pid, since, owner):
        if ctx.clock() > deadline:
            raise errors.JobTimeout(f"pid {pid} ({what}) did not stop within {STOP_WAIT_S:g} s")
        ctx.sleep(0.1)


def _unfinished_move(ctx: Context, name: str) -> MigrationRecord | None:
    """The record of a move of domain ``name`` (by name or uuid) to
    another node -- found also once the domain left this node."""
    found = MigrationStore(ctx.state).all(name)
    return found[0] if found else None


def _abort_move(ctx: Context, record: MigrationRecord, target: str,
                pivot: bool) -> AbortReport:
    """Stop a move to another node: the migrate command is stopped as by
    Ctrl-C (an upload or a proof is cut, a migration job aborted) and
    rolls back; whatever it leaves is settled as recover would -- rolled
    back while the domain still runs here, finished if it already runs
    there (a migration past its switchover cannot be undone)."""
    if record.unreadable:
        raise errors.StateError(f"{record.domain}: {record.describe()}")
    disks = [d["disk"] for d in record.plan.get("disks", [])]
    if target != "all" and target not in disks:
        raise errors.BadRequest(f"{record.domain} is being moved to {record.dest_uri} with "
                                f"{', '.join(disks)}: abort the move with 'all'")
    if pivot:
        raise errors.BadRequest(f"{record.domain} is being moved to {record.dest_uri}: a move "
                                "has no pivot, abort stops it")
    from .moved import recover_moves, source_domain

    with aborts.noted(ctx.state, record.id, record.pid, lambda: _alive(record)):
        _stop_owner(ctx, record.pid, record.started_at, record.owner, f"migrate {record.id}")
        # A command that died left its migration job running: abort it,
        # as the command would have (a job past its switchover refuses).
        source = source_domain(ctx, record.uuid)
        if source is not None and source.is_active() and source.migration_progress():
            with contextlib.suppress(errors.BlockOpsError):
                source.abort_migration()
        outcomes = recover_moves(ctx, record.uuid, timeout_s=STOP_WAIT_S)
    domain = source_domain(ctx, record.uuid)
    here = domain is not None and domain.is_active()
    if not outcomes:  # the command settled it itself
        outcomes = [RecordOutcome(domain=record.domain, disk="all", record=record.id,
                                  operation="migrate", phase=record.phase.value,
                                  result="rolled-back" if here else "finished")]
    chain = current_chain(domain, target) if here and domain and target != "all" else []
    report = AbortReport(domain=record.domain, disk=target, pivot=False, chain_after=chain,
                         recover=outcomes)
    unsettled = [o for o in outcomes if not o.settled]
    if unsettled:  # said with its exit code, not as a success
        report.error = {"code": "timeout" if all(o.result == "waiting" for o in unsettled)
                        else "recover-incomplete",
                        "message": "; ".join(f"the move is {o.result}: {o.message}"
                                             for o in unsettled)}
    return report


def _is_snapshot_stream(record: OperationRecord) -> bool:
    return (not record.unreadable and record.operation == "relocate"
            and record.plan.get("method") == "snapshot-stream")


def _undo_snapshot_stream(ctx: Context, domain: Domain, record: OperationRecord) -> None:
    """The VM is on DEST over the old chain: back onto the chain before
    (recover would pull again, which completes the move abort was asked to
    stop)."""
    from ..core.relocate_plan import RelocatePlan, RelocateRequest
    from .movers.snapshot_stream import SnapshotStream
    from .relocate import Relocate

    plan = RelocatePlan.from_json(record.plan)
    op = Relocate(RelocateRequest(**record.request))
    store = RecordStore(domain, ctx.state)
    try:
        with ctx.state.disk_lock(domain.uuid, record.disk, f"abort of {domain.name} {record.disk}"):
            SnapshotStream(op.move(ctx, domain, plan, store, record, online=True)).undo()
    except errors.Conflict:
        pass  # the command that waits on the pull is alive: it undoes it itself


def _finished_copy_kept(domain: Domain, target: str, record: OperationRecord) -> bool:
    """A relocation asked not to pivot whose copy is ready: the copy is what
    the operator asked for, and stays."""
    mirror = domain.spec().disk(target).mirror
    return (not record.unreadable and record.operation == "relocate"
            and record.request.get("pivot") is False and mirror is not None
            and mirror.is_ready)


def speed(ctx: Context, domain_name: str, target: str, bandwidth_mib_s: int) -> SpeedReport:
    bandwidth = check_bandwidth(bandwidth_mib_s)
    domain = ctx.conn.domain(domain_name)
    domain.spec().disk(target)
    _refuse_foreign_vdsm_job(ctx, domain, target)
    if domain.block_job_info(target) is None:
        raise errors.BadRequest(f"disk {target} of {domain.name} has no block job")
    domain.set_speed(target, bandwidth)
    return SpeedReport(domain=domain.name, disk=target, bandwidth_mib_s=bandwidth)


def _refuse_foreign_vdsm_job(ctx: Context, domain: Domain, target: str) -> None:
    """On a VM VDSM manages, only the work of an operation of ours (its
    record on the disk) is ours to control."""
    if RecordStore(domain).load().get(target) is None:
        refuse_vdsm_managed(ctx, domain)
