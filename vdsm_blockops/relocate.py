"""Live disk relocation: move a disk's data elsewhere while the VM runs.

Modes:
* ``chain``   every layer moves into DEST's folder and the chain keeps its
  shape. The read-only layers are immutable while the VM runs, so they are
  copied as files (fast) and their backing links rewritten; the active
  layer is mirrored by a shallow blockCopy onto a pre-created overlay
  (SHALLOW + REUSE_EXT), then pivoted.
* ``full``    DEST is one standalone image with all the data (blockCopy, or
  with ``--method snapshot-stream`` a disk-only snapshot into DEST and a
  pull of the whole chain into it -- the seed's "live block copy").
* ``shallow`` only the active layer moves; DEST backs onto the old chain.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from xml.sax.saxutils import quoteattr

from . import errors
from .chain import Disk
from .images import ImageInfo, copy_image_file, create_overlay, set_backing
from .inspect import image_chain
from .jobs import Outcome
from .ops import (
    Context,
    JobRunner,
    check_bandwidth,
    check_disk_supported,
    check_no_job,
    check_timeout,
    combine_reports,
    delete_unused,
    live_chain_problems,
    norm,
    point_persistent_definition,
    require_live_chain,
    run_per_disk,
    running_domain,
)
from .records import OperationRecord, Phase, RecordStore
from .state import fsync_dir
from .virt import COPY_REUSE_EXT, COPY_SHALLOW, COPY_SYNCHRONOUS_WRITES, COPY_TRANSIENT_JOB, Domain

log = logging.getLogger(__name__)

MODES = ("chain", "full", "shallow")
METHODS = ("mirror", "snapshot-stream")
FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class RelocateRequest:
    domain: str
    disk: str
    dest: str
    mode: str = "chain"
    method: str = "mirror"
    format: str = "qcow2"
    reuse_external: bool = False
    sync_writes: bool = False
    pivot: bool = True
    delete_source: bool = False
    bandwidth_mib_s: int = 0
    timeout_s: float | None = None
    wait: bool = True
    dry_run: bool = False


@dataclass
class RelocatePlan:
    disk: str
    mode: str
    method: str
    format: str
    dest: str
    chain_before: list[str]
    chain_after: list[str]  # when pivoted
    copies: list[tuple[str, str]] = field(default_factory=list)  # (source layer, new path)
    bytes_to_copy: int = 0
    persistent: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def _check_request(req: RelocateRequest) -> None:
    for value, allowed, what in ((req.mode, MODES, "mode"), (req.method, METHODS, "method"),
                                 (req.format, FORMATS, "format")):
        if value not in allowed:
            raise errors.BadRequest(f"unknown {what} {value!r} (choose from {', '.join(allowed)})")
    if req.format == "raw" and req.mode != "full":
        raise errors.BadRequest(f"a raw destination holds no backing chain: use --mode full, not {req.mode}")
    if req.method == "snapshot-stream":
        if req.mode != "full":
            raise errors.BadRequest("--method snapshot-stream only makes a full copy: use --mode full")
        if req.format != "qcow2":
            raise errors.BadRequest("--method snapshot-stream needs a qcow2 destination (it is a snapshot overlay)")
        if not req.pivot:
            raise errors.BadRequest("--method snapshot-stream moves the VM at once; --no-pivot needs --method mirror")
    if not os.path.isabs(req.dest):
        raise errors.BadRequest(f"DEST must be an absolute path, not {req.dest!r}")


def _dest_for(disk: Disk, req: RelocateRequest) -> str:
    """DEST names the new active image; with ``all`` it is a folder."""
    if req.disk != "all":
        return os.path.normpath(req.dest)
    if not os.path.isdir(req.dest):
        raise errors.BadRequest(f"with DISK 'all', DEST must be an existing folder: {req.dest}")
    name = os.path.basename(disk.paths[0])
    if req.format == "raw":
        name = os.path.splitext(name)[0] + ".raw"
    return os.path.join(os.path.normpath(req.dest), name)


def _check_place(ctx: Context, path: str, disk: Disk, reuse: bool, all_sources: set[str]) -> None:
    if path in all_sources:
        raise errors.BadRequest(f"destination {path} is an image of the source chain")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise errors.BadRequest(f"destination folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise errors.BadRequest(f"destination folder {folder} is not writable")
    exists = os.path.lexists(path)
    if exists and not reuse:
        raise errors.BadRequest(f"destination {path} exists (pass --reuse-external to use it)")
    if reuse and not exists:
        raise errors.BadRequest(f"--reuse-external, but {path} does not exist")
    roots = ctx.config.storage_roots
    if roots and not any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots):
        raise errors.BadRequest(f"destination {path} is outside the allowed storage roots ({', '.join(roots)})")


def plan_relocation(ctx: Context, domain: Domain, disk: Disk, req: RelocateRequest) -> RelocatePlan:
    check_disk_supported(disk)
    images = image_chain(disk)
    if norm(disk.paths) != [i.path for i in images]:
        raise errors.BadRequest(f"{disk.target}: libvirt's chain and the images' metadata disagree; run verify")
    dest = _dest_for(disk, req)
    sources = set(norm(disk.paths))
    if dest in sources:
        raise errors.BadRequest(f"destination {dest} is an image of the source chain")
    chain = norm(disk.paths)
    alloc = {i.path: i.actual_size for i in images}
    plan = RelocatePlan(disk=disk.target, mode=req.mode, method=req.method, format=req.format,
                        dest=dest, chain_before=chain, chain_after=[dest],
                        persistent=domain.is_persistent())
    if req.mode == "chain" and len(chain) > 1:
        folder = os.path.dirname(dest)
        plan.copies = [(src, os.path.join(folder, os.path.basename(src))) for src in chain[1:]]
        new_paths = [dest] + [new for _, new in plan.copies]
        if sources.intersection(new_paths):
            raise errors.BadRequest(
                f"{disk.target}: chain mode moves every layer into {folder}, where "
                "layers of the source chain already are; choose another folder")
        if len(set(new_paths)) != len(new_paths):
            raise errors.BadRequest(f"{disk.target}: layers share a file name; chain mode "
                                    "would put two of them at one path")
        plan.chain_after = new_paths
        plan.bytes_to_copy = sum(alloc.values())
    elif req.mode == "shallow":
        plan.chain_after = [dest] + chain[1:]
        plan.bytes_to_copy = alloc[chain[0]]
    else:
        plan.bytes_to_copy = sum(alloc.values())
    for path in plan.chain_after:
        if path in chain[1:] and req.mode == "shallow":
            continue
        _check_place(ctx, path, disk, req.reuse_external, sources)
    free = shutil.disk_usage(os.path.dirname(dest)).free
    if plan.bytes_to_copy > free:
        raise errors.BadRequest(
            f"not enough space at {os.path.dirname(dest)}: {plan.bytes_to_copy} bytes "
            f"to copy, {free} free")
    return plan


def relocate(ctx: Context, req: RelocateRequest) -> dict:
    started = time.monotonic()
    _check_request(req)
    bandwidth = check_bandwidth(req.bandwidth_mib_s)
    check_timeout(req.timeout_s)
    domain = running_domain(ctx, req.domain)
    disks = domain.spec().select(req.disk)
    if not disks:
        raise errors.BadRequest(f"domain {domain.name} has no disk with an image chain")
    for disk in disks:
        check_no_job(domain, disk)
    plans = [plan_relocation(ctx, domain, disk, req) for disk in disks]
    dests = [p for plan in plans for p in plan.chain_after if p not in plan.chain_before]
    if len(set(dests)) != len(dests):
        raise errors.BadRequest("two disks would be relocated onto the same file")
    if req.dry_run:
        results = [_report(domain, plan, req, plan.chain_before, verified=False) for plan in plans]
    else:
        results = run_per_disk(plans, lambda plan: _run(ctx, domain, plan, req, bandwidth))
    return combine_reports("relocate", domain, req.disk, results, time.monotonic() - started)


def _report(domain: Domain, plan: RelocatePlan, req: RelocateRequest, chain_now: list[str], *,
            verified: bool) -> dict:
    return {
        "ok": True, "operation": "relocate", "domain": domain.name, "disk": plan.disk,
        "mode": plan.mode, "method": plan.method, "format": plan.format, "dest": plan.dest,
        "dry_run": req.dry_run, "changed": not req.dry_run, "pivot": req.pivot,
        "chain_before": plan.chain_before,
        "chain_after": chain_now if not req.dry_run else (plan.chain_after if req.pivot else plan.chain_before),
        "copy_chain": plan.chain_after,
        "bytes_to_copy": plan.bytes_to_copy, "retired": [], "verified": verified,
        "finished": verified,
    }


def _dest_disk_xml(path: str, fmt: str) -> str:
    kind, attr = ("block", "dev") if path.startswith("/dev/") else ("file", "file")
    return (f"<disk type='{kind}'><driver type='{fmt}'/>"
            f"<source {attr}={quoteattr(path)}/></disk>")


def _prepare_chain_copy(plan: RelocatePlan, images: dict[str, ImageInfo], reuse: bool) -> None:
    """Copy the read-only layers as files (two at a time), relink them,
    create the new active overlay."""
    if not reuse:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            for future in [pool.submit(copy_image_file, src, new) for src, new in plan.copies]:
                future.result()
        # Relink each copy to the copy of its backing; keep relative names
        # relative (the layers sit side by side in DEST's folder).
        new_of = dict(plan.copies)
        for src, new in plan.copies:
            info = images[src]
            if info.backing_path is None:
                continue
            new_backing = new_of[info.backing_path]
            name = new_backing if os.path.isabs(info.backing_name or "/") else os.path.basename(new_backing)
            set_backing(new, name, info.backing_format or images[info.backing_path].format)
        top_src, top_new = plan.copies[0]
        active = images[plan.chain_before[0]]
        create_overlay(plan.dest, top_new, images[top_src].format, active.virtual_size)
        fsync_dir(os.path.dirname(plan.dest))  # the new names survive a host crash


def _run(ctx: Context, domain: Domain, plan: RelocatePlan, req: RelocateRequest, bandwidth: int) -> dict:
    store = RecordStore(domain)
    with ctx.state.disk_lock(domain.uuid, plan.disk, f"relocate of {domain.name} {plan.disk}"):
        # Every file we may create is named in the record before it exists,
        # so a crash at any point leaves recover a list of what to remove.
        ours = [] if req.reuse_external else [new for _, new in plan.copies] + [plan.dest]
        record = OperationRecord(operation="relocate", disk=plan.disk, request=asdict(req),
                                 plan=plan.to_json(), created_files=ours)
        store.begin(record)
        runner = JobRunner(ctx, domain, plan.disk, store, record)
        try:
            if req.method == "snapshot-stream":
                outcome = _snapshot_stream(ctx, domain, plan, req, bandwidth, runner, store, record)
            else:
                if plan.copies:
                    images = {i.path: i for i in image_chain(domain.spec().disk(plan.disk))}
                    _prepare_chain_copy(plan, images, req.reuse_external)
                    store.advance(record, Phase.PREPARED)
                flags = COPY_TRANSIENT_JOB if plan.persistent else 0
                if plan.mode in ("chain", "shallow") and len(plan.chain_before) > 1:
                    flags |= COPY_SHALLOW
                if req.reuse_external or plan.copies:
                    flags |= COPY_REUSE_EXT
                if req.sync_writes:
                    flags |= COPY_SYNCHRONOUS_WRITES
                dest_xml = _dest_disk_xml(plan.dest, plan.format)
                outcome = runner.run(lambda: domain.copy(plan.disk, dest_xml, flags, bandwidth),
                                     two_phase=True, pivot=req.pivot,
                                     timeout_s=req.timeout_s, wait=req.wait)
        except errors.BlockOpsError:
            _roll_back(domain, plan, store, record, req)
            raise
        if outcome is None:
            report = _report(domain, plan, req, plan.chain_before, verified=False)
            report["record"] = record.id
            return report
        if outcome is Outcome.CANCELED:  # --no-pivot: DEST is a consistent copy
            return _finish_no_pivot(domain, plan, req, store, record)
        store.advance(record, Phase.COMPLETED)
        fixed = point_persistent_definition(domain, plan.disk, plan.dest, plan.format)
        require_live_chain(domain, plan.disk, plan.chain_after)
        report = _report(domain, plan, req, domain.spec().disk(plan.disk).paths, verified=True)
        report["persistent_definition_fixed"] = fixed
        report["retired"] = [{"path": p, "valid": True}
                             for p in plan.chain_before if p not in plan.chain_after]
        if req.delete_source:
            report["deleted"] = delete_unused(ctx, domain, plan.disk, [r["path"] for r in report["retired"]])
        store.finish(record)
        return report


def _snapshot_stream(ctx, domain, plan, req, bandwidth, runner, store, record):
    """The seed's live block copy: snapshot into DEST, then pull it all in."""
    domain.snapshot(snapshot_xml(domain, {plan.disk: plan.dest}), reuse_external=req.reuse_external)
    store.advance(record, Phase.PREPARED)
    with ctx.state.stream_lock(domain.uuid):
        outcome = runner.run(lambda: domain.pull(plan.disk, None, bandwidth),
                             two_phase=False, pivot=False, timeout_s=req.timeout_s, wait=req.wait)
    if outcome is not None and norm(domain.spec().disk(plan.disk).paths) != [plan.dest]:
        raise errors.JobFailed(f"{plan.disk}: the pull into {plan.dest} did not finish")
    return outcome


