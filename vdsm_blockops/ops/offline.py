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

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

from ..core import errors
from ..core.identity import ImageKey, fingerprint, is_block_device
from ..core.model import Method, Mode, Strategy
from ..engine import prepared, qemuimg
from ..engine.copying import copy_proven
from ..engine.images import (
    ImageInfo,
    add_bitmap,
    backing_name_for,
    create_image,
    create_overlay,
    enable_bitmap,
    merge_bitmap,
    read_chain,
    remove_bitmap,
    set_backing,
)
from ..engine.state import fsync_dir
from ..engine.storage import FileCreator, point_persistent_definition

if TYPE_CHECKING:
    from ..core.planner import MergePlan
    from ..core.relocate_plan import RelocatePlan
    from ..engine.context import Context
    from ..virt import Domain

log = logging.getLogger(__name__)


def _progress(ctx: Context, disk: str, job: str,
              total_bytes: int = 0) -> qemuimg.Progress | None:
    return (qemuimg.Progress(disk, job, ctx.observer, total_bytes)
            if ctx.observer is not None else None)


def merge(ctx: Context, domain: Domain, plan: MergePlan, images: dict[str, ImageInfo],
          rate_mib_s: int = 0) -> None:
    """qemu-img commit (then relink the layer above, or point the definition
    at the result of an active commit) or a safe qemu-img rebase."""
    top = images[plan.top]
    chain, top_pos = plan.chain_before, plan.chain_before.index(plan.top)
    if plan.strategy is Strategy.PULL:
        base = images[plan.base] if plan.base else None
        name = None
        if base is not None:
            name = backing_name_for(top, base.path, top.path) if plan.keep_relative else base.path
        with _not_recording(top):
            qemuimg.rebase(top.path, top.format, name, base.format if base else None,
                           _progress(ctx, plan.disk, "pull"), rate_mib_s, ctx.budget)
        end = chain.index(plan.base) if plan.base else len(chain)
        _carry_bitmaps(top, top, [images[p] for p in chain[top_pos + 1:end]])
        point_persistent_definition(domain, plan.disk, top.path, top.format, headers_changed=True)
        return
    result, dropped = _drop_invalid_bitmaps(images[plan.result])
    with _not_recording(result):
        qemuimg.commit(top.path, top.format, result.path,
                       _progress(ctx, plan.disk, "active-commit" if plan.active else "commit"),
                       rate_mib_s=rate_mib_s, budget=ctx.budget)
    _carry_bitmaps(result, top, [images[p] for p in chain[top_pos:chain.index(plan.result)]],
                   broken=dropped)
    if plan.active:
        point_persistent_definition(domain, plan.disk, result.path, result.format)
    else:
        above = images[chain[top_pos - 1]]
        set_backing(above.path, backing_name_for(above, result.path, above.path) if plan.keep_relative
                    else result.path, result.format)
        active = images[chain[0]]
        point_persistent_definition(domain, plan.disk, active.path, active.format,
                                    headers_changed=True)


def method_used(plan: RelocatePlan) -> Method:
    """What ``relocate`` below runs for ``plan`` (no mirror runs with the
    VM off): qemu-img convert for a full copy or onto a device, else the
    tool's own proven file copies."""
    if plan.mode is Mode.FULL or is_block_device(plan.dest):
        return Method.CONVERT
    return Method.COPY


def relocate(ctx: Context, domain: Domain, plan: RelocatePlan, images: dict[str, ImageInfo],
             creator: FileCreator, reuse_external: bool,
             targets: list[prepared.Prepared] | None, rate_mib_s: int = 0) -> None:
    """Copy (chain, shallow: the files, each chunk compared as written; full: qemu-img
    convert, flushed), relink, then point the persistent definition at DEST.
    ``targets``: the prepared files of --reuse-external, checked (a
    prepared device is formatted by the tool instead). Before the
    definition names DEST, the domain is checked to be still shut off and
    its images unchanged since the record was written."""
    active = images[plan.chain_before[0]]
    seen = {path: fingerprint(path) for path in plan.chain_before}
    if plan.mode is Mode.FULL:
        if not reuse_external:
            creator.reserve(plan.dest)
            create_image(plan.dest, plan.format.value, active.virtual_size)
        # qemu-img copies here, as QEMU does in a block job: its result is
        # flushed, then verified like a job's (chain and headers).
        carry = plan.format.value == "qcow2" and active.format == "qcow2"
        qemuimg.convert(active.path, active.format, plan.dest, plan.format.value,
                        _progress(ctx, plan.disk, "copy", plan.bytes_to_copy),
                        rate_mib_s=rate_mib_s, dest_is_new=not reuse_external, bitmaps=carry,
                        budget=ctx.budget)
        if carry:  # convert carried the active layer's bitmaps; merge in their copies below
            _carry_bitmaps(replace(active, path=plan.dest), active,
                           [images[p] for p in plan.chain_before[1:]])
        qemuimg.fsync(plan.dest)
    elif is_block_device(plan.dest):
        # shallow onto a device, formatted over the old backing: qemu-img
        # writes the active layer's own clusters (files cannot be copied
        # onto a device: its stale bytes would show through their holes)
        below = plan.chain_before[1] if len(plan.chain_before) > 1 else None
        qemuimg.convert(active.path, active.format, plan.dest, "qcow2",
                        _progress(ctx, plan.disk, "copy"), rate_mib_s=rate_mib_s, dest_is_new=False,
                        bitmaps=active.format == "qcow2", backing=below, budget=ctx.budget)
        qemuimg.fsync(plan.dest)
    else:
        # Every layer is read-only while the VM is off: copy them all as
        # files (chain) or only the active one (shallow), then relink.
        copies = [(active.path, plan.dest)] + (plan.copies if plan.mode is Mode.CHAIN else [])
        if targets is not None:
            # Prepared images, checked to back onto the right ones: each
            # gets its layer's data, proven; their own backing names stay.
            prepared.fill(copies, {p: i.format for p, i in images.items()},
                          prepared.backings(targets), rate_mib_s, ctx.budget)
            _still_off_and_unchanged(domain, seen)
            point_persistent_definition(domain, plan.disk, plan.dest, plan.format.value)
            return
        copy_proven(copies, creator, rate_mib_s, ctx.budget)
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
    _still_off_and_unchanged(domain, seen)
    point_persistent_definition(domain, plan.disk, plan.dest, plan.format.value)


