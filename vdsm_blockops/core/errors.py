"""The one error tree of vdsm-blockops.

Every failure the tool reports is one of these; the shells (CLI, Ansible,
hook) map the class to an exit code or a ``fail_json`` and print ``str(e)``,
which reads as one sentence::

    BlockOpsError                      exit 1   something failed
     ├── BadRequest                    exit 2   refused before anything changed
     │    ├── UnknownDomain
     │    ├── UnknownDisk
     │    ├── UnknownImage
     │    └── UnsafeRequest            e.g. commit into a layer another VM uses
     ├── OperationFailed               exit 1   libvirt/QEMU said no mid-way
     │    ├── Interrupted              Ctrl-C or SIGTERM stopped the command
     │    ├── Aborted                  'abort' from another process stopped it
     │    ├── JobFailed                a block job ended FAILED or CANCELED
     │    ├── VolumeNotExtended        a block volume could not be extended
     │    ├── VerificationFailed       result does not match the plan/metadata
     │    └── StateError               our own records went wrong
     ├── ConnectionLost                exit 1   libvirtd went away for good
     ├── JobTimeout                    exit 3
     └── Conflict                      exit 4   another job/operation on the disk
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the CLI's start loads no typing
    from typing import Any


class BlockOpsError(Exception):
    """Root of all errors. ``code`` is the stable machine-readable name.

    The optional fields say more where there is more to say; they appear
    under ``details`` in the JSON error: ``record`` (the operation record
    that holds a disk), ``holder`` (who holds its lock), ``problems`` (what
    a verification found), ``results`` (each disk's report, for ``all``),
    ``settled`` (what became of a failed operation's change: ``"rolled-back"``
    -- the chain is as before --, ``"finished"``, or None: left as it stands
    for ``recover`` under its ``record``). ``domain`` and ``disk`` name what
    the request was about (set by the public API; not in the JSON, whose
    report names them already).
    """

    exit_code = 1
    code = "failed"
    usage: str | None = None  # a command line refused by the parser: its usage line

    def __init__(self, message: str, *, record: str | None = None, holder: str | None = None,
                 problems: list[str] | None = None,
                 results: list[dict[str, Any]] | None = None, settled: str | None = None,
                 domain: str | None = None, disk: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.record = record
        self.holder = holder
        self.problems = problems
        self.results = results
        self.settled = settled
        self.domain = domain
        self.disk = disk

    def __str__(self) -> str:
        return self.message

    @property
    def details(self) -> dict[str, Any]:
        fields = {"record": self.record, "holder": self.holder, "problems": self.problems,
                  "results": self.results, "settled": self.settled}
        return {k: v for k, v in fields.items() if v is not None}

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body

    _FIELDS = ("record", "holder", "problems", "results", "settled", "domain", "disk")

    def with_message(self, message: str, **fields: Any) -> BlockOpsError:
        """The same kind of error with another message (and fields)."""
        unknown = set(fields) - set(self._FIELDS)
        if unknown:
            raise TypeError(f"unknown error fields {sorted(unknown)}")
        copy = type(self)(message, **{k: fields.get(k, getattr(self, k)) for k in self._FIELDS})
        copy.usage = self.usage
        return copy


class BadRequest(BlockOpsError):
    """The request was refused before anything changed."""

    exit_code = 2
    code = "bad-request"


class UnknownDomain(BadRequest):
    """No domain of that name or UUID on the node (exit 2)."""

    code = "unknown-domain"


class UnknownDisk(BadRequest):
    """The domain has no disk of that target name (exit 2)."""

    code = "unknown-disk"


class UnknownImage(BadRequest):
    """No image of the disk's chain answers to that name (exit 2)."""

    code = "unknown-image"


class UnsafeRequest(BadRequest):
    """Refused as unsafe, e.g. a commit into a layer another VM uses (exit 2)."""

    code = "unsafe-request"


class OperationFailed(BlockOpsError):
    """libvirt, QEMU or qemu-img failed mid-way (exit 1); ``settled`` says what became of the
    change."""

    code = "operation-failed"


class Interrupted(OperationFailed):
    """Ctrl-C or SIGTERM stopped the command (what it started is handed
    over to ``recover`` under its record)."""

    code = "interrupted"


class Aborted(OperationFailed):
    """'abort' from another process stopped the operation (and settles it)."""

    code = "aborted"


class JobFailed(OperationFailed):
    """A block job ended FAILED or CANCELED (exit 1)."""

    code = "job-failed"


class VerificationFailed(OperationFailed):
    """The result does not match the plan or the images' metadata (exit 1); ``problems``
    lists each."""

    code = "verification-failed"


class VolumeNotExtended(OperationFailed):
    """A block volume could not be made big enough (the extend command
    failed, or the device stayed too small)."""

    code = "volume-not-extended"


class StateError(OperationFailed):
    """Our own bookkeeping went wrong (an illegal phase transition, a
    created file that vanished): a failure, never a refusal."""

    code = "state-error"


class ConnectionLost(BlockOpsError):
    """libvirtd went away for good (exit 1)."""

    code = "connection-lost"


class JobTimeout(BlockOpsError):
    """The operation did not finish within its ``timeout`` (exit 3); rolled back as ``abort``
    would."""

    exit_code = 3
    code = "timeout"


class Conflict(BlockOpsError):
    """Another job or operation holds the disk, or the chain changed meanwhile (exit 4)."""

    exit_code = 4
    code = "conflict"


class PivotNotReady(OperationFailed):
    """libvirt refused a pivot because the mirror is not ready (yet)."""

    code = "pivot-not-ready"
