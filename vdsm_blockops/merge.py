"""Snapshot live merge: collapse a segment of a chain while the VM runs.

Validation and planning happen for every selected disk before anything
changes; then each disk's job runs (concurrently for ``all``), is waited on
through events, and its result verified against the live XML, the images'
metadata and the persistent definition.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace

from . import errors
from .chain import Disk
from .identity import ImageSet, image_key
from .inspect import chain_users, current_chain, image_chain
from .jobs import Outcome
from .ops import (
    Context,
    JobRunner,
    as_failure,
    check_bandwidth,
    check_disk_supported,
    check_no_job,
    check_timeout,
    combine_reports,
    delete_unused,
    exclusive_pull,
    live_chain_problems,
    norm,
    require_live_chain,
    run_per_disk,
    running_domain,
)
from .planner import MergePlan, plan_merge
from .records import OperationRecord, Phase, RecordStore
from .virt import Domain

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


def uses_relative_names(images) -> bool:
    """Whether any layer names its backing file relatively (oVirt's ``V1``,
    ``../<template-img>/<vol>``): then merges keep names relative."""
    return any(i.backing_name and not i.backing_name.startswith("/") for i in images)


def _plan_disk(ctx: Context, domain: Domain, disk: Disk, req: MergeRequest) -> MergePlan:
    check_disk_supported(disk)
    # "" is a malformed reference, not "not given": position() refuses it.
    top_pos = disk.position(req.top) if req.top is not None else 0
    base_pos = disk.position(req.base) if req.base is not None else None
    images = image_chain(disk)
    if norm(disk.paths) != [i.path for i in images]:
        raise errors.BadRequest(
            f"{disk.target}: libvirt's chain {disk.paths} does not match the "
            f"images' metadata {[i.path for i in images]}; run 'vdsm-blockops verify'"
        )
    allocation = {i.path: i.actual_size for i in images}
    end = len(disk.chain) if base_pos is None else base_pos
    lowest = disk.paths[end - 1]
    # Who else uses the commit target only matters when a commit may run;
    # users are found by identity, whatever name their chains use.
    may_commit = end - top_pos > 1 and req.strategy != "pull"
    users = chain_users(ctx.conn, [lowest], exclude=(domain.uuid, disk.target)) if may_commit else {}
    plan = plan_merge(disk, top_pos=top_pos, base_pos=base_pos, strategy=req.strategy,
                      allocation=allocation, users=users)
    relative = uses_relative_names(images) if req.keep_relative is None else req.keep_relative
    return replace(plan, keep_relative=relative)


def merge(ctx: Context, req: MergeRequest) -> dict:
    """Run (or with ``dry_run`` only plan) a merge; returns the report."""
    started = time.monotonic()
    bandwidth = check_bandwidth(req.bandwidth_mib_s)
    check_timeout(req.timeout_s)
    domain = running_domain(ctx, req.domain)
    spec = domain.spec()
    disks = spec.select(req.disk)
    if req.disk == "all" and (req.base is not None or req.top is not None):
        raise errors.BadRequest("--base and --top name images of one chain; they cannot go with 'all'")
    if not disks:
        raise errors.BadRequest(f"domain {domain.name} has no disk with an image chain")
    for disk in disks:
        check_no_job(domain, disk)
    plans = [_plan_disk(ctx, domain, disk, req) for disk in disks]
    if not req.wait and sum(p.strategy == "pull" for p in plans) > 1:
        raise errors.BadRequest(
            "pulls within one VM run one at a time (QEMU 7.2 can crash when two end "
            "together), which --no-wait cannot do; run without --no-wait or choose "
            "--strategy commit")

    def work(plan: MergePlan) -> dict:
        return _run_plan(ctx, domain, plan, req, bandwidth)

    if req.dry_run:
        results = [_report(domain, plan, None, verified=False, dry_run=True) for plan in plans]
    else:
        results = run_per_disk(plans, work)
    return combine_reports("merge", domain, req.disk, results, time.monotonic() - started)


def _report(domain: Domain, plan: MergePlan, chain_after: list[str] | None, *,
            verified: bool, dry_run: bool = False) -> dict:
    return {
        "ok": True,
        "operation": "merge",
        "domain": domain.name,
        "disk": plan.disk,
        "strategy": plan.strategy,
        "dry_run": dry_run,
        "changed": not dry_run and plan.strategy != "noop",
        "finished": verified or plan.strategy == "noop",
        "base": plan.base,
        "top": plan.top,
        "result_image": plan.result,
        "chain_before": plan.chain_before,
        "chain_after": chain_after if chain_after is not None else plan.chain_after,
        "retired": [asdict(r) for r in plan.retired],
        "bytes_to_copy": plan.bytes_to_copy,
        "alternatives": plan.alternatives,
        "libvirt_call": plan.libvirt_call,
        "keep_relative": plan.keep_relative,
        "verified": verified,
    }


def libvirt_ref(domain: Domain, target: str, path: str | None) -> str | None:
    """The live index notation (``vda[3]``) of ``path``'s image, so libvirt
    is never left to match a name it may spell differently (``..``,
    symlinked folders); the path itself where no index is known."""
    if path is None:
        return None
    key = image_key(path)
    for layer in domain.spec().disk(target).chain:
        if layer.index is not None and image_key(layer.path) == key:
            return f"{target}[{layer.index}]"
    return path


def _run_plan(ctx: Context, domain: Domain, plan: MergePlan, req: MergeRequest, bandwidth: int) -> dict:
    if plan.strategy == "noop":
        return _report(domain, plan, plan.chain_before, verified=True)
    with ctx.state.disk_lock(domain.uuid, plan.disk, f"merge of {domain.name} {plan.disk}"):
        store = RecordStore(domain, ctx.state)
        record = OperationRecord(operation="merge", disk=plan.disk, request=asdict(req),
                                 plan=plan.to_json())
        store.begin(record)
        runner = JobRunner(ctx, domain, plan.disk, store, record)

        def start() -> None:
            if plan.strategy == "pull":
                domain.pull(plan.disk, libvirt_ref(domain, plan.disk, plan.base), bandwidth,
                            relative=plan.keep_relative)
            else:
                domain.commit(plan.disk, libvirt_ref(domain, plan.disk, plan.result),
                              libvirt_ref(domain, plan.disk, plan.top), active=plan.active,
                              bandwidth_mib_s=bandwidth,
                              relative=plan.keep_relative and not plan.active)

        try:
            if plan.strategy == "pull":
                # Waiting pulls hold the lock for their whole job; --no-wait
                # ones only while starting (and are refused if a pull runs).
                with exclusive_pull(ctx, domain, plan.disk, wait=req.wait):
                    outcome = runner.run(start, two_phase=False, pivot=True,
                                         timeout_s=req.timeout_s, wait=req.wait)
            else:
                outcome = runner.run(start, two_phase=plan.two_phase, pivot=True,
                                     timeout_s=req.timeout_s, wait=req.wait)
            if outcome is None:  # --no-wait: jobs/recover follow up
                report = _report(domain, plan, None, verified=False)
                report.update(finished=False, record=record.id)
                return report
            if outcome is Outcome.VANISHED:
                log.info("%s %s: job gone without an event; the XML decides", domain.name, plan.disk)
            store.advance(record, Phase.COMPLETED)
            return finish_merge(ctx, domain, plan, store, record, delete_retired=req.delete_retired)
        except errors.VerificationFailed:
            raise  # the chain moved but does not check out: the record stays for recover
        except (errors.BlockOpsError, OSError) as exc:
            _settle_after_failure(domain, plan, store, record)
            raise as_failure(exc) from exc


def finish_merge(ctx: Context, domain: Domain, plan: MergePlan, store: RecordStore,
                 record: OperationRecord, *, delete_retired: bool) -> dict:
    """After the job ended (or, for recover, the VM stopped after it): check,
    register invalidated layers, clean up."""
    chain_now = current_chain(domain, plan.disk)
    if norm(chain_now) == norm(plan.chain_before):
        raise errors.JobFailed(
            f"the block job on {domain.name} {plan.disk} is gone but the chain is unchanged"
        )
    invalid = [r.path for r in plan.retired if not r.valid]
    left_chain = ImageSet(chain_now)
    # Committed-out layers are invalid from the moment they leave the chain,
    # whatever verification says next.
    ctx.state.invalidate([p for p in invalid if p not in left_chain],
                         domain=domain.name, disk=plan.disk, operation=f"merge {record.id}")
    require_live_chain(domain, plan.disk, plan.chain_after)
    report = _report(domain, plan, chain_now, verified=True)
    if delete_retired:
        report["deleted"] = delete_unused(ctx, domain, plan.disk, [r.path for r in plan.retired])
    store.finish(record)
    return report


def _settle_after_failure(domain: Domain, plan: MergePlan, store: RecordStore,
                          record: OperationRecord) -> None:
    """After a failed/aborted job: if the chain is verifiably the old one,
    the record can go; otherwise leave it for ``recover``."""
    try:
        problems = live_chain_problems(domain, plan.disk, plan.chain_before)
    except errors.BlockOpsError as exc:
        log.warning("cannot check %s %s after failure: %s", domain.name, plan.disk, exc)
        return
    if not problems:
        store.finish(record)
    else:
        log.warning("%s %s left for recover: %s", domain.name, plan.disk, "; ".join(problems))
