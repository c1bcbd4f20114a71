"""What every verb answers, typed. ``to_json()`` gives the contract's JSON
object (pinned by ``tests/integration/test_reports.py``); the CLI renders
the same objects as text (``render.py``), the Ansible modules return them.
Optional fields are left out of the JSON while they are None."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from .model import ImageFormat, Method, Mode, Strategy

JSON = dict[str, Any]
V = TypeVar("V", bound="View")


def _plain(value: Any) -> Any:
    if isinstance(value, (Report, View)):
        return value.to_json()
    if isinstance(value, (Strategy, Mode, Method, ImageFormat)):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class View:
    """A part of a report: its fields as a JSON object."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ()  # fields left out of the JSON while None

    # Built up field by field inside the package; frozen when handed out
    # by the public API (``freeze``): assigning a field then raises.
    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise FrozenInstanceError(f"cannot assign to field {name!r}: the result is frozen")
        object.__setattr__(self, name, value)

    def freeze(self: V) -> V:
        """This result, and the results in its fields, made read-only."""
        for f in fields(self):
            value = getattr(self, f.name)
            for part in value if isinstance(value, list) else [value]:
                if isinstance(part, View):
                    part.freeze()
        object.__setattr__(self, "_frozen", True)
        return self

    def to_json(self) -> JSON:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)
                if not (f.name in self.OPTIONAL and getattr(self, f.name) is None)}


@dataclass
class Report(View):
    """A whole answer: one JSON object with ``ok`` and ``operation``."""

    OPERATION: ClassVar[str] = ""

    @property
    def ok(self) -> bool:
        return True

    @property
    def exit_code(self) -> int:
        """The command's exit code for this answer (0 when ok)."""
        return 0 if self.ok else 1

    def to_json(self) -> JSON:
        body: JSON = {"ok": self.ok}
        if self.OPERATION:
            body["operation"] = self.OPERATION
        body.update(super().to_json())
        return body


@dataclass
class Retired(View):
    """A layer an operation took out of the chain; ``valid``: its data still whole."""

    path: str
    valid: bool


@dataclass
class MergeReport(Report):
    """What a merge did (or, with ``dry_run``, would do) to one disk: the chain before and
    after, the layers it retired."""

    OPERATION = "merge"
    OPTIONAL = ("deleted", "kept", "record", "duration_s", "volume")
    domain: str
    disk: str
    strategy: Strategy
    dry_run: bool
    changed: bool
    finished: bool
    base: str | None
    top: str
    result_image: str
    chain_before: list[str]
    chain_after: list[str]
    retired: list[Retired]
    bytes_to_copy: int
    alternatives: dict[str, int | str]
    libvirt_call: str
    keep_relative: bool
    verified: bool
    online: bool = True  # False: a shut-off domain, done with qemu-img
    deleted: list[str] | None = None
    kept: list[dict[str, str]] | None = None  # asked to delete, kept: {"path", "why"}
    record: str | None = None
    duration_s: float | None = None
    # a qcow2 on a block device written into: its size, where its data ends,
    # the room needed, and the size it was extended to
    volume: dict[str, Any] | None = None


@dataclass
class RelocateReport(Report):
    """What a relocation did to one disk: what was copied where, the chain before and after."""

    OPERATION = "relocate"
    OPTIONAL = ("persistent_definition_fixed", "deleted", "kept", "record", "duration_s", "phases_s",
                "volume")
    domain: str
    disk: str
    mode: Mode
    method: Method
    format: ImageFormat
    dest: str
    dry_run: bool
    changed: bool
    pivot: bool
    chain_before: list[str]
    chain_after: list[str]
    copy_chain: list[str]
    bytes_to_copy: int
    retired: list[Retired]
    verified: bool
    finished: bool
    online: bool = True
    persistent_definition_fixed: bool | None = None
    deleted: list[str] | None = None
    kept: list[dict[str, str]] | None = None  # asked to delete, kept: {"path", "why"}
    record: str | None = None
    duration_s: float | None = None  # the whole operation, planning included
    phases_s: dict[str, float] | None = None  # {"copy", "verification"}: each phase's time
    volume: dict[str, Any] | None = None  # DEST a block device: its size, the room needed


