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
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from ..core.errors import Conflict
from ..core.identity import (
    ImageKey,
    clean_path,
    existing_key,
    file_exists,
    image_key,
    known_key_form,
    recorded_key,
)

REGISTRY_NAME = "invalidated.json"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, data: object, durable: bool = True) -> None:
    """Replace ``path`` whole. ``durable=False`` for a cache a reader
    rebuilds when it is lost or unreadable: no fsyncs (~2 ms each here)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


class StateDir:
    def __init__(self, path: str) -> None:
        self.path = path

    def _ensure(self) -> None:
        os.makedirs(os.path.join(self.path, "locks"), mode=0o755, exist_ok=True)

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
        self._ensure()
        with open(os.path.join(self.path, "locks", "registry.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
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

    def invalid_lookup(self) -> InvalidImages:
        return InvalidImages(self.invalidated())

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the node-wide lock ``name`` (waiting for it)."""
        with self._lock_file(name):
            yield

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
        self._ensure()
        path = os.path.join(self.path, "locks", name)
        while True:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (closed below)
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
            if not name.endswith(".lock") or name == "registry.lock":
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
        with self._lock_file(f"{domain_uuid}-records.lock"):
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
            try:
                handle = stack.enter_context(self._lock_file(f"{domain_uuid}-{disk}.lock", wait=False))
            except BlockingIOError as exc:
                other = exc.strerror or "another process"
                raise Conflict(f"disk {disk} is busy: {other} holds its lock", holder=other) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{holder} (pid {os.getpid()})")
            handle.flush()
            yield


def registry_key(key: ImageKey) -> str:
    return ":".join(str(part) for part in key.to_json())


def entry_path(name: str, entry: dict[str, Any]) -> str:
    return str(entry.get("path") or name)


def _current_key(name: str, entry: dict[str, Any]) -> ImageKey | None:
    """The key an entry names, in today's form; None while that cannot be
    known (an earlier version's entry whose path names nothing now, or
    another file: ``identity.recorded_key``)."""
    return recorded_key(entry.get("id"), entry_path(name, entry))


def live_entries(data: dict[str, Any],
                 gone: Sequence[ImageKey] = ()) -> dict[str, dict[str, Any]]:
    """The registry, keyed in today's form, without the entries whose file
    is provably gone: in ``gone`` (deleted by the tool), or no longer on its
    own file system (asked by handle there: a retired file renamed or
    hard-linked elsewhere still exists; a file system not mounted now proves
    nothing). An entry that cannot be read in today's form (an earlier
    version's whose file is not where it was, or a later version's) is kept
    byte for byte: never dropped unread. Node state does not grow with the
    node's history."""
    kept: dict[str, dict[str, Any]] = {}
    for name, entry in data.items():
        key = _current_key(name, entry) if isinstance(entry, dict) else None
        if key is None:
            kept[name] = entry
            continue
        if key in gone or file_exists(key) is False:
            continue
        kept[registry_key(key)] = {**entry, "path": entry_path(name, entry), "id": key.to_json()}
    return kept


class InvalidImages:
    """The registry as a lookup by identity: an entry matches the image
    it was made for, named by any path (an alias, a new name after a
    rename, a hard link) -- and never a later file that got its number or
    its path. An entry whose key is of no form this version knows (a later
    version's) cannot be matched by identity: it matches its own path, so
    the guard fails closed on it rather than ignoring it."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self._by_key: dict[ImageKey, dict[str, Any]] = {}
        self._by_path: dict[str, dict[str, Any]] = {}
        for name, entry in data.items():
            if not isinstance(entry, dict):
                continue
            path = entry_path(name, entry)
            key = _current_key(name, entry)
            if key is not None:
                self._by_key[key] = {**entry, "path": path}
            elif not known_key_form(entry.get("id")):
                self._by_path[clean_path(path)] = {**entry, "path": path}

    def __bool__(self) -> bool:
        return bool(self._by_key or self._by_path)

    def why(self, path: str) -> dict[str, Any] | None:
        if not self:
            return None
        return self._by_key.get(image_key(path)) or self._by_path.get(clean_path(path))
