"""Who uses a file on the destination of a move, decided there.

The source node cannot see the destination's files, and two source nodes
may move VMs built on one template onto the same destination: so a file
there has owners the destination must name, through its libvirt:

- a domain defined or running there whose chain holds the file (the
  sources its definitions and live XML name, then the backing names in each
  image's header as the destination reads it);
- another move that counts on it: every move leaves a *claim* in each
  destination folder it uses, naming the files it needs there (made or
  found), from before its first byte until it finished or rolled back;
  and a file still being uploaded is named by that upload's *marker*.

A roll-back deletes only files nothing else uses; a move that finds a
layer another move is uploading waits for that upload to be proven, then
reuses it (``ops/migrate.py``): a template crosses the wire once per
destination. What cannot be read (a note, a domain's XML) counts as a use:
a file is kept when in doubt, never deleted.
"""

from __future__ import annotations

import json
import logging
import posixpath
import socket
import time
from collections.abc import Iterator

import libvirt

from ..core import errors
from ..core.chain import parse_domain
from ..core.headers import Qcow2Header, parse_qcow2_header
from ..core.migrate_plan import CLAIM_PREFIX, MARKER_PREFIX, MigratePlan, claim_name
from ..engine.context import Context
from ..engine.migrations import MigrationRecord, MigrationStore
from ..virt.remote import RemoteNode

log = logging.getLogger(__name__)
NOTE_MAX_BYTES = 1 << 20  # a claim or marker names a chain's files: a few KiB
HEADER_BYTES = 64 * 1024  # the header and the backing name QEMU writes after it
CHAIN_DEPTH = 64  # a backing chain longer than this is not followed further
# An upload another move runs whose file has not grown for this long is
# taken as stalled (its command died: recover settles it on its node).
STALL_S = 300.0
POLL_S = 0.5


def note_body(record: MigrationRecord, files: list[str]) -> bytes:
    return json.dumps({"domain": record.domain, "uuid": record.uuid, "record": record.id,
                       "source": socket.gethostname(), "files": files}).encode()


def put_note(dest: RemoteNode, path: str, body: bytes) -> None:
    dest.upload(path, iter([body]), len(body))


# ------------------------------------------------------------ claims
def claim(dest: RemoteNode, plan: MigratePlan, record: MigrationRecord,
          store: MigrationStore) -> None:
    """A claim in every destination folder of the move, naming every file
    it needs there; entered in the record before it is made."""
    for folder in plan.dest_folders:
        path = posixpath.join(folder, claim_name(plan.uuid))
        if path in record.claims:
            continue
        record.claims.append(path)
        store.save(record)
        put_note(dest, path, note_body(record, [m.dest for m in plan.layers
                                                       if posixpath.dirname(m.dest) == folder]))


def drop_claims(dest: RemoteNode, record: MigrationRecord, store: MigrationStore) -> None:
    for path in list(record.claims):
        dest.delete(path)
        record.claims.remove(path)
        store.save(record)


# ------------------------------------------------------------ notes
def _notes(dest: RemoteNode, folder: str,
           uuid: str) -> Iterator[tuple[str, dict[str, object] | None]]:
    """Other moves' claims and markers in ``folder``: (name, body), the
    body None when it cannot be read (it may name any file there)."""
    exists, names, _ = dest.folder_state(folder)
    for name in sorted(names) if exists else []:
        if not name.startswith((CLAIM_PREFIX, MARKER_PREFIX)) or uuid in name:
            continue
        path = posixpath.join(folder, name)
        try:
            body = json.loads(dest.head(path, NOTE_MAX_BYTES))
        except (errors.BlockOpsError, ValueError) as exc:
            log.warning("%s: %s cannot be read (%s): taken to name every file there",
                        dest.uri, path, exc)
            body = None
        if body is not None and not (isinstance(body, dict)
                                     and isinstance(body.get("files"), list)):
            body = None
        yield name, body


def _names(body: dict[str, object] | None, path: str) -> bool:
    files = body.get("files") if body is not None else None
    return not isinstance(files, list) or path in files


def _describe(name: str, body: dict[str, object] | None) -> str:
    if body is None:
        return f"an unreadable note {name}"
    what = "upload" if name.startswith(MARKER_PREFIX) else "move"
    return f"the {what} of {body.get('domain')} from {body.get('source')}"


