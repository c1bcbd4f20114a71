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

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator

import libvirt

from ..core import errors
from ..core.chain import parse_xml
from ..core.migrate_plan import CLAIM_PREFIX, MARKER_PREFIX
from .connection import host_uuid_of
from .errors import libvirt_errors
from .streams import VolumeStreams
from .streams import xml_escape as _escape

log = logging.getLogger(__name__)
POOL_PREFIX = "vdsm-blockops-"


class RemoteNode(VolumeStreams):
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
        """The active pool on ``folder`` -- never a moment's pool of another
        move (its look, its folder removal): that one may go any time."""
        with libvirt_errors(f"{self.uri}: storage pools"):
            pools = self.conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
        for pool in pools:
            if pool.name().startswith((f"{POOL_PREFIX}look-", f"{POOL_PREFIX}rm-")):
                continue
            try:
                if parse_xml(pool.XMLDesc(0)).findtext("target/path") != folder:
                    continue
            except libvirt.libvirtError:  # stopped meanwhile by its owner
                continue
            try:
                if refresh:
                    pool.refresh(0)
            except libvirt.libvirtError as exc:  # another move's upload runs into it: its
                log.debug("%s: %s not refreshed: %s", self.uri, folder, exc)  # volumes are
            return pool  # listed all the same (made through this pool)
        return None

    def release(self, folders: list[str]) -> None:
        """Stop the transient pools a move started for ``folders`` (their
        files stay): those of ours no other move uses (no claim or marker
        of a move in the folder; an upload running into it makes libvirt
        refuse the refresh, and the pool stays). Best effort: a pool left
        running is only listed, never in the way."""
        for folder in folders:
            try:
                for pool in self.conn.listAllStoragePools(
                        libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE
                        | libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_TRANSIENT):
                    if pool.name() != _pool_name(folder):
                        continue
                    pool.refresh(0)
                    if not any(n.startswith((MARKER_PREFIX, CLAIM_PREFIX))
                               for n in pool.listVolumes()):
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

    # -- files (upload, digest, pieces, head: ``streams.py``)
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

    def delete(self, path: str) -> bool:
        for attempt in range(2):
            with self._volume(path) as volume:
                if volume is None:
                    return False
                try:
                    volume.delete(0)
                    return True
                except libvirt.libvirtError as exc:
                    # the folder's pool stopped by another move meanwhile:
                    # found again (or looked at through a pool of our own)
                    if attempt or exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                        raise errors.OperationFailed(
                            f"{self.uri}: cannot delete {path}: {exc}") from exc
        return False

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
