"""Node-local state: the registry of invalidated images and disk locks.

Lives in the state directory (``Config.state_dir``). The hook reads the
registry without libvirt, so it is a plain JSON file, replaced atomically
(write, fsync, rename, fsync the folder) under an flock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

from ..core.errors import Conflict
from ..core.identity import ImageKey, clean_path, existing_key
from .registry import InvalidImages, live_entries, registry_key

if TYPE_CHECKING:
    from ..core.budget import Budget

REGISTRY_NAME = "invalidated.json"
GUARD_OFF_NAME = "guard-disabled.json"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_private(path: str, flags: int) -> int:
    """A file descriptor of ``path``, made 0600 if it is created; never
    through a symlink."""
    return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def write_json_atomic(path: str, data: object, durable: bool = True) -> None:
    """Replace ``path`` whole (0600). ``durable=False`` for a cache a reader
    rebuilds when it is lost or unreadable: no fsyncs (~2 ms each here)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a killed writer's: it may have another mode
    with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_EXCL), "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


# Without a budget (no --timeout) a lock wait still ends: the node's own
# locks are held for milliseconds (the registry, a domain's records, the
# history) or not waited for (disks); only a stuck process holds one longer.
LOCK_WAIT_S = 60.0


# A holder killed in the middle of disk I/O lets its lock go when that
# I/O returns: a lock it holds is waited for that long, not refused.
DYING_HOLDER_WAIT_S = 30.0


def _holder_dying(holder: str) -> bool:
    """Whether the lock's holder (``... (pid N)``, as ``disk_lock`` writes
    it) is a process on its way out."""
    from ..core.lifetime import process_exiting

    found = re.search(r"\(pid (\d+)\)$", holder)
    return found is not None and process_exiting(int(found.group(1)))


