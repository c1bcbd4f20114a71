"""Settle a move to another node -- after it succeeded, after it failed,
and in ``recover`` -- from where the domain is now, never from the
record's phase alone:

- it runs on the destination (or is defined there and runs nowhere):
  finish -- checkpoints redefined there, chains verified there (live XML,
  persistent definition, each image's header read through the destination),
  then the source definition dropped and the source layers retired
  (deleted only with --delete-source);
- it runs here (or nowhere, and the destination never defined it): roll
  back -- every file the move created there removed while it is still ours;
- the migration job still runs: wait for it (recover's --timeout).

Never two running copies: the source definition goes only once the
destination verified, and the hook refuses to start the domain here while
the record exists.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import TYPE_CHECKING

import libvirt

from ..core import errors
from ..core.chain import parse_domain
from ..core.headers import resolve_backing
from ..core.identity import clean_path, same_images
from ..core.migrate_plan import MigratePlan, MigrateReport, MigrateRequest
from ..core.reports import Retired
from ..core.settled import RecordOutcome
from ..engine.context import Context
from ..engine.migrations import MigrationRecord, MigrationStore, MovePhase
from ..virt.remote import RemoteNode
from . import dest_files
from .dest_files import remote_header
from .retire import delete_when_durable, retire_source

if TYPE_CHECKING:
    from ..virt import Domain

log = logging.getLogger(__name__)
MOVE_LOCK = "move"  # the lock (beside the disks') of a domain being moved


class Where(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"
    MOVING = "moving"


def where(ctx: Context, record: MigrationRecord, dest: RemoteNode) -> Where:
    source = source_domain(ctx, record.uuid)
    here = source is not None and source.is_active()
    if here and source is not None and source.migration_progress() is not None:
        return Where.MOVING
    remote = dest.domain(record.uuid)
    if remote is not None and remote.isActive():
        state, reason = remote.state()
        if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION:
            return Where.MOVING  # an incoming migration the destination has not ended yet
        if here:
            raise errors.VerificationFailed(
                f"{record.domain} runs on this node and on {record.dest_uri}: stop one of them")
        return Where.DESTINATION
    if here:
        return Where.SOURCE
    # Running nowhere (the guest stopped): the destination's definition
    # exists only once the migration completed.
    return Where.DESTINATION if remote is not None and remote.isPersistent() else Where.SOURCE


def settle(ctx: Context, dest: RemoteNode, record: MigrationRecord, store: MigrationStore,
           wait_s: float | None = 0) -> tuple[str, MigrateReport | None]:
    """("finished", report) or ("rolled-back", None); JobTimeout while the
    migration job still runs after ``wait_s`` (None: as long as it runs)."""
    if record.phase is MovePhase.DELETING:  # finished but for --delete-source
        return "finished", finish(ctx, dest, record, store)
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while (now := where(ctx, record, dest)) is Where.MOVING:
        if deadline is not None and time.monotonic() >= deadline:
            raise errors.JobTimeout(f"the migration of {record.domain} to {record.dest_uri} "
                                    "still runs")
        time.sleep(0.5)
    if now is Where.DESTINATION:
        return "finished", finish(ctx, dest, record, store)
    if record.phase is MovePhase.MOVED:
        # Past the switchover the guest wrote to the destination's copies:
        # a roll-back would delete them and let the source's stale chain
        # start. Only ever finished -- once the VM is back there.
        raise errors.VerificationFailed(
            f"the move of {record.domain} to {record.dest_uri} had switched over (phase "
            f"moved), so it is never rolled back, yet {record.domain} is not on the "
            "destination now: define or start it there, then run 'vdsm-blockops recover' "
            "again to finish the move")
    roll_back(ctx, dest, record, store)
    return "rolled-back", None


def after_failure(ctx: Context, domain: Domain, dest: RemoteNode, record: MigrationRecord,
                  store: MigrationStore) -> tuple[str | None, str]:
    """Settle right away what a failed move left; what cannot be (the
    destination unreachable, a chain that does not check out) stays
    recorded for recover. What became of it ("finished", "rolled-back" or
    None: left for recover), and in words for the error message."""
    try:
        done = settle(ctx, dest, record, store, wait_s=30)[0]
    except (errors.BlockOpsError, OSError) as why:
        log.warning("the move of %s to %s is left for recover: %s", domain.name,
                    record.dest_uri, why)
        return None, f"the move is left for 'vdsm-blockops recover {domain.name}' ({why})"
    if done == "finished":
        return "finished", f"yet the move completed: {domain.name} runs on {dest.hostname}"
    return "rolled-back", f"the move was rolled back: {domain.name} runs on this node"


def source_domain(ctx: Context, uuid: str) -> Domain | None:
    try:
        return ctx.conn.domain(uuid)
    except errors.UnknownDomain:
        return None


# ------------------------------------------------------------ roll back
def roll_back(ctx: Context, dest: RemoteNode, record: MigrationRecord,
              store: MigrationStore) -> None:
    """Remove what the move created on the destination, newest first,
    each only while it is still the file we wrote: a finished copy by its
    digest, an active layer by the backing name we gave it; a file whose
    upload never finished is ours by the record alone."""
    store.advance(record, MovePhase.ROLLING_BACK)
    plan = MigratePlan.from_json(record.plan)
    names = {m.dest: m.backing_name for m in plan.layers}
    # A file another domain or move there uses (a template a later move
    # reused) stays, whoever made it: asked on the destination.
    others = dest_files.kept_by_others(dest, [e["path"] for e in record.created], record.uuid)
    for entry in reversed(record.created):
        path = entry["path"]
        if dest.size(path) is None:
            continue
        if path in others:
            log.warning("%s on %s: kept, %s uses it", path, dest.uri, others[path])
            continue
        if entry["digest"] and not entry.get("active"):
            ours = dest.digest(path) == entry["digest"]
        elif entry.get("active"):
            header = remote_header(dest, path)
            ours = header is not None and header.backing_name == names.get(path)
        else:
            ours = True  # its upload was cut: nothing else could have made it since
        if ours:
            dest.delete(path)
        else:
            log.warning("%s on %s changed since the move made it: kept", path, dest.uri)
    for marker in record.markers:
        dest.delete(marker)
    dest_files.drop_claims(dest, record, store)
    dest.release(plan.dest_folders)
    dest.remove_empty(plan.new_folders)
    source = source_domain(ctx, record.uuid)
    if source is not None and source.is_active():
        live = {d.target: d.paths for d in source.spec().disks}
        for move in plan.disks:
            if not same_images(live.get(move.disk, []), move.chain_before):
                # A snapshot or merge since (the move was left for recover):
                # the roll-back removed only what the move made; the VM
                # runs here on its own, newer chain. Not a reason to keep a
                # record every later recover would fail on.
                log.warning("%s %s: rolled back; its chain changed since the move was "
                            "planned (now %s)", record.domain, move.disk, live.get(move.disk))
    store.drop(record)


# ------------------------------------------------------------ finish
def finish(ctx: Context, dest: RemoteNode, record: MigrationRecord,
           store: MigrationStore) -> MigrateReport:
    """Checkpoints redefined and the move verified there, the source
    definition dropped and its layers retired -- and, with --delete-source,
    deleted once the destination's copies are on its disk (``retire.py``)."""
    plan = MigratePlan.from_json(record.plan)
    req = MigrateRequest(**record.request)
    remote = dest.domain(record.uuid)
    if record.phase is not MovePhase.DELETING:  # else all but the deletion was done
        if remote is None:
            raise errors.VerificationFailed(f"{record.domain} is not on {dest.uri}")
        _redefine_checkpoints(remote, record.checkpoints)
        problems = verify_on_destination(dest, remote, plan)
        if problems:
            raise errors.VerificationFailed(
                f"the move of {record.domain} does not check out on {dest.uri}: "
                + "; ".join(problems), problems=problems)
        source = source_domain(ctx, record.uuid)
        if source is not None:
            source.undefine_moved()
    retired = retire_source(ctx, plan)
    dest_files.drop_claims(dest, record, store)  # its domain there holds them now
    dest.release(plan.dest_folders)
    deleted, kept = None, None
    if req.delete_source:
        deleted, kept, stay = delete_when_durable(ctx, lambda: dest.domain(record.uuid),
                                                  record, store,
                                                  [r.path for r in retired if not r.valid])
        if stay:  # the record stays: recover deletes them
            return report(plan, req, dest, dry_run=False, reused=record.reused,
                          retired=retired, kept=kept, record=record)
    store.drop(record)
    return report(plan, req, dest, dry_run=False, reused=record.reused, retired=retired,
                  deleted=deleted, kept=kept or None, record=record)


