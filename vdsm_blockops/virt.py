"""The libvirt adapter: the only module that imports ``libvirt``.

It owns the process-wide event loop thread, the connection (keepalive,
close callback, reconnect), the BLOCK_JOB_2 event fan-out, a narrow
``Domain`` wrapper whose verbs are named after the job, and the one place
where ``libvirtError`` becomes an error of our own tree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import libvirt

from . import errors
from .chain import DomainSpec, parse_domain
from .model import JOB_TYPE_NAMES, BlockJobEvent, EventHub, JobInfo, JobStatus

log = logging.getLogger(__name__)

# libvirt constants, named once. Job types and statuses live in model.py
# (libvirt-free); their numbers are libvirt's ABI, checked here.
assert tuple(JobStatus) == (libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED, libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED,
        libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED, libvirt.VIR_DOMAIN_BLOCK_JOB_READY)
assert libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT == 4 and libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL == 1
REBASE_RELATIVE = libvirt.VIR_DOMAIN_BLOCK_REBASE_RELATIVE
COMMIT_ACTIVE = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
COMMIT_RELATIVE = libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE
COPY_SHALLOW = libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
COPY_REUSE_EXT = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
COPY_TRANSIENT_JOB = libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
COPY_SYNCHRONOUS_WRITES = libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES
ABORT_PIVOT = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
ABORT_ASYNC = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC
SNAPSHOT_DISK_ONLY = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
SNAPSHOT_NO_METADATA = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
SNAPSHOT_REUSE_EXT = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
SNAPSHOT_ATOMIC = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
METADATA_ELEMENT = libvirt.VIR_DOMAIN_METADATA_ELEMENT
AFFECT_LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
AFFECT_CONFIG = libvirt.VIR_DOMAIN_AFFECT_CONFIG
XML_INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE
MIB = 1024 * 1024


# ---------------------------------------------------------------- errors
def translate(exc: libvirt.libvirtError, doing: str) -> errors.BlockOpsError:
    """Map a libvirtError onto our tree; ``doing`` says what we tried."""
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    text = f"{doing}: {message}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return errors.UnknownDomain(text)
    if code == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE and "not ready for pivot" in message:
        return errors.PivotNotReady(text)
    if "already in active block job" in message or (
        code == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE
    ):
        return errors.Conflict(text)
    if code == libvirt.VIR_ERR_INVALID_ARG and "not found in domain" in message:
        return errors.UnknownDisk(text)
    if "in chain for" in message or "could not find image" in message:
        return errors.UnknownImage(text)
    if code == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in message:
        return errors.BadRequest(text)
    if code == libvirt.VIR_ERR_OVERFLOW:
        return errors.BadRequest(text)
    if (
        exc.get_error_domain() == libvirt.VIR_FROM_RPC
        or code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN)
    ):
        return errors.ConnectionLost(text)
    return errors.OperationFailed(text)


@contextlib.contextmanager
def libvirt_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as exc:
        raise translate(exc, doing) from exc


# ------------------------------------------------------------ event loop
_loop_lock = threading.Lock()
_loop_started = False


def start_event_loop() -> None:
    """Register libvirt's default event loop and spin it in a daemon thread.

    Must happen before the first ``open()``; keepalive and events only work
    while the loop runs.
    """
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        # libvirt prints every error to stderr by default; we translate and
        # report errors ourselves.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        libvirt.virEventRegisterDefaultImpl()

        def spin() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=spin, name="libvirt-events", daemon=True).start()
        _loop_started = True


# ------------------------------------------------------------ connection
class Connection:
    """A libvirt connection that notices when libvirtd goes away and can
    reopen itself, re-registering its event callbacks."""

    def __init__(self, uri: str, keepalive_interval_s: int = 5, keepalive_count: int = 3):
        self.uri = uri
        self.events = EventHub()
        self._keepalive = (keepalive_interval_s, keepalive_count)
        self._conn: libvirt.virConnect | None = None
        self._callback_ids: list[int] = []
        self._closed = threading.Event()
        self._lock = threading.RLock()
        self.generation = 0  # bumped on every (re)open
        self.node_changes = 0  # bumped on every domain lifecycle event
        self._open()

    # -- lifecycle
    def _open(self) -> None:
        start_event_loop()
        with libvirt_errors(f"cannot connect to {self.uri}"):
            conn = libvirt.open(self.uri)
        try:
            conn.setKeepAlive(*self._keepalive)
        except libvirt.libvirtError:  # e.g. test:/// or embedded drivers
            pass
        with contextlib.suppress(libvirt.libvirtError):
            conn.registerCloseCallback(self._on_close, None)
        self._callback_ids = [
            conn.domainEventRegisterAny(
                None,
                libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
                self._on_block_job,
                None,
            ),
            # Any define, undefine, start or stop: a look at the node's
            # chains taken before is stale (see node.NodeUsers).
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None),
        ]
        self._conn = conn
        self._closed.clear()
        self.generation += 1

    def _on_close(self, _conn: object, reason: int, _opaque: object) -> None:
        log.warning("connection to %s closed (reason %s)", self.uri, reason)
        self._closed.set()

    def _on_lifecycle(self, _conn: object, _dom: object, _event: int, _detail: int,
                      _opaque: object) -> None:
        self.node_changes += 1

    def _on_block_job(self, _conn: object, dom: libvirt.virDomain, disk: str, job_type: int,
                      status: int, _opaque: object) -> None:
        self.events.publish(
            BlockJobEvent(
                domain_uuid=dom.UUIDString(),
                disk=disk,
                job_type=JOB_TYPE_NAMES.get(job_type, str(job_type)),
                status=status,
            )
        )

    @property
    def alive(self) -> bool:
        if self._closed.is_set() or self._conn is None:
            return False
        try:
            return bool(self._conn.isAlive() == 1)
        except libvirt.libvirtError:
            return False

    def reconnect(self, give_up_at: float | None = None, pause_s: float = 0.5) -> None:
        """Reopen after libvirtd went away, retrying until ``give_up_at``."""
        with self._lock:
            if self.alive:
                return
            self._drop()
            while True:
                try:
                    self._open()
                    log.info("reconnected to %s", self.uri)
                    return
                except errors.BlockOpsError:
                    if give_up_at is not None and time.monotonic() >= give_up_at:
                        raise errors.ConnectionLost(
                            f"libvirt at {self.uri} did not come back"
                        ) from None
                    time.sleep(pause_s)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for cid in self._callback_ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(cid)
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._drop()

    @property
    def raw(self) -> libvirt.virConnect:
        if self._conn is None:
            raise errors.ConnectionLost(f"not connected to {self.uri}")
        return self._conn

    # -- domains
    def domain(self, name_or_uuid: str) -> Domain:
        with libvirt_errors(f"domain {name_or_uuid}"):
            try:
                dom = self.raw.lookupByName(name_or_uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                try:
                    dom = self.raw.lookupByUUIDString(name_or_uuid)
                except libvirt.libvirtError:
                    raise errors.UnknownDomain(
                        f"no domain named {name_or_uuid!r} on {self.uri}"
                    ) from None
        return Domain(self, dom)

    def domains(self, active_only: bool = False) -> list[Domain]:
        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE if active_only else 0
        with libvirt_errors("listing domains"):
            return [Domain(self, d) for d in self.raw.listAllDomains(flags)]

    def persistent_domains(self, running: bool) -> list[Domain]:
        """The defined domains that run (``running``) or do not."""
        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT | (
            libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE if running
            else libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE)
        with libvirt_errors("listing domains"):
            return [Domain(self, d) for d in self.raw.listAllDomains(flags)]

    def running_chains(self) -> list[RunningChain]:
        """Every image of every disk of every running domain, from one
        ``getAllDomainStats`` call (the BACKING flag lists whole chains)."""
        with libvirt_errors("block stats of the running domains"):
            stats = self.raw.getAllDomainStats(
                libvirt.VIR_DOMAIN_STATS_BLOCK,
                libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
                | libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_BACKING)
        chains: dict[tuple[str, str], RunningChain] = {}
        for dom, values in stats:
            for i in range(int(values.get("block.count", 0))):
                target, path = values.get(f"block.{i}.name"), values.get(f"block.{i}.path")
                if target and path:
                    key = (dom.UUIDString(), target)
                    chain = chains.setdefault(key, RunningChain(dom.UUIDString(), dom.name(), target, []))
                    chain.paths.append(path)
        return list(chains.values())

    def definition_file(self, domain_name: str) -> str | None:
        """Where the local QEMU driver keeps a persistent definition (libvirt
        rewrites the file, under a new inode, on every define): a cheap
        sign that a definition changed. None where unknown (remote, other
        drivers)."""
        if self.uri in ("qemu:///system", "qemu+unix:///system"):
            return f"/etc/libvirt/qemu/{domain_name}.xml"
        if self.uri in ("qemu:///session", "qemu+unix:///session"):
            return os.path.expanduser(f"~/.config/libvirt/qemu/{domain_name}.xml")
        return None


@dataclass
class RunningChain:
    uuid: str
    name: str
    target: str
    paths: list[str]


class Domain:
    """The libvirt calls this project needs on one domain, and no others."""

    def __init__(self, conn: Connection, dom: libvirt.virDomain):
        self.conn = conn
        self._dom = dom
        self._generation = conn.generation
        self.name = dom.name()
        self.uuid = dom.UUIDString()

    def _live(self) -> libvirt.virDomain:
        # After a reconnect the old virDomain object is dead: look it up
        # again on the new connection.
        if self._generation != self.conn.generation:
            with libvirt_errors(f"domain {self.name}"):
                self._dom = self.conn.raw.lookupByUUIDString(self.uuid)
            self._generation = self.conn.generation
        return self._dom

    # -- state
    def is_active(self) -> bool:
        with libvirt_errors(f"state of {self.name}"):
            return bool(self._live().isActive())

    def is_persistent(self) -> bool:
        with libvirt_errors(f"state of {self.name}"):
            return bool(self._live().isPersistent())

    def xml(self, inactive: bool = False) -> str:
        with libvirt_errors(f"XML of {self.name}"):
            return str(self._live().XMLDesc(XML_INACTIVE if inactive else 0))

    def spec(self, inactive: bool = False) -> DomainSpec:
        return parse_domain(self.xml(inactive))

    # -- block jobs
    def block_job_info(self, disk: str) -> JobInfo | None:
        with libvirt_errors(f"block job of {self.name} {disk}"):
            info = self._live().blockJobInfo(
                disk, libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES
            )
        if not info:
            return None
        return JobInfo(
            disk=disk,
            job_type=JOB_TYPE_NAMES.get(info["type"], str(info["type"])),
            cur=int(info["cur"]),
            end=int(info["end"]),
            bandwidth_bytes_s=int(info["bandwidth"]),
        )

    def pull(self, disk: str, base: str | None, bandwidth_mib_s: int = 0, relative: bool = False) -> None:
        flags = REBASE_RELATIVE if relative and base else 0
        with libvirt_errors(f"block pull on {self.name} {disk}"):
            self._live().blockRebase(disk, base, bandwidth_mib_s, flags)

    def commit(self, disk: str, base: str, top: str | None, active: bool,
               bandwidth_mib_s: int = 0, relative: bool = False) -> None:
        flags = (COMMIT_ACTIVE if active else 0) | (COMMIT_RELATIVE if relative else 0)
        with libvirt_errors(f"block commit on {self.name} {disk}"):
            self._live().blockCommit(disk, base, top, bandwidth_mib_s, flags)

    def copy(self, disk: str, dest_xml: str, *, shallow: bool, reuse_external: bool,
             transient: bool, sync_writes: bool = False, bandwidth_mib_s: int = 0) -> None:
        """blockCopy onto ``dest_xml``. ``transient``: libvirt 9 refuses a
        copy of a persistent domain's disk without TRANSIENT_JOB."""
        flags = ((COPY_SHALLOW if shallow else 0) | (COPY_REUSE_EXT if reuse_external else 0)
                 | (COPY_TRANSIENT_JOB if transient else 0)
                 | (COPY_SYNCHRONOUS_WRITES if sync_writes else 0))
        params = {"bandwidth": bandwidth_mib_s * MIB} if bandwidth_mib_s else {}
        with libvirt_errors(f"block copy on {self.name} {disk}"):
            self._live().blockCopy(disk, dest_xml, params, flags)

    def abort_job(self, disk: str, pivot: bool = False, wait: bool = True) -> None:
        flags = (ABORT_PIVOT if pivot else 0) | (0 if wait else ABORT_ASYNC)
        action = "pivot" if pivot else "abort"
        with libvirt_errors(f"{action} of the block job on {self.name} {disk}"):
            self._live().blockJobAbort(disk, flags)

    def set_speed(self, disk: str, bandwidth_mib_s: int) -> None:
        with libvirt_errors(f"set speed on {self.name} {disk}"):
            self._live().blockJobSetSpeed(disk, bandwidth_mib_s, 0)

    def snapshot(self, snapshot_xml: str, reuse_external: bool = False) -> None:
        flags = SNAPSHOT_DISK_ONLY | SNAPSHOT_NO_METADATA | SNAPSHOT_ATOMIC
        if reuse_external:
            flags |= SNAPSHOT_REUSE_EXT
        with libvirt_errors(f"disk-only snapshot of {self.name}"):
            self._live().snapshotCreateXML(snapshot_xml, flags)

    # -- our metadata record
    def set_metadata(self, xml: str | None, key: str, namespace: str, config: bool = True) -> None:
        """Set our metadata element live and, with ``config``, in the
        persistent definition too (which costs libvirt a config rewrite)."""
        active = self.is_active()
        flags = AFFECT_LIVE if active else 0
        if (config or not active) and self.is_persistent():
            flags |= AFFECT_CONFIG
        with libvirt_errors(f"metadata of {self.name}"):
            self._live().setMetadata(METADATA_ELEMENT, xml, key if xml else None, namespace, flags)

    def get_metadata(self, namespace: str, inactive: bool = False) -> str | None:
        flags = AFFECT_CONFIG if inactive else 0
        try:
            xml: str | None = self._live().metadata(METADATA_ELEMENT, namespace, flags)
            return xml
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise translate(exc, f"metadata of {self.name}") from exc

    def define(self, xml: str) -> None:
        with libvirt_errors(f"redefining {self.name}"):
            self.conn.raw.defineXML(xml)


def open_connection(uri: str) -> Connection:
    return Connection(uri)

