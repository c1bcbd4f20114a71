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
from collections.abc import Iterator, Sequence
from typing import Any

from .errors import Conflict
from .identity import ImageKey, clean_path, existing_key, image_key

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
        """path -> why it was invalidated (and the image's identity under
        ``id``). Missing registry = empty."""
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
        if not paths:
            return
        with self._registry_lock():
            data = self.invalidated()
            for path in paths:
                key = existing_key(path)
                data[clean_path(path)] = {
                    "domain": domain,
                    "disk": disk,
                    "operation": operation,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    **({"id": key.to_json()} if key else {}),
                }
            write_json_atomic(self.registry_path, data)

    def forget(self, paths: list[str], keys: Sequence[ImageKey] = ()) -> None:
        """Drop entries (e.g. after the files were deleted): those under
        ``paths`` and those of the images ``keys`` (taken before deleting)."""
        with self._registry_lock():
            data = self.invalidated()
            names, gone = {clean_path(p) for p in paths}, set(keys)
            for name in list(data):
                if name in names or ImageKey.from_json(data[name].get("id")) in gone:
                    del data[name]
            write_json_atomic(self.registry_path, data)

    def invalid_lookup(self) -> InvalidImages:
        return InvalidImages(self.invalidated())

    @contextlib.contextmanager
    def domain_lock(self, domain_uuid: str) -> Iterator[None]:
        """Held around every read-modify-write of one domain's records, so
        two processes on two disks of the domain never lose each other's."""
        self._ensure()
        path = os.path.join(self.path, "locks", f"{domain_uuid}-records.lock")
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def stream_lock(self, domain_uuid: str, wait: bool = True) -> Iterator[None]:
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
        self._ensure()
        path = os.path.join(self.path, "locks", f"{domain_uuid}-stream.lock")
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise Conflict("another block pull of this VM is being started or "
                               "waited on (pulls of one VM run one at a time)") from None
            yield

    # -- one operation per disk, across processes
    @contextlib.contextmanager
    def disk_lock(self, domain_uuid: str, disk: str, holder: str) -> Iterator[None]:
        """Hold the node-wide lock of one disk, or raise Conflict at once."""
        self._ensure()
        path = os.path.join(self.path, "locks", f"{domain_uuid}-{disk}.lock")
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (closed in finally)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                handle.seek(0)
                other = handle.read().strip() or "another process"
                raise Conflict(
                    f"disk {disk} is busy: {other} holds its lock", holder=other
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{holder} (pid {os.getpid()})")
            handle.flush()
            yield
        finally:
            handle.close()


class InvalidImages:
    """The registry as a lookup by identity: an entry matches an image
    named by any path that resolves to the recorded file or device, or by
    the recorded path itself."""

    def __init__(self, data: dict[str, dict[str, Any]]) -> None:
        self.data = data
        self._by_key: dict[ImageKey, dict[str, Any]] = {}
        for entry in data.values():
            key = ImageKey.from_json(entry.get("id"))
            if key is not None:
                self._by_key[key] = entry

    def __bool__(self) -> bool:
        return bool(self.data)

    def why(self, path: str) -> dict[str, Any] | None:
        if not self.data:
            return None
        entry = self.data.get(clean_path(path))
        if entry is not None:
            return entry
        return self._by_key.get(image_key(path))
