"""Making a relocation's destination before the mirror starts: the
read-only layers copied as files (and proven), relinked, a new overlay on
top (chain mode); or an empty standalone image (full mode). Every new file
is reserved exclusively and recorded first (``storage.FileCreator``)."""

from __future__ import annotations

import concurrent.futures
import os
from typing import TYPE_CHECKING

from . import errors
from .images import (
    ImageInfo,
    backing_name_for,
    content_difference,
    copy_image_file,
    create_image,
    create_overlay,
    set_backing,
)
from .state import fsync_dir
from .storage import FileCreator

if TYPE_CHECKING:
    from .relocate import RelocatePlan


def copy_proven(copies: list[tuple[str, str]], creator: FileCreator) -> None:
    """Copy images nobody writes into new files (reserved and recorded
    first), two at a time, each proven against its source: content, not
    only paths -- every copy is read back and compared (a reflink needs not)."""
    for _, new in copies:
        creator.reserve(new)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        copied = [(src, new, pool.submit(copy_image_file, src, new, reserved=True))
                  for src, new in copies]
        checks = [pool.submit(content_difference, src, new)
                  for src, new, proven in copied if not proven.result()]
        for check in checks:
            difference = check.result()
            if difference:
                raise errors.OperationFailed(f"copy check failed: {difference}")


def prepare_chain_copy(plan: RelocatePlan, images: dict[str, ImageInfo], creator: FileCreator) -> None:
    """Copy the read-only layers as files, relink them, create the new
    active overlay."""
    copy_proven(plan.copies, creator)
    creator.reserve(plan.dest)
    # Relink each copy to the copy of its backing; relative names stay
    # relative (the layers sit side by side in DEST's folder).
    new_of = dict(plan.copies)
    for src, new in plan.copies:
        info = images[src]
        if info.backing_path is None:
            continue
        new_backing = new_of[info.backing_path]
        set_backing(new, backing_name_for(info, new_backing, new),
                    info.backing_format or images[info.backing_path].format)
    top_src, top_new = plan.copies[0]
    active = images[plan.chain_before[0]]
    create_overlay(plan.dest, backing_name_for(active, top_new, plan.dest), images[top_src].format,
                   active.virtual_size)
    fsync_dir(os.path.dirname(plan.dest))  # the new names survive a host crash


def prepare_full_copy(plan: RelocatePlan, images: dict[str, ImageInfo], creator: FileCreator) -> None:
    """DEST for a full mirror, made by us (and then reused by libvirt) so
    that it is reserved and recorded before anything is written into it."""
    creator.reserve(plan.dest)
    create_image(plan.dest, plan.format.value, images[plan.chain_before[0]].virtual_size)
    fsync_dir(os.path.dirname(plan.dest))