def snapshot_xml(domain: Domain, overlays: dict[str, str]) -> str:
    """Disk-only external snapshot XML: ``overlays`` maps target -> new file;
    every other disk is left out of the snapshot."""
    disks = []
    for disk in domain.spec().disks:
        if disk.target in overlays:
            disks.append(f"<disk name='{disk.target}' snapshot='external' type='file'>"
                         f"<driver type='qcow2'/><source file={quoteattr(overlays[disk.target])}/></disk>")
        else:
            disks.append(f"<disk name='{disk.target}' snapshot='no'/>")
    name = f"vdsm-blockops-{int(time.time() * 1000)}"
    return (f"<domainsnapshot><name>{name}</name><memory snapshot='no'/>"
            f"<disks>{''.join(disks)}</disks></domainsnapshot>")


def _finish_no_pivot(domain, plan, req, store, record) -> dict:
    require_live_chain(domain, plan.disk, plan.chain_before)
    store.finish(record)
    report = _report(domain, plan, req, plan.chain_before, verified=True)
    return report


def remove_created_files(domain: Domain, plan: RelocatePlan, record: OperationRecord,
                         reuse_external: bool, live_paths: set[str]) -> list[str]:
    """Remove the destination files this operation created, unless the VM
    uses them (snapshot-stream after the snapshot) or the caller made them."""
    if reuse_external:
        return []
    removed = []
    for path in record.created_files:
        if path in live_paths or not os.path.exists(path):
            continue
        log.info("removing partial destination %s", path)
        os.unlink(path)
        removed.append(path)
    return removed


