"""The plan of a move to another node, and every refusal, before anything
changes on either node: the disks' kinds (files only; network and shared
file systems have nothing to copy; devices and pool volumes are refused by
name), encryption secrets the destination lacks, files of the same name
there (a read-only layer with exactly our bytes is reused: a template an
earlier move put there; one another move is uploading is awaited by the
copy), room in each destination folder. And how a layer is made there."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING

import libvirt

from ..core import errors
from ..core.chain import parse_xml
from ..core.headers import NotAnImage
from ..core.migrate_plan import (
    LayerMove,
    MigratePlan,
    MigrateRequest,
    SourceImage,
    checkpoint_order,
    plan_layout,
    with_backing_name,
)
from ..engine.context import Context
from ..engine.copying import data_extents
from ..engine.images import ImageInfo, read_chain, run_command
from ..engine.records import RecordStore
from ..engine.storage import filesystem_type
from ..virt.remote import RemoteNode
from ..virt.streams import Chunk, hash_zeros
from .dest_files import uploading

if TYPE_CHECKING:
    from ..virt import Domain

# File systems other nodes see too: a disk there has nothing to copy.
SHARED_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "fuse.glusterfs",
                      "gfs2", "ocfs2", "lustre", "beegfs", "fuse.cephfs"}
HEAD_BYTES = 2 * 1024 * 1024  # the largest qcow2 cluster: the header's whole first cluster
READ_CHUNK = 4 * 1024 * 1024  # read from a layer at a time


def make_plan(ctx: Context, domain: Domain, dest: RemoteNode,
              req: MigrateRequest) -> tuple[MigratePlan, list[str]]:
    """The plan, and the read-only layers the destination already holds
    with the same bytes (a template an earlier move put there). Every
    refusal happens here."""
    if dest.host_uuid == _host_uuid(ctx):
        raise errors.BadRequest(f"{req.dest_uri} is this node: nothing to move")
    for there, how in ((dest.domain(domain.uuid), f"UUID {domain.uuid}"),
                       (dest.domain_by_name(domain.name), f"name {domain.name}")):
        if there is not None:  # libvirt would refuse only after the whole copy
            raise errors.BadRequest(
                f"{dest.hostname} already has a domain with the {how} ({there.name()}): "
                "undefine it there first, or move this VM elsewhere")
    if RecordStore(domain, ctx.state).load():
        raise errors.Conflict(f"{domain.name} has an unfinished operation on its disks: "
                              f"run 'vdsm-blockops recover {domain.name}' first")
    xml = domain.xml()
    chains: dict[str, list[SourceImage]] = {}
    for disk in domain.spec().disks:
        if not disk.chain:
            continue  # an empty drive: nothing to move
        if disk.device != "disk" or disk.readonly:
            raise errors.UnsafeRequest(f"disk {disk.target} is a read-only {disk.device}: "
                                       "migrate moves writable disks; eject it first")
        if disk.shareable:
            raise errors.UnsafeRequest(
                f"disk {disk.target} is shareable (other VMs write {disk.chain[0].path} too): a "
                "copy on another node would diverge from it. Detach it before the move and "
                "attach it there from storage both nodes reach, or keep the VMs together")
        for layer in disk.chain:
            _refuse_kind(disk.target, layer.source_type, layer.path)
            if layer.volume:
                raise errors.UnsafeRequest(
                    f"disk {disk.target}: {layer.path} is volume {layer.volume} of a storage "
                    "pool; migrate moves plain files (relocate the disk to a file first)")
            if layer.encrypted:
                raise errors.UnsafeRequest(
                    f"disk {disk.target}: {layer.path} is encrypted; migrate would create its "
                    "active layer on the destination in plaintext, so it refuses before any "
                    "byte is sent (move the VM with virsh migrate --copy-storage-all)")
        if domain.block_job_info(disk.target) is not None:
            raise errors.Conflict(f"disk {disk.target} has a block job running")
        chains[disk.target] = [_source_image(disk.target, info)
                               for info in read_chain(disk.chain[0].path, disk.chain[0].format)]
    if not chains:
        raise errors.BadRequest(f"domain {domain.name} has no disk with an image chain to move")
    _refuse_missing_secrets(xml, dest)
    disks, layers = plan_layout(chains, req.dest_dir, req.source_root)
    parents = {name: parent for name, (parent, _) in domain.checkpoint_definitions().items()}
    plan = MigratePlan(domain=domain.name, uuid=domain.uuid, dest_uri=req.dest_uri,
                       dest_dir=req.dest_dir, disks=disks, layers=layers,
                       checkpoints=checkpoint_order(parents))
    reused = _check_destination(ctx, dest, plan)
    return plan, reused


def _refuse_kind(disk: str, source_type: str, path: str) -> None:
    if source_type == "network":
        raise errors.UnsafeRequest(
            f"disk {disk} is on network storage ({path}): both nodes reach it, nothing to "
            "copy; migrate the VM without copying storage (virsh migrate --live)")
    if source_type != "file":
        raise errors.UnsafeRequest(
            f"disk {disk}: a {source_type} layer ({path}) cannot be copied to another node "
            "by migrate; relocate the disk to files first")
    fstype = filesystem_type(path)
    if fstype in SHARED_FILESYSTEMS:
        raise errors.UnsafeRequest(
            f"disk {disk} is on shared storage ({fstype}: {path}): both nodes reach it, "
            "nothing to copy; migrate the VM without copying storage (virsh migrate --live)")


def _source_image(disk: str, info: ImageInfo) -> SourceImage:
    if info.data_file:
        raise errors.UnsafeRequest(f"disk {disk}: {info.path} keeps its data in the external "
                                   f"file {info.data_file}, which migrate does not copy")
    if info.format not in ("qcow2", "raw"):
        raise errors.UnsafeRequest(f"disk {disk}: {info.path} is {info.format}; migrate "
                                   "copies qcow2 and raw images")
    return SourceImage(path=info.path, format=info.format, size=os.path.getsize(info.path),
                       virtual_size=info.virtual_size, backing_name=info.backing_name,
                       backing_format=info.backing_format)


def _refuse_missing_secrets(xml: str, dest: RemoteNode) -> None:
    for disk in parse_xml(xml).iterfind("devices/disk"):
        target = disk.find("target")
        for secret in disk.iterfind(".//encryption/secret"):
            uuid, usage = secret.get("uuid"), secret.get("usage")
            if not dest.has_secret(uuid, (libvirt.VIR_SECRET_USAGE_TYPE_VOLUME, usage)
                                   if usage else None):
                raise errors.UnsafeRequest(
                    f"disk {target.get('dev') if target is not None else '?'} is encrypted "
                    f"with secret {uuid or usage}, which {dest.uri} does not have: define it "
                    "there first (virsh secret-define, secret-set-value)")


def _check_destination(ctx: Context, dest: RemoteNode, plan: MigratePlan) -> list[str]:
    """Refuse a destination file of the same name unless it is a read-only
    layer holding exactly our bytes (then it is reused), and a destination
    without room for the rest (summed per existing folder: a folder still
    to be made counts against the nearest one above it). Notes in the plan
    the folders still to be made."""
    reused: list[str] = []
    need: dict[str, int] = {}
    free: dict[str, int | None] = {}
    for folder in plan.dest_folders:
        exists, names, room = dest.folder_state(folder)
        above = folder
        while not exists and above != "/":
            if above not in plan.new_folders:
                plan.new_folders.append(above)
            above = os.path.dirname(above)
            exists, _, room = dest.folder_state(above)
        free[above] = room
        for move in (m for m in plan.layers if os.path.dirname(m.dest) == folder):
            if os.path.basename(move.dest) not in names or (
                    not move.active and uploading(dest, move.dest, plan.uuid)):
                # absent, or another move's upload of it runs: the copy
                # waits for it to be proven, then reuses it (or makes it)
                need[above] = need.get(above, 0) + move.size
            elif move.active or dest.digest(move.dest) != local_digest(move):
                raise errors.UnsafeRequest(
                    f"{dest.uri} already has {move.dest} (for {move.source}) with other "
                    "contents: nothing was changed; choose another --dest-dir")
            else:
                reused.append(move.dest)
    plan.new_folders.sort(key=lambda f: (-f.count("/"), f))
    for folder, bytes_needed in need.items():
        room = free.get(folder)
        if room is not None and room < bytes_needed:
            raise errors.UnsafeRequest(
                f"{dest.uri}: {folder} has {room} bytes free, the move needs {bytes_needed}: "
                "nothing was changed")
    return reused


def local_digest(move: LayerMove) -> str:
    digest = hashlib.sha256()
    with open(move.source, "rb") as handle:
        for chunk in layer_chunks(move, handle):
            if isinstance(chunk, int):
                hash_zeros(digest, chunk)
            else:
                digest.update(chunk)
    return digest.hexdigest()


def layer_chunks(move: LayerMove, handle: IO[bytes]) -> Iterator[Chunk]:
    """What the destination gets for ``move`` (``handle``: its file), in
    chunks: the header with the backing name rewritten where the
    destination names it otherwise (an active layer is made with its name),
    then the rest of the file -- its holes as their lengths."""
    start = 0
    if not move.active and move.rewrite and move.backing_name is not None:
        head = with_backing_name(handle.read(HEAD_BYTES), move.backing_name)
        yield head
        start = len(head)
    yield from file_chunks(handle.fileno(), start)


def file_chunks(fd: int, pos: int) -> Iterator[Chunk]:
    """The file ``fd`` from ``pos`` on: data in chunks, each hole as its
    length (``data_extents``: a file system without SEEK_DATA has none)."""
    end = os.fstat(fd).st_size
    for start, stop in data_extents(fd, end, pos):
        if start > pos:
            yield start - pos
            pos = start
        while pos < stop:
            chunk = os.pread(fd, min(READ_CHUNK, stop - pos), pos)
            if not chunk:
                return  # shorter than it was: the fingerprint check after says so
            yield chunk
            pos += len(chunk)
    if pos < end:
        yield end - pos  # a hole to the end


def checkpoint_xmls(domain: Domain) -> list[str]:
    definitions = domain.checkpoint_definitions()
    parents = {name: parent for name, (parent, _) in definitions.items()}
    return [definitions[name][1] for name in checkpoint_order(parents)]


def _host_uuid(ctx: Context) -> str:
    return ctx.conn.host_uuid()


def empty_active(move: LayerMove, scratch: contextlib.ExitStack) -> str:
    """A local file holding the new, empty active layer as the destination
    needs it: qcow2 on its backing name there, or a sparse raw image."""
    folder = scratch.enter_context(tempfile.TemporaryDirectory(prefix="vdsm-blockops-"))
    path = os.path.join(folder, "active")
    if move.format == "raw":
        with open(path, "wb") as handle:
            handle.truncate(move.virtual_size)
    else:
        argv = ["qemu-img", "create", "-q", "-f", "qcow2",
                "-o", f"cluster_size={cluster_size(move)}"]
        if move.backing_name:
            argv += ["-u", "-b", move.backing_name, "-F", move.backing_format or "raw"]
        run_command(argv + [path, str(move.virtual_size)])
    return path


def cluster_size(move: LayerMove) -> int:
    with open(move.source, "rb") as handle:
        head = handle.read(24)
    if head[:4] != b"QFI\xfb":
        raise NotAnImage(f"{move.source} is not a qcow2 image")
    return 1 << int.from_bytes(head[20:24], "big")
