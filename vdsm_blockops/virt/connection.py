"""The connection: the process-wide event loop thread, keepalive, close
callback and reconnect, the BLOCK_JOB_2 fan-out, and the bulk looks at the
node (domain lists, every running chain in one stats call)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass

import libvirt

from ..core import errors
from ..core.model import JOB_TYPE_NAMES, BlockJobEvent, EventHub, ThresholdEvent
from .domain import Domain
from .errors import libvirt_errors

log = logging.getLogger(__name__)


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
        self.node_changes = 0  # bumped on every domain lifecycle or block job event
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
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_THRESHOLD, self._on_threshold, None),
            # Any define, undefine, start or stop: a look at the node's
            # chains taken before is stale (see users.NodeUsers).
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
        self.node_changes += 1  # a job's end may change whose chain holds what
        self.events.publish(
            BlockJobEvent(
                domain_uuid=dom.UUIDString(),
                disk=disk,
                job_type=JOB_TYPE_NAMES.get(job_type, str(job_type)),
                status=status,
            )
        )

    def _on_threshold(self, _conn: object, dom: libvirt.virDomain, dev: str, _path: str,
                      _threshold: int, excess: int, _opaque: object) -> None:
        self.events.publish(ThresholdEvent(domain_uuid=dom.UUIDString(), disk=dev.split("[")[0],
                                           dev=dev, excess=excess))

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

    def host_uuid(self) -> str:
        """The node's identity as its libvirt gives it (capabilities)."""
        return host_uuid_of(self.raw)

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

    def volume_path(self, pool: str, volume: str) -> str | None:
        """The local file or device of a storage-pool volume; None when
        libvirt does not know it or it is no local path (a network pool)."""
        try:
            path = str(self.raw.storagePoolLookupByName(pool).storageVolLookupByName(volume).path())
        except libvirt.libvirtError:
            return None
        return path if path.startswith("/") else None

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


def host_uuid_of(conn: libvirt.virConnect) -> str:
    from ..core.chain import parse_xml

    return str(parse_xml(conn.getCapabilities()).findtext("host/uuid"))


def require_this_node(conn: Connection) -> None:
    """A URI that names a host may still reach this node (loopback, this
    node's own name) -- or another libvirt node on the same host (a
    container, a second daemon on another port). Verbs that read, copy or
    delete image files act on this node only: decided by the node's
    identity, its host UUID against that of the local daemon, never by the
    address."""
    from urllib.parse import urlsplit

    from ..core.config import names_a_host

    if not names_a_host(conn.uri):
        return  # no host: the local daemon
    parts = urlsplit(conn.uri)
    local = f"{parts.scheme.split('+', 1)[0]}://{parts.path}"
    try:
        here = libvirt.open(local)
    except libvirt.libvirtError as exc:
        raise errors.BadRequest(f"cannot tell whether {conn.uri} is this node: the local "
                                f"{local} does not answer ({exc}); connect to {local}") from None
    try:
        ours, theirs = host_uuid_of(here), conn.host_uuid()
    finally:
        here.close()
    if ours != theirs:
        raise errors.BadRequest(
            f"{conn.uri} reaches another node (host UUID {theirs}; this node's is {ours}): "
            "this verb reads and writes image files, so it acts only on the node it runs on. "
            "Run it there, or use the Ansible modules, which run on each node")


def open_connection(uri: str) -> Connection:
    return Connection(uri)