def _redefine_checkpoints(remote: libvirt.virDomain, checkpoints: list[str]) -> None:
    """The checkpoints' metadata on the destination (parents first); their
    bitmaps came with the images (read-only layers) and the migration
    (the active layer)."""
    have = {str(c.getName()) for c in remote.listAllCheckpoints(0)}
    for xml in checkpoints:
        name = parse_domain_checkpoint_name(xml)
        if name not in have:
            try:
                remote.checkpointCreateXML(xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
            except libvirt.libvirtError as exc:
                raise errors.VerificationFailed(
                    f"checkpoint {name} cannot be redefined on the destination: {exc}") from exc


def parse_domain_checkpoint_name(xml: str) -> str:
    from ..core.chain import parse_xml

    return str(parse_xml(xml).findtext("name"))


def verify_on_destination(dest: RemoteNode, remote: libvirt.virDomain,
                          plan: MigratePlan) -> list[str]:
    """The chains as planned in the destination's live XML (when it runs)
    and persistent definition, and in each image's header as the
    destination reads it."""
    problems = []
    views = [("definition", remote.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))]
    if remote.isActive():
        views.append(("live XML", remote.XMLDesc(0)))
    if not remote.isPersistent():
        problems.append("the destination has no persistent definition")
    for what, xml in views:
        disks = {d.target: d for d in parse_domain(xml).disks}
        for move in plan.disks:
            disk = disks.get(move.disk)
            paths = [clean_path(p) for p in disk.paths] if disk is not None else []
            expected = move.chain_after if what == "live XML" else move.chain_after[:1]
            if paths[:len(expected)] != expected:
                problems.append(f"{move.disk}: the {what} names {paths}, not {expected}")
    formats = {m.dest: m.format for m in plan.layers}
    for move in plan.disks:
        for pos, path in enumerate(move.chain_after):
            if formats.get(path) != "qcow2":
                continue
            header = remote_header(dest, path)
            below = move.chain_after[pos + 1] if pos + 1 < len(move.chain_after) else None
            found = resolve_backing(path, header.backing_name) \
                if header is not None and header.backing_name else None
            if header is None or found != below:
                problems.append(f"{path} on the destination names {found} as its backing "
                                f"file, not {below}")
    have = {str(c.getName()) for c in remote.listAllCheckpoints(0)}
    missing = [name for name in plan.checkpoints if name not in have]
    if missing:
        problems.append(f"checkpoints {missing} are missing on the destination")
    return problems