def _roll_back(domain, plan, store, record, req) -> None:
    """After a failure the VM stays on its source chain: remove what we
    created; if the chain is consistent again the record can go, otherwise
    recover takes over."""
    try:
        store.advance(record, Phase.ROLLING_BACK)
        live = set(norm(domain.spec().disk(plan.disk).paths))
        remove_created_files(domain, plan, record, req.reuse_external, live)
        if not live_chain_problems(domain, plan.disk, domain.spec().disk(plan.disk).paths):
            store.finish(record)
    except errors.BlockOpsError as exc:
        log.warning("cannot settle %s %s after failure: %s; left for recover",
                    domain.name, plan.disk, exc)


def snapshot(ctx: Context, domain_name: str, target: str, overlay: str, reuse_external: bool) -> dict:
    """Disk-only external snapshot of one disk (the seed's snapshot_blkdev)."""
    started = time.monotonic()
    domain = running_domain(ctx, domain_name)
    disk = domain.spec().disk(target)
    check_disk_supported(disk)
    check_no_job(domain, disk)
    if not os.path.isabs(overlay):
        raise errors.BadRequest(f"OVERLAY must be an absolute path, not {overlay!r}")
    overlay = os.path.normpath(overlay)
    _check_place(ctx, overlay, disk, reuse_external, set(norm(disk.paths)))
    with ctx.state.disk_lock(domain.uuid, target, f"snapshot of {domain.name} {target}"):
        domain.snapshot(snapshot_xml(domain, {target: overlay}), reuse_external=reuse_external)
        expected = [overlay] + norm(disk.paths)
        point_persistent_definition(domain, target, overlay, "qcow2")
        require_live_chain(domain, target, expected)
    return {"ok": True, "operation": "snapshot", "domain": domain.name, "disk": target,
            "overlay": overlay, "chain_before": norm(disk.paths), "chain_after": expected,
            "retired": [], "verified": True, "duration_s": round(time.monotonic() - started, 3)}
