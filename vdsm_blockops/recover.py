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
from .inspect import current_chain
from .jobs import JobWatch, Outcome
from .merge import finish_merge
from .ops import (Context, JobRunner, exclusive_pull, live_chain_problems, norm,
                  point_persistent_definition, require_live_chain)
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
        store = RecordStore(domain, ctx.state)
        for disk, record in sorted(store.load().items()):
            outcomes.append(_recover_one(ctx, domain, store, record, timeout_s))
    failed = [o for o in outcomes if o["result"] in ("failed", "busy")]
    return {"ok": not failed, "operation": "recover", "domain": domain_name or "all",
            "records": outcomes,
            **({"error": {"code": "recover-incomplete",
                          "message": f"{len(failed)} record(s) could not be settled"}}
               if failed else {})}


def recover_queued(ctx: Context, timeout_s: float | None = None) -> dict:
    """Work the queue the hook fills (reconnect/started/release events), and
    retry earlier failures. A domain that cannot be settled moves to
    ``failed/`` with the reason (beside ``queue/``, which the path unit
    watches: a bad entry must not re-trigger it forever); the timer retries
    it, and a success removes it."""
    queue = os.path.join(ctx.state.path, "queue")
    failed_dir = os.path.join(ctx.state.path, "failed")
    entries = [(folder, name) for folder in (queue, failed_dir) if os.path.isdir(folder)
               for name in sorted(os.listdir(folder))]
    outcomes, failed = [], []
    for folder, name in entries:
        try:
            report = recover(ctx, name, timeout_s)
        except errors.UnknownDomain:
            report = {"ok": True, "records": []}  # gone: nothing left to do
        except errors.BlockOpsError as exc:
            report = {"ok": False, "records": [], "error": exc.to_json()}
        outcomes += report["records"]
        if not report["ok"]:
            failed.append(name)
            reasons = [r.get("message", r["result"]) for r in report["records"]
                       if r["result"] in ("failed", "busy")] or [str(report.get("error"))]
            os.makedirs(failed_dir, exist_ok=True)
            with open(os.path.join(failed_dir, name), "w", encoding="utf-8") as handle:
                handle.write("\n".join(reasons) + "\n")
        if folder == queue or report["ok"]:
            os.unlink(os.path.join(folder, name))
    return {"ok": not failed, "operation": "recover", "domain": "queued",
            "queued": [name for _, name in entries], "records": outcomes,
            **({"error": {"code": "recover-incomplete",
                          "message": f"{len(failed)} queued domain(s) not settled: "
                                     f"{', '.join(failed)} (see {failed_dir})"}} if failed else {})}


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
    except (errors.BlockOpsError, OSError) as exc:
        log.warning("recover %s %s: %s", domain.name, record.disk, exc)
        return {**base, "result": "failed", "message": str(exc)}
    log.info("recover %s %s %s: %s", domain.name, record.disk, record.id, result)
    return {**base, "result": result}


def _wait_job(ctx: Context, domain: Domain, store: RecordStore, record: OperationRecord,
              two_phase: bool, pivot: bool, timeout_s: float | None) -> Outcome:
    """Follow a job that is still running; pivot it when wanted."""
    runner = JobRunner(ctx, domain, record.disk, store, record)
    with JobWatch(domain, record.disk, poll_interval_s=ctx.config.poll_interval_s,
                  clock=ctx.clock, sleep=ctx.sleep) as watch:
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


def _job_running(domain: Domain, target: str) -> bool:
    return domain.is_active() and domain.block_job_info(target) is not None


def _recover_merge(ctx, domain, store, record, timeout_s) -> str:
    plan = merge_plan_from(record)
    if _job_running(domain, record.disk):
        _wait_job(ctx, domain, store, record, plan.two_phase, True, timeout_s)
    # The chain decides, live or -- with the VM off -- from the images'
    # headers: a commit that completed (or an active commit that pivoted,
    # which libvirt wrote into the definition) shows the chain after; an
    # unfinished or unpivoted one the chain before, whose layers above still
    # cover whatever was copied into the base.
    chain_now = norm(current_chain(domain, record.disk))
    if chain_now == norm(plan.chain_after):
        finish_merge(ctx, domain, plan, store, record,
                     delete_retired=bool(record.request.get("delete_retired")))
        return "finished"
    return _settle_unchanged(domain, store, record, plan.chain_before, chain_now)


def _settle_unchanged(domain, store, record, chain_before, chain_now) -> str:
    problems = live_chain_problems(domain, record.disk, chain_before)
    if chain_now != norm(chain_before):
        problems.insert(0, f"{record.disk}: chain is {chain_now}, neither before nor after the operation")
    if problems:
        raise errors.VerificationFailed("; ".join(problems), problems=problems)
    store.finish(record)
    return "rolled-back"


def _recover_relocate(ctx, domain, store, record, timeout_s) -> str:
    plan = relocate_plan_from(record)
    pivot = record.request.get("pivot", True)
    snapshot_stream = plan.method == "snapshot-stream"
    if _job_running(domain, record.disk):
        outcome = _wait_job(ctx, domain, store, record, not snapshot_stream, pivot, timeout_s)
        if outcome is Outcome.CANCELED and not pivot:
            # --no-pivot: DEST is the finished copy, the VM stays on the source.
            _settle_unchanged(domain, store, record, plan.chain_before,
                              norm(current_chain(domain, record.disk)))
            return "finished"
    chain_now = norm(current_chain(domain, record.disk))
    if chain_now == norm(plan.chain_after):
        point_persistent_definition(domain, record.disk, plan.dest, plan.format)
        require_live_chain(domain, record.disk, plan.chain_after)
        store.finish(record)
        return "finished"
    if snapshot_stream and chain_now == [plan.dest] + norm(plan.chain_before):
        # The snapshot happened, the pull did not: the VM is on DEST over the
        # old chain (consistent). Pull again -- which needs the VM running.
        if not domain.is_active():
            raise errors.OperationFailed(
                f"{record.disk}: the VM is off on {plan.dest} over its old chain (consistent); "
                "start it and run recover again to finish the copy")
        with exclusive_pull(ctx, domain, record.disk, wait=True), \
                JobWatch(domain, record.disk, clock=ctx.clock, sleep=ctx.sleep) as watch:
            domain.pull(record.disk, None, 0)
            watch.wait(timeout_s=timeout_s)
        if norm(current_chain(domain, record.disk)) != norm(plan.chain_after):
            raise errors.JobFailed(f"{record.disk}: the pull into {plan.dest} did not finish")
        return _recover_relocate(ctx, domain, store, record, timeout_s)
    if chain_now == norm(plan.chain_before):
        remove_created_files(record, chain_now)
    return _settle_unchanged(domain, store, record, plan.chain_before, chain_now)
