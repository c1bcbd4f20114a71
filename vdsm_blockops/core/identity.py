"""An image is a file or a device, not a path string -- and it has a lifetime.

The same image is reached through many names on a real node: symlinked
folders (oVirt's ``/rhev/data-center/<pool>/<sd>`` -> ``mnt/<server>/<sd>``),
bind mounts, and libvirt's un-normalised relative backing paths
(``/…/images/img1/../tmpl/T``). Every safety decision -- who else uses a
layer, may a file be deleted, is an image invalidated, is DEST inside the
source chain or a storage root -- compares *identities* (``ImageKey``).
Paths are only for display, and are cleaned once where they enter
(``clean_path``).

A number alone is no identity: ext4 hands a freed inode number to the next
file created nearby (seen here many times per test run: a retired layer
deleted by hand, and the next VM's new image "was invalidated"), and
``lvremove`` + ``lvcreate`` hands a device minor on (after a reboot minors
are renumbered anyway). So a key also carries what tells the same file
from a later one with the same number (``ImageKey.life``):

* files: the kernel's file handle (``name_to_handle_at``), which every
  exportable file system -- ext4, XFS, btrfs, tmpfs, NFS -- builds from
  the inode number *and* its generation (measured here: the same inode
  number re-used on ext4 and on tmpfs comes back with another handle).
  Where a file system has no handles, the inode generation
  (``FS_IOC_GETVERSION``: ext4 answers, tmpfs says ENOTTY), then the birth
  time from ``statx``; a file system with none of the three keeps the bare
  number (``life`` empty) -- the old behaviour, said here so no one relies
  on more there;
* block devices: what names the volume rather than the minor --
  device-mapper's UUID (``LVM-<vg uuid><lv uuid>`` for an LV), a loop
  device's backing file (by its own file key), a disk's WWID, a partition
  as its disk's identity plus its number, else the kernel's ``diskseq``
  (new at every attach) with the device number.

A handle also lets a record about a file find out whether the file still
exists anywhere (renamed or hard-linked included: ``file_exists``), so
records of files that are gone can be dropped.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterable
from typing import Any, NamedTuple

# A key read from a record written before keys had a lifetime: it can only
# be compared by number (``ImageKey.matches``).
LEGACY = "?"


class ImageKey(NamedTuple):
    """What makes two names one image. ``kind`` is ``file`` (dev, ino),
    ``block`` (a device: ``life`` names the volume, dev/ino are 0) or
    ``path`` for a name that does not resolve (yet): then the cleaned path
    itself is the key. ``life`` tells this file from a later one that got
    the same number (module docstring)."""

    kind: str
    dev: int
    ino: int
    life: str = ""
    path: str = ""

    def to_json(self) -> list[object]:
        if self.kind == "path":
            return ["path", self.path]
        return [self.kind, self.dev, self.ino, self.life]

    @classmethod
    def from_json(cls, body: object) -> ImageKey | None:
        if not isinstance(body, list) or len(body) not in (3, 4) or body[0] not in ("file", "block"):
            return None
        try:
            life = str(body[3]) if len(body) == 4 else LEGACY
            return cls(str(body[0]), int(body[1]), int(body[2]), life)
        except (TypeError, ValueError):
            return None

    def matches(self, current: ImageKey) -> bool:
        """Whether ``current`` (a key taken now) is the image this recorded
        key names. A legacy key (no lifetime) can only compare numbers."""
        if self.life == LEGACY:
            if self.kind == "block":
                return current.kind == "block" and current.dev == self.dev
            return current[:3] == self[:3]
        return current == self


def clean_path(path: str) -> str:
    """An absolute path without ``.``/``..``/``//``, naming the same file.

    Lexical normalisation is wrong when the component a ``..`` steps out of
    is a symlink (its physical parent is elsewhere); the kernel, and so
    QEMU, resolves ``..`` physically. So such a component is resolved first;
    every other symlink (a pool link, say) is kept as the user wrote it.
    Relative and empty names come back unchanged.
    """
    if not path or not path.startswith("/"):
        return path
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                prefix = "/" + "/".join(parts)
                if os.path.islink(prefix):
                    parts = [p for p in os.path.realpath(prefix).split("/") if p]
                if parts:
                    parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


def key_of_stat(st: os.stat_result, path: str) -> ImageKey:
    """The key of the image ``path`` names, whose ``os.stat`` is ``st``."""
    if stat.S_ISBLK(st.st_mode):
        return ImageKey("block", 0, 0, _volume_identity(st.st_rdev))
    return ImageKey("file", st.st_dev, st.st_ino, _file_life(path, st))


def image_key(path: str) -> ImageKey:
    """The identity of the image ``path`` names (symlinks followed). The
    number and the lifetime are read by two calls: a name that another file
    took meanwhile is read again, so a key never mixes two files."""
    try:
        for _ in range(3):
            st = os.stat(path)
            key = key_of_stat(st, path)
            again = os.stat(path)
            if (again.st_dev, again.st_ino, again.st_rdev) == (st.st_dev, st.st_ino, st.st_rdev):
                return key
    except (OSError, ValueError):  # missing, unreachable, or a NUL in the name
        pass
    return ImageKey("path", 0, 0, "", clean_path(path))


# -- files: handle, generation, birth time

_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_MAX_HANDLE = 128
_FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long)
_STATX_BTIME = 0x800
_libc: Any = None


def _c() -> Any:
    """libc through ctypes, loaded on first use (the hook pays for it only
    when it has a file to key)."""
    global _libc
    if _libc is None:
        import ctypes

        class FileHandle(ctypes.Structure):
            _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                        ("f_handle", ctypes.c_ubyte * _MAX_HANDLE)]

        lib = ctypes.CDLL(None, use_errno=True)
        _libc = (ctypes, lib, FileHandle)
    return _libc


def _file_handle(path: str) -> tuple[int, bytes] | None:
    ctypes, lib, FileHandle = _c()
    handle, mount_id = FileHandle(), ctypes.c_int()
    handle.handle_bytes = _MAX_HANDLE
    if lib.name_to_handle_at(_AT_FDCWD, os.fsencode(path), ctypes.byref(handle),
                             ctypes.byref(mount_id), _AT_SYMLINK_FOLLOW) != 0:
        return None  # EOPNOTSUPP: no handles on this file system
    return handle.handle_type, bytes(handle.f_handle[:handle.handle_bytes])


def _generation(path: str, st: os.stat_result) -> int | None:
    if not stat.S_ISREG(st.st_mode):
        return None  # never open a FIFO or a device to ask
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = fcntl.ioctl(fd, _FS_IOC_GETVERSION, bytes(8))
        return int(struct.unpack("I", raw[:4])[0])  # the kernel writes an int
    except OSError:  # ENOTTY: tmpfs, NFS
        return None
    finally:
        os.close(fd)


def _birth_time(path: str) -> int | None:
    ctypes, lib, _ = _c()
    buf = ctypes.create_string_buffer(256)  # struct statx
    if lib.statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_BTIME, buf) != 0:
        return None
    mask = struct.unpack_from("I", buf.raw, 0)[0]
    if not mask & _STATX_BTIME:
        return None
    seconds, nanos = struct.unpack_from("qI", buf.raw, 80)  # stx_btime
    return int(seconds) * 1_000_000_000 + int(nanos)


def _file_life(path: str, st: os.stat_result) -> str:
    handle = _file_handle(path)
    if handle is not None:
        return f"fh:{handle[0]}:{handle[1].hex()}"
    generation = _generation(path, st)
    if generation is not None:
        return f"gen:{generation}"
    born = _birth_time(path)
    return f"btime:{born}" if born is not None else ""


def file_exists(key: ImageKey) -> bool | None:
    """Whether the file ``key`` names still exists anywhere on its file
    system (under any name, renamed or hard-linked), asked by its handle;
    None where that cannot be told (no handle in the key, the file system
    is not mounted here, no privilege)."""
    if key.kind != "file" or not key.life.startswith("fh:"):
        return None
    _, kind, hexed = key.life.split(":", 2)
    mount = _mount_point(key.dev)
    if mount is None:
        return None
    ctypes, lib, FileHandle = _c()
    raw = bytes.fromhex(hexed)
    handle = FileHandle()
    handle.handle_bytes, handle.handle_type = len(raw), int(kind)
    ctypes.memmove(handle.f_handle, raw, len(raw))
    try:
        mount_fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fd = lib.open_by_handle_at(mount_fd, ctypes.byref(handle), os.O_PATH | os.O_CLOEXEC)
        if fd >= 0:
            os.close(fd)
            return True
        return False if ctypes.get_errno() == errno.ESTALE else None
    finally:
        os.close(mount_fd)


def _mount_point(dev: int) -> str | None:
    """Where the file system with device number ``dev`` is mounted here."""
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) > 4 and fields[2] == wanted and os.stat(
                        _unescape(fields[4])).st_dev == dev:
                    return _unescape(fields[4])
    except OSError:
        return None
    return None


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline or backslash as ``\\ooo``."""
    return field.replace("\\040", " ").replace("\\011", "\t").replace(
        "\\012", "\n").replace("\\134", "\\")


