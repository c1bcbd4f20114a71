"""The record of a move to another node, kept on the source node.

A domain's own metadata cannot hold it: the domain leaves the node (a
transient one vanishes with its definition), and what must be found after
a crash is exactly that the domain is half here, half there. So the record
is a file in the state folder, ``migrations/<domain uuid>.json``, written
durably before every step: what was asked, the plan, the phase, and every
file created on the destination (entered the moment it was created, with
the digest of what was written into it), until the move is verified on the
destination and the source retired -- or the destination's files are
removed again. The hook refuses to start the domain on this node while the
record exists (never two running copies), and ``recover`` settles it.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.errors import StateError
from ..core.lifetime import process_identity
from ..core.model import StrEnum
from .state import StateDir, write_json_atomic


class MovePhase(StrEnum):
    PLANNED = "planned"  # nothing changed yet
    COPYING = "copying"  # files being created on the destination
    COPIED = "copied"  # every file there and proven
    MIGRATING = "migrating"  # migrateToURI3 called
    MOVED = "moved"  # runs on the destination, not yet verified and retired
    # verified there, the source retired; its layers deleted (--delete-source)
    # once the destination's copies can no longer be lost to a crash there
    DELETING = "deleting"
    ROLLING_BACK = "rolling-back"


@dataclass
class MigrationRecord:
    domain: str
    uuid: str
    dest_uri: str
    request: dict[str, Any]
    plan: dict[str, Any]
    phase: MovePhase = MovePhase.PLANNED
    # files this move created on the destination: {"path", "digest"};
    # the digest tells ours from a file someone else put there since
    created: list[dict[str, Any]] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)  # beside an unfinished upload
    # the claims this move left on the destination (``ops/dest_files.py``),
    # and the layers it found there with its bytes and did not upload
    claims: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    copied_at: float = 0.0  # when the last copy was proven (time.time())
    # --delete-source: when deleting may start, and how the domain ran on
    # the destination then ([domain id, cpu time]): still so after the wait
    # means the destination did not restart meanwhile
    delete_after: float = 0.0
    dest_run: list[int] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)  # XML, parents first
    id: str = field(default_factory=lambda: os.urandom(6).hex())
    started_at: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)
    owner: str = field(default_factory=process_identity)  # ``node.owner_alive``
    # Set only on a record this version cannot read (a later version's
    # field, a hand edit): why. Such a record is kept as it is on disk and
    # stops only its own domain.
    unreadable: str = ""

    def to_json(self) -> dict[str, Any]:
        body = {**asdict(self), "phase": self.phase.value}
        del body["unreadable"]
        return body

    def describe(self) -> str:
        if self.unreadable:
            return (f"move record {self.uuid} (which this version cannot read: {self.unreadable}; "
                    "settle it with the version that wrote it, or put it right by hand)")
        return f"move {self.id} to {self.dest_uri} ({self.phase.value})"

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> MigrationRecord:
        if "unreadable" in body:
            raise ValueError("a field named unreadable")
        # earlier versions wrote no owner: their liveness falls back on pid
        return cls(**{"owner": "", **body, "phase": MovePhase(body["phase"])})


class MigrationStore:
    def __init__(self, state: StateDir) -> None:
        self.folder = os.path.join(state.path, "migrations")

    def _path(self, uuid: str) -> str:
        return os.path.join(self.folder, f"{uuid}.json")

    def save(self, record: MigrationRecord) -> None:
        if record.unreadable:  # kept byte for byte: never overwritten
            raise StateError(f"{record.describe()} cannot be changed by this version")
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        write_json_atomic(self._path(record.uuid), record.to_json())

    def advance(self, record: MigrationRecord, phase: MovePhase) -> None:
        record.phase = phase
        self.save(record)

    def load(self, uuid: str) -> MigrationRecord | None:
        """The record of domain ``uuid``'s move, None when there is none. A
        record this version cannot read comes back with ``unreadable`` set
        (and what of it could be read): it concerns its own domain only."""
        import json

        body: object = None
        try:
            with open(self._path(uuid), encoding="utf-8") as handle:
                body = json.load(handle)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            return MigrationRecord.from_json(body)
        except FileNotFoundError:
            return None
        except (OSError, TypeError, ValueError, KeyError) as exc:
            got = body if isinstance(body, dict) else {}
            text = {k: str(got[k]) for k in ("domain", "dest_uri", "id") if k in got}
            return MigrationRecord(domain=text.get("domain", uuid), uuid=uuid,
                                   dest_uri=text.get("dest_uri", "?"), request={}, plan={},
                                   id=text.get("id", "?"), pid=0, started_at=0.0,
                                   unreadable=f"{self._path(uuid)}: {exc}")

    def all(self, domain: str | None = None) -> list[MigrationRecord]:
        """Every record, or those of ``domain`` (its name or uuid: it may
        no longer be defined here)."""
        try:
            names = sorted(os.listdir(self.folder))
        except FileNotFoundError:
            return []
        found = [self.load(n[:-5]) for n in names if n.endswith(".json")]
        return [r for r in found if r is not None and domain in (None, r.domain, r.uuid)]

    def drop(self, record: MigrationRecord) -> None:
        try:
            os.unlink(self._path(record.uuid))
        except FileNotFoundError:
            pass


def pending_move(state_path: str, uuid: str) -> dict[str, Any] | None:
    """The hook's look: the unfinished move of domain ``uuid`` (its record
    as written), or None. A record it cannot read counts as a move."""
    import json

    path = os.path.join(state_path, "migrations", f"{uuid}.json")
    try:
        with open(path, encoding="utf-8") as handle:
            body = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"dest_uri": "?", "phase": "unreadable"}
    return body if isinstance(body, dict) else {"dest_uri": "?", "phase": "unreadable"}
