"""Controlling a running block job: abort (or pivot) and throttle."""

from __future__ import annotations

from ..core import errors
from ..core.reports import AbortReport, SpeedReport
from ..engine.context import Context, check_bandwidth
from ..engine.node import current_chain
from ..engine.records import RecordStore

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
    domain.abort_job(target, pivot=pivot)
    report = AbortReport(domain=domain.name, disk=target, pivot=pivot, chain_after=[])
    if target in RecordStore(domain).load():
        from .recover import recover

        report.recover = recover(ctx, domain.name, disk=target).records
    report.chain_after = current_chain(domain, target)
    return report


def speed(ctx: Context, domain_name: str, target: str, bandwidth_mib_s: int) -> SpeedReport:
    bandwidth = check_bandwidth(bandwidth_mib_s)
    domain = ctx.conn.domain(domain_name)
    domain.spec().disk(target)
    if domain.block_job_info(target) is None:
        raise errors.BadRequest(f"disk {target} of {domain.name} has no block job")
    domain.set_speed(target, bandwidth)
    return SpeedReport(domain=domain.name, disk=target, bandwidth_mib_s=bandwidth)
