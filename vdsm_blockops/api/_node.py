"""The node object of the public API (``vdsm_blockops.api``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..core.errors import BadRequest
from ..core.model import JobInfo
from ..core.reports import ChainReport, HistoryReport, JobsReport, Report, SpeedReport, VerifyReport
from ..core.settled import AbortReport, RecoverReport
from ._calls import Calls, CancelToken

if TYPE_CHECKING:
    from ..core.config import Config
    from ..core.migrate_plan import MigrateReport
    from ..engine.context import Context
    from ..virt import Connection

#: Called with (disk, JobInfo) as a job moves on, from the thread that waits
#: for it (one per disk for ``disk="all"``); a move to another node reports
#: its phases as disk ``"all"``. It must return quickly and not raise.
Progress = Callable[[str, JobInfo], None]



class Node(Calls):
    """One libvirt node, reached through one connection (opened on first
    use, closed by :meth:`close` or the ``with`` block).

    ``uri``: libvirt URI (default: the config's ``connect``); ``config``:
    the config file (default ``/etc/vdsm-blockops.conf`` or
    ``$VDSM_BLOCKOPS_CONFIG``); ``allow_vdsm_managed``: act on domains VDSM
    runs (the CLI's ``--allow-vdsm-managed``); ``source``: the name of the
    caller in the node's history. Verbs that read or write image files act
    on this node only: a URI naming another host is refused for them
    (:class:`BadRequest`).

    Thread-safe for operations on different disks (each call its own
    context; the same disk from two threads: the second gets
    :class:`Conflict`)."""

    def __init__(self, uri: str | None = None, *, config: str | None = None,
                 allow_vdsm_managed: bool = False, source: str = "api") -> None:
        from ..core.config import load_config

        self.config: Config = load_config(config)
        self.uri: str = uri or self.config.connect
        self.allow_vdsm_managed = allow_vdsm_managed
        self.source = source
        #: What a KeyboardInterrupt is called in messages (the CLI says SIGTERM when it is).
        self.interrupt_name = "Ctrl-C"
        self._conn: Connection | None = None
        self._local_checked = False
        self._lock = threading.Lock()

    # -- the connection -------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._conn is not None

    def _connection(self) -> Connection:
        with self._lock:
            if self._conn is None:
                from ..virt import open_connection

                self._conn = open_connection(self.uri)
            return self._conn

    def require_local(self) -> None:
        """Refuse (:class:`BadRequest`) a URI that reaches another host's
        libvirt: verbs that read or write image files call this first."""
        if self._local_checked:
            return
        from ..core.config import names_a_host, require_local_uri

        require_local_uri(self.uri)
        if names_a_host(self.uri):  # may still be another daemon on this host
            from ..virt.connection import require_this_node

            require_this_node(self._connection())
        self._local_checked = True

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _context(self, progress: Progress | None = None,
                 cancel: CancelToken | None = None) -> Context:
        from ..core.budget import Budget
        from ..engine.context import Context

        budget = Budget(interrupted=cancel._event) if cancel is not None else Budget()
        return Context(conn=self._connection(), config=self.config, observer=progress,
                       budget=budget, allow_vdsm_managed=self.allow_vdsm_managed)

    # -- the verbs ------------------------------------------------------
    def domains(self) -> list[str]:
        """The names of the node's domains, running or not."""
        return [d.name for d in self._connection().domains()]

    def chain(self, domain: str, disk: str | None = None) -> ChainReport:
        """Each disk's backing chain (or ``disk``'s), as libvirt and the
        images' headers give it."""
        def action() -> ChainReport:
            from ..engine.node import describe_chains

            self.require_local()
            return describe_chains(self._connection().domain(domain), disk)
        return self._call("chain", domain, disk, action)

    def chains(self, domain: str, disk: str = "all") -> dict[str, list[str]]:
        """The paths of the chain each disk runs on now (``disk``: one, or
        ``all``), in the order of the reports' ``chain_before``."""
        from ..engine.node import current_chain

        self.require_local()
        dom = self._connection().domain(domain)
        targets = [d.target for d in dom.spec().select(disk)]
        return {target: current_chain(dom, target) for target in targets}

    def verify(self, domain: str, disk: str | None = None, *,
               checkpoints: bool = False) -> VerifyReport:
        """Check the chains against the live XML, the definition and the
        images' metadata; ``checkpoints``: a broken checkpoint fails too."""
        def action() -> VerifyReport:
            from ..engine.verification import verify

            self.require_local()
            return verify(self._connection().domain(domain), disk, self._state,
                          checkpoints=checkpoints)
        return self._call("verify", domain, disk, action)

    def merge(self, domain: str, disk: str, *, base: str | None = None, top: str | None = None,
              strategy: str = "auto", bandwidth: int = 0, timeout: float | None = None,
              wait: bool = True, dry_run: bool = False, keep_relative: bool | None = None,
              delete_retired: bool = False, progress: Progress | None = None,
              cancel: CancelToken | None = None) -> Report:
        """Collapse the segment TOP..above BASE of ``disk`` (``all``: every
        disk; then a :class:`MultiReport`) into one layer, BASE staying the
        backing file. ``wait=False`` is the CLI's ``--no-wait``."""
        from ..ops.merge import MergeRequest, merge

        req = MergeRequest(domain=domain, disk=disk, base=base, top=top, strategy=strategy,
                           bandwidth_mib_s=bandwidth, timeout_s=timeout, wait=wait,
                           dry_run=dry_run, keep_relative=keep_relative,
                           delete_retired=delete_retired)
        return self._call("merge", domain, disk, lambda: merge(
            self._local_context(progress, cancel), req), dry_run=dry_run, cancel=cancel)

    def relocate(self, domain: str, disk: str, dest: str, *, mode: str = "chain",
                 method: str = "auto", format: str = "qcow2",  # noqa: A002 (the CLI's name)
                 reuse_external: bool = False, sync_writes: bool = False, pivot: bool = True,
                 delete_source: bool = False, bandwidth: int = 0, timeout: float | None = None,
                 wait: bool = True, dry_run: bool = False, progress: Progress | None = None,
                 cancel: CancelToken | None = None) -> Report:
        """Copy ``disk`` (``all``: every disk, DEST a folder) to DEST while
        the VM runs, then pivot onto it (``pivot=False``: the CLI's
        ``--no-pivot``, a standalone copy)."""
        from ..ops.relocate import RelocateRequest, relocate

        req = RelocateRequest(domain=domain, disk=disk, dest=dest, mode=mode, method=method,
                              format=format, reuse_external=reuse_external,
                              sync_writes=sync_writes, pivot=pivot, delete_source=delete_source,
                              bandwidth_mib_s=bandwidth, timeout_s=timeout, wait=wait,
                              dry_run=dry_run)
        return self._call("relocate", domain, disk, lambda: relocate(
            self._local_context(progress, cancel), req), dry_run=dry_run, cancel=cancel)

    def snapshot(self, domain: str, disk: str, overlay: str, *,
                 reuse_external: bool = False, dry_run: bool = False) -> Report:
        """A disk-only external snapshot: a new qcow2 overlay on the active image."""
        from ..ops.snapshot import SnapshotRequest, snapshot

        req = SnapshotRequest(domain=domain, disk=disk, overlay=overlay,
                              reuse_external=reuse_external, dry_run=dry_run)
        return self._call("snapshot", domain, disk,
                          lambda: snapshot(self._local_context(), req), dry_run=dry_run)

    def migrate(self, domain: str, dest_uri: str, *, dest_dir: str,
                source_root: str | None = None, proof: str = "full",
                migrate_uri: str | None = None, bandwidth: int = 0,
                timeout: float | None = None, delete_source: bool = False,
                dry_run: bool = False, progress: Progress | None = None,
                cancel: CancelToken | None = None) -> MigrateReport:
        """Move the running ``domain`` and its disks to the node at
        ``dest_uri`` (files under ``dest_dir``), chains and checkpoints
        kept. A failure or cancellation rolls the move back."""
        from ..core.migrate_plan import MigrateRequest
        from ..ops.migrate import migrate

        req = MigrateRequest(domain=domain, dest_uri=dest_uri, dest_dir=dest_dir,
                             migrate_uri=migrate_uri, bandwidth_mib_s=bandwidth,
                             timeout_s=timeout, dry_run=dry_run, delete_source=delete_source,
                             source_root=source_root, proof=proof)
        return self._call("migrate", domain, None, lambda: migrate(
            self._local_context(progress, cancel), req), dry_run=dry_run, cancel=cancel)

    def jobs(self, domain: str | None = None) -> JobsReport:
        """Block jobs and migrations running, and this tool's operations
        under way (every domain, or ``domain``'s)."""
        from ..engine.node import list_jobs

        return self._call("jobs", domain, None,
                          lambda: list_jobs(self._connection(), domain, self._state))

    def abort(self, domain: str, disk: str, *, pivot: bool = False) -> AbortReport:
        """Abort the block job on ``disk`` (``pivot``: pivot a ready one),
        or with ``disk="all"`` stop a move to another node."""
        from ..ops.control import abort

        return self._call("abort", domain, disk,
                          lambda: abort(self._local_context(), domain, disk, pivot))

    def speed(self, domain: str, disk: str, bandwidth: int) -> SpeedReport:
        """Change a running job's bandwidth (MiB/s, 0: no limit)."""
        from ..ops.control import speed

        return self._call("speed", domain, disk,
                          lambda: speed(self._context(), domain, disk, bandwidth))

    def recover(self, domain: str | None = None, *, queued: bool = False,
                timeout: float | None = None) -> RecoverReport:
        """Finish or roll back what interrupted operations left (every
        domain with a record, or ``domain``'s; ``queued``: the hook's queue)."""
        from ..ops.recover import recover, recover_queued

        def action() -> RecoverReport:
            ctx = self._local_context()
            return (recover_queued(ctx, timeout_s=timeout) if queued
                    else recover(ctx, domain, timeout_s=timeout))
        return self._call("recover", domain, None, action)

    def history(self, domain: str | None = None) -> HistoryReport:
        """What ran on this node (every domain, or ``domain``), oldest first."""
        from ..engine.history import read

        return self._call("history", domain, None, lambda: HistoryReport(
            operation="history", entries=list(read(self._state, domain))))

    # -- for idempotent callers (Ansible) ------------------------------
    def already_done(self, verb: str, domain: str, disk: str, **options: Any) -> str | None:
        """Why running ``verb`` (merge, relocate, snapshot) with these
        arguments again has nothing to do, or None. Decided by the images'
        identities, never by path strings."""
        ctx = self._local_context()
        if verb == "merge":
            from ..ops.merge import MergeRequest, already_done

            return already_done(ctx, MergeRequest(domain=domain, disk=disk,
                                                  base=options.get("base"),
                                                  top=options.get("top")))
        if verb == "relocate":
            from ..ops.relocate import RelocateRequest
            from ..ops.relocate import already_done as relocated

            return relocated(ctx, RelocateRequest(
                domain=domain, disk=disk, dest=options["dest"],
                mode=options.get("mode", "chain"), pivot=options.get("pivot", True),
                format=options.get("format", "qcow2")))
        if verb == "snapshot":
            from ..ops.snapshot import already_done as snapped

            done = snapped(ctx, domain, disk, options["overlay"])
            return None if done is None else f"{options['overlay']} is already the active image"
        raise BadRequest(f"already_done knows merge, relocate and snapshot, not {verb!r}")

    def unfinished_move(self, domain: str) -> str | None:
        """The unfinished move of ``domain`` to another node and its phase, or None."""
        from ..ops.migrate import unfinished

        return unfinished(self._local_context(), domain)

    def settle_move(self, domain: str, dest_uri: str, *, dest_dir: str,
                    timeout: float | None = None) -> str | None:
        """Settle an unfinished move of ``domain`` first: None when the move
        is still to be made, else what happened ("finished: ..." or "not
        running here: ...")."""
        from ..core.migrate_plan import MigrateRequest
        from ..ops.migrate import settle_unfinished

        req = MigrateRequest(domain=domain, dest_uri=dest_uri, dest_dir=dest_dir,
                             timeout_s=timeout)
        return settle_unfinished(self._local_context(), req)

    # -- the common path -----------------------------------------------
    def _local_context(self, progress: Progress | None = None,
                       cancel: CancelToken | None = None) -> Context:
        self.require_local()
        return self._context(progress, cancel)
