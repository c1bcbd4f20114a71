"""Controlling a running block job: abort (or pivot) and throttle."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core import errors
from ..core.reports import AbortReport, SpeedReport
from ..engine.context import Context, check_bandwidth
from ..engine.node import current_chain
from ..engine.records import OperationRecord, RecordStore

if TYPE_CHECKING:
    from ..virt import Domain

# Two-phase jobs: they converge, then pivot (a pull or an inner commit ends
# by itself and cannot).
PIVOTING_JOBS = ("copy", "active-commit")


def abort(ctx: Context, domain_name: str, target: str, pivot: bool) -> AbortReport:
    """Abort the job on ``target`` (or pivot a ready one). A job of ours
    (started with --no-wait) has its record settled at once -- that disk's
    only -- so retired layers get registered and verify passes."""
    domain = ctx.conn.domain(domain_name)
    domain.spec().disk(target)
    job = domain.block_job_info(target)
    if job is None:
        raise errors.BadRequest(f"disk {target} of {domain.name} has no block job")
    if pivot and job.job_type not in PIVOTING_JOBS:
        raise errors.BadRequest(f"the {job.job_type} job on {domain.name} {target} ends by "
                                "itself and has no pivot: abort it without --pivot")
    record = RecordStore(domain).load().get(target)
    report = AbortReport(domain=domain.name, disk=target, pivot=pivot, chain_after=[])
    if pivot or record is None or not _finished_copy_kept(domain, target, record):
        domain.abort_job(target, pivot=pivot)
    if record is not None:
        # Settled at once: a finished --no-pivot copy is ended by recover as
        # the command would have (the job cancelled, DEST kept); anything
        # else aborted is rolled back (what the operation made removed).
        from .recover import recover

        report.recover = recover(ctx, domain.name, disk=target).records
    report.chain_after = current_chain(domain, target)
    return report


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
    if domain.block_job_info(target) is None:
        raise errors.BadRequest(f"disk {target} of {domain.name} has no block job")
    domain.set_speed(target, bandwidth)
    return SpeedReport(domain=domain.name, disk=target, bandwidth_mib_s=bandwidth)
