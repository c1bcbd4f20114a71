"""Read-only views of the node: each disk's whole chain and the block jobs.
(Who else uses an image: ``users.py``.)"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

from ..core import errors
from ..core.chain import Disk, Layer
from ..core.identity import clean_path, device_size, image_key, is_block_device
from ..core.lifetime import proc_start, process_alive
from ..core.reports import ChainReport, DiskView, JobRow, JobsReport, LayerView, OperationRow
from .images import ImageInfo, chain_problems, missing_images, read_chain
from .records import RecordStore

if TYPE_CHECKING:
    from ..virt import Connection, Domain
    from .state import StateDir

MIB = 1024 * 1024


def image_chain(disk: Disk) -> list[ImageInfo]:
    """The images' own chain below the disk's active image ([] if not local)."""
    active = disk.active
    if active is None or not active.is_local or not os.path.exists(active.path):
        return []
    return read_chain(active.path, active.format)


def resolved_paths(disk: Disk) -> list[str]:
    """The whole chain of ``disk``: libvirt's when it spelled it out (a
    running domain), else the images' own metadata from the active image
    down (a persistent definition names only the active image)."""
    if disk.chain_complete:
        return [p for p in disk.paths if p]
    try:
        return [i.path for i in image_chain(disk)] or disk.paths
    except errors.BlockOpsError:
        return disk.paths


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


def current_chain(domain: Domain, target: str) -> list[str]:
    """The chain ``target`` runs on now, or would start with if shut off."""
    return resolved_paths(domain.spec().disk(target))


def with_image_chain(disk: Disk, images: list[ImageInfo]) -> Disk:
    """``disk`` with its whole chain: a definition that names only the
    active image (a domain that is not running) gets the layers below from
    the images' own metadata -- without libvirt's indexes."""
    if disk.chain_complete or len(images) <= len(disk.chain):
        return disk
    below = tuple(Layer(path=i.path, format=i.format,
                        source_type="block" if is_block_device(i.path) else "file")
                  for i in images[len(disk.chain):])
    return replace(disk, chain=disk.chain + below)


def planned_disk(disk: Disk) -> tuple[Disk, list[ImageInfo]]:
    """``disk`` with its whole chain, and the images' own view of it, for
    planning an operation: refused (nothing changed) when libvirt and the
    images disagree."""
    images = image_chain(disk)
    disk = with_image_chain(disk, images)
    if [clean_path(p) for p in disk.paths] != [i.path for i in images]:
        raise errors.BadRequest(
            f"{disk.target}: libvirt's chain {disk.paths} does not match the images' "
            f"metadata {[i.path for i in images]}; run 'vdsm-blockops verify'")
    return disk, images


def volume_view(image: ImageInfo) -> dict[str, int]:
    """A block-device layer's room: a qcow2 ends where its used space
    does (``qemu-img check``; read while QEMU may write: a moment's view)."""
    from .volumes import qcow2_end

    size = device_size(image.path)
    end = qcow2_end(image.path) if image.format == "qcow2" else min(size, image.virtual_size)
    return {"size": size, "end": end, "free": max(size - end, 0)}


def describe_disk(disk: Disk, running_checkpoints: dict[str, bool] | None = None) -> DiskView:
    """``running_checkpoints``: the disk's libvirt checkpoints while the VM
    runs -- QEMU holds their bitmaps in the active layer in memory and
    stores them in the file only when it closes it (seen here: a new
    checkpoint's bitmap is missing from the file until the VM stops); the
    active layer shows those libvirt finds usable there."""
    images = image_chain(disk)
    by_path = {i.path: i for i in images}
    problems = missing_images(disk) or (chain_problems(disk, images) if images else [])
    layers = []
    for pos, layer in enumerate(with_image_chain(disk, images).chain):
        info = by_path.get(clean_path(layer.path)) if layer.path else None
        bitmaps = [b._asdict() | {"flags": list(b.flags)} for b in info.bitmaps] if info else []
        if pos == 0 and running_checkpoints is not None:
            recorded = {b["name"]: b["granularity"] for b in bitmaps}
            bitmaps = [{"name": name, "granularity": recorded.get(name), "flags": ["auto"]}
                       for name, usable in running_checkpoints.items() if usable]
        layers.append(LayerView(
            path=layer.path, format=layer.format, type=layer.source_type, index=layer.index,
            allocation=info.actual_size if info else None,
            virtual_size=info.virtual_size if info else None,
            backing_in_metadata=info.backing_path if info else None, bitmaps=bitmaps,
            volume=volume_view(info) if info and is_block_device(info.path) else None))
    mirror = None
    if disk.mirror is not None:
        mirror = {"job": disk.mirror.job, "path": disk.mirror.path,
                  "format": disk.mirror.format, "ready": disk.mirror.is_ready}
    return DiskView(
        disk=disk.target, device=disk.device, chain=layers,
        # libvirt spells out a running domain's chain; otherwise it comes
        # from the images' headers and libvirt's vda[N] indexes do not exist.
        chain_from="libvirt" if disk.chain_complete else "image metadata",
        mirror=mirror, metadata_agrees=not problems, problems=problems)


def describe_chains(domain: Domain, target: str | None = None) -> ChainReport:
    spec = domain.spec()
    disks = spec.disks if target in (None, "all") else (spec.disk(target or ""),)
    checkpoints = domain.checkpoints() if domain.is_active() else None
    return ChainReport(domain=spec.name, uuid=spec.uuid, active=checkpoints is not None,
                       disks=[describe_disk(d, checkpoints.get(d.target, {})
                                            if checkpoints is not None else None)
                              for d in disks])


def list_jobs(conn: Connection, domain_name: str | None = None,
              state: StateDir | None = None) -> JobsReport:
    """Block jobs and migrations running, and the tool's operations under
    way (with ``state``: the moves to other nodes too)."""
    # every domain: a shut-off one may have an operation of ours under way
    try:
        domains = [conn.domain(domain_name)] if domain_name else conn.domains()
    except errors.UnknownDomain:
        if state is None or not moves_in(state, domain_name):
            raise
        domains = []  # it left this node: its move's record is still here
    rows = []
    for domain in domains:
        if not domain.is_active():
            continue
        progress = domain.migration_progress()
        if progress is not None:
            done, total = progress
            rows.append(JobRow(domain=domain.name, disk="all", type="migration", cur=done,
                               end=total, percent=round(100.0 * done / total, 1) if total else None,
                               bandwidth_mib_s=0.0, ready=False, mirror=None))
        spec = domain.spec()
        for disk in spec.disks:
            if not disk.chain:
                continue
            try:
                info = domain.block_job_info(disk.target)
            except errors.OperationFailed:
                continue  # e.g. a cdrom without medium
            if info is None:
                continue
            rows.append(JobRow(
                domain=spec.name, disk=disk.target, type=info.job_type, cur=info.cur,
                end=info.end, percent=info.percent,
                bandwidth_mib_s=round(info.bandwidth_bytes_s / MIB, 3),
                ready=bool(disk.mirror and disk.mirror.is_ready),
                mirror=disk.mirror.path if disk.mirror else None))
    moves = [] if state is None else moves_in(state, domain_name)
    return JobsReport(jobs=rows, operations=operations_on(domains) + moves)


def moves_in(state: StateDir, domain_name: str | None) -> list[OperationRow]:
    """The moves to other nodes under way (their records on this node)."""
    from .migrations import MigrationStore

    return [OperationRow(domain=r.domain, disk="all", operation="migrate",
                         method=f"to {r.dest_uri}",
                         phase="unreadable" if r.unreadable else r.phase.value, online=True,
                         record=r.id, pid=r.pid,
                         running=owner_alive(r.pid, r.started_at, r.owner),
                         started_at=r.started_at)
            for r in MigrationStore(state).all(domain_name)]


def operations_on(domains: list[Domain]) -> list[OperationRow]:
    """The tool's own operations in progress, from the domains' records."""
    rows = []
    for domain in domains:
        for target, record in sorted(RecordStore(domain).load().items()):
            plan = record.plan
            rows.append(OperationRow(
                domain=domain.name, disk=target, operation=record.operation,
                method=str(plan.get("method") or plan.get("strategy") or ""),
                phase="?" if record.unreadable else record.phase.value, online=record.online,
                record=record.id, pid=record.pid,
                running=owner_alive(record.pid, record.started_at, record.owner),
                started_at=record.started_at, detached=record.request.get("wait") is False))
    return rows


def owner_alive(pid: int, since: float, owner: str = "") -> bool:
    """Whether the process that wrote a record (at ``since``) still runs.

    Decided by ``owner``, the record's process identity (boot, pid and the
    kernel's start time of that pid: ``lifetime.process_identity``) --
    never by the command line, which an Ansible module run with pipelining
    (``/usr/bin/python3``) does not share, and never by the wall clock,
    which may step. A record of an earlier version has no identity: then
    the pid must have started (by the boot time) before the record."""
    alive = process_alive(owner)
    if alive is not None:
        return alive
    now = proc_start(pid) if pid > 0 else None
    if now is None:
        return False
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime "))
    except (OSError, IndexError, StopIteration, ValueError):
        return False
    state, ticks = now
    return state != "Z" and boot + ticks / os.sysconf("SC_CLK_TCK") <= since + 2