class StateDir:
    """The node's state folder: root's alone (0700, files 0600), so no other
    local user can read the registry and the history or hold a lock the
    tool waits on. ``budget`` (the operation's ``--timeout`` and interrupt)
    bounds every lock wait."""

    def __init__(self, path: str, budget: Budget | None = None) -> None:
        self.path = path
        self.budget = budget

    def ensure(self) -> None:
        """The folder and its ``locks``, made private (tightened if an
        earlier version made them readable by all)."""
        for folder in (self.path, os.path.join(self.path, "locks")):
            os.makedirs(folder, mode=0o700, exist_ok=True)
            if stat.S_IMODE(os.lstat(folder).st_mode) & 0o077:
                os.chmod(folder, 0o700)


    def upgrade(self) -> None:
        """Bring an existing state folder to this version: private (every
        folder 0700, every file 0600, a lock file left by earlier versions
        removed once no one holds it) and its registry in today's form."""
        self.ensure()
        for top, folders, files in os.walk(self.path):
            for name in folders:
                os.chmod(os.path.join(top, name), 0o700, follow_symlinks=False)
            for name in files:
                path = os.path.join(top, name)
                if not os.path.islink(path):
                    os.chmod(path, 0o600)
        self.sweep_locks()
        if os.path.exists(self.registry_path):
            self.forget([])  # rewrites it converted, keeping what it cannot read

    @property
    def registry_path(self) -> str:
        return os.path.join(self.path, REGISTRY_NAME)

    # -- invalidated images
    def invalidated(self) -> dict[str, dict[str, Any]]:
        """identity -> why its image was invalidated: the image's key under
        ``id``, its name then under ``path``. Missing registry = empty.
        (Registries of earlier versions were keyed by path: ``entry_path``.)"""
        try:
            with open(self.registry_path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    @contextlib.contextmanager
    def _registry_lock(self) -> Iterator[None]:
        with self.lock("registry.lock"):
            yield

    def invalidate(self, paths: list[str], *, domain: str, disk: str, operation: str) -> None:
        """Enter the images ``paths`` name now. A path that names nothing
        is not entered: a record is about a file, and a later file at that
        path is another image."""
        if not paths:
            return
        with self._registry_lock():
            data = live_entries(self.invalidated())
            for path in paths:
                key = existing_key(path)
                if key is None:
                    continue
                data[registry_key(key)] = {
                    "path": clean_path(path),
                    "domain": domain,
                    "disk": disk,
                    "operation": operation,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "id": key.to_json(),
                }
            write_json_atomic(self.registry_path, data)

    def forget(self, keys: Sequence[ImageKey]) -> None:
        """Drop the entries of the images ``keys`` (taken before they were
        deleted), and every entry whose file is gone."""
        with self._registry_lock():
            data = live_entries(self.invalidated(), gone=keys)
            write_json_atomic(self.registry_path, data)

    # -- the guard turned off, explicitly (``hook disable``)
    @property
    def guard_off_path(self) -> str:
        return os.path.join(self.path, GUARD_OFF_NAME)

    def guard_disabled(self) -> dict[str, Any] | None:
        """Why the operator turned the guard off, or None while it guards.
        A file there that cannot be read still says "off": only an operator
        makes it, and ``hook enable`` removes it."""
        try:
            with open(self.guard_off_path, encoding="utf-8") as handle:
                body = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            return {"reason": f"(unreadable: {exc})"}
        return body if isinstance(body, dict) else {"reason": "(unreadable)"}

    def set_guard_disabled(self, why: dict[str, Any] | None) -> None:
        self.ensure()
        if why is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.guard_off_path)
                fsync_dir(self.path)
            return
        write_json_atomic(self.guard_off_path, why)

    def invalid_lookup(self) -> InvalidImages:
        return InvalidImages(self.invalidated())

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the node-wide lock ``name``, waiting for it as long as the
        budget allows (exit 3 naming the wait) and at most ``LOCK_WAIT_S``
        (exit 4 naming the holder)."""
        with self._lock_file(name, between_tries=self._bounded_wait(name)):
            yield

    def _bounded_wait(self, name: str) -> Callable[[], None]:
        give_up = time.monotonic() + LOCK_WAIT_S

        def step() -> None:
            if self.budget is not None:
                self.budget.check(f"the wait for the node's lock {name}")
            if time.monotonic() >= give_up:
                raise Conflict(f"the node's lock {os.path.join(self.path, 'locks', name)} has been "
                               f"held for over {LOCK_WAIT_S:g} s by another process "
                               "(fuser -v on it names it)", holder="another process")
        return step

    @contextlib.contextmanager
    def _lock_file(self, name: str, wait: bool = True,
                   between_tries: Callable[[], None] | None = None) -> Iterator[IO[str]]:
        """Hold ``locks/<name>`` (an flock), yielding its open file; with
        ``wait=False`` a held lock raises BlockingIOError at once, its file's
        text (the holder) in the message. With ``between_tries`` the wait is
        a try every 0.1 s, that callable between tries (it raises to stop
        waiting: a timeout, an interrupt in another thread).

        The file is removed on release, so the folder holds only the locks
        in use (it held one file per domain and disk ever seen). That is
        safe because a taker checks, once locked, that the path still names
        the file it locked; if the holder it waited for removed it, it
        starts again on the new file."""
        self.ensure()
        path = os.path.join(self.path, "locks", name)
        while True:
            handle = os.fdopen(open_private(path, os.O_RDWR | os.O_APPEND), "a+", encoding="utf-8")
            try:
                self._flock(handle, wait, between_tries)
            except OSError as exc:
                holder = ""
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    handle.seek(0)
                    holder = handle.read().strip()
                handle.close()
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise BlockingIOError(exc.errno, holder) from None
                raise
            except BaseException:
                handle.close()
                raise
            mine = os.fstat(handle.fileno())
            try:
                now = os.stat(path)
                if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                    break
            except FileNotFoundError:
                pass
            handle.close()
        try:
            yield handle
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)  # still held: no one else is inside
            handle.close()

    @staticmethod
    def _flock(handle: IO[str], wait: bool, between_tries: Callable[[], None] | None) -> None:
        if not wait or between_tries is None:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            return
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                between_tries()
                time.sleep(0.1)

    def sweep_locks(self) -> int:
        """Remove the lock files no one holds (left by a killed process, or
        by versions that kept one per domain and disk ever seen); returns
        how many. Each is taken first, as any taker would, so a lock in use
        is never touched."""
        folder = os.path.join(self.path, "locks")
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return 0
        swept = 0
        for name in names:
            if not name.endswith(".lock"):
                continue
            try:
                with self._lock_file(name, wait=False):
                    swept += 1  # removed on release
            except OSError:  # held (BlockingIOError), or gone meanwhile
                continue
        return swept

    @contextlib.contextmanager
    def domain_lock(self, domain_uuid: str) -> Iterator[None]:
        """Held around every read-modify-write of one domain's records, so
        two processes on two disks of the domain never lose each other's."""
        with self.lock(f"{domain_uuid}-records.lock"):
            yield

    @contextlib.contextmanager
    def stream_lock(self, domain_uuid: str, wait: bool = True,
                    between_tries: Callable[[], None] | None = None) -> Iterator[None]:
        """Wait until no other block pull runs in this domain, then hold it.

        QEMU 7.2 (Debian 7.2+dfsg-7+deb12u18) segfaults now and then when
        two block-stream jobs of one VM finish at the same moment (seen
        here: 2 of 8 VMs with two concurrent pulls crashed; commits and
        copies did not). So pulls within one domain run one at a time,
        across processes too; other jobs still run side by side. With
        ``wait=False`` a held lock is a Conflict at once. (A pull started
        with --no-wait outlives its lock: callers also look for running
        pulls while holding it, see ``ops.exclusive_pull``.)
        """
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self._lock_file(f"{domain_uuid}-stream.lock", wait,
                                                    between_tries))
            except BlockingIOError:
                raise Conflict("another block pull of this VM is being started or "
                               "waited on (pulls of one VM run one at a time)") from None
            yield

    # -- one operation per disk, across processes
    @contextlib.contextmanager
    def disk_lock(self, domain_uuid: str, disk: str, holder: str) -> Iterator[None]:
        """Hold the node-wide lock of one disk, or raise Conflict at once."""
        with contextlib.ExitStack() as stack:
            until = time.monotonic() + DYING_HOLDER_WAIT_S
            while True:
                try:
                    handle = stack.enter_context(self._lock_file(f"{domain_uuid}-{disk}.lock",
                                                                 wait=False))
                    break
                except BlockingIOError as exc:
                    other = exc.strerror or "another process"
                    if not (_holder_dying(other) and time.monotonic() < until):
                        raise Conflict(f"disk {disk} is busy: {other} holds its lock",
                                       holder=other) from None
                if self.budget is not None:  # a killed holder lets go once its I/O returns
                    self.budget.sleep(0.1, doing=f"the wait for the lock of disk {disk}")
                else:
                    time.sleep(0.1)
            handle.seek(0)
            handle.truncate()
            handle.write(f"{holder} (pid {os.getpid()})")
            handle.flush()
            yield
