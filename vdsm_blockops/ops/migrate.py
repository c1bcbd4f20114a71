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
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import libvirt

from ..core import errors
from ..core.identity import fingerprint, same_images
from ..core.migrate_plan import (
    LayerMove,
    MigratePlan,
    MigrateReport,
    MigrateRequest,
    marker_name,
    rewrite_sources,
)
from ..core.model import JobInfo
from ..engine.context import (
    Context,
    as_failure,
    check_bandwidth,
    check_timeout,
    refuse_vdsm_managed,
    running_domain,
)
from ..engine.copying import Pace
from ..engine.migrations import MigrationRecord, MigrationStore, MovePhase
from ..virt.remote import RemoteNode
from ..virt.streams import Chunk
from . import dest_files, moved
from .move_plan import checkpoint_xmls, empty_active, layer_chunks, local_digest, make_plan
from .moved import MOVE_LOCK
from .proofs import KINDS, Proofs

if TYPE_CHECKING:
    from ..virt import Domain

log = logging.getLogger(__name__)

MIGRATE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                 | libvirt.VIR_MIGRATE_NON_SHARED_INC | libvirt.VIR_MIGRATE_PERSIST_DEST)


def migrate(ctx: Context, req: MigrateRequest) -> MigrateReport:
    check_bandwidth(req.bandwidth_mib_s)
    check_timeout(req.timeout_s)
    if req.proof not in KINDS:
        raise errors.BadRequest(f"unknown proof {req.proof!r} (choose from {', '.join(KINDS)})")
    ctx = ctx.timed(req.timeout_s)
    started = ctx.clock()
    domain = running_domain(ctx, req.domain)
    refuse_vdsm_managed(ctx, domain)
    store = MigrationStore(ctx.state)
    if (unfinished := store.load(domain.uuid)) is not None:
        raise errors.Conflict(f"{domain.name} has an unfinished {unfinished.describe()}: "
                              f"run 'vdsm-blockops recover {domain.name}'")
    dest = RemoteNode(req.dest_uri)
    try:
        plan, reused = make_plan(ctx, domain, dest, req)
        log.info("%s: planned in %.2f s", domain.name, ctx.clock() - started)
        if req.dry_run:
            return moved.report(plan, req, dest, dry_run=True, reused=reused)
        with contextlib.ExitStack() as locks:
            locks.enter_context(ctx.state.disk_lock(domain.uuid, MOVE_LOCK,
                                                    f"migrate of {domain.name}"))
            for move in plan.disks:
                locks.enter_context(ctx.state.disk_lock(domain.uuid, move.disk,
                                                        f"migrate of {domain.name}"))
            _plan_still_holds(domain, plan)
            record = MigrationRecord(domain=domain.name, uuid=domain.uuid, dest_uri=req.dest_uri,
                                     request=vars(req), plan=plan.to_json(),
                                     checkpoints=checkpoint_xmls(domain))
            store.save(record)
            try:
                copy_layers(ctx, dest, plan, record, store, reused)
                run_migration(ctx, domain, plan, record, store, req)
                finishing = ctx.clock()
                report = moved.finish(ctx, dest, record, store)
                log.info("%s: verified and settled in %.2f s", domain.name,
                         ctx.clock() - finishing)
            except (errors.BlockOpsError, OSError) as exc:
                failure = as_failure(exc)
                settled, outcome = moved.after_failure(ctx, domain, dest, record, store)
                raise failure.with_message(f"{failure}; {outcome}", record=record.id,
                                           settled=settled) from exc
            except KeyboardInterrupt:
                settled, outcome = moved.after_failure(ctx, domain, dest, record, store)
                from ..engine.aborts import find

                note = find(ctx.state, record.id)
                if note is not None:
                    raise errors.Aborted(f"the move of {domain.name} was stopped by "
                                         f"'vdsm-blockops abort' (pid {note.get('by_pid')}) "
                                         f"from another process: {outcome}", record=record.id,
                                         settled=settled) from None
                raise errors.Interrupted(f"the move of {domain.name} was interrupted: "
                                         f"{outcome}", record=record.id,
                                         settled=settled) from None
    finally:
        dest.close()
    report.duration_s = round(ctx.clock() - started, 3)
    return report


