"""The files and definitions an operation changes besides its block job:
new files it creates (reserved exclusively, recorded with their identity),
source or retired files it deletes (only when no chain uses them), and the
persistent definition it points at a new active image."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lxml import etree

from ..core import errors
from ..core.chain import parse_xml, source_kind
from ..core.identity import ImageKey, ImageSet, existing_key, image_key, is_block_device, under_root
from ..core.lifetime import mounts
from .images import reserve_file, run_command
from .records import OperationRecord, RecordStore
from .users import chain_users
from .volumes import node_command

if TYPE_CHECKING:
    from ..virt import Domain
    from .context import Context

log = logging.getLogger(__name__)


class FileCreator:
    """Makes an operation's new files: each is reserved exclusively, then
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

    def created_volume(self, path: str) -> None:
        """Enter a block volume the configured command has just created
        (it cannot be reserved first: the command makes it; the plan
        checked the name was free). A roll-back removes it with
        ``volume_remove_command``."""
        self.store.add_created(self.record, path, volume=True)


def check_place(ctx: Context, path: str, reuse: bool, sources: ImageSet,
                owner: tuple[str, str]) -> None:
    """May ``path`` become a new image? Decided on identities: an existing
    DEST that is a source layer under another name is refused, so is one
    (--reuse-external) that any other chain on the node uses -- another
    VM's LV, running or only defined, would be overwritten -- and storage
    roots contain what resolves inside them. ``owner``: (domain uuid, disk)
    of the chain operated on."""
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
    if reuse:
        users = chain_users(ctx.conn, [path], exclude=owner, cache_dir=ctx.state.path).get(path)
        if users:
            raise errors.BadRequest(f"--reuse-external, but {path} is an image of "
                                    f"{', '.join(users)}: it would be overwritten")
    roots = ctx.config.storage_roots
    if roots and not any(under_root(path, root) for root in roots):
        raise errors.BadRequest(
            f"destination {path} is outside the allowed storage roots ({', '.join(roots)})")


def remove_created_files(record: OperationRecord, live_paths: list[str],
                         remove_volume: Sequence[str] = ()) -> list[str]:
    """Remove the files (and block volumes) this operation created, unless
    the VM uses them (snapshot-stream after the snapshot) or the path no
    longer names the file or volume we made (then it is someone else's).
    Volumes go through ``remove_volume`` (``volume_remove_command``), the
    newest first (their layers back onto the older ones)."""
    live = ImageSet(live_paths)
    removed = []
    for entry in reversed(record.created_files):
        path = entry["path"]
        if path in live or not record.still_ours(entry):
            continue
        log.info("removing partial destination %s", path)
        if entry.get("volume"):
            if not remove_volume:
                raise errors.OperationFailed(
                    f"{path} is a block volume the operation created; set "
                    "volume_remove_command in the config and run recover")
            run_command(node_command(remove_volume, path=path))
        else:
            os.unlink(path)
        removed.append(path)
    return removed


