"""Checking chains: after every operation (the expected chain against the
live or stored one, the images' own metadata, the persistent definition),
and for ``verify`` (every chain of a domain, invalidated images,
unfinished operations)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core import errors
from ..core.chain import Disk
from ..core.identity import clean_path, image_key, same_images
from ..core.reports import VerifyReport
from .images import ImageInfo, chain_problems, missing_images
from .node import image_chain
from .records import RecordStore
from .state import StateDir

if TYPE_CHECKING:
    from ..virt import Domain


def norm(paths: list[str]) -> list[str]:
    return [clean_path(p) for p in paths]


def disk_problems(disk: Disk, state: StateDir | None, definition: str) -> list[str]:
    """Missing images, disagreement with the images' metadata and, with
    ``state``, invalidated images in the chain of one disk."""
    return _checked_disk(disk, state, definition)[0]


def _checked_disk(disk: Disk, state: StateDir | None,
                  definition: str) -> tuple[list[str], list[ImageInfo]]:
    """``disk_problems``, and the images' own chain it read (empty when it
    could not be read) -- so a caller needs not run qemu-img again."""
    where = f"{definition} {disk.target}"
    missing = missing_images(disk)
    if missing:
        return [f"{where}: image {p} does not exist" for p in missing], []
    try:
        images = image_chain(disk)
    except errors.BlockOpsError as exc:
        return [f"{where}: cannot read image metadata: {exc}"], []
    problems = [f"{definition} {p}" for p in chain_problems(disk, images)]
    if state is not None:
        invalid = state.invalid_lookup()
        for path in [i.path for i in images] or disk.paths:
            why = invalid.why(path)
            if why is not None:
                problems.append(f"{where}: {path} was invalidated by {why.get('operation')} "
                                f"on {why.get('domain')} {why.get('disk')}")
    return problems, images


def chain_problems_now(domain: Domain, target: str, expected: list[str]) -> list[str]:
    """Problems of the chain of ``target`` against the expected chain and
    the images' own metadata; a running VM's persistent definition must
    use the same active image. For a shut-off VM the chain is the one the
    images' headers give from the persistent definition's active image."""
    running = domain.is_active()
    disk = domain.spec().disk(target)
    where = "live" if running else "stored"
    disk_found, images = _checked_disk(disk, None, "live" if running else "persistent")
    # The chain as resolved_paths() gives it, from the images already read.
    chain = [p for p in disk.paths if p] if disk.chain_complete \
        else [i.path for i in images] or disk.paths
    problems = []
    if not same_images(chain, expected):
        problems.append(f"{target}: {where} chain is {chain}, expected {expected}")
    if disk.mirror is not None:
        problems.append(f"{target}: a {disk.mirror.job} job is still attached")
    problems += disk_found
    stored = persistent_disk(domain, target) if running else None
    if stored is not None and (stored.active is None
                               or image_key(stored.active.path) != image_key(expected[0])):
        problems.append(f"{target}: persistent definition uses "
                        f"{stored.active.path if stored.active else None}, not {expected[0]}")
    return problems


def persistent_disk(domain: Domain, target: str) -> Disk | None:
    """``target`` in the persistent definition; None when the domain has
    none or the disk exists only live (hot-plugged)."""
    if not domain.is_persistent():
        return None
    spec = domain.spec(inactive=True)
    return spec.disk(target) if spec.has(target) else None


def require_chain(domain: Domain, target: str, expected: list[str]) -> None:
    """Raise VerificationFailed listing every problem ``chain_problems_now`` finds."""
    problems = chain_problems_now(domain, target, expected)
    if problems:
        raise errors.VerificationFailed("; ".join(problems), problems=problems)


def domain_problems(domain: Domain, target: str | None, state: StateDir | None) -> list[str]:
    """Every problem with the domain's chains (empty list: all good)."""
    problems: list[str] = []
    live = domain.spec() if domain.is_active() else None
    persistent = domain.spec(inactive=True) if domain.is_persistent() else None
    # A disk may exist on one side only: hot-plugged (live), or attached
    # with --config while the VM runs (persistent). Each side is checked
    # where the disk exists; a disk on neither is unknown.
    sides = [(name, spec) for name, spec in (("live", live), ("persistent", persistent))
             if spec is not None and (target in (None, "all") or spec.has(target))]
    if not sides and live is not None:
        live.disk(str(target))  # raises UnknownDisk
    for definition, spec in sides:
        for disk in spec.select(target or "all"):
            if disk.chain:
                problems += disk_problems(disk, state, definition)
    if live is not None and persistent is not None:
        for disk in live.select(target or "all"):
            try:
                stored = persistent.disk(disk.target)
            except errors.UnknownDisk:
                continue  # hot-plugged live only
            if stored.active and disk.active and \
                    image_key(stored.active.path) != image_key(disk.active.path):
                problems.append(f"{disk.target}: the persistent definition uses "
                                f"{stored.active.path} but the VM runs on {disk.active.path}")
    return problems


def verify(domain: Domain, target: str | None, state: StateDir,
           checkpoints: bool = False) -> VerifyReport:
    """``verify``: chains, invalidated images, unfinished operations; and
    the domain's checkpoints (a broken one fails only with ``checkpoints``)."""
    problems = domain_problems(domain, target, state)
    for disk, record in RecordStore(domain).load().items():
        if target in (None, "all", disk):
            problems.append(f"{disk}: unfinished {record.describe()}")
    running = domain.is_active()
    checkpoints_of = domain.checkpoints()
    broken = []
    for checked in domain.spec().select(target or "all"):
        names = checkpoints_of.get(checked.target, {}) if checked.chain else {}
        if names:
            try:
                images = image_chain(checked)
            except errors.BlockOpsError:
                continue  # reported above
            broken += [f"{checked.target}: checkpoint {name} is broken ({why}): the next backup "
                       "from it must be full"
                       for name, usable in names.items()
                       if (why := checkpoint_problem(name, images, running, usable))]
    return VerifyReport(domain=domain.name, disk=target or "all",
                        problems=problems + (broken if checkpoints else []),
                        broken_checkpoints=broken)


def checkpoint_problem(name: str, images: list[ImageInfo], running: bool,
                       usable_in_qemu: bool = True) -> str | None:
    """Why libvirt could not take an incremental backup from checkpoint
    ``name`` of a disk with this chain, or None. Its bitmap must be in the
    active layer and, down the chain, in an unbroken run of layers (none
    below a layer without it); every copy recording (``auto``) and none
    ``in-use``, which in a file no QEMU writes means inconsistent. A running
    VM's active layer is QEMU's: there libvirt's word decides
    (``usable_in_qemu``: it could size the checkpoint from QEMU's bitmaps)."""
    if running and not usable_in_qemu:
        return "libvirt finds its bitmap missing or broken in the running disk"
    held = []
    for pos, image in enumerate(images):
        if pos == 0 and running:
            held.append(True)
            continue
        bitmap = image.bitmap(name)
        if bitmap is not None and not bitmap.consistent:
            return f"its bitmap in {image.path} is inconsistent"
        if bitmap is not None and not bitmap.recording:
            return f"its bitmap in {image.path} is disabled"
        held.append(bitmap is not None)
    if not held or not held[0]:
        return f"no bitmap {name} in the active layer"
    end = held.index(False) if False in held else len(held)
    if any(held[end:]):
        return f"its bitmap is missing in {images[end].path} but present below it"
    return None