def _plan_still_holds(domain: Domain, plan: MigratePlan) -> None:
    """Under the locks: every chain is still the planned one, by identity.
    A merge or snapshot that ended while the plan was made would have made
    a planned read-only layer active (written to while uploaded)."""
    live = {d.target: d.paths for d in domain.spec().disks}
    for move in plan.disks:
        if not same_images(live.get(move.disk, []), move.chain_before):
            raise errors.Conflict(f"the chain of {move.disk} changed while the move was planned "
                                  f"(now {live.get(move.disk)}): nothing was changed; run the "
                                  "command again")


# ------------------------------------------------------------ copy
def copy_layers(ctx: Context, dest: RemoteNode, plan: MigratePlan, record: MigrationRecord,
                store: MigrationStore, reused: list[str]) -> None:
    """Every read-only layer uploaded and proven -- or found there already
    with our bytes (a template: another move's upload of it awaited, never
    written beside) -- then every active layer created on its chain. The
    move's claims stand in every destination folder from before its first
    byte (``ops/dest_files.py``), a marker beside each file until proven."""
    store.advance(record, MovePhase.COPYING)
    dest.make_folders(plan.dest_folders)
    dest_files.claim(dest, plan, record, store)
    record.reused = list(reused)
    store.save(record)
    new = [m for m in plan.layers if m.dest not in reused]
    pace = Pace(req_rate(record), ctx.budget)
    counts = [0, sum(m.size for m in new if not m.active)]  # bytes sent, in all
    # One at a time: two uploads side by side moved no more bytes per
    # second than one (measured here: 2 x 600 MiB in 4.2 s, one after the
    # other in 4.2 s too).
    proofs = Proofs(ctx, dest, str(record.request.get("proof") or "full"), record, store)
    try:
        with contextlib.ExitStack() as scratch:  # the active layers made here
            for move in new:
                while True:
                    if not move.active and _found_there(ctx, dest, move, plan.uuid):
                        with proofs.lock:
                            record.reused.append(move.dest)
                            store.save(record)
                        break
                    try:
                        _upload(ctx, dest, move, record, store, (pace, counts), scratch, proofs)
                        break
                    except FileExistsError as exc:  # another move made it since we looked
                        if move.active:
                            raise errors.OperationFailed(
                                f"{exc}: made by another meanwhile") from None
        proofs.wait()
    finally:
        proofs.close()
    record.copied_at = time.time()
    store.advance(record, MovePhase.COPIED)


def _found_there(ctx: Context, dest: RemoteNode, move: LayerMove, uuid: str) -> bool:
    """Whether the destination holds ``move``'s layer with our bytes (after
    any upload of it by another move ended); OperationFailed when it holds
    other bytes under that name."""
    if dest.size(move.dest) is None:
        return False
    dest_files.await_upload(ctx, dest, move.dest, uuid)
    if dest.size(move.dest) is None:
        return False  # that upload was rolled back: ours to make
    if dest.digest(move.dest, lambda: ctx.budget.check("the proof of the copies")) \
            != local_digest(move):
        raise errors.OperationFailed(f"{dest.uri} has {move.dest} (for {move.source}) with other "
                                     "contents, made while this move was planned: choose "
                                     "another --dest-dir")
    log.info("%s: on %s already with our bytes: reused", move.dest, dest.uri)
    return True


