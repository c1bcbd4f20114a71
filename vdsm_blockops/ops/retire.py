"""What becomes of a moved domain's source layers: retired (entered as
invalid, so the hook refuses a VM on them) once the move is verified on the
destination, and with ``--delete-source`` deleted -- but only once the
destination's copies can no longer be lost to a crash there.

libvirt's volume upload writes through the destination's page cache and
offers no fsync (nor any other way to make a volume durable), and the
read-back that proves a copy may be served from that cache. The kernel
there writes dirty pages to disk once they are older than its
``vm.dirty_expire_centisecs`` (30 s by default), at its next flusher run
(``dirty_writeback_centisecs``, 5 s). So the deletion waits
``dest_writeback_s`` (config, 60 s by default) after the last copy was
proven, then deletes only if the destination did not restart meanwhile:
the domain there still runs as the same QEMU process (same domain id, its
CPU time not gone back). A crash of the destination in that window keeps
the source layers (retired, not deleted) and says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import libvirt

from ..core.migrate_plan import MigratePlan
from ..core.reports import Retired
from ..engine.context import Context
from ..engine.migrations import MigrationRecord, MigrationStore, MovePhase
from ..engine.storage import unlink_images
from ..engine.users import chain_users

log = logging.getLogger(__name__)


def retire_source(ctx: Context, plan: MigratePlan) -> list[Retired]:
    """The source layers no other chain on this node uses are entered as
    invalid (the hook refuses a VM on them); those another chain uses (a
    shared template) stay valid."""
    paths = list(dict.fromkeys(p for move in plan.disks for p in move.chain_before))
    users = chain_users(ctx.conn, paths, exclude=(plan.uuid, ""), cache_dir=ctx.state.path)
    unused = [p for p in paths if not users.get(p)]
    ctx.state.invalidate(unused, domain=plan.domain, disk="all", operation="migrate")
    return [Retired(path=p, valid=p not in unused) for p in paths]


def delete_when_durable(ctx: Context, remote: Callable[[], libvirt.virDomain | None],
                        record: MigrationRecord, store: MigrationStore,
                        paths: list[str]) -> tuple[list[str] | None, list[dict[str, str]], bool]:
    """Delete ``paths`` (retired source layers) once the destination's
    copies are on its disk: (deleted, kept with why, whether the record must
    stay -- the wait did not fit in the operation's timeout). ``remote``
    looks the domain up there afresh (a handle keeps the id it was found
    with)."""
    if record.phase is not MovePhase.DELETING:
        record.delete_after = (record.copied_at or time.time()) + ctx.config.dest_writeback_s
        record.dest_run = _run_of(remote())
        store.advance(record, MovePhase.DELETING)
    wait = record.delete_after - time.time()
    left = ctx.budget.left("the move") if wait > 0 else None
    if left is not None and left < wait:
        why = (f"deleted only once the destination has written its copies to disk "
               f"({wait:.0f} s from now, past this command's timeout): run "
               f"'vdsm-blockops recover {record.domain}' then")
        return None, [{"path": p, "why": why} for p in paths], True
    if wait > 0:
        log.info("%s: waiting %.0f s for the destination's copies to reach its disk before "
                 "deleting the source layers", record.domain, wait)
        ctx.budget.sleep(wait, doing="the wait for the destination's writeback")
    now, then = _run_of(remote()), record.dest_run
    if not (now and then and now[0] == then[0] and now[1] >= then[1]):
        why = ("kept: the domain on the destination did not run on as the same process through "
               f"the {ctx.config.dest_writeback_s:g} s its copies needed to reach its disk (a "
               "restart or crash there?); check its copies, then delete these by hand")
        log.warning("%s: source layers %s", record.domain, why)
        return None, [{"path": p, "why": why} for p in paths], False
    # Found unused when they were retired; the wait (or a recover days
    # later) leaves room for a domain defined here on one since: asked again.
    users = chain_users(ctx.conn, paths, exclude=(record.uuid, ""), cache_dir=ctx.state.path)
    used = [{"path": p, "why": f"kept: used since by {', '.join(users[p])}"}
            for p in paths if users.get(p)]
    deleted, kept = unlink_images(ctx, [p for p in paths if not users.get(p)])
    return deleted, used + kept, False


def _run_of(remote: libvirt.virDomain | None) -> list[int]:
    """[domain id, CPU time] of the domain running on the destination, []
    when it does not run (or cannot be asked)."""
    try:
        if remote is None or not remote.isActive():
            return []
        return [int(remote.ID()), int(remote.info()[4])]
    except libvirt.libvirtError:
        return []
