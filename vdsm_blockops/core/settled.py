"""The reports of settling operation records: ``recover`` and ``abort``
(failed, not raised, while some records stay unsettled: ``error`` says why)."""

from __future__ import annotations

from dataclasses import dataclass

from .reports import JSON, Report, View


@dataclass
class RecordOutcome(View):
    """What recover did with one operation record."""

    OPTIONAL = ("message",)
    domain: str
    disk: str
    record: str
    operation: str
    phase: str
    result: str  # finished | rolled-back | failed | busy
    message: str | None = None

    @property
    def settled(self) -> bool:
        return self.result not in ("failed", "busy", "unreadable", "waiting")


class _Settles:
    """A report on settling records: failed while ``error`` says some were not."""

    error: JSON | None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def exit_code(self) -> int:  # 3: it only stopped waiting on a job that still runs
        return 0 if self.error is None else 3 if self.error.get("code") == "timeout" else 1


@dataclass
class RecoverReport(_Settles, Report):
    """What ``recover`` did with each unfinished record (``records``)."""

    OPERATION = "recover"
    OPTIONAL = ("queued", "error")
    domain: str
    records: list[RecordOutcome]
    queued: list[str] | None = None
    error: JSON | None = None


@dataclass
class AbortReport(_Settles, Report):
    """What ``abort`` did: the job aborted (or pivoted) and the records it settled."""

    OPERATION = "abort"
    OPTIONAL = ("recover", "error")
    domain: str
    disk: str
    pivot: bool
    chain_after: list[str]
    recover: list[RecordOutcome] | None = None
    error: JSON | None = None