def _upload(ctx: Context, dest: RemoteNode, move: LayerMove, record: MigrationRecord,
            store: MigrationStore, pacing: tuple[Pace, list[int]],
            scratch: contextlib.ExitStack, proofs: Proofs) -> None:
    """One layer made there: marker, upload, then its proof handed to
    ``proofs`` (which removes the marker). FileExistsError (nothing of ours
    left) when the file is already there."""
    marker = os.path.join(os.path.dirname(move.dest), marker_name(record.uuid, move.dest))
    entry: dict[str, Any] = {"path": move.dest, "digest": "", "active": move.active}
    with proofs.lock:  # the proof of the layer before may be entering it
        record.markers.append(marker)
        record.created.append(entry)  # before it exists: a crash mid-upload leaves it named
        store.save(record)
    try:
        dest_files.put_note(dest, marker, dest_files.note_body(record, [move.dest]))
        source = empty_active(move, scratch) if move.active else move.source
        started = time.monotonic()
        with open(source, "rb") as handle:
            before = fingerprint(source)
            chunks = _paced(ctx, layer_chunks(move, handle), *pacing)
            sent = dest.upload(move.dest, chunks, os.fstat(handle.fileno()).st_size)
    except FileExistsError:
        dest.delete(marker)
        with proofs.lock:
            record.created.remove(entry)
            record.markers.remove(marker)
            store.save(record)
        raise
    if fingerprint(source) != before:
        # what was sent may mix two versions: a proof would only show that
        # they arrived
        raise errors.OperationFailed(f"{move.source} changed while it was uploaded (a "
                                     "checkpoint deleted, a merge?): the copy is not proven")
    ctx.budget.check("the copy of the layers")
    proofs.add(move, entry, marker, sent, time.monotonic() - started)


def _paced(ctx: Context, chunks: Iterator[Chunk], pace: Pace,
           counts: list[int]) -> Iterator[Chunk]:
    """``chunks`` at the pace asked for (a hole sends no data: free)."""
    for chunk in chunks:
        if isinstance(chunk, int):
            counts[0] += chunk
        else:
            pace.take(len(chunk))
            counts[0] += len(chunk)
        _progress(ctx, "upload", counts[0], counts[1])
        yield chunk


def req_rate(record: MigrationRecord) -> int:
    return int(record.request.get("bandwidth_mib_s") or 0)


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
    started = time.monotonic()
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)  # the command returns as soon as the VM runs there
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
        raise _with_hint(failure[0], req)
    log.info("%s migrated to %s in %.2f s", domain.name, req.dest_uri, time.monotonic() - started)
    store.advance(record, MovePhase.MOVED)


def _with_hint(failure: BaseException, req: MigrateRequest) -> BaseException:
    """libvirt migrates to the address the destination names itself by; a
    name this node cannot resolve fails the migration late -- say how to
    pass the address instead."""
    if req.migrate_uri or "address resolution failed" not in str(failure) or \
            not isinstance(failure, errors.BlockOpsError):
        return failure
    return failure.with_message(
        f"{failure}: this node cannot resolve the destination's own name; pass its address "
        "with --migrate-uri tcp://ADDRESS (Ansible: migrate_uri)")


def unfinished(ctx: Context, domain: str) -> str | None:
    """What settling would do, without doing it (check mode): the
    unfinished move of ``domain`` (name or uuid) and its phase, or None."""
    records = MigrationStore(ctx.state).all(domain)
    if not records:
        return None
    return (f"the unfinished {records[0].describe()} would be settled first: finished if the "
            "VM runs there, else rolled back")


def settle_unfinished(ctx: Context, req: MigrateRequest) -> str | None:
    """What a run again finds (Ansible): an unfinished move of the domain
    settled first -- None when the move is still to be made here, else
    what happened ("finished: ..." or "not running here: ...")."""
    outcomes = moved.recover_moves(ctx, req.domain, req.timeout_s)
    failed = [o for o in outcomes if not o.settled]
    if failed:
        raise errors.OperationFailed(f"the unfinished move of {req.domain} cannot be settled: "
                                     f"{failed[0].message}")
    source = moved.source_domain(ctx, req.domain)
    if source is not None and source.is_active():
        return None
    if any(o.result == "finished" for o in outcomes):
        return f"finished: the interrupted move of {req.domain} to {req.dest_uri} completed"
    dest = RemoteNode(req.dest_uri)
    try:
        there = dest.domain_by_name(req.domain)
    finally:
        dest.close()
    if there is not None and there.isActive():
        return f"not running here: {req.domain} runs on {dest.hostname} already"
    return None  # not running anywhere we know: migrate() says why
