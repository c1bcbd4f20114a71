"""How every verb of the public API's :class:`~vdsm_blockops.api.Node`
runs: the report frozen, errors naming the domain and disk, a line in the
node's history, and an interrupt (Ctrl-C, SIGTERM, a cancellation) turned
into the error that says what it left and who settles it."""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..core.errors import Aborted, BlockOpsError, Interrupted
from ..core.reports import Report

if TYPE_CHECKING:
    from ..core.config import Config
    from ..virt import Connection

R = TypeVar("R", bound=Report)
F = TypeVar("F", bound=Callable[..., Any])


def renamed(**old_to_new: str) -> Callable[[F], F]:
    """The deprecation policy for a renamed keyword argument (see
    docs/versioning.rst): the old name keeps working for at least one minor
    release, with a DeprecationWarning naming the new one."""
    def wrap(function: F) -> F:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{function.__name__}() got both {old!r} and {new!r}")
                    warnings.warn(f"{function.__name__}(): {old!r} is deprecated, use {new!r}",
                                  DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)
        return call  # type: ignore[return-value]
    return wrap


def trail(state: Any, source: str, operation: str, domain: str | None, disk: str | None,
          started: float, outcome: Report | BlockOpsError, message: str | None = None) -> None:
    """The node's history line of a call that changed (or tried to change)
    the node: its report, or its error and exit code."""
    from ..engine.history import append, entry

    if isinstance(outcome, BlockOpsError):
        exit_code, code = outcome.exit_code, outcome.code
        body, message = {"error": outcome.to_json()}, outcome.message
    else:
        exit_code, body = outcome.exit_code, outcome.to_json()
        code = "ok" if exit_code == 0 else "failed"
    append(state, entry(source=source, operation=operation, domain=domain, disk=disk,
                        started=started, exit_code=exit_code, outcome=code, body=body,
                        message=message))


# The verbs that change a node: each call leaves a line in its history.
CHANGES = ("merge", "relocate", "migrate", "snapshot", "abort", "speed", "recover")


class CancelToken:
    """Set from any thread to stop an operation at its next step, as
    Ctrl-C stops the command: what it ran itself stops, a block job it
    started runs on under its record for :meth:`Node.recover` (a move to
    another node is rolled back). The call raises :class:`Interrupted`."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class Calls:
    """The part of a node every verb runs through."""

    config: Config
    source: str
    interrupt_name: str
    _conn: Connection | None

    @property
    def _state(self) -> Any:
        from ..engine.state import StateDir

        return StateDir(self.config.state_dir)

    def _call(self, verb: str, domain: str | None, disk: str | None,
              action: Callable[[], R], *, dry_run: bool = False,
              cancel: CancelToken | None = None) -> R:
        started = time.time()
        trailed = verb in CHANGES and not dry_run
        try:
            report = action()
        except KeyboardInterrupt:
            error = self._interrupted(verb, domain, disk, self.interrupt_name)
            self._trail(trailed, verb, domain, disk, started, error)
            raise error from None
        except BlockOpsError as exc:
            if isinstance(exc, Interrupted) and cancel is not None and cancel.cancelled \
                    and exc.message == _stopped_message():
                exc = self._interrupted(verb, domain, disk, "cancellation")
            exc.domain = exc.domain or domain
            exc.disk = exc.disk or disk
            self._trail(trailed, verb, domain, disk, started, exc)
            raise exc
        self._trail(trailed, verb, domain, disk, started, report)
        return report.freeze()

    def _trail(self, trailed: bool, verb: str, domain: str | None, disk: str | None,
               started: float, outcome: Report | BlockOpsError) -> None:
        if trailed:
            trail(self._state, self.source, verb, domain, disk, started, outcome)

    def _interrupted(self, verb: str, domain: str | None, disk: str | None,
                     by: str) -> BlockOpsError:
        """What stopped the call: 'abort' from another process (its note:
        that process settles what this one started), else ``by`` (Ctrl-C,
        SIGTERM, a cancellation): the work is handed over to ``recover``."""
        from ..core.budget import INTERRUPTED
        from ..engine import aborts

        what = " ".join(w for w in (verb, domain, disk) if w)
        note = aborts.find(self._state, owner_pid=os.getpid())
        if note is not None:
            return Aborted(aborts.stopped_by_abort(note, what), domain=domain, disk=disk)
        ids = self._own_records(domain)
        what += f" (record {', '.join(ids)})" if ids else ""
        return Interrupted(f"{what}: stopped by {by}. {INTERRUPTED}", domain=domain, disk=disk,
                           record=ids[0] if len(ids) == 1 else None)

    def _own_records(self, domain: str | None) -> list[str]:
        """The records this process wrote on ``domain`` (none when libvirt
        does not answer: an interrupt's own message must not fail)."""
        if not domain or self._conn is None:  # never connect in an interrupt
            return []
        try:
            from ..engine.records import RecordStore

            return [r.id for r in RecordStore(self._conn.domain(domain)).load().values()
                    if r.pid == os.getpid()]
        except Exception:
            return []


def _stopped_message() -> str:
    from ..core.budget import STOPPED

    return STOPPED


