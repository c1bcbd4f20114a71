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
from .chain import Disk, check_reference
from .identity import ImageSet, clean_path, image_key, is_block_device, under_root
from .images import (ImageInfo, content_difference, copy_image_file, create_image, create_overlay,
                     reserve_file, set_backing)
from .inspect import current_chain, image_chain
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
    check_reference(req.dest, "DEST")
    if not os.path.isabs(req.dest):
        raise errors.BadRequest(f"DEST must be an absolute path, not {req.dest!r}")


def _dest_for(disk: Disk, req: RelocateRequest) -> str:
    """DEST names the new active image; with ``all`` it is a folder."""
    if req.disk != "all":
        return clean_path(req.dest)
    if not os.path.isdir(req.dest):
        raise errors.BadRequest(f"with DISK 'all', DEST must be an existing folder: {req.dest}")
    name = os.path.basename(disk.paths[0])
    if req.format == "raw":
        name = os.path.splitext(name)[0] + ".raw"
    return os.path.join(clean_path(req.dest), name)


def _check_place(ctx: Context, path: str, reuse: bool, sources: ImageSet) -> None:
    """May ``path`` become a new image? Decided on identities: an existing
    DEST that is a source layer under another name is refused, and storage
    roots contain what resolves inside them."""
    if path in sources:
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
    if roots and not any(under_root(path, root) for root in roots):
        raise errors.BadRequest(f"destination {path} is outside the allowed storage roots ({', '.join(roots)})")


def plan_relocation(ctx: Context, domain: Domain, disk: Disk, req: RelocateRequest) -> RelocatePlan:
    check_disk_supported(disk)
    images = image_chain(disk)
    if norm(disk.paths) != [i.path for i in images]:
        raise errors.BadRequest(f"{disk.target}: libvirt's chain and the images' metadata disagree; run verify")
    dest = _dest_for(disk, req)
    sources = ImageSet(disk.paths)
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
        if any(path in sources for path in new_paths):
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
        _check_place(ctx, path, req.reuse_external, sources)
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
    dests = [image_key(p) for plan in plans for p in plan.chain_after if p not in plan.chain_before]
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
    kind, attr = ("block", "dev") if is_block_device(path) else ("file", "file")
    return (f"<disk type='{kind}'><driver type='{fmt}'/>"
            f"<source {attr}={quoteattr(path)}/></disk>")


class _Creator:
    """Makes the operation's new files: each is reserved exclusively, then
    entered in the record with its identity, then filled -- so the record
    never names a file that was there before, and a crash leaves recover
    exactly what to remove."""

    def __init__(self, store: RecordStore, record: OperationRecord) -> None:
        self.store = store
        self.record = record

    def reserve(self, path: str) -> None:
        try:
            reserve_file(path)
        except FileExistsError:
            raise errors.Conflict(f"{path} appeared while the operation was starting; "
                                  "another process creates it") from None
        self.store.add_created(self.record, path)


def _prepare_chain_copy(plan: RelocatePlan, images: dict[str, ImageInfo], reuse: bool,
                        creator: _Creator) -> None:
    """Copy the read-only layers as files (two at a time), prove each copy
    against its source, relink them, create the new active overlay."""
    if not reuse:
        for _, new in plan.copies:
            creator.reserve(new)
        creator.reserve(plan.dest)
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            copied = [(src, new, pool.submit(copy_image_file, src, new, reserved=True))
                      for src, new in plan.copies]
            # Content, not only paths: read every copy back before the VM
            # may depend on it (a reflink shares the source's extents).
            checks = [pool.submit(content_difference, src, new)
                      for src, new, reflinked in copied if not reflinked.result()]
            for check in checks:
                difference = check.result()
                if difference:
                    raise errors.OperationFailed(f"copy check failed: {difference}")
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
        name = top_new if os.path.isabs(active.backing_name or "/") else os.path.basename(top_new)
        create_overlay(plan.dest, name, images[top_src].format, active.virtual_size)
        fsync_dir(os.path.dirname(plan.dest))  # the new names survive a host crash


def _prepare_full_copy(plan: RelocatePlan, images: dict[str, ImageInfo], creator: _Creator) -> None:
    """DEST for a full mirror, made by us (and then reused by libvirt) so
    that it is reserved and recorded before anything is written into it."""
    creator.reserve(plan.dest)
    create_image(plan.dest, plan.format, images[plan.chain_before[0]].virtual_size)
    fsync_dir(os.path.dirname(plan.dest))


