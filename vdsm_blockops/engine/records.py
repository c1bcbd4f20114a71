"""Operation records kept in the domain's own metadata.

Before each side effect an operation writes what was asked, the plan and
the phase into ``<metadata>`` under our namespace (live and, for
persistent domains, config), so that ``recover`` can pick it up after a
crash of this tool, of libvirtd or of the VM, and the hook can refuse a
migration mid-operation. The record goes away only once the result has been
verified (or the chain has been verified to be unchanged after a failure).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

from lxml import etree

from ..core.chain import METADATA_NS, parse_xml
from ..core.errors import Conflict, StateError
from ..core.identity import existing_key, image_key, recorded_key
from ..core.lifetime import process_identity
from ..core.model import StrEnum

if TYPE_CHECKING:
    from .state import StateDir

log = logging.getLogger(__name__)


class MetadataHolder(Protocol):
    """What a record store needs of a domain (``virt.Domain``, or a fake)."""

    name: str
    uuid: str

    def get_metadata(self, namespace: str) -> str | None: ...
    def set_metadata(self, xml: str | None, key: str, namespace: str,
                     config: bool = True) -> None: ...

METADATA_KEY = "blockops"


class Phase(StrEnum):
    PLANNED = "planned"  # record written, nothing changed yet
    PREPARED = "prepared"  # files created (overlays, copied layers)
    STARTED = "started"  # block job started
    READY = "ready"  # mirror ready, about to pivot (no longer written; older records)
    PIVOTED = "pivoted"  # pivot done, not yet verified (no longer written; older records)
    COMPLETED = "completed"  # job ended, not yet verified
    ROLLING_BACK = "rolling-back"


# Which phase may follow which. Anything may go to ROLLING_BACK.
TRANSITIONS: dict[Phase, set[Phase]] = {
    Phase.PLANNED: {Phase.PREPARED, Phase.STARTED},
    Phase.PREPARED: {Phase.STARTED},
    Phase.STARTED: {Phase.COMPLETED},
    Phase.READY: {Phase.PIVOTED, Phase.COMPLETED},
    Phase.PIVOTED: {Phase.COMPLETED},
    Phase.COMPLETED: set(),
    Phase.ROLLING_BACK: set(),
}


# Version 2 added ``format`` itself; records without it are version 1 and
# read the same way. A record of a newer format is kept but not acted on.
RECORD_FORMAT = 2
OPERATIONS = ("merge", "relocate", "snapshot")


@dataclass
class OperationRecord:
    operation: str  # merge | relocate | snapshot
    disk: str
    request: dict[str, Any]
    plan: dict[str, Any]
    phase: Phase = Phase.PLANNED
    id: str = field(default_factory=lambda: os.urandom(6).hex())
    # Files this operation created, each {"path", "id"}: entered only after
    # the file was made exclusively (O_EXCL), so recover never deletes a
    # file that was there before; and recover deletes only while the path
    # still names that same file.
    created_files: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)
    # the process that runs it, for its whole life (``owner_alive``)
    owner: str = field(default_factory=process_identity)
    # False: the domain was shut off and the operation runs with qemu-img;
    # the hook refuses to start the domain until the record is gone.
    online: bool = True
    format: int = RECORD_FORMAT
    # Fields another version wrote that this one does not know: kept, and
    # written back as they were.
    extra: dict[str, Any] = field(default_factory=dict)
    # Why this version cannot act on the record (another version's phase,
    # format or operation, a field missing): it is then never dropped nor
    # rewritten -- ``raw`` goes back as it came -- and it blocks the disk.
    unreadable: str = ""
    raw: str = ""

    def to_json(self) -> dict[str, Any]:
        body = {**self.extra, **asdict(self)}
        for local in ("extra", "unreadable", "raw"):
            del body[local]
        body["phase"] = self.phase.value
        return body

    @classmethod
    def from_json(cls, body: object, disk: str = "", raw: str = "") -> OperationRecord:
        """The record ``body`` describes; never raises: a body this version
        cannot act on comes back ``unreadable`` (with ``disk`` and ``raw``
        from the element that held it)."""
        known = {f.name for f in fields(cls)} - {"extra", "unreadable", "raw"}
        try:
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            body = dict(body)
            missing = [name for name in ("operation", "disk", "request", "plan") if name not in body]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            if body["operation"] not in OPERATIONS:
                raise ValueError(f"unknown operation {body['operation']!r}")
            if int(body.get("format", 1)) > RECORD_FORMAT:
                raise ValueError(f"record format {body['format']} is newer than this version's "
                                 f"({RECORD_FORMAT})")
            phase = body.get("phase", Phase.PLANNED.value)
            if phase not in {p.value for p in Phase}:
                raise ValueError(f"unknown phase {phase!r}")
            body["phase"] = Phase(phase)
            body["format"] = int(body.get("format", 1))
            # Records of earlier versions listed bare paths, some never
            # created: without an identity they are never deleted.
            body["created_files"] = [f for f in body.get("created_files", []) if isinstance(f, dict)]
            extra = {k: v for k, v in body.items() if k not in known}
            record = cls(**{k: v for k, v in body.items() if k in known}, extra=extra)
            if not isinstance(record.request, dict) or not isinstance(record.plan, dict):
                raise ValueError("request or plan is not an object")
            return record
        except (ValueError, TypeError) as exc:
            got = body if isinstance(body, dict) else {}
            return cls(operation=str(got.get("operation", "operation")),
                       disk=str(got.get("disk") or disk), request={}, plan={},
                       id=str(got.get("id", "?")), pid=0, unreadable=str(exc), raw=raw)

    def describe(self) -> str:
        """How messages name the record."""
        if self.unreadable:
            return (f"{self.operation} (record {self.id}, which this version cannot read: "
                    f"{self.unreadable})")
        return f"{self.operation} (record {self.id}, pid {self.pid}, phase {self.phase.value})"

    def created_paths(self) -> list[str]:
        return [f["path"] for f in self.created_files]

    def still_ours(self, entry: dict[str, Any]) -> bool:
        """Whether ``entry``'s path still names the file we created."""
        if entry.get("id") is None:
            return False
        key = recorded_key(entry["id"], entry["path"])
        return key is not None and key == image_key(entry["path"])


