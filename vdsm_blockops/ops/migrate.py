"""Move a running domain and its disks to another node, keeping each
disk's qcow2 chain and the domain's checkpoints.

Steps (each recorded first, ``engine/migrations.py``): plan and refuse
(nothing changed) -> copy every read-only layer to the destination through
its libvirt (pool volume uploads) and prove each copy by reading it back
there (SHA-256 of the downloaded bytes against what was sent: libvirt
exposes no checksum of a volume, and a read back through the destination's
own libvirt proves what its storage holds, not what we meant to send) ->
create each active layer there, empty, on its copied chain -> migrateToURI3
(live, peer to peer, NON_SHARED_INC: QEMU mirrors only the active layers;
persistent on the destination) -> settle (``ops/moved.py``): checkpoints
redefined, verified on the destination, source definition dropped and its
layers retired. A marker volume beside the files of an unfinished upload
lets the destination's hook refuse a domain that would start on them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import libvirt

from ..core import errors
from ..core.headers import NotAnImage
from ..core.migrate_plan import (
    LayerMove,
    MigratePlan,
    MigrateRequest,
    SourceImage,
    checkpoint_order,
    marker_name,
    plan_layout,
    rewrite_sources,
    with_backing_name,
)
from ..core.model import JobInfo
from ..core.reports import MigrateReport
from ..engine.context import (
    Context,
    as_failure,
    check_bandwidth,
    check_timeout,
    refuse_vdsm_managed,
    running_domain,
)
from ..engine.copying import Pace
from ..engine.images import ImageInfo, read_chain, run_command
from ..engine.migrations import MigrationRecord, MigrationStore, MovePhase
from ..engine.records import RecordStore
from ..engine.storage import filesystem_type
from ..virt.remote import RemoteNode, file_chunks
from . import moved
from .moved import MOVE_LOCK

if TYPE_CHECKING:
    from ..virt import Domain

log = logging.getLogger(__name__)

# File systems other nodes see too: a disk there has nothing to copy.
SHARED_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "fuse.glusterfs",
                      "gfs2", "ocfs2", "lustre", "beegfs", "fuse.cephfs"}
MIGRATE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                 | libvirt.VIR_MIGRATE_NON_SHARED_INC | libvirt.VIR_MIGRATE_PERSIST_DEST)
HEAD_BYTES = 2 * 1024 * 1024  # the largest qcow2 cluster: the header's whole first cluster


def migrate(ctx: Context, req: MigrateRequest) -> MigrateReport:
    check_bandwidth(req.bandwidth_mib_s)
    check_timeout(req.timeout_s)
    ctx = ctx.timed(req.timeout_s)
    started = ctx.clock()
    domain = running_domain(ctx, req.domain)
    refuse_vdsm_managed(ctx, domain)
    store = MigrationStore(ctx.state)
    if store.load(domain.uuid) is not None:
        raise errors.Conflict(f"{domain.name} has an unfinished move to another node: "
                              f"run 'vdsm-blockops recover {domain.name}'")
    dest = RemoteNode(req.dest_uri)
    try:
        plan, reused = make_plan(ctx, domain, dest, req)
        if req.dry_run:
            return moved.report(plan, req, dest, dry_run=True, reused=reused)
        with contextlib.ExitStack() as locks:
            locks.enter_context(ctx.state.disk_lock(domain.uuid, MOVE_LOCK,
                                                    f"migrate of {domain.name}"))
            for move in plan.disks:
                locks.enter_context(ctx.state.disk_lock(domain.uuid, move.disk,
                                                        f"migrate of {domain.name}"))
            record = MigrationRecord(domain=domain.name, uuid=domain.uuid, dest_uri=req.dest_uri,
                                     request=vars(req), plan=plan.to_json(),
                                     checkpoints=_checkpoints(domain))
            store.save(record)
            try:
                copy_layers(ctx, dest, plan, record, store, reused)
                run_migration(ctx, domain, plan, record, store, req)
                report = moved.finish(ctx, dest, record, store)
            except (errors.BlockOpsError, OSError) as exc:
                moved.after_failure(ctx, domain, dest, record, store)
                raise as_failure(exc) from exc
            except KeyboardInterrupt:
                moved.after_failure(ctx, domain, dest, record, store)
                raise errors.Interrupted("interrupted: the move was stopped and rolled back "
                                         f"({domain.name} runs on this node)") from None
    finally:
        dest.close()
    report.duration_s = round(ctx.clock() - started, 3)
    return report


# ------------------------------------------------------------ plan
def make_plan(ctx: Context, domain: Domain, dest: RemoteNode,
              req: MigrateRequest) -> tuple[MigratePlan, list[str]]:
    """The plan, and the read-only layers the destination already holds
    with the same bytes (a template an earlier move put there). Every
    refusal happens here."""
    if dest.host_uuid == _host_uuid(ctx):
        raise errors.BadRequest(f"{req.dest_uri} is this node: nothing to move")
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
        for layer in disk.chain:
            _refuse_kind(disk.target, layer.source_type, layer.path)
        if domain.block_job_info(disk.target) is not None:
            raise errors.Conflict(f"disk {disk.target} has a block job running")
        chains[disk.target] = [_source_image(disk.target, info)
                               for info in read_chain(disk.chain[0].path, disk.chain[0].format)]
    if not chains:
        raise errors.BadRequest(f"domain {domain.name} has no disk with an image chain to move")
    _refuse_missing_secrets(xml, dest)
    disks, layers = plan_layout(chains, req.dest_dir)
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
    from ..core.chain import parse_xml

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
    to be made counts against the nearest one above it)."""
    reused: list[str] = []
    need: dict[str, int] = {}
    free: dict[str, int | None] = {}
    for folder in plan.dest_folders:
        exists, names, room = dest.folder_state(folder)
        above = folder
        while not exists and above != "/":
            above = os.path.dirname(above)
            exists, _, room = dest.folder_state(above)
        free[above] = room
        for move in (m for m in plan.layers if os.path.dirname(m.dest) == folder):
            if os.path.basename(move.dest) not in names:
                need[above] = need.get(above, 0) + move.size
            elif move.active or dest.digest(move.dest) != _local_digest(move):
                raise errors.UnsafeRequest(
                    f"{dest.uri} already has {move.dest} (for {move.source}) with other "
                    "contents: nothing was changed; choose another --dest-dir")
            else:
                reused.append(move.dest)
    for folder, bytes_needed in need.items():
        room = free.get(folder)
        if room is not None and room < bytes_needed:
            raise errors.UnsafeRequest(
                f"{dest.uri}: {folder} has {room} bytes free, the move needs {bytes_needed}: "
                "nothing was changed")
    return reused


