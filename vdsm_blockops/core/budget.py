"""When an operation must stop: its ``--timeout`` as a point in time, and
the interrupt of a command that works on several disks at once.

``--timeout N`` bounds the whole operation from its start -- a wait in the
queue of a VM's pulls, qemu-img, the tool's own copies, the block job --
not each of them: an operator who gives 5 s expects the command back in
about 5 s, whatever ran underneath. Every waiting loop asks ``check()``
(or ``left()``) between steps; the timeout then rolls back like ``abort``.

The interrupt: Ctrl-C reaches only the main thread; the threads working
on the other disks of ``all``, or on a disk's own file copies, see it
here (``wait_all``), at their next step, and stop too (the command
hands what it started over to ``recover``, as for one disk).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import Interrupted, JobTimeout

if TYPE_CHECKING:
    from concurrent.futures import Future

INTERRUPTED = ("Whatever it ran itself (qemu-img, its own copies) stopped with it; a block "
               "job it started runs on under its record ('jobs' lists both): 'recover' "
               "finishes or rolls back what it left, 'abort' rolls it back")
STOPPED = f"the command was interrupted. {INTERRUPTED}"


@dataclass
class Budget:
    timeout_s: float | None = None
    clock: Callable[[], float] = time.monotonic
    at: float | None = None  # clock() value at which the timeout passes
    interrupted: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def starting_now(cls, timeout_s: float | None,
                     clock: Callable[[], float] = time.monotonic,
                     interrupted: threading.Event | None = None) -> Budget:
        """A budget whose timeout starts now; ``interrupted``: the event a
        caller sets to stop the operation (the API's cancellation token)."""
        return cls(timeout_s, clock, None if timeout_s is None else clock() + timeout_s,
                   interrupted if interrupted is not None else threading.Event())

    def check(self, doing: str = "the operation") -> None:
        """Raise Interrupted or JobTimeout when the operation must stop."""
        if self.interrupted.is_set():
            raise Interrupted(STOPPED)
        if self.at is not None and self.clock() >= self.at:
            raise JobTimeout(f"{doing} did not finish within the timeout of "
                             f"{self.timeout_s:g} s")

    def left(self, doing: str = "the operation") -> float | None:
        """Seconds left (None: no timeout); raises as ``check`` when none are."""
        self.check(doing)
        return None if self.at is None else self.at - self.clock()

    def sleep(self, seconds: float, sleep: Callable[[float], None] = time.sleep,
              doing: str = "the operation") -> None:
        """Sleep in short steps, stopping as ``check`` says."""
        end = self.clock() + seconds
        while (rest := end - self.clock()) > 0:
            left = self.left(doing)
            sleep(min(rest, 0.2, left if left is not None else rest))
        self.check(doing)


def wait_all(futures: Sequence[Future[Any]], budget: Budget | None) -> None:
    """Wait until every one of ``futures`` is done. Woken every 0.2 s: the
    kernel may hand SIGINT to any thread (libvirt's event loop, a worker);
    Python then runs the handler only when the main thread next runs
    bytecode -- a wait without a timeout held Ctrl-C until all were done.
    On Ctrl-C the threads are told through ``budget`` to stop at their
    next step, waited for, and the interrupt raised."""
    import concurrent.futures  # only where threads run: not at start-up

    try:
        while concurrent.futures.wait(futures, timeout=0.2).not_done:
            pass
    except KeyboardInterrupt:
        if budget is None:
            raise
        budget.interrupted.set()
        concurrent.futures.wait(futures)
        raise