def _run(ctx: Context, domain: Domain, plan: RelocatePlan, req: RelocateRequest, bandwidth: int) -> dict:
    store = RecordStore(domain, ctx.state)
    with ctx.state.disk_lock(domain.uuid, plan.disk, f"relocate of {domain.name} {plan.disk}"):
        record = OperationRecord(operation="relocate", disk=plan.disk, request=asdict(req),
                                 plan=plan.to_json())
        store.begin(record)
        creator = _Creator(store, record)
        runner = JobRunner(ctx, domain, plan.disk, store, record)
        try:
            if req.method == "snapshot-stream":
                outcome = _snapshot_stream(ctx, domain, plan, req, bandwidth, runner, store, record,
                                           creator)
            else:
                images = {i.path: i for i in image_chain(domain.spec().disk(plan.disk))}
                if plan.copies:
                    _prepare_chain_copy(plan, images, req.reuse_external, creator)
                    store.advance(record, Phase.PREPARED)
                elif not req.reuse_external and plan.mode == "full":
                    _prepare_full_copy(plan, images, creator)
                    store.advance(record, Phase.PREPARED)
                flags = COPY_TRANSIENT_JOB if plan.persistent else 0
                if plan.mode in ("chain", "shallow") and len(plan.chain_before) > 1:
                    flags |= COPY_SHALLOW
                if req.reuse_external or record.created_files:
                    flags |= COPY_REUSE_EXT
                if req.sync_writes:
                    flags |= COPY_SYNCHRONOUS_WRITES
                dest_xml = _dest_disk_xml(plan.dest, plan.format)
                outcome = runner.run(lambda: domain.copy(plan.disk, dest_xml, flags, bandwidth),
                                     two_phase=True, pivot=req.pivot,
                                     timeout_s=req.timeout_s, wait=req.wait)
        except (errors.BlockOpsError, OSError) as exc:
            _roll_back(domain, plan, store, record)
            raise as_failure(exc) from exc
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


def _snapshot_stream(ctx, domain, plan, req, bandwidth, runner, store, record, creator):
    """The seed's live block copy: snapshot into DEST, then pull it all in."""
    if not req.reuse_external:
        active = domain.spec().disk(plan.disk).chain[0]
        creator.reserve(plan.dest)
        size = image_chain(domain.spec().disk(plan.disk))[0].virtual_size
        create_overlay(plan.dest, active.path, active.format or "qcow2", size)
    domain.snapshot(snapshot_xml(domain, {plan.disk: plan.dest}), reuse_external=True)
    store.advance(record, Phase.PREPARED)
    with exclusive_pull(ctx, domain, plan.disk, wait=req.wait):
        outcome = runner.run(lambda: domain.pull(plan.disk, None, bandwidth),
                             two_phase=False, pivot=False, timeout_s=req.timeout_s, wait=req.wait)
    if outcome is not None and norm(domain.spec().disk(plan.disk).paths) != [plan.dest]:
        raise errors.JobFailed(f"{plan.disk}: the pull into {plan.dest} did not finish")
    return outcome


def snapshot_xml(domain: Domain, overlays: dict[str, str]) -> str:
    """Disk-only external snapshot XML: ``overlays`` maps target -> new file
    (or device); every other disk is left out of the snapshot."""
    disks = []
    for disk in domain.spec().disks:
        if disk.target in overlays:
            path = overlays[disk.target]
            kind, attr = ("block", "dev") if is_block_device(path) else ("file", "file")
            disks.append(f"<disk name='{disk.target}' snapshot='external' type='{kind}'>"
                         f"<driver type='qcow2'/><source {attr}={quoteattr(path)}/></disk>")
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


def remove_created_files(record: OperationRecord, live_paths: list[str]) -> list[str]:
    """Remove the files this operation created, unless the VM uses them
    (snapshot-stream after the snapshot) or the path no longer names the
    file we made (then it is someone else's)."""
    live = ImageSet(live_paths)
    removed = []
    for entry in record.created_files:
        path = entry["path"]
        if path in live or not record.still_ours(entry):
            continue
        log.info("removing partial destination %s", path)
        os.unlink(path)
        removed.append(path)
    return removed


def _roll_back(domain, plan, store, record) -> None:
    """After a failure: when the VM is still on its source chain, remove
    what we created and drop the record; otherwise (e.g. a snapshot-stream
    that failed after the snapshot: the VM runs on DEST) leave it all for
    recover, which finishes the job."""
    try:
        chain_now = current_chain(domain, plan.disk)
        if norm(chain_now) != norm(plan.chain_before):
            log.warning("%s %s: the disk is on %s, not its source chain; left for recover",
                        domain.name, plan.disk, chain_now)
            return
        store.advance(record, Phase.ROLLING_BACK)
        remove_created_files(record, chain_now)
        if not live_chain_problems(domain, plan.disk, plan.chain_before):
            store.finish(record)
    except (errors.BlockOpsError, OSError) as exc:
        log.warning("cannot settle %s %s after failure: %s; left for recover",
                    domain.name, plan.disk, exc)


def snapshot(ctx: Context, domain_name: str, target: str, overlay: str, reuse_external: bool) -> dict:
    """Disk-only external snapshot of one disk (the seed's snapshot_blkdev)."""
    started = time.monotonic()
    domain = running_domain(ctx, domain_name)
    disk = domain.spec().disk(target)
    check_disk_supported(disk)
    check_no_job(domain, disk)
    check_reference(overlay, "OVERLAY")
    if not os.path.isabs(overlay):
        raise errors.BadRequest(f"OVERLAY must be an absolute path, not {overlay!r}")
    overlay = clean_path(overlay)
    _check_place(ctx, overlay, reuse_external, ImageSet(disk.paths))
    with ctx.state.disk_lock(domain.uuid, target, f"snapshot of {domain.name} {target}"):
        domain.snapshot(snapshot_xml(domain, {target: overlay}), reuse_external=reuse_external)
        expected = [overlay] + norm(disk.paths)
        point_persistent_definition(domain, target, overlay, "qcow2")
        require_live_chain(domain, target, expected)
    return {"ok": True, "operation": "snapshot", "domain": domain.name, "disk": target,
            "overlay": overlay, "chain_before": norm(disk.paths), "chain_after": expected,
            "retired": [], "verified": True, "duration_s": round(time.monotonic() - started, 3)}
