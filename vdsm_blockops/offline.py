"""The operations on a shut-off domain: qemu-img and file copies where a
running VM would have a block job, then the persistent definition pointed
at the result -- only once it is complete, flushed and proven.

Every step leaves a chain a VM could start on: a commit keeps its top
layer's data (``-d``) until the layer above is relinked; a safe rebase
changes TOP's backing last; copies go to new files the definition names
only at the end. The operation is recorded in the domain's persistent
metadata first, and the hook refuses to start the domain until the record
is gone.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import qemuimg
from .copying import copy_proven
from .images import (
    ImageInfo,
    backing_name_for,
    create_image,
    create_overlay,
    merge_bitmap,
    set_backing,
)
from .model import Mode, Strategy
from .state import fsync_dir
from .storage import FileCreator, point_persistent_definition

if TYPE_CHECKING:
    from .context import Context
    from .planner import MergePlan
    from .relocate import RelocatePlan
    from .virt import Domain


def _progress(ctx: Context, disk: str, job: str) -> qemuimg.Progress | None:
    return qemuimg.Progress(disk, job, ctx.observer) if ctx.observer is not None else None


def merge(ctx: Context, domain: Domain, plan: MergePlan, images: dict[str, ImageInfo],
          rate_mib_s: int = 0) -> None:
    """qemu-img commit (then relink the layer above, or point the definition
    at the result of an active commit) or a safe qemu-img rebase."""
    top = images[plan.top]
    if plan.strategy is Strategy.PULL:
        base = images[plan.base] if plan.base else None
        name = None
        if base is not None:
            name = backing_name_for(top, base.path, top.path) if plan.keep_relative else base.path
        qemuimg.rebase(top.path, top.format, name, base.format if base else None,
                       _progress(ctx, plan.disk, "pull"))
        return
    result = images[plan.result]
    qemuimg.commit(top.path, top.format, result.path,
                   _progress(ctx, plan.disk, "active-commit" if plan.active else "commit"),
                   rate_mib_s=rate_mib_s)
    if plan.active:
        point_persistent_definition(domain, plan.disk, result.path, result.format)
    else:
        above = images[plan.chain_before[plan.chain_before.index(plan.top) - 1]]
        set_backing(above.path, backing_name_for(above, result.path, above.path) if plan.keep_relative
                    else result.path, result.format)


def relocate(ctx: Context, domain: Domain, plan: RelocatePlan, images: dict[str, ImageInfo],
             creator: FileCreator, reuse_external: bool, rate_mib_s: int = 0) -> None:
    """Copy (chain, shallow: the files, proven byte for byte; full: qemu-img
    convert, flushed), relink, then point the persistent definition at DEST."""
    active = images[plan.chain_before[0]]
    if plan.mode is Mode.FULL:
        if not reuse_external:
            creator.reserve(plan.dest)
            create_image(plan.dest, plan.format.value, active.virtual_size)
        # qemu-img copies here, as QEMU does in a block job: its result is
        # flushed, then verified like a job's (chain and headers).
        carry = plan.format.value == "qcow2" and active.format == "qcow2"
        qemuimg.convert(active.path, active.format, plan.dest, plan.format.value,
                        _progress(ctx, plan.disk, "copy"), rate_mib_s=rate_mib_s,
                        dest_is_new=not reuse_external, bitmaps=carry)
        if carry:
            _merge_lower_bitmaps(plan, images, active)
        qemuimg.fsync(plan.dest)
    else:
        # Every layer is read-only while the VM is off: copy them all as
        # files (chain) or only the active one (shallow), then relink.
        copies = [(active.path, plan.dest)] + (plan.copies if plan.mode is Mode.CHAIN else [])
        if not reuse_external:
            copy_proven(copies, creator)
        new_of = dict(copies)
        for src, new in copies:
            image = images[src]
            if image.backing_path is None:
                continue
            if image.backing_path in new_of:  # chain mode: onto the copy, named as before
                set_backing(new, backing_name_for(image, new_of[image.backing_path], new),
                            image.backing_format or images[image.backing_path].format)
            else:  # shallow: onto the old chain where it is
                set_backing(new, image.backing_path,
                            image.backing_format or images[image.backing_path].format)
        fsync_dir(os.path.dirname(plan.dest))
    point_persistent_definition(domain, plan.disk, plan.dest, plan.format.value)


def _merge_lower_bitmaps(plan: RelocatePlan, images: dict[str, ImageInfo],
                         active: ImageInfo) -> None:
    """A checkpoint older than a snapshot has its bitmap in several layers
    (libvirt merges them for a backup): convert carried the active layer's
    copy; merge in the copies of the layers below, down the unbroken run,
    as oVirt's cold merge does -- so DEST's bitmap covers every write since
    the checkpoint."""
    for name in [b.name for b in active.bitmaps if "in-use" not in b.flags]:
        for path in plan.chain_before[1:]:
            lower = images[path]
            if not any(b.name == name and "in-use" not in b.flags for b in lower.bitmaps):
                break  # the run ends: nothing below belongs to this checkpoint
            merge_bitmap(name, lower.path, lower.format, plan.dest)


def snapshot(domain: Domain, disk: str, overlay: str, active: ImageInfo, reuse_external: bool,
             creator: FileCreator) -> None:
    """A new overlay on the active image, then the definition on it."""
    if not reuse_external:
        creator.reserve(overlay)
        create_overlay(overlay, active.path, active.format, active.virtual_size)
        fsync_dir(os.path.dirname(overlay))
    point_persistent_definition(domain, disk, overlay, "qcow2")
