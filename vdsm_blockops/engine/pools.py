"""Storage-pool volumes (``<disk type='volume'>``) as files and devices.

The tool asks libvirt's storage API (``Connection.volume_path``); the hook,
which must not call libvirt, reads the pool definitions libvirt keeps on
disk -- the running pool's status XML under ``/run/libvirt/storage``, else
the persistent one under ``/etc/libvirt/storage``. In the pools whose
volumes are files or devices named after the volume, the volume is the
pool's target path joined with its name: ``dir``, ``fs``, ``netfs`` (files)
and ``logical`` (``/dev/<vg>/<lv>``), ``disk`` (partitions). Volumes of the
other pools (iSCSI, SCSI, multipath: names that are not file names;
network pools such as rbd and gluster, which never hold an image this
tool touched) are not resolved here.
"""

from __future__ import annotations

import os

from ..core.chain import parse_xml
from ..core.errors import BadRequest

NAMED_POOLS = ("dir", "fs", "netfs", "logical", "disk")
POOL_FOLDERS = ("/run/libvirt/storage", "/etc/libvirt/storage")
MAX_POOL_XML = 1024 * 1024


class PoolFiles:
    """Pool definitions as libvirt keeps them on disk."""

    def __init__(self, folders: tuple[str, ...] | None = None) -> None:
        self.folders = folders if folders is not None else POOL_FOLDERS
        self._pools: dict[str, tuple[str, str] | None] = {}

    def pool(self, name: str) -> tuple[str, str] | None:
        """(type, target path) of pool ``name``; None when no definition
        of it can be read."""
        if name not in self._pools:
            self._pools[name] = self._read(name)
        return self._pools[name]

    def _read(self, name: str) -> tuple[str, str] | None:
        if not name or "/" in name or name.startswith("."):
            return None
        for folder in self.folders:
            try:
                with open(os.path.join(folder, f"{name}.xml"), "rb") as handle:
                    root = parse_xml(handle.read(MAX_POOL_XML))
            except (OSError, BadRequest):
                continue
            pool = root if root.tag == "pool" else root.find("pool")  # status XML wraps it
            if pool is None:
                continue
            return pool.get("type", ""), pool.findtext("target/path", "")
        return None

    def resolve(self, pool: str, volume: str) -> str | None:
        """The file or device of ``volume`` in ``pool``, or None."""
        found = self.pool(pool)
        if found is None or "/" in volume or volume in ("", ".", ".."):
            return None
        kind, target = found
        if kind not in NAMED_POOLS or not target.startswith("/"):
            return None
        return os.path.join(target, volume)