# ------------------------------------------------------------ report
def report(plan: MigratePlan, req: MigrateRequest, dest: RemoteNode, *, dry_run: bool,
           reused: list[str], retired: list[Retired] | None = None,
           deleted: list[str] | None = None, kept: list[dict[str, str]] | None = None,
           record: MigrationRecord | None = None) -> MigrateReport:
    made = {e["path"]: e for e in record.created} if record is not None else {}
    # "proof": how the copy was proven (full, sample; earlier versions: full)
    copied = [{"source": m.source, "dest": m.dest, "bytes": m.size,
               "sha256": made.get(m.dest, {}).get("digest") or None, "reused": m.dest in reused,
               "proof": made[m.dest].get("proof", "full") if made.get(m.dest, {}).get("digest")
               else None}
              for m in plan.uploads]
    return MigrateReport(
        domain=plan.domain, dest_uri=plan.dest_uri, dest_host=dest.hostname,
        dest_dir=plan.dest_dir, dry_run=dry_run, changed=not dry_run,
        chain_before={d.disk: d.chain_before for d in plan.disks},
        chain_after={d.disk: d.chain_after for d in plan.disks},
        copied=copied, bytes_to_copy=sum(m.size for m in plan.uploads if m.dest not in reused),
        checkpoints=plan.checkpoints, retired=retired or [], verified=not dry_run,
        finished=not dry_run, deleted=deleted, kept=kept, record=record.id if record else None)


def recover_moves(ctx: Context, name: str | None, timeout_s: float | None) -> list[RecordOutcome]:
    """Settle every unfinished move (of domain ``name``, by name or uuid)."""
    outcomes = []
    store = MigrationStore(ctx.state)
    for record in store.all(name):
        outcome = RecordOutcome(domain=record.domain, disk="all", record=record.id,
                                operation="migrate", phase=record.phase.value, result="")
        if record.unreadable:
            outcome.phase, outcome.result = "?", "unreadable"
            outcome.message = f"{record.describe()}: kept as it is"
            outcomes.append(outcome)
            continue
        try:
            with ctx.state.disk_lock(record.uuid, MOVE_LOCK, f"recover of {record.domain}"):
                dest = RemoteNode(record.dest_uri)
                try:
                    outcome.result = settle(ctx, dest, record, store, wait_s=timeout_s)[0]
                finally:
                    dest.close()
        except errors.Conflict as exc:
            outcome.result, outcome.message = "busy", str(exc)
        except errors.JobTimeout as exc:
            outcome.result, outcome.message = "waiting", str(exc)
        except (errors.BlockOpsError, OSError) as exc:
            outcome.result, outcome.message = "failed", str(exc)
        outcomes.append(outcome)
    return outcomes
