"""The verbs of the command: each builds a request from its arguments,
makes one library call and returns the report (``cli.py`` parses, emits
and maps errors to exit codes)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..core import errors
from ..core.config import load_config, names_a_host
from ..core.reports import Report

if TYPE_CHECKING:
    from ..core.model import Observer
    from ..engine.context import Context
    from ..virt import Connection


def cmd_chain(args: argparse.Namespace, env: Env) -> Report:
    from ..engine.node import describe_chains

    return describe_chains(env.conn.domain(args.domain), args.disk)


def cmd_jobs(args: argparse.Namespace, env: Env) -> Report:
    from ..engine.node import list_jobs
    from ..engine.state import StateDir

    return list_jobs(env.conn, args.domain, StateDir(env.config.state_dir))


def cmd_history(args: argparse.Namespace, env: Env) -> Report:
    from ..core.reports import HistoryReport
    from ..engine.history import read
    from ..engine.state import StateDir

    return HistoryReport(operation="history",
                         entries=list(read(StateDir(env.config.state_dir), args.domain)))


def cmd_merge(args: argparse.Namespace, env: Env) -> Report:
    from ..ops.merge import MergeRequest, merge

    req = MergeRequest(
        domain=args.domain, disk=args.disk, base=args.base, top=args.top,
        strategy=args.strategy, bandwidth_mib_s=args.bandwidth, timeout_s=args.timeout,
        wait=not args.no_wait, dry_run=args.dry_run, keep_relative=args.keep_relative,
        delete_retired=args.delete_retired,
    )
    return merge(env.context(progress=not args.no_wait and not args.dry_run), req)


def cmd_relocate(args: argparse.Namespace, env: Env) -> Report:
    from ..ops.relocate import RelocateRequest, relocate

    req = RelocateRequest(
        domain=args.domain, disk=args.disk, dest=args.dest, mode=args.mode, method=args.method,
        format=args.format, reuse_external=args.reuse_external, sync_writes=args.sync_writes,
        pivot=not args.no_pivot, delete_source=args.delete_source,
        bandwidth_mib_s=args.bandwidth, timeout_s=args.timeout, wait=not args.no_wait,
        dry_run=args.dry_run,
    )
    return relocate(env.context(progress=not args.no_wait and not args.dry_run), req)


def cmd_migrate(args: argparse.Namespace, env: Env) -> Report:
    from ..core.migrate_plan import MigrateRequest
    from ..ops.migrate import migrate

    req = MigrateRequest(domain=args.domain, dest_uri=args.dest_uri, dest_dir=args.dest_dir,
                         migrate_uri=args.migrate_uri, bandwidth_mib_s=args.bandwidth,
                         timeout_s=args.timeout, dry_run=args.dry_run,
                         delete_source=args.delete_source, source_root=args.source_root,
                         proof=args.proof)
    return migrate(env.context(progress=not args.dry_run), req)


def cmd_snapshot(args: argparse.Namespace, env: Env) -> Report:
    from ..ops.snapshot import SnapshotRequest, snapshot

    return snapshot(env.context(), SnapshotRequest(domain=args.domain, disk=args.disk,
                                                   overlay=args.overlay,
                                                   reuse_external=args.reuse_external))


def cmd_abort(args: argparse.Namespace, env: Env) -> Report:
    from ..ops.control import abort

    return abort(env.context(), args.domain, args.disk, args.pivot)


def cmd_speed(args: argparse.Namespace, env: Env) -> Report:
    from ..ops.control import speed

    return speed(env.context(), args.domain, args.disk, args.bandwidth)


def cmd_recover(args: argparse.Namespace, env: Env) -> Report:
    from ..ops.recover import recover, recover_queued

    if args.queued:
        return recover_queued(env.context(), timeout_s=args.timeout)
    return recover(env.context(), args.domain, timeout_s=args.timeout)


def cmd_hook(args: argparse.Namespace, env: Env) -> Report:
    from . import hookctl

    hooks_dir = args.hooks_dir or hookctl.HOOKS_DIR
    if args.action in ("disable", "enable"):
        return hookctl.set_guard(env.config.state_dir, args.action == "disable", args.reason)
    if args.action == "install":
        return hookctl.install(hooks_dir, config_path=args.config, reload=args.reload)
    return hookctl.uninstall(hooks_dir, reload=args.reload)


def cmd_units(args: argparse.Namespace, env: Env) -> Report:
    from . import units

    unit_dir = args.unit_dir or units.UNIT_DIR
    if args.action == "install":
        return units.install(env.config, args.config, unit_dir, enable=args.enable)
    return units.uninstall(unit_dir, disable=args.enable)


def cmd_verify(args: argparse.Namespace, env: Env) -> Report:
    from ..engine.verification import verify

    return verify(env.conn.domain(args.domain), args.disk, env.context().state,
                  checkpoints=args.checkpoints)


def disk_names(env: Env, domain: str | None) -> list[str]:
    """The disks of ``domain`` and 'all' (for completion); none when it
    is not one."""
    if not domain or domain == "-":
        return []
    try:
        return [d.target for d in env.conn.domain(domain).spec().disks] + ["all"]
    except errors.BlockOpsError:
        return []


class Env:
    """What a verb needs, opened lazily (hook/help need no libvirt)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = load_config(args.config)
        self._conn: Connection | None = None
        self._progress: Observer | None = None
        self.json = bool(args.json)

    @property
    def uri(self) -> str:
        return str(self.args.connect or self.config.connect)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            from ..virt import open_connection

            self._conn = open_connection(self.uri)
        return self._conn

    def require_this_node(self) -> None:
        """A URI naming a host must reach this very node (host UUID)."""
        if names_a_host(self.uri):  # else the local daemon: no connection needed to know
            from ..virt.connection import require_this_node

            require_this_node(self.conn)

    def context(self, progress: bool = False) -> Context:
        from ..engine.context import Context
        from ..engine.progress import make_progress

        self._progress = make_progress(progress and not self.json and not self.args.quiet)
        return Context(conn=self.conn, config=self.config, observer=self._progress,
                       allow_vdsm_managed=bool(getattr(self.args, "allow_vdsm_managed", False)))

    def close(self) -> None:
        close = getattr(self._progress, "close", None)
        if close is not None:
            close()
        if self._conn is not None:
            self._conn.close()