@dataclass
class SnapshotReport(Report):
    """The overlay a snapshot put on one disk, and its chain before and after."""

    OPERATION = "snapshot"
    OPTIONAL = ("duration_s", "volume")
    domain: str
    disk: str
    overlay: str
    chain_before: list[str]
    chain_after: list[str]
    retired: list[Retired] = field(default_factory=list)
    verified: bool = True
    online: bool = True
    duration_s: float | None = None
    volume: dict[str, Any] | None = None  # OVERLAY a block device: its size, the room needed


@dataclass
class DiskFailure(Report):
    """One disk's failure inside an ``all`` report: the disk, its own
    error code and message."""

    disk: str
    error: JSON

    @property
    def ok(self) -> bool:
        return False


@dataclass
class MultiReport(Report):
    """The reports of every disk, for DISK ``all``."""

    operation: str
    domain: str
    results: list[Report]
    disk: str = "all"
    duration_s: float | None = None


@dataclass
class LayerView(View):
    """One layer of a chain: its path, format, sizes and backing name."""

    OPTIONAL = ("volume",)
    path: str
    format: str | None
    type: str
    index: int | None
    allocation: int | None
    virtual_size: int | None
    backing_in_metadata: str | None
    # Persistent dirty bitmaps ({name, granularity, flags}) as each image
    # records them; for a running VM's active layer, its libvirt checkpoints
    # (QEMU stores their bitmaps in the file only when it closes it).
    bitmaps: list[JSON] = field(default_factory=list)
    # a layer on a block device: {size, end, free} -- the device's bytes,
    # where a qcow2's used space ends (a raw one uses the whole disk), and
    # the room left for it to grow
    volume: JSON | None = None


@dataclass
class DiskView(View):
    """One disk in a chain report: its target, device and layers (active first)."""

    disk: str
    device: str
    chain: list[LayerView]
    chain_from: str  # libvirt | image metadata
    mirror: JSON | None
    metadata_agrees: bool
    problems: list[str]


@dataclass
class ChainReport(Report):
    """Each disk of a domain with its backing chain (``chain``)."""

    OPERATION = "chain"
    domain: str
    uuid: str
    active: bool
    disks: list[DiskView]


@dataclass
class JobRow(View):
    """One running block job or migration."""

    domain: str
    disk: str
    type: str
    cur: int
    end: int
    percent: float | None
    bandwidth_mib_s: float
    ready: bool
    mirror: str | None


@dataclass
class OperationRow(View):
    """An operation of this tool in progress (its record), with or without
    a libvirt job underneath: qemu-img phases and shut-off domains too."""

    domain: str
    disk: str
    operation: str  # merge | relocate | snapshot
    method: str  # strategy or method of the plan
    phase: str
    online: bool  # False: a shut-off domain, worked on by qemu-img
    record: str
    pid: int
    running: bool  # the process that owns it is alive (else: recover)
    started_at: float
    # started with --no-wait: its owner returned at once by design, the
    # block job runs on under the record ('recover' finishes it when done)
    detached: bool = False


@dataclass
class JobsReport(Report):
    """The block jobs running and the operations under way (``jobs``)."""

    OPERATION = "jobs"
    jobs: list[JobRow]
    operations: list[OperationRow] = field(default_factory=list)


@dataclass
class VerifyReport(Report):
    """What ``verify`` found: ``ok`` while ``problems`` is empty."""

    OPERATION = "verify"
    domain: str
    disk: str
    problems: list[str]
    # checkpoints an incremental backup cannot start from (problems too
    # with ``verify --checkpoints``)
    broken_checkpoints: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> JSON:
        body = super().to_json()
        body["verified"] = self.ok
        if not self.ok:
            body["error"] = {"code": "verification-failed",
                             "message": f"{len(self.problems)} problem(s) found"}
        return body


@dataclass
class SpeedReport(Report):
    """The bandwidth a running job was set to."""

    OPERATION = "speed"
    domain: str
    disk: str
    bandwidth_mib_s: int


@dataclass
class InstallReport(Report):
    """hook install/uninstall, units install/uninstall."""

    OPTIONAL = ("path", "reloaded", "units", "enabled", "note")
    operation: str
    path: str | None = None
    reloaded: list[str] | None = None
    units: list[str] | None = None
    enabled: bool | None = None
    note: str | None = None


@dataclass
class HistoryReport(Report):
    """The node's trail of operations, in the order they started."""

    operation: str
    entries: list[dict[str, Any]]


@dataclass
class TextReport(Report):
    """A completion script, the manual page, names for completion."""
    operation: str
    text: str
