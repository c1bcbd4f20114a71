"""Disk-only external snapshots: the ``snapshot`` verb (the seed's
``snapshot_blkdev``) and the first step of a snapshot-stream relocation."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING
from xml.sax.saxutils import quoteattr

from . import errors
from .chain import check_reference
from .context import Context, as_failure, check_disk_supported, check_no_job, running_domain
from .identity import ImageSet, clean_path, image_key, is_block_device
from .reports import SnapshotReport
from .storage import check_place, point_persistent_definition
from .verification import norm, require_chain

if TYPE_CHECKING:
    from .virt import Domain


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


def already_done(ctx: Context, domain_name: str, target: str, overlay: str) -> SnapshotReport | None:
    """The report of a re-run that has nothing to do: OVERLAY (by identity)
    is already the disk's active image."""
    chain = ctx.conn.domain(domain_name).spec().disk(target).paths
    if chain and image_key(chain[0]) == image_key(overlay):
        return SnapshotReport(domain=domain_name, disk=target, overlay=overlay,
                              chain_before=chain, chain_after=chain)
    return None


def snapshot(ctx: Context, domain_name: str, target: str, overlay: str,
             reuse_external: bool, dry_run: bool = False) -> SnapshotReport:
    """Disk-only external snapshot of one disk: a new qcow2 overlay."""
    started = ctx.clock()
    domain = running_domain(ctx, domain_name)
    disk = domain.spec().disk(target)
    check_disk_supported(disk)
    check_no_job(domain, disk)
    check_reference(overlay, "OVERLAY")
    if not os.path.isabs(overlay):
        raise errors.BadRequest(f"OVERLAY must be an absolute path, not {overlay!r}")
    overlay = clean_path(overlay)
    check_place(ctx, overlay, reuse_external, ImageSet(disk.paths))
    if dry_run:
        return SnapshotReport(domain=domain.name, disk=target, overlay=overlay,
                              chain_before=norm(disk.paths), chain_after=[overlay] + norm(disk.paths),
                              verified=False)
    with ctx.state.disk_lock(domain.uuid, target, f"snapshot of {domain.name} {target}"):
        domain.snapshot(snapshot_xml(domain, {target: overlay}), reuse_external=reuse_external)
        expected = [overlay] + norm(disk.paths)
        try:
            point_persistent_definition(domain, target, overlay, "qcow2")
            require_chain(domain, target, expected)
        except (errors.BlockOpsError, OSError) as exc:
            raise as_failure(exc) from exc  # the snapshot exists: never exit 2
    return SnapshotReport(domain=domain.name, disk=target, overlay=overlay,
                          chain_before=norm(disk.paths), chain_after=expected,
                          duration_s=round(ctx.clock() - started, 3))
