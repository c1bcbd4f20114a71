"""The verbs of the command: each builds a request from its arguments,
makes one library call and returns the report (``cli.py`` parses, emits
and maps errors to exit codes)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..api import Node, Progress, Report


def cmd_chain(args: argparse.Namespace, env: Env) -> Report:
    return env.node.chain(args.domain, args.disk)


def cmd_jobs(args: argparse.Namespace, env: Env) -> Report:
    return env.node.jobs(args.domain)


def cmd_history(args: argparse.Namespace, env: Env) -> Report:
    return env.node.history(args.domain)


def cmd_merge(args: argparse.Namespace, env: Env) -> Report:
    return env.node.merge(
        args.domain, args.disk, base=args.base, top=args.top, strategy=args.strategy,
        bandwidth=args.bandwidth, timeout=args.timeout, wait=not args.no_wait,
        dry_run=args.dry_run, keep_relative=args.keep_relative,
        delete_retired=args.delete_retired,
        progress=env.progress(not args.no_wait and not args.dry_run))


def cmd_relocate(args: argparse.Namespace, env: Env) -> Report:
    return env.node.relocate(
        args.domain, args.disk, args.dest, mode=args.mode, method=args.method,
        format=args.format, reuse_external=args.reuse_external, sync_writes=args.sync_writes,
        pivot=not args.no_pivot, delete_source=args.delete_source, bandwidth=args.bandwidth,
        timeout=args.timeout, wait=not args.no_wait, dry_run=args.dry_run,
        progress=env.progress(not args.no_wait and not args.dry_run))


def cmd_migrate(args: argparse.Namespace, env: Env) -> Report:
    return env.node.migrate(
        args.domain, args.dest_uri, dest_dir=args.dest_dir, migrate_uri=args.migrate_uri,
        bandwidth=args.bandwidth, timeout=args.timeout, dry_run=args.dry_run,
        delete_source=args.delete_source, source_root=args.source_root, proof=args.proof,
        progress=env.progress(not args.dry_run))


def cmd_snapshot(args: argparse.Namespace, env: Env) -> Report:
    return env.node.snapshot(args.domain, args.disk, args.overlay,
                             reuse_external=args.reuse_external)


def cmd_abort(args: argparse.Namespace, env: Env) -> Report:
    return env.node.abort(args.domain, args.disk, pivot=args.pivot)


def cmd_speed(args: argparse.Namespace, env: Env) -> Report:
    return env.node.speed(args.domain, args.disk, args.bandwidth)


def cmd_recover(args: argparse.Namespace, env: Env) -> Report:
    return env.node.recover(None if args.queued else args.domain, queued=args.queued,
                            timeout=args.timeout)


def cmd_hook(args: argparse.Namespace, env: Env) -> Report:
    from .. import api

    if args.action == "disable":
        return api.disable_guard(args.reason, config=args.config, source="cli")
    if args.action == "enable":
        return api.enable_guard(config=args.config, source="cli")
    if args.action == "install":
        return api.install_hook(args.hooks_dir, config=args.config, reload=args.reload)
    return api.uninstall_hook(args.hooks_dir, reload=args.reload)


def cmd_units(args: argparse.Namespace, env: Env) -> Report:
    from .. import api

    if args.action == "install":
        return api.install_units(args.unit_dir, config=args.config, enable=args.enable)
    return api.uninstall_units(args.unit_dir, disable=args.enable)


def cmd_verify(args: argparse.Namespace, env: Env) -> Report:
    return env.node.verify(args.domain, args.disk, checkpoints=args.checkpoints)


def disk_names(env: Env, domain: str | None) -> list[str]:
    """The disks of ``domain`` and 'all' (for completion); none when it
    is not one."""
    if not domain or domain == "-":
        return []
    from ..api import BlockOpsError

    try:
        return [*env.node.chains(domain), "all"]
    except BlockOpsError:
        return []


class Env:
    """What a verb needs: the node, opened lazily (hook/help need no libvirt)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._interrupt_name = "Ctrl-C"
        self._node: Node | None = None
        self._progress: Any = None
        self.json = bool(args.json)

    @property
    def node(self) -> Node:
        if self._node is None:
            from ..api import Node

            self._node = Node(self.args.connect, config=self.args.config, source="cli",
                              allow_vdsm_managed=bool(getattr(self.args, "allow_vdsm_managed",
                                                              False)))
            self._node.interrupt_name = self._interrupt_name
        return self._node

    def stopped_by(self, name: str) -> None:
        """What the interrupt to come is called (SIGTERM, not Ctrl-C)."""
        self._interrupt_name = name
        if self._node is not None:
            self._node.interrupt_name = name

    def progress(self, wanted: bool) -> Progress | None:
        """A bar per disk on a terminal, lines otherwise; None under --json
        or --quiet."""
        if not wanted or self.json or self.args.quiet:
            return None
        from .progress import make_progress

        self._progress = make_progress(True)
        return self._progress  # type: ignore[no-any-return]

    def close(self) -> None:
        close = getattr(self._progress, "close", None)
        if close is not None:
            close()
        if self._node is not None:
            self._node.close()
