"""``Domain``: the libvirt calls this project needs on one domain."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import libvirt

from ..core import errors
from ..core.chain import DomainSpec, parse_domain
from ..core.model import JOB_TYPE_NAMES, RECONNECT_GRACE_S, EventHub, JobInfo, JobStatus
from .errors import libvirt_errors, translate

log = logging.getLogger(__name__)
T = TypeVar("T")


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



class Host(Protocol):
    """What a domain needs of its connection (``connection.Connection``;
    named here so the two modules import one way only)."""

    generation: int
    events: EventHub

    @property
    def raw(self) -> libvirt.virConnect: ...
    @property
    def alive(self) -> bool: ...
    def reconnect(self, give_up_at: float | None = None, pause_s: float = 0.5) -> None: ...
    def volume_path(self, pool: str, volume: str) -> str | None: ...


class Domain:
    """The libvirt calls this project needs on one domain, and no others."""

    def __init__(self, conn: Host, dom: libvirt.virDomain):
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

    def checkpoints(self) -> dict[str, dict[str, bool]]:
        """Per disk target, the libvirt checkpoints that track it with a
        bitmap (incremental backups start from them), each with whether
        libvirt can use it: in a running VM libvirt sizes a checkpoint's
        data from QEMU's own bitmaps and, seen here on 9.0, leaves out the
        ``size`` of a disk whose bitmap is missing or broken anywhere in the
        live chain. A shut-off domain has no QEMU to ask: True, the files
        decide. One listing for every disk of the domain."""
        from ..core.chain import parse_xml

        running = self.is_active()
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN | (
            libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE if running else 0)
        found: dict[str, dict[str, bool]] = {}
        with libvirt_errors(f"checkpoints of {self.name}"):
            for checkpoint in self._live().listAllCheckpoints(0):
                root = parse_xml(checkpoint.getXMLDesc(flags))
                for disk in root.iterfind("disks/disk"):
                    if disk.get("checkpoint") == "bitmap":
                        usable = not running or disk.get("size") is not None
                        found.setdefault(str(disk.get("name")), {})[
                            str(checkpoint.getName())] = usable
        return found

    def _again_after_reconnect(self, call: Callable[[], T]) -> T:
        """``call`` once more after a reconnect when libvirtd went away
        under it (a restart): for the calls that may be repeated -- reads,
        and writes that set a whole value (our records). Without this a
        record written while libvirtd restarts failed the whole command
        (seen in the restart test, one run in several)."""
        try:
            return call()
        except errors.ConnectionLost:
            log.info("%s: libvirtd went away; reconnecting to repeat the call", self.name)
            self.conn.reconnect(time.monotonic() + RECONNECT_GRACE_S)
            return call()

    def xml(self, inactive: bool = False) -> str:
        def read() -> str:
            with libvirt_errors(f"XML of {self.name}"):
                return str(self._live().XMLDesc(XML_INACTIVE if inactive else 0))

        return self._again_after_reconnect(read)

    def spec(self, inactive: bool = False) -> DomainSpec:
        """The disks as files and devices: a storage-pool volume is named
        by what it is (every identity decision needs the file)."""
        return parse_domain(self.xml(inactive)).with_volumes(self.conn.volume_path)

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

    def set_block_threshold(self, dev: str, offset: int) -> None:
        """One BLOCK_THRESHOLD event when QEMU writes past ``offset`` of
        ``dev`` (``vda`` or a layer below it, ``vda[3]``)."""
        with libvirt_errors(f"block threshold on {self.name} {dev}"):
            self._live().setBlockThreshold(dev, offset, 0)

    def paused_on_io_error(self) -> bool:
        """Paused by QEMU after a write failed (ENOSPC on a full volume)."""
        with libvirt_errors(f"state of {self.name}"):
            state, reason = self._live().state(0)
        return bool(state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR)

    def resume(self) -> None:
        with libvirt_errors(f"resume of {self.name}"):
            self._live().resume()

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
        def write() -> None:
            active = self.is_active()
            flags = AFFECT_LIVE if active else 0
            if (config or not active) and self.is_persistent():
                flags |= AFFECT_CONFIG
            with libvirt_errors(f"metadata of {self.name}"):
                self._live().setMetadata(METADATA_ELEMENT, xml, key if xml else None, namespace,
                                         flags)

        self._again_after_reconnect(write)

    def get_metadata(self, namespace: str, inactive: bool = False) -> str | None:
        flags = AFFECT_CONFIG if inactive else 0

        def read() -> str | None:
            try:
                xml: str | None = self._live().metadata(METADATA_ELEMENT, namespace, flags)
                return xml
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    return None
                raise translate(exc, f"metadata of {self.name}") from exc

        return self._again_after_reconnect(read)

    def define(self, xml: str) -> None:
        with libvirt_errors(f"redefining {self.name}"):
            self.conn.raw.defineXML(xml)

    # -- a move to another node
    def migratable_xml(self, inactive: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE
        with libvirt_errors(f"XML of {self.name}"):
            return str(self._live().XMLDesc(flags | (XML_INACTIVE if inactive else 0)))

    def migrate(self, dest_uri: str, params: dict[str, object], flags: int) -> None:
        """migrateToURI3: returns when the domain runs on the destination."""
        with libvirt_errors(f"migration of {self.name} to {dest_uri}"):
            self._live().migrateToURI3(dest_uri, params, flags)

    def migration_progress(self) -> tuple[int, int] | None:
        """(bytes done, bytes in all) of the domain's migration job, memory
        and disks; None when none runs."""
        with libvirt_errors(f"job of {self.name}"):
            stats = self._live().jobStats(0)
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
            return None
        return int(stats.get("data_processed", 0)), int(stats.get("data_total", 0))

    def abort_migration(self) -> None:
        with libvirt_errors(f"abort of the migration of {self.name}"):
            self._live().abortJob()

    def checkpoint_definitions(self) -> dict[str, tuple[str | None, str]]:
        """Every checkpoint: its parent and its XML without the domain
        (what ``checkpoint-create --redefine`` takes on another node)."""
        found = {}
        with libvirt_errors(f"checkpoints of {self.name}"):
            for checkpoint in self._live().listAllCheckpoints(0):
                try:
                    parent: str | None = str(checkpoint.getParent(0).getName())
                except libvirt.libvirtError:
                    parent = None
                found[str(checkpoint.getName())] = (parent, str(checkpoint.getXMLDesc(
                    libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)))
        return found

    def undefine_moved(self) -> None:
        """Drop the shut-off source definition of a domain that moved, with
        its checkpoint and snapshot metadata (the destination has them)."""
        with libvirt_errors(f"undefine of {self.name}"):
            self._live().undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                                       | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                                       | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