def _still_off_and_unchanged(domain: Domain, seen: dict[str, tuple[ImageKey, int, int]]) -> None:
    """Before the definition names the copies: the domain is still shut off
    and its images are the ones copied, unchanged (identity, size, mtime).
    The copies held QEMU's image locks, so a start during them failed; a
    start since (with the hook not installed) would have written to the
    source: then the copies are not used (Conflict: the settlement rolls
    them back) rather than a definition pointed at stale data."""
    if domain.is_active():
        raise errors.Conflict(f"{domain.name} was started during the copy: its images may have "
                              "been written since, so the copies are not used")
    for path, before in seen.items():
        if fingerprint(path) != before:
            raise errors.Conflict(f"{path} changed during the copy: the copies are not used")


@contextlib.contextmanager
def _not_recording(image: ImageInfo) -> Iterator[None]:
    """qemu-img's writes into ``image`` would mark its recording bitmaps
    dirty (a pull measured 10 MiB in the next backup for 2 MiB of guest
    writes): they are disabled meanwhile, and enabled again however
    qemu-img ends -- a failed commit's partial writes are qemu-img's too,
    under data the layers above still cover. If we are killed in between
    they stay disabled, which ``verify`` reports: the next backup is a
    full one."""
    recording = [b.name for b in image.bitmaps if b.usable]
    for name in recording:
        enable_bitmap(image.path, name, False)
    try:
        yield
    except BaseException:
        for name in recording:
            try:
                enable_bitmap(image.path, name, True)
            except Exception as exc:  # the failure being raised matters more
                log.warning("%s: bitmap %s stays disabled: %s", image.path, name, exc)
        raise
    for name in recording:
        enable_bitmap(image.path, name, True)


def _drop_invalid_bitmaps(base: ImageInfo) -> tuple[ImageInfo, frozenset[str]]:
    """A commit target's bitmaps that no backup can use -- ``in-use`` in a
    file no QEMU has open (never stored: inconsistent) or not ``auto``
    (disabled) -- are removed first, as oVirt does: they would only grow
    with the data committed into them (and a merge into an inconsistent one
    fails)."""
    invalid = [b for b in base.bitmaps if not b.usable]
    for bitmap in invalid:
        log.warning("%s: removing bitmap %s before the commit: it is %s", base.path, bitmap.name,
                    "disabled" if bitmap.consistent else "inconsistent")
        remove_bitmap(base.path, bitmap.name)
    kept = tuple(b for b in base.bitmaps if b not in invalid)
    return replace(base, bitmaps=kept), frozenset(b.name for b in invalid)


def _carry_bitmaps(into: ImageInfo, nearest: ImageInfo, merged: list[ImageInfo],
                   broken: frozenset[str] = frozenset()) -> None:
    """qemu-img commit and rebase move data, not bitmaps (oVirt's cold merge
    fixes them up the same way): each checkpoint bitmap of ``nearest`` (the
    merged layer closest to the active one) goes into ``into`` -- added
    there with its granularity if missing -- merged with its copies in the
    ``merged`` layers (top down) while their run is unbroken. A bitmap that
    ``nearest`` lacks belongs to a checkpoint already broken above: adding
    it would vouch for writes it never saw; so would one whose copy in
    ``into`` was ``broken`` (dropped as invalid)."""
    if into.format != "qcow2":
        return  # a raw image holds no bitmaps: its checkpoints end here
    present = {b.name for b in into.bitmaps}
    for bitmap in nearest.bitmaps:
        if not bitmap.consistent or bitmap.name in broken:
            continue
        if bitmap.name not in present:
            add_bitmap(into.path, bitmap.name, bitmap.granularity)
        for layer in merged:
            copy = layer.bitmap(bitmap.name)
            if copy is None or not copy.consistent:
                break
            merge_bitmap(bitmap.name, layer.path, layer.format, into.path)


def snapshot(domain: Domain, disk: str, overlay: str, active: ImageInfo, reuse_external: bool,
             creator: FileCreator) -> None:
    """A new overlay on the active image, then the definition on it. The
    active image's checkpoint bitmaps get an empty copy in the overlay, as
    libvirt gives a live snapshot's: the checkpoint's run goes on up to
    the new active layer (without it the next backup would be full)."""
    if not reuse_external:
        creator.reserve(overlay)
        create_overlay(overlay, active.path, active.format, active.virtual_size)
        fsync_dir(os.path.dirname(overlay))
    # one just made holds none; one the caller made may (its header says)
    present = {b.name for b in read_chain(overlay, "qcow2")[0].bitmaps} if reuse_external \
        else set()
    for bitmap in active.bitmaps:
        if bitmap.usable and bitmap.name not in present:
            add_bitmap(overlay, bitmap.name, bitmap.granularity)
    point_persistent_definition(domain, disk, overlay, "qcow2")
