"""The destination node of a move, reached only through its libvirt.

Nothing here touches the destination's files directly (no ssh, no shared
mount): folders are storage pools (a transient ``dir`` pool is started for
a folder no pool covers), files are pool volumes written and read back
through volume upload/download streams on the same authenticated
connection.

Found on libvirt 9.0: a volume upload writes the bytes as sent into a
``raw`` volume, whatever they are (a qcow2 image stays one), so an image
is copied by creating a ``raw`` volume of the file's size and uploading the
file; a pool lists a file made meanwhile by others only after ``refresh``.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import libvirt

from ..core import errors
from ..core.chain import parse_xml
from ..core.migrate_plan import MARKER_PREFIX
from .connection import host_uuid_of
from .errors import libvirt_errors

log = logging.getLogger(__name__)
# What one stream send or receive moves. Measured on libvirt 9.0 over TCP:
# 600 MiB uploaded in 0.46 s with 256 KiB sends, 2.0 s with 4 MiB ones
# (one RPC message carries at most 256 KiB); downloads 0.69 s vs 0.92 s.
STREAM_CHUNK = 256 * 1024
# A read back (the proof of a copy) downloads pieces on several streams at
# once: one stream ran at ~390 MiB/s here, held by the destination
# libvirtd's event loop, which handles a stream's 256 KiB messages one at a
# time; 700 MiB took 1.81 s on one stream, 1.50 s on two, 1.17 s on four
# (medians of 5, libvirt 9.0 over TCP on loopback, 2 cores).
PROOF_STREAMS = 4
PROOF_PIECE = 8 * 1024 * 1024
POOL_PREFIX = "vdsm-blockops-"


class RemoteNode:
    """The libvirt calls a move needs on the destination node."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        with libvirt_errors(f"cannot connect to the destination {uri}"):
            self.conn = libvirt.open(uri)
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.setKeepAlive(5, 3)
        with libvirt_errors(f"{uri}: hostname"):
            self.hostname = str(self.conn.getHostname())
            self.host_uuid = host_uuid_of(self.conn)

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()

    # -- folders
    def _pool(self, folder: str, create: bool,
              refresh: bool = False) -> libvirt.virStoragePool | None:
        """The active pool whose target is ``folder``; with ``create``, a
        transient ``dir`` pool is started for it (building the folder).
        ``refresh`` lists files others made meanwhile -- never while an
        upload runs into it (libvirt refuses: "asynchronous jobs running")."""
        pool = self._active_pool(folder, refresh)
        if pool is not None or not create:
            return pool
        xml = (f"<pool type='dir'><name>{_pool_name(folder)}</name><target><path>"
               f"{_escape(folder)}</path><permissions><mode>0755</mode></permissions>"
               "</target></pool>")
        try:
            return self.conn.storagePoolCreateXML(xml, libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
        except libvirt.libvirtError as exc:
            pool = self._active_pool(folder, refresh)  # another move's, started meanwhile
            if pool is None:
                raise errors.OperationFailed(
                    f"{self.uri}: cannot make a storage pool for {folder}: {exc}") from exc
            return pool

    def _active_pool(self, folder: str, refresh: bool) -> libvirt.virStoragePool | None:
        with libvirt_errors(f"{self.uri}: storage pools"):
            for pool in self.conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
                if parse_xml(pool.XMLDesc(0)).findtext("target/path") == folder:
                    try:
                        if refresh:
                            pool.refresh(0)
                    except libvirt.libvirtError as exc:  # another move's upload runs into it:
                        log.debug("%s: %s not refreshed: %s", self.uri, folder, exc)  # its
                    return pool  # volumes are listed (made through this pool)
        return None

    def release(self, folders: list[str]) -> None:
        """Stop the transient pools a move started for ``folders`` (their
        files stay): those of ours that no other move's unfinished upload
        uses (no marker in the folder; an upload running into it makes
        libvirt refuse the refresh, and the pool stays). Best effort: a pool
        left running is only listed, never in the way."""
        for folder in folders:
            try:
                for pool in self.conn.listAllStoragePools(
                        libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE
                        | libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_TRANSIENT):
                    if pool.name() != _pool_name(folder):
                        continue
                    pool.refresh(0)
                    if not any(n.startswith(MARKER_PREFIX) for n in pool.listVolumes()):
                        pool.destroy()
            except libvirt.libvirtError as exc:
                log.debug("%s: pool of %s left running: %s", self.uri, folder, exc)

    @contextlib.contextmanager
    def _look(self, folder: str,
              refresh: bool = False) -> Iterator[libvirt.virStoragePool | None]:
        """The pool of ``folder``, or a transient one stopped again after
        (nothing changes on the node); None when there is no such folder
        (a dir pool needs it)."""
        pool = self._pool(folder, create=False, refresh=refresh)
        if pool is not None:
            yield pool
            return
        try:
            pool = self.conn.storagePoolCreateXML(
                f"<pool type='dir'><name>{POOL_PREFIX}look-{os.getpid()}-"
                f"{threading.get_ident()}</name><target><path>{_escape(folder)}</path></target>"
                "</pool>", 0)
        except libvirt.libvirtError:
            yield None
            return
        try:
            yield pool
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                pool.destroy()

    def folder_state(self, folder: str) -> tuple[bool, list[str], int | None]:
        """(whether ``folder`` exists, the names in it, its free bytes)."""
        with self._look(folder, refresh=True) as pool:
            if pool is None:
                return False, [], None
            with libvirt_errors(f"{self.uri}: {folder}"):
                return True, list(pool.listVolumes()), int(pool.info()[3])

    def make_folders(self, folders: list[str]) -> None:
        for folder in folders:
            self._pool(folder, create=True)

    @contextlib.contextmanager
    def _volume(self, path: str,
                refresh: bool = False) -> Iterator[libvirt.virStorageVol | None]:
        with self._look(os.path.dirname(path), refresh) as pool:
            if pool is None:
                yield None
                return
            try:
                volume = pool.storageVolLookupByName(os.path.basename(path))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    raise errors.OperationFailed(f"{self.uri}: {path}: {exc}") from exc
                volume = None
            yield volume

    @contextlib.contextmanager
    def _existing(self, path: str) -> Iterator[libvirt.virStorageVol]:
        with self._volume(path) as volume:
            if volume is None:
                raise errors.OperationFailed(f"{self.uri}: {path} is not there")
            yield volume

    def size(self, path: str) -> int | None:
        """The bytes ``path`` holds (its allocation); None when it is not there."""
        with self._volume(path, refresh=True) as volume:
            return None if volume is None else int(volume.info()[2])

    def remove_empty(self, folders: list[str]) -> None:
        """Remove each of ``folders`` (deepest first) that is empty, through
        a pool defined on it for the moment: a ``dir`` pool's delete is an
        rmdir, which leaves a folder holding anything. Best effort."""
        for folder in folders:
            if self._active_pool(folder, refresh=False) is not None:
                continue  # in use
            try:
                pool = self.conn.storagePoolDefineXML(
                    f"<pool type='dir'><name>{_pool_name(folder, 'rm-')}</name><target>"
                    f"<path>{_escape(folder)}</path></target></pool>", 0)
            except libvirt.libvirtError as exc:
                log.debug("%s: %s kept: %s", self.uri, folder, exc)
                continue
            try:
                pool.delete(0)
            except libvirt.libvirtError as exc:
                log.debug("%s: %s kept: %s", self.uri, folder, exc)
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    pool.undefine()

    # -- files
    def upload(self, path: str, data: Iterator[bytes], size: int) -> str:
        """Create ``path`` (it must not exist) and write ``data`` into it;
        the SHA-256 of what was sent."""
        xml = (f"<volume><name>{_escape(os.path.basename(path))}</name>"
               f"<capacity unit='bytes'>{size}</capacity><allocation>0</allocation>"
               "<target><format type='raw'/><permissions><mode>0644</mode></permissions>"
               "</target></volume>")
        volume = self._create(path, xml)
        digest = hashlib.sha256()
        stream = self.conn.newStream(0)
        try:
            with libvirt_errors(f"{self.uri}: upload of {path}"):
                volume.upload(stream, 0, size, 0)
                for chunk in data:
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        sent = stream.send(bytes(view[:STREAM_CHUNK]))
                        view = view[sent:]
                stream.finish()
        except BaseException:
            _abort(stream)
            raise
        return digest.hexdigest()

    def _create(self, path: str, xml: str) -> libvirt.virStorageVol:
        pool = self._pool(os.path.dirname(path), create=True)
        assert pool is not None
        try:
            return pool.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_STORAGE_VOL_EXIST:
                raise FileExistsError(f"{self.uri}: {path} exists") from exc  # never written
            if _active(pool):
                raise errors.OperationFailed(f"{self.uri}: cannot create {path}: {exc}") from exc
        # another move released the folder's pool meanwhile: start it again
        pool = self._pool(os.path.dirname(path), create=True)
        assert pool is not None
        with libvirt_errors(f"{self.uri}: cannot create {path}"):
            return pool.createXML(xml, 0)

    def digest(self, path: str, check: Callable[[], None] = lambda: None) -> str:
        """SHA-256 of ``path`` as the destination reads it back: pieces
        downloaded on PROOF_STREAMS streams side by side, hashed in order
        (at most PROOF_STREAMS + 2 pieces held here); ``check`` before each
        piece is hashed (a deadline)."""
        with self._existing(path) as volume:
            with libvirt_errors(f"{self.uri}: {path}"):
                size = int(volume.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])
            digest = hashlib.sha256()
            pieces: collections.deque[Future[bytes]] = collections.deque()
            with ThreadPoolExecutor(PROOF_STREAMS, thread_name_prefix="proof") as workers:
                try:
                    for offset in range(0, size, PROOF_PIECE):
                        pieces.append(workers.submit(self._piece, volume, path, offset,
                                                     min(PROOF_PIECE, size - offset)))
                        if len(pieces) == PROOF_STREAMS + 2:
                            check()
                            digest.update(pieces.popleft().result())
                    while pieces:
                        check()
                        digest.update(pieces.popleft().result())
                except BaseException:
                    for piece in pieces:
                        piece.cancel()
                    raise
        return digest.hexdigest()

    def _piece(self, volume: libvirt.virStorageVol, path: str, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        self._download(volume, path, offset, length, parts.append)
        piece = b"".join(parts)
        if len(piece) != length:
            raise errors.OperationFailed(f"{self.uri}: {path} reads back {len(piece)} bytes at "
                                         f"{offset}, {length} expected")
        return piece

    def head(self, path: str, length: int) -> bytes:
        """The first ``length`` bytes of ``path`` (a header)."""
        parts: list[bytes] = []
        with self._existing(path) as volume:
            self._download(volume, path, 0, length, parts.append)
        return b"".join(parts)

    def _download(self, volume: libvirt.virStorageVol, path: str, offset: int, length: int,
                  sink: Callable[[bytes], object]) -> None:
        stream = self.conn.newStream(0)
        try:
            with libvirt_errors(f"{self.uri}: download of {path}"):
                volume.download(stream, offset, length, 0)
                while True:
                    chunk = stream.recv(STREAM_CHUNK)
                    if isinstance(chunk, int):  # -2: would block (not on a blocking stream)
                        continue
                    if not chunk:
                        break
                    sink(chunk)
                stream.finish()
        except BaseException:
            _abort(stream)
            raise

    def delete(self, path: str) -> bool:
        with self._volume(path) as volume:
            if volume is None:
                return False
            with libvirt_errors(f"{self.uri}: cannot delete {path}"):
                volume.delete(0)
            return True

    # -- the moved domain
    def domain(self, uuid: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise errors.OperationFailed(f"{self.uri}: domain {uuid}: {exc}") from exc

    def domain_by_name(self, name: str) -> libvirt.virDomain | None:
        with contextlib.suppress(libvirt.libvirtError):
            return self.conn.lookupByName(name)
        return None

    def has_secret(self, uuid: str | None, usage: tuple[int, str] | None) -> bool:
        with contextlib.suppress(libvirt.libvirtError):
            if uuid:
                self.conn.secretLookupByUUIDString(uuid)
            elif usage:
                self.conn.secretLookupByUsage(*usage)
            return True
        return False


def _active(pool: libvirt.virStoragePool) -> bool:
    try:
        return bool(pool.isActive())
    except libvirt.libvirtError:  # a transient pool stopped is gone
        return False


def _pool_name(folder: str, kind: str = "") -> str:
    """The transient pool a move starts for ``folder`` (the same name for
    every move, so that the next one finds it, and releases it); ``kind``
    sets apart the pool defined for a moment to remove the folder."""
    return POOL_PREFIX + kind + hashlib.sha1(folder.encode()).hexdigest()[:12]


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")


def _abort(stream: libvirt.virStream) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        stream.abort()