# -- block devices: the volume, not the minor

def _sysfs(dev_dir: str, name: str) -> str:
    try:
        with open(os.path.join(dev_dir, name), encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _volume_identity(rdev: int) -> str:
    major, minor = os.major(rdev), os.minor(rdev)
    dev_dir = f"/sys/dev/block/{major}:{minor}"
    dm_uuid = _sysfs(dev_dir, "dm/uuid")
    if dm_uuid:
        return f"dm:{dm_uuid}"
    if _sysfs(dev_dir, "partition"):
        disk = os.path.dirname(os.path.realpath(dev_dir))
        try:
            parent = os.stat(f"/dev/{os.path.basename(disk)}").st_rdev
        except OSError:
            parent = None
        if parent is not None:
            return f"{_volume_identity(parent)}/part{_sysfs(dev_dir, 'partition')}"
    backing = _sysfs(dev_dir, "loop/backing_file")
    if backing and not backing.endswith("(deleted)"):
        file_key = image_key(backing)
        if file_key.kind == "file":
            return f"loop:{file_key.dev}:{file_key.ino}:{file_key.life}@{_sysfs(dev_dir, 'loop/offset')}"
    wwid = _sysfs(dev_dir, "wwid") or _sysfs(dev_dir, "device/wwid")
    if wwid:
        return f"wwid:{wwid}"
    seq = _sysfs(dev_dir, "diskseq")
    return f"dev:{major}:{minor}" + (f":seq{seq}" if seq else "")


def existing_key(path: str) -> ImageKey | None:
    key = image_key(path)
    return None if key.kind == "path" else key


def same_image(a: str, b: str) -> bool:
    return image_key(a) == image_key(b)


class ImageSet:
    """A set of images, answered by identity whatever name is asked."""

    def __init__(self, paths: Iterable[str] = ()) -> None:
        self._keys: dict[ImageKey, str] = {}
        for path in paths:
            self.add(path)

    def add(self, path: str) -> None:
        self._keys.setdefault(image_key(path), path)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and image_key(path) in self._keys

    def name_of(self, path: str) -> str | None:
        """The name this set knows ``path``'s image by, if any."""
        return self._keys.get(image_key(path))

    def __len__(self) -> int:
        return len(self._keys)


def same_images(a: Iterable[str], b: Iterable[str]) -> bool:
    """Whether two chains are the same images in the same order, however
    each names them."""
    a, b = list(a), list(b)
    return len(a) == len(b) and all(image_key(x) == image_key(y) for x, y in zip(a, b, strict=True))


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def device_size(path: str) -> int:
    """Size in bytes of a file or a block device (``st_size`` of a device
    is 0: seek to its end instead, as BLKGETSIZE64 would tell)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def under_root(path: str, root: str) -> bool:
    """Whether ``path`` lies inside the folder ``root``, decided on the
    resolved folders (an alias of a root is that root; a symlink out of a
    root is not inside it)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")