def _local_digest(move: LayerMove) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(move.source, "rb") as handle:
        for chunk in file_chunks(handle, _head(move, handle)):
            digest.update(chunk)
    return digest.hexdigest()


def _head(move: LayerMove, handle: object) -> bytes:
    """The first bytes to send instead of the file's own: the header with
    the backing name rewritten, when the destination names it otherwise."""
    if move.active or not move.rewrite or move.backing_name is None:
        return b""  # an active layer is made with its name
    head = handle.read(HEAD_BYTES)  # type: ignore[attr-defined]
    return with_backing_name(head, move.backing_name)


def _checkpoints(domain: Domain) -> list[str]:
    definitions = domain.checkpoint_definitions()
    parents = {name: parent for name, (parent, _) in definitions.items()}
    return [definitions[name][1] for name in checkpoint_order(parents)]


def _host_uuid(ctx: Context) -> str:
    from ..core.chain import parse_xml

    return str(parse_xml(ctx.conn.raw.getCapabilities()).findtext("host/uuid"))


# ------------------------------------------------------------ copy
def copy_layers(ctx: Context, dest: RemoteNode, plan: MigratePlan, record: MigrationRecord,
                store: MigrationStore, reused: list[str]) -> None:
    """Every read-only layer uploaded and proven, then every active layer
    created on its chain; the marker beside them until all are proven."""
    store.advance(record, MovePhase.COPYING)
    dest.make_folders(plan.dest_folders)
    new = [m for m in plan.layers if m.dest not in reused]
    marker_body = json.dumps({"domain": plan.domain, "uuid": plan.uuid, "record": record.id,
                              "source": socket.gethostname(),
                              "files": [m.dest for m in new]}).encode()
    for folder in sorted({os.path.dirname(m.dest) for m in new}):
        marker = os.path.join(folder, marker_name(plan.uuid))
        record.markers.append(marker)
        store.save(record)
        dest.upload(marker, iter([marker_body]), len(marker_body))
    pace = Pace(req_rate(record), ctx.budget)
    sent_so_far = [0, sum(m.size for m in new if not m.active)]  # done, in all
    with contextlib.ExitStack() as scratch:  # the active layers made here
        for move in new:
            entry: dict[str, Any] = {"path": move.dest, "digest": "", "active": move.active}
            record.created.append(entry)  # before it exists: a crash mid-upload leaves it named
            store.save(record)
            source = _empty_active(move, scratch) if move.active else move.source
            with open(source, "rb") as handle:
                chunks = _paced(ctx, file_chunks(handle, _head(move, handle)), pace, sent_so_far)
                sent = dest.upload(move.dest, chunks, os.fstat(handle.fileno()).st_size)
            ctx.budget.check("the copy of the layers")
            if dest.digest(move.dest) != sent:
                raise errors.OperationFailed(f"the copy of {move.source} on {dest.uri} "
                                             f"({move.dest}) does not read back as sent")
            entry["digest"] = sent
            store.save(record)
    for marker in list(record.markers):
        dest.delete(marker)
        record.markers.remove(marker)
    store.advance(record, MovePhase.COPIED)