def uploading(dest: RemoteNode, path: str, uuid: str) -> str | None:
    """Which other move is still uploading ``path`` (None: none is)."""
    for name, body in _notes(dest, posixpath.dirname(path), uuid):
        if name.startswith(MARKER_PREFIX) and _names(body, path):
            return _describe(name, body)
    return None


def await_upload(ctx: Context, dest: RemoteNode, path: str, uuid: str) -> None:
    """Wait while another move uploads ``path``, until it is proven (its
    marker gone) or gone itself; Conflict when that upload stalls."""
    grown, size = time.monotonic(), dest.size(path)
    while (other := uploading(dest, path, uuid)) is not None:
        ctx.budget.check(f"waiting for {other} to finish uploading {path}")
        now = dest.size(path)
        if now != size:
            grown, size = time.monotonic(), now
        elif time.monotonic() - grown > STALL_S:
            raise errors.Conflict(
                f"{path} on {dest.uri} is being uploaded by {other}, which has not written "
                f"for {STALL_S:.0f} s: run 'vdsm-blockops recover' on its node, then move "
                "this VM again")
        time.sleep(POLL_S)


# ------------------------------------------------------------ users
def other_users(dest: RemoteNode, paths: list[str], uuid: str) -> dict[str, list[str]]:
    """For each of ``paths`` on the destination, who else uses it there:
    its domains (but domain ``uuid``) and other moves. OperationFailed when
    the destination cannot say (then nothing may be deleted)."""
    users: dict[str, list[str]] = {posixpath.normpath(p): [] for p in paths}
    try:
        domains = dest.conn.listAllDomains(0)
        for dom in domains:
            if dom.UUIDString() == uuid:
                continue
            try:
                files = _chain_files(dest, dom)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined meanwhile: it uses nothing now
                raise
            for path in files & users.keys():
                users[path].append(f"domain {dom.name()}")
    except libvirt.libvirtError as exc:
        raise errors.OperationFailed(f"{dest.uri}: cannot tell which domains use the files of "
                                     f"the move ({exc}): nothing deleted there") from exc
    for folder in sorted({posixpath.dirname(p) for p in users}):
        for name, body in _notes(dest, folder, uuid):
            for path in (p for p in users if posixpath.dirname(p) == folder):
                if _names(body, path):
                    users[path].append(_describe(name, body))
    return users


def _chain_files(dest: RemoteNode, dom: libvirt.virDomain) -> set[str]:
    """Every file the chains of ``dom`` hold on the destination."""
    xmls = [dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)]
    if dom.isActive():
        xmls.append(dom.XMLDesc(0))
    files: set[str] = set()
    for xml in xmls:
        for disk in parse_domain(xml).disks:
            files.update(posixpath.normpath(p) for p in disk.paths if p.startswith("/"))
            top = disk.chain[0] if disk.chain else None
            if top is not None and top.source_type == "file" and top.path.startswith("/"):
                files.update(_backing_files(dest, posixpath.normpath(top.path)))
    return files


def _backing_files(dest: RemoteNode, path: str) -> list[str]:
    """``path`` and the files its headers name below it, as read there."""
    found = [path]
    while len(found) < CHAIN_DEPTH:
        try:
            header = remote_header(dest, found[-1])
        except errors.BlockOpsError:
            break  # not there (or not readable): nothing below it to find
        if header is None or not header.backing_name:
            break
        below = posixpath.normpath(posixpath.join(posixpath.dirname(found[-1]),
                                                  header.backing_name))
        if below in found:
            break
        found.append(below)
    return found


def remote_header(dest: RemoteNode, path: str) -> Qcow2Header | None:
    """The qcow2 header of ``path`` as the destination reads it (None: not
    a qcow2 image)."""
    head = dest.head(path, HEADER_BYTES)
    return parse_qcow2_header(lambda size, offset: head[offset:offset + size])


def kept_by_others(dest: RemoteNode, paths: list[str], uuid: str) -> dict[str, str]:
    """Of ``paths``, those another user keeps, with who ({} when none)."""
    return {p: ", ".join(who) for p, who in other_users(dest, paths, uuid).items() if who}