def delete_unused(ctx: Context, domain: Domain, target: str,
                  paths: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Delete those of ``paths`` no chain uses -- decided by identity, so a
    layer another VM names through an alias is kept; (deleted, kept with
    why) as the report says them."""
    users = chain_users(ctx.conn, paths, exclude=(domain.uuid, target), cache_dir=ctx.state.path)
    live = ImageSet(domain.spec().disk(target).paths)
    unused, kept = [], []
    for path in paths:
        if users.get(path) or path in live:
            why = f"still used by {users.get(path) or 'this disk'}"
            log.warning("keeping %s: %s", path, why)
            kept.append({"path": path, "why": why})
        else:
            unused.append(path)
    deleted, not_removed = unlink_images(ctx, unused)
    return deleted, kept + not_removed


def unlink_images(ctx: Context, paths: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Delete the images ``paths`` name (the caller decided no chain uses
    them), each only while it is the image that was decided on, and drop
    them from the registry; (deleted, kept with why).

    A file is unlinked. A block device is a volume, not a file: unlinking
    its ``/dev`` node frees nothing, and the node comes back at the next
    udev trigger or reboot -- while its invalidation would be forgotten. So
    it is removed by ``volume_remove_command`` and forgotten only once it
    is gone, or kept (and still refused by the hook) when no command is
    configured or the command failed."""
    deleted, keys, kept = [], [], []
    for path in paths:
        key = existing_key(path)
        if key is None:
            continue
        if key.kind == "block":
            why = _remove_volume(ctx, path, key)
            if why:
                log.warning("keeping the volume %s: %s", path, why)
                kept.append({"path": path, "why": why})
                continue
            deleted.append(path)
            keys.append(key)
            continue
        # The decision was about the image, not the name: a layer reached
        # through a symlink is the file it points to. Unlinking the link
        # would leave that file behind (an orphan whose backing goes next).
        real = os.path.realpath(path) if os.path.islink(path) else path
        if image_key(real) != key:
            log.warning("keeping %s: it changed while it was being deleted", path)
            kept.append({"path": path, "why": "it changed while it was being deleted"})
            continue
        os.unlink(real)
        if real != path:
            os.unlink(path)  # the link named a file that is gone now
            log.info("%s: removed the symlink to the deleted %s", path, real)
        deleted.append(real)
        keys.append(key)
    ctx.state.forget(keys)
    return deleted, kept


def _remove_volume(ctx: Context, path: str, key: ImageKey) -> str:
    """Remove the block volume ``path`` with the configured command; why it
    is still there, or "" once it is gone."""
    command = ctx.config.volume_remove_command
    if not command:
        return ("a block volume: the tool never unlinks a /dev node; remove it with your volume "
                "manager (lvremove), or set volume_remove_command")
    try:
        run_command(node_command(command, path=path))
    except errors.OperationFailed as exc:
        return f"volume_remove_command failed: {exc}"
    if existing_key(path) == key:
        return "still there after volume_remove_command"
    return ""


def point_persistent_definition(domain: Domain, target: str, path: str, fmt: str,
                                headers_changed: bool = False) -> bool:
    """Make the persistent definition's disk use ``path``; True if changed.

    libvirt 9.0 rewrites it itself after a pivot when the old source
    matched; this is the safety net for when it did not (a VM restarted on a
    stale definition silently loses the data written since).
    ``headers_changed``: qemu-img relinked the chain below ``path`` (a cold
    merge), so a ``<backingStore>`` the definition spells out (libvirt
    writes one after a disk-only snapshot) is stale -- and libvirt would
    start the VM on it rather than on the headers: it goes."""
    if not domain.is_persistent():
        return False
    root = parse_xml(domain.xml(inactive=True))
    for disk_elem in root.iterfind("devices/disk"):
        target_elem = disk_elem.find("target")
        if target_elem is None or target_elem.get("dev") != target:
            continue
        source = disk_elem.find("source")
        old = (source.get("dev") or source.get("file")) if source is not None else None
        kind_agrees = (disk_elem.get("type") == "block") == is_block_device(path)
        if source is not None and disk_elem.get("type") == "volume":
            # A pool volume stays one while it is still the image.
            old = domain.conn.volume_path(source.get("pool", ""), source.get("volume", ""))
            kind_agrees = True
        if old and image_key(old) == image_key(path) and kind_agrees:
            stale = disk_elem.findall("backingStore") if headers_changed else []
            for backing in stale:
                disk_elem.remove(backing)
            if stale:
                domain.define(etree.tostring(root, encoding="unicode"))
            return bool(stale)
        if source is None:
            source = etree.SubElement(disk_elem, "source")
        source.attrib.clear()
        kind, attr = source_kind(path)
        disk_elem.set("type", kind)
        source.set(attr, path)
        driver = disk_elem.find("driver")
        if driver is not None:
            driver.set("type", fmt)
        for backing in disk_elem.findall("backingStore"):
            disk_elem.remove(backing)
        domain.define(etree.tostring(root, encoding="unicode"))
        log.info("%s %s: pointed the persistent definition at %s", domain.name, target, path)
        return True
    return False


def filesystem_type(path: str) -> str:
    """The type of the file system ``path`` lies on (``/proc/self/mountinfo``:
    the longest mount point above its real path), e.g. ``ext4``, ``nfs4``."""
    real = os.path.realpath(path)
    found = mounts()
    if not found:
        raise OSError("cannot read /proc/self/mountinfo")
    best, fstype = "", ""
    for _, point, kind, _ in found:
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, kind
    return fstype
