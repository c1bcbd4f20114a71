"""Relocation onto block devices.

A full or shallow copy onto one pre-created device (an LV, given with
``--reuse-external``): the copy must fit, after an extension where the node
has a command for it; the tool writes the image onto the device, and the
mirror (or, VM off, qemu-img) fills it, watched by a block threshold on the
copy's target.

Chain mode onto block volumes: DEST names a directory of
device nodes (``/dev/<vg>``) and every layer gets a volume of its own,
created by the node's ``volume_create_command`` under the layer's name,
sized by ``qemu-img measure``, and relinked with device paths.

A file cannot be copied onto a device byte for byte (where the file has a
hole the device keeps stale bytes), so qemu-img writes each layer: a qcow2
layer onto a qcow2 written over its backing's new volume (``convert -n
-B``: only the layer's own clusters, zero clusters included); a raw one as
it is. Each copy is proven -- the new layer over its new backing shows the
guest the same disk as the old one (``qemu-img compare``) -- before
anything names it. The active layer gets an empty overlay on the copies
for the shallow mirror; with the VM off, it is copied like the others.
Volumes made before a failure stay (no command to remove them is known);
nothing names them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..core import errors
from ..core.budget import Budget
from ..core.identity import is_block_device
from ..core.model import ImageFormat, Mode
from ..engine import qemuimg, volumes
from ..engine.images import ImageInfo, run_command

if TYPE_CHECKING:
    from ..core.config import Config
    from ..core.relocate_plan import RelocatePlan
    from ..engine.context import Context
    from ..engine.storage import FileCreator
    from ..virt import Domain


def device_room(ctx: Context, plan: RelocatePlan, images: list[ImageInfo]) -> dict[str, Any]:
    """DEST a pre-created device: the room the copy needs (refused, exit 2,
    when it is short and nothing may extend it), as the report carries it."""
    copied = images if plan.mode is Mode.FULL else images[:1]
    room = volumes.destination_room(plan.dest, plan.format.value, copied, images[0].virtual_size,
                                    ctx.config.volume_margin_mib)
    volumes.refuse_if_short(room, ctx.config.volume_extend_command)
    return room.to_json()


def prepare_device(ctx: Context, plan: RelocatePlan, images: dict[str, ImageInfo],
                   room: dict[str, Any]) -> None:
    """Extend DEST where it is short (a raw one to the disk's size exactly:
    LVM may round past it), then write the image onto it."""
    active = images[plan.chain_before[0]]
    volumes.make_room(room, ctx.config.volume_extend_command, ctx.budget)
    grown = room.get("extended_to", active.virtual_size)
    if plan.format is ImageFormat.RAW and grown != active.virtual_size:
        raise errors.VolumeNotExtended(
            f"{plan.dest} is {grown} bytes after the extension and the disk "
            f"{active.virtual_size}: a raw copy must be the disk's size")
    below = plan.chain_before[1] if plan.mode is not Mode.FULL and len(plan.chain_before) > 1 \
        else None
    volumes.format_destination(plan.dest, plan.format.value, active.virtual_size,
                               below, images[below].format if below else "qcow2")


def mirror_guard(ctx: Context, domain: Domain, plan: RelocatePlan) -> volumes.VolumeGuard | None:
    """A threshold on the copy's target when it is a qcow2 on a device
    (libvirt names it ``vda[N]`` by the ``<mirror>``'s index once the job
    runs) -- for the relocation, and for recover following it. A raw
    target never: extended, it would show the guest a bigger disk."""
    if not (ctx.config.volume_extend_command and plan.format is ImageFormat.QCOW2
            and is_block_device(plan.dest)):
        return None

    def locate() -> str:
        mirror = domain.spec().disk(plan.disk).mirror
        if mirror is None or mirror.index is None:
            raise errors.OperationFailed("the copy's target has no index in the live XML")
        return f"{plan.disk}[{mirror.index}]"

    return volumes.VolumeGuard.configured(ctx.config, domain, locate, plan.dest)


def volume_sizes(plan: RelocatePlan, images: dict[str, ImageInfo], config: Config) -> dict[str, int]:
    """The size of each new volume of a chain onto block volumes (the
    planner named them after the layers, in DEST's folder)."""
    folder = os.path.dirname(plan.dest)
    if not config.volume_create_command:
        raise errors.BadRequest(
            f"{folder} is a directory: DEST names the new active image (give a file path such "
            f"as {plan.dest}); chain mode onto block volumes, one per layer, needs "
            "volume_create_command in the config")
    if not config.volume_remove_command:
        raise errors.BadRequest(
            "chain mode onto block volumes needs volume_remove_command in the config too: "
            "a roll-back removes the volumes the operation created")
    margin_mib = config.volume_margin_mib
    taken = [path for path in plan.chain_after if os.path.lexists(path)]
    if taken:
        raise errors.BadRequest(f"{plan.disk}: {', '.join(taken)} exist(s) already")
    sizes = {}
    for pos, (src, new) in enumerate(zip(plan.chain_before, plan.chain_after)):
        image = images[src]
        if image.format == "raw":
            sizes[new] = image.virtual_size
            continue
        # the active layer's data moves by the mirror (VM running) or by
        # qemu-img (VM off); the guest's writes meanwhile need the margin
        extra = margin_mib * volumes.MIB if pos == 0 else 0
        needed = volumes.measure([image], image.virtual_size) + extra
        sizes[new] = volumes.whole_mib(needed)
    return sizes

def create_volume(path: str, size: int, command: Sequence[str]) -> None:
    argv = volumes.node_command(command, name=os.path.basename(path), size_bytes=size)
    run_command(argv)
    if not is_block_device(path):
        raise errors.OperationFailed(f"{argv[0]} ran, but {path} is no block device")


def copy_onto_volumes(plan: RelocatePlan, images: dict[str, ImageInfo], sizes: dict[str, int],
                      command: Sequence[str], with_active: bool, creator: FileCreator,
                      rate_mib_s: int = 0, budget: Budget | None = None) -> None:
    """Create the volumes (each entered in the record at once, for a
    roll-back to remove) and write the layers onto them, bottom up, each
    proven; the active layer copied too (``with_active``: the VM is off) or
    an empty overlay for the mirror."""
    new_of = dict(plan.copies) | {plan.chain_before[0]: plan.dest}
    for src in reversed(plan.chain_before):
        image, new = images[src], new_of[src]
        create_volume(new, sizes[new], command)
        creator.created_volume(new)
        below = new_of.get(image.backing_path) if image.backing_path else None
        volumes.format_destination(new, image.format, image.virtual_size, below,
                                   images[image.backing_path].format if image.backing_path else "")
        if src == plan.chain_before[0] and not with_active:
            continue
        qemuimg.convert(src, image.format, new, image.format, dest_is_new=False,
                        bitmaps=image.format == "qcow2", backing=below, rate_mib_s=rate_mib_s,
                        budget=budget)
        qemuimg.fsync(new)
        _prove(src, image.format, new)


def _prove(src: str, fmt: str, new: str) -> None:
    """The new layer over its new backing shows the guest what the old one
    showed over the old chain."""
    import subprocess

    proc = subprocess.run(["qemu-img", "compare", "-U", "-f", fmt, "-F", fmt, src, new],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise errors.OperationFailed(f"copy check failed: {new} differs from {src}: "
                                     f"{(proc.stdout + proc.stderr).strip()}")