def parse_records(metadata_xml: str | None) -> dict[str, OperationRecord]:
    """disk -> record, from our metadata element (as libvirt returns it)."""
    if not metadata_xml:
        return {}
    root = parse_xml(metadata_xml)
    records = {}
    for elem in root.iter():
        if not isinstance(elem.tag, str) or etree.QName(elem).localname != "operation":
            continue
        try:
            body: object = json.loads(elem.text or "{}")
        except ValueError as exc:
            body = f"not JSON: {exc}"
        record = OperationRecord.from_json(body, disk=elem.get("disk", ""), raw=elem.text or "")
        if record.unreadable:
            log.warning("operation record %s of disk %s cannot be read by this version (%s): "
                        "kept, and the disk stays blocked", record.id, record.disk, record.unreadable)
        records[record.disk] = record
    return records


def records_in_domain_xml(spec_metadata: dict[str, str]) -> dict[str, OperationRecord]:
    return parse_records(spec_metadata.get(METADATA_NS))


def render_records(records: dict[str, OperationRecord]) -> str | None:
    if not records:
        return None
    root = etree.Element("operations")
    for disk in sorted(records):
        record = records[disk]
        if record.unreadable:  # another version's: back exactly as it came
            elem = etree.SubElement(root, "operation", disk=disk, id=record.id)
            elem.text = record.raw
            continue
        elem = etree.SubElement(root, "operation", disk=disk, id=record.id,
                                phase=record.phase.value)
        elem.text = json.dumps(record.to_json(), sort_keys=True)
    return etree.tostring(root, encoding="unicode")


class RecordStore:
    """Reads and writes the records of one domain. ``domain`` is a
    ``virt.Domain`` (or a fake with ``get_metadata``/``set_metadata``)."""

    _locks: dict[str, threading.Lock] = {}
    _locks_guard = threading.Lock()

    def __init__(self, domain: MetadataHolder, state: StateDir | None = None) -> None:
        self.domain = domain
        self.state = state  # a StateDir: its flock covers other processes
        with self._locks_guard:
            self._thread_lock = self._locks.setdefault(domain.uuid, threading.Lock())

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Every read-modify-write of the records: threads of this process
        and, through the state directory, other processes on the node."""
        with self._thread_lock:
            if self.state is None:
                yield
                return
            with self.state.domain_lock(self.domain.uuid):
                yield

    def load(self) -> dict[str, OperationRecord]:
        return parse_records(self.domain.get_metadata(METADATA_NS))

    def _store(self, records: dict[str, OperationRecord], config: bool = True) -> None:
        self.domain.set_metadata(render_records(records), METADATA_KEY, METADATA_NS, config=config)

    def begin(self, record: OperationRecord) -> None:
        with self._lock():
            records = self.load()
            other = records.get(record.disk)
            if other is not None:
                raise Conflict(
                    f"disk {record.disk} of {self.domain.name} has an unfinished "
                    f"{other.describe()}; run 'vdsm-blockops recover {self.domain.name}'",
                    record=other.id,
                )
            records[record.disk] = record
            self._store(records)
        log.info("%s %s %s: %s recorded (%s)", self.domain.name, record.disk,
                 record.id, record.operation, record.phase.value)

    def advance(self, record: OperationRecord, phase: Phase, **changes: Any) -> None:
        if phase is not Phase.ROLLING_BACK and phase not in TRANSITIONS[record.phase]:
            raise StateError(
                f"record {record.id}: no transition {record.phase.value} -> {phase.value}"
            )
        log.info("%s %s %s: %s -> %s", self.domain.name, record.disk,
                 record.id, record.phase.value, phase.value)
        record.phase = phase
        for key, value in changes.items():
            setattr(record, key, value)
        # Phases change live only: the persistent copy (written at begin
        # and finish) exists so a record outlives a stopped VM, and
        # recover reads the real state rather than trusting the phase.
        self._write(record, config=False)

    def _write(self, record: OperationRecord, config: bool) -> None:
        with self._lock():
            records = self.load()
            records[record.disk] = record
            self._store(records, config=config)

    def add_created(self, record: OperationRecord, path: str, volume: bool = False) -> None:
        """Enter a file (or block ``volume``) this process has just created."""
        key = existing_key(path)
        if key is None:
            raise StateError(f"{path} was created but cannot be found")
        entry: dict[str, Any] = {"path": path, "id": key.to_json()}
        if volume:
            entry["volume"] = True
        record.created_files.append(entry)
        # In the persistent copy too: a VM stopped before recover must not
        # leave the files unnamed.
        self._write(record, config=True)

    def finish(self, record: OperationRecord) -> None:
        with self._lock():
            records = self.load()
            if records.get(record.disk) and records[record.disk].id == record.id:
                del records[record.disk]
                self._store(records)
        log.info("%s %s %s: record removed", self.domain.name, record.disk, record.id)