def _paced(ctx: Context, chunks: Iterator[bytes], pace: Pace,
           counts: list[int]) -> Iterator[bytes]:
    for chunk in chunks:
        pace.take(len(chunk))
        counts[0] += len(chunk)
        _progress(ctx, "upload", counts[0], counts[1])
        yield chunk


def req_rate(record: MigrationRecord) -> int:
    return int(record.request.get("bandwidth_mib_s") or 0)


def _empty_active(move: LayerMove, scratch: contextlib.ExitStack) -> str:
    """A local file holding the new, empty active layer as the destination
    needs it: qcow2 on its backing name there, or a sparse raw image."""
    folder = scratch.enter_context(tempfile.TemporaryDirectory(prefix="vdsm-blockops-"))
    path = os.path.join(folder, "active")
    if move.format == "raw":
        with open(path, "wb") as handle:
            handle.truncate(move.virtual_size)
    else:
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={_cluster(move)}"]
        if move.backing_name:
            argv += ["-u", "-b", move.backing_name, "-F", move.backing_format or "raw"]
        run_command(argv + [path, str(move.virtual_size)])
    return path


def _cluster(move: LayerMove) -> int:
    with open(move.source, "rb") as handle:
        head = handle.read(24)
    if head[:4] != b"QFI\xfb":
        raise NotAnImage(f"{move.source} is not a qcow2 image")
    return 1 << int.from_bytes(head[20:24], "big")


def _progress(ctx: Context, what: str, done: int, total: int) -> None:
    if ctx.observer is not None:
        ctx.observer("all", JobInfo(disk="all", job_type=what, cur=done, end=max(total, 1),
                                    bandwidth_bytes_s=0))


# ------------------------------------------------------------ migrate
def run_migration(ctx: Context, domain: Domain, plan: MigratePlan, record: MigrationRecord,
                  store: MigrationStore, req: MigrateRequest) -> None:
    """migrateToURI3 in a thread, watched from here: progress, and an
    abort of the migration job at the deadline or on Ctrl-C."""
    paths = plan.path_map
    params: dict[str, object] = {
        libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: [d.disk for d in plan.disks],
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: rewrite_sources(domain.migratable_xml(), paths),
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: rewrite_sources(
            domain.migratable_xml(inactive=domain.is_persistent()), paths),
    }
    if req.bandwidth_mib_s:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = req.bandwidth_mib_s
    if req.migrate_uri:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = req.migrate_uri
    store.advance(record, MovePhase.MIGRATING)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            domain.migrate(req.dest_uri, params, MIGRATE_FLAGS)
        except BaseException as exc:  # handed to the waiting thread
            failure.append(exc)

    thread = threading.Thread(target=work, name="migration", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
            ctx.budget.check("the migration")
            with contextlib.suppress(errors.BlockOpsError):
                progress = domain.migration_progress()
                if progress is not None:
                    _progress(ctx, "migration", *progress)
    except (errors.BlockOpsError, KeyboardInterrupt):
        with contextlib.suppress(errors.BlockOpsError):
            domain.abort_migration()
        thread.join()
        raise
    if failure:
        raise failure[0]
    store.advance(record, MovePhase.MOVED)
