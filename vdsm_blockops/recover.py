"""Finish or roll back operations a crash interrupted.

For every unfinished record the real state is read from libvirt -- is the
job still there, is its mirror ready, what is the chain now -- rather than
trusted from the record's phase. Then:

* a job still running is waited on (and pivoted when it is two-phase and
  the request wanted a pivot), then finished like the original command;
* no job, chain as planned: verify, register invalidated layers, done;
* no job, chain as before: roll back (remove files we created), done;
* anything else is reported and the record kept.

Idempotent: a record goes only after its disk verified, and a disk whose
lock is held (the original command is still alive) is left alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from . import errors
from .jobs import JobWatch, Outcome
from .merge import finish_merge
from .ops import (Context, JobRunner, live_chain_problems, norm, point_persistent_definition,
                  require_live_chain)
from .planner import MergePlan, RetiredLayer
from .records import OperationRecord, RecordStore
from .relocate import RelocatePlan, remove_created_files
from .virt import Domain

log = logging.getLogger(__name__)


def merge_plan_from(record: OperationRecord) -> MergePlan:
    names = {f.name for f in dataclasses.fields(MergePlan)}
    body = {k: v for k, v in record.plan.items() if k in names}
    body["retired"] = [RetiredLayer(**r) for r in body.get("retired", [])]
    return MergePlan(**body)


def relocate_plan_from(record: OperationRecord) -> RelocatePlan:
    names = {f.name for f in dataclasses.fields(RelocatePlan)}
    body = {k: v for k, v in record.plan.items() if k in names}
    body["copies"] = [tuple(c) for c in body.get("copies", [])]
    return RelocatePlan(**body)


def recover(ctx: Context, domain_name: str | None = None, timeout_s: float | None = None) -> dict:
    domains = [ctx.conn.domain(domain_name)] if domain_name else ctx.conn.domains()
    outcomes = []
    for domain in domains:
        store = RecordStore(domain)
        for disk, record in sorted(store.load().items()):
            outcomes.append(_recover_one(ctx, domain, store, record, timeout_s))
    failed = [o for o in outcomes if o["result"] in ("failed", "busy")]
    return {"ok": not failed, "operation": "recover", "domain": domain_name or "all",
            "records": outcomes,
            **({"error": {"code": "recover-incomplete",
                          "message": f"{len(failed)} record(s) could not be settled"}}
               if failed else {})}


def recover_queued(ctx: Context, timeout_s: float | None = None) -> dict:
    """Work the queue the hook fills (reconnect/started/release events)."""
    folder = os.path.join(ctx.state.path, "queue")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    outcomes, failed = [], 0
    for name in names:
        try:
            report = recover(ctx, name, timeout_s)
        except errors.UnknownDomain:
            report = {"ok": True, "records": []}  # gone: nothing left to do
        outcomes += report["records"]
        if report["ok"]:
            os.unlink(os.path.join(folder, name))
        else:
            failed += 1
    return {"ok": not failed, "operation": "recover", "domain": "queued", "queued": names,
            "records": outcomes,
            **({"error": {"code": "recover-incomplete",
                          "message": f"{failed} queued domain(s) not settled"}} if failed else {})}


def _recover_one(ctx: Context, domain: Domain, store: RecordStore, record: OperationRecord,
                 timeout_s: float | None) -> dict:
    base = {"domain": domain.name, "disk": record.disk, "record": record.id,
            "operation": record.operation, "phase": record.phase.value}
    try:
        with ctx.state.disk_lock(domain.uuid, record.disk, f"recover of {domain.name} {record.disk}"):
            if record.operation == "merge":
                result = _recover_merge(ctx, domain, store, record, timeout_s)
            else:
                result = _recover_relocate(ctx, domain, store, record, timeout_s)
    except errors.Conflict as exc:
        return {**base, "result": "busy", "message": str(exc)}
    except errors.BlockOpsError as exc:
        log.warning("recover %s %s: %s", domain.name, record.disk, exc)
        return {**base, "result": "failed", "message": str(exc)}
    log.info("recover %s %s %s: %s", domain.name, record.disk, record.id, result)
    return {**base, "result": result}


def _live_paths(domain: Domain, target: str) -> list[str] | None:
    """The running chain, or None when the VM is off (then only the
    persistent definition's active image is known)."""
    if not domain.is_active():
        return None
    return norm(domain.spec().disk(target).paths)


def _wait_job(ctx: Context, domain: Domain, store: RecordStore, record: OperationRecord,
              two_phase: bool, pivot: bool, timeout_s: float | None) -> Outcome:
    """Follow a job that is still running; pivot it when wanted."""
    runner = JobRunner(ctx, domain, record.disk, store, record)
    with JobWatch(domain, record.disk, poll_interval_s=ctx.config.poll_interval_s) as watch:
        outcome = watch.wait(until_ready=two_phase, timeout_s=timeout_s,
                             ready_check=runner.mirror_ready if two_phase else None)
    if outcome in (Outcome.FAILED, Outcome.CANCELED):
        return outcome
    if two_phase and outcome is Outcome.READY:
        if pivot:
            runner.pivot()
            return Outcome.COMPLETED
        domain.abort_job(record.disk)
        return Outcome.CANCELED
    return outcome


def _persistent_active(domain: Domain, target: str) -> str | None:
    if not domain.is_persistent():
        return None
    disk = domain.spec(inactive=True).disk(target)
    return norm(disk.paths[:1])[0] if disk.paths else None


def _recover_merge(ctx, domain, store, record, timeout_s) -> str:
    plan = merge_plan_from(record)
    if domain.is_active() and domain.block_job_info(record.disk) is not None:
        outcome = _wait_job(ctx, domain, store, record, plan.two_phase, True, timeout_s)
        if outcome not in (Outcome.COMPLETED, Outcome.VANISHED):
            return _settle_unchanged(domain, store, record, plan.chain_before, "rolled-back")
    live = _live_paths(domain, record.disk)
    if live == norm(plan.chain_after):
        finish_merge(ctx, domain, plan, store, record,
                     delete_retired=bool(record.request.get("delete_retired")))
        return "finished"
    if live is None:
        # VM off: its jobs died with it. An unpivoted active commit or an
        # unfinished commit leaves the old chain whole (the layers above
        # still cover what was copied into the base).
        if _persistent_active(domain, record.disk) in (norm(plan.chain_before)[0], None):
            store.finish(record)
            return "rolled-back"
        raise errors.OperationFailed(
            f"{record.disk}: the VM is off and its definition matches neither the chain "
            "before nor after the merge; start it and run recover again")
    return _settle_unchanged(domain, store, record, plan.chain_before, "rolled-back")


def _settle_unchanged(domain, store, record, chain_before, result) -> str:
    live = norm(domain.spec().disk(record.disk).paths)
    problems = live_chain_problems(domain, record.disk, live)
    if live != norm(chain_before):
        problems.insert(0, f"{record.disk}: chain is {live}, neither before nor after the operation")
    if problems:
        raise errors.VerificationFailed("; ".join(problems), problems=problems)
    store.finish(record)
    return result


def _recover_relocate(ctx, domain, store, record, timeout_s) -> str:
    plan = relocate_plan_from(record)
    req = record.request
    pivot = req.get("pivot", True)
    snapshot_stream = plan.method == "snapshot-stream"
    if domain.is_active() and domain.block_job_info(record.disk) is not None:
        outcome = _wait_job(ctx, domain, store, record, not snapshot_stream, pivot, timeout_s)
        if outcome is Outcome.CANCELED and not pivot:
            return _settle_unchanged(domain, store, record, plan.chain_before, "finished")
    live = _live_paths(domain, record.disk)
    if live == norm(plan.chain_after):
        point_persistent_definition(domain, record.disk, plan.dest, plan.format)
        require_live_chain(domain, record.disk, plan.chain_after)
        store.finish(record)
        return "finished"
    if snapshot_stream and live == [plan.dest] + norm(plan.chain_before):
        # The snapshot happened, the pull did not: pull again.
        with ctx.state.stream_lock(domain.uuid), JobWatch(domain, record.disk) as watch:
            domain.pull(record.disk, None, 0)
            watch.wait(timeout_s=timeout_s)
        if _live_paths(domain, record.disk) != norm(plan.chain_after):
            raise errors.JobFailed(f"{record.disk}: the pull into {plan.dest} did not finish")
        return _recover_relocate(ctx, domain, store, record, timeout_s)
    if live is None:
        if _persistent_active(domain, record.disk) == plan.dest:
            store.finish(record)
            return "finished"
        remove_created_files(domain, plan, record, req.get("reuse_external", False), live_paths=set())
        store.finish(record)
        return "rolled-back"
    remove_created_files(domain, plan, record, req.get("reuse_external", False), live_paths=set(live))
    return _settle_unchanged(domain, store, record, plan.chain_before, "rolled-back")
