"""What tells a file or a volume from a later one that got its number
(see ``identity.py``, which keys images with it): a file's kernel handle
(inode number and generation), else its inode generation, else its birth
time; a block device's own identity (device-mapper UUID, a loop device's
backing file, WWID, else the device number with its ``diskseq``). Read
through ctypes and sysfs: no process is run, so the hook can afford it."""

from __future__ import annotations

import errno
import os
import stat
import struct
from typing import Any

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


def file_life(path: str, st: os.stat_result) -> str:
    handle = _file_handle(path)
    if handle is not None:
        return f"fh:{handle[0]}:{handle[1].hex()}"
    generation = _generation(path, st)
    if generation is not None:
        return f"gen:{generation}"
    born = _birth_time(path)
    return f"btime:{born}" if born is not None else ""


def handle_exists(dev: int, life: str) -> bool | None:
    """Whether the file whose lifetime ``life`` (from ``file_life``) is a
    handle still exists anywhere on its file system (device ``dev``), under
    any name, renamed or hard-linked; None where that cannot be told (no
    handle, the file system is not mounted here, no privilege)."""
    if not life.startswith("fh:"):
        return None
    _, kind, hexed = life.split(":", 2)
    mount = _mount_point(dev)
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


_MOUNTS: dict[int, str] = {}  # dev -> mount point, checked again at each use


def _mount_point(dev: int) -> str | None:
    """Where the file system with device number ``dev`` is mounted here.
    A registry's entries share a few file systems: mountinfo is read once
    per file system, and a remembered mount point is used only while it
    still is that file system."""
    known = _MOUNTS.get(dev)
    try:
        if known is not None and os.stat(known).st_dev == dev:
            return known
    except OSError:
        pass
    found = _scan_mounts(dev)
    if found is not None:
        _MOUNTS[dev] = found
    return found


def _scan_mounts(dev: int) -> str | None:
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


def volume_identity(rdev: int) -> str:
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
            return f"{volume_identity(parent)}/part{_sysfs(dev_dir, 'partition')}"
    backing = _sysfs(dev_dir, "loop/backing_file")
    if backing and not backing.endswith("(deleted)"):
        try:
            st = os.stat(backing)
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode):
            life = file_life(backing, st)
            return f"loop:{st.st_dev}:{st.st_ino}:{life}@{_sysfs(dev_dir, 'loop/offset')}"
    wwid = _sysfs(dev_dir, "wwid") or _sysfs(dev_dir, "device/wwid")
    if wwid:
        return f"wwid:{wwid}"
    seq = _sysfs(dev_dir, "diskseq")
    return f"dev:{major}:{minor}" + (f":seq{seq}" if seq else "")
