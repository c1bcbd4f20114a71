"""Prepared targets (``--reuse-external``): images someone else made for
this operation -- the way oVirt's engine creates the volumes of a storage
migration before it asks a host to move the data.

They are checked before anything changes (exit 2 when one does not fit):
a qcow2 (or the asked format), the disk's virtual size, backing onto the
right image *by identity*, and -- where the data below must show through --
holding no data of its own. And every prepared layer receives its source
layer's data, proven, before any definition names it: a prepared chain is
an empty shape, and relinking a VM onto it would show the guest zeros.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from ..core import errors
from ..core.budget import Budget
from ..core.identity import image_key
from . import qemuimg
from .images import read_backing_chain, run_command


@dataclass(frozen=True)
class Prepared:
    """What one prepared image must be."""

    path: str
    fmt: str  # the format it must have
    virtual_size: int
    backing: str | None  # the image it must back onto (by identity); None: none
    empty: bool  # must hold no data of its own (the data comes in, or shows through)


def check(targets: Sequence[Prepared], what: str) -> None:
    """Refuse (BadRequest, nothing changed) a prepared image that does not
    fit: another format or size, another backing, data of its own."""
    for target in targets:
        try:
            info = read_backing_chain(target.path)[0]
        except errors.BlockOpsError as exc:
            raise errors.BadRequest(f"prepared {what} {target.path} cannot be read: {exc}") from None
        if info.format != target.fmt:
            raise errors.BadRequest(f"prepared {what} {target.path} is {info.format}, "
                                    f"not {target.fmt}")
        if info.virtual_size != target.virtual_size:
            raise errors.BadRequest(
                f"prepared {what} {target.path} has a virtual size of {info.virtual_size} "
                f"bytes, the disk {target.virtual_size}: the guest would see another disk")
        if target.backing is None and info.backing_path is not None:
            raise errors.BadRequest(f"prepared {what} {target.path} backs onto "
                                    f"{info.backing_path}; it must have no backing file")
        if target.backing is not None and (
                info.backing_path is None
                or image_key(info.backing_path) != image_key(target.backing)):
            raise errors.BadRequest(
                f"prepared {what} {target.path} backs onto {info.backing_path or 'nothing'}, "
                f"not {target.backing}")
        if target.empty and holds_data(target.path, info.format, info.backing_path is not None):
            raise errors.BadRequest(
                f"prepared {what} {target.path} already holds data of its own, which would "
                "hide the guest's: give an empty image")


def holds_data(path: str, fmt: str, has_backing: bool) -> bool:
    """Whether ``path`` has clusters of its own that a reader would see:
    over a backing file any allocated cluster (zero clusters too: they mask
    what is below); without one, any cluster with data."""
    extents = json.loads(run_command(["qemu-img", "map", "-U", "--output=json", "-f", fmt, path]))
    if has_backing:
        return any(e.get("depth") == 0 for e in extents)
    return any(e.get("data") for e in extents)


def fill(copies: Sequence[tuple[str, str]], formats: dict[str, str],
         backing_of: dict[str, str | None], rate_mib_s: int = 0,
         budget: Budget | None = None) -> None:
    """Write each source layer's own data into its prepared counterpart,
    bottom layer first, and prove it: ``copies`` are (source, prepared)
    from the top down; ``backing_of`` names the image each prepared one
    backs onto (checked by ``check``). qemu-img writes the source's own
    clusters over that backing (``-B``: zero clusters too), then ``qemu-img
    compare`` reads both chains whole -- the guest's view from that layer
    down -- so each layer is proven on the ones below it."""
    for source, target in reversed(list(copies)):
        fmt = formats[source]  # a layer's copy keeps its format
        qemuimg.convert(source, fmt, target, fmt, rate_mib_s=rate_mib_s, dest_is_new=False,
                        backing=backing_of.get(target), budget=budget)
        qemuimg.fsync(target)
        try:
            run_command(["qemu-img", "compare", "-U", "-f", fmt, "-F", fmt, source, target])
        except errors.BlockOpsError as exc:
            raise errors.OperationFailed(
                f"the prepared {target} does not read as {source} after the copy: {exc}") from None


def layered(copies: Sequence[tuple[str, str]], below: str | None,
            sizes: dict[str, int], formats: dict[str, str]) -> list[Prepared]:
    """What prepared copies of layers must be: ``copies`` (source,
    prepared) from the top down, each backing onto the next one's prepared
    image, the last onto ``below`` (the old chain's image for a shallow
    copy; None: the bottom of the chain)."""
    targets = []
    for pos, (source, target) in enumerate(copies):
        backing = copies[pos + 1][1] if pos + 1 < len(copies) else below
        targets.append(Prepared(target, formats[source], sizes[source], backing, empty=True))
    return targets


def backings(targets: Sequence[Prepared]) -> dict[str, str | None]:
    return {t.path: t.backing for t in targets}
