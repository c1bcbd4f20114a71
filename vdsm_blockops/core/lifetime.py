"""What tells a file or a volume from a later one that got its number
(see ``identity.py``, which keys images with it): a file's kernel handle
(inode number and generation), else its inode generation, else its birth
time; a block device's own identity (device-mapper UUID, a loop device's
backing file, WWID, else the device number with its ``diskseq``). Read
through ctypes and sysfs: no process is run, so the hook can afford it."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
from typing import Any

_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_AT_SYMLINK_NOFOLLOW = 0x100
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


def _birth_time(path: str, follow: bool = True) -> int | None:
    ctypes, lib, _ = _c()
    buf = ctypes.create_string_buffer(256)  # struct statx
    flags = 0 if follow else _AT_SYMLINK_NOFOLLOW
    if lib.statx(_AT_FDCWD, os.fsencode(path), flags, _STATX_BTIME, buf) != 0:
        return None
    mask = struct.unpack_from("I", buf.raw, 0)[0]
    if not mask & _STATX_BTIME:
        return None
    seconds, nanos = struct.unpack_from("qI", buf.raw, 80)  # stx_btime
    return int(seconds) * 1_000_000_000 + int(nanos)


def made_at(path: str, follow: bool = True) -> int:
    """When ``path`` was made (ns): its birth time, else its last change of
    content (file systems without birth times). Raises OSError."""
    born = _birth_time(path, follow)
    if born is not None:
        return born
    return (os.stat(path) if follow else os.lstat(path)).st_mtime_ns


def file_life(path: str, st: os.stat_result) -> str:
    handle = _file_handle(path)
    if handle is not None:
        return f"fh:{handle[0]}:{handle[1].hex()}"
    generation = _generation(path, st)
    if generation is not None:
        return f"gen:{generation}"
    born = _birth_time(path)
    return f"btime:{born}" if born is not None else ""


def handle_exists(home: str, life: str) -> bool | None:
    """Whether the file whose lifetime ``life`` (from ``file_life``) is a
    handle still exists anywhere on its file system (``home``, from
    ``filesystem_home``), under any name, renamed or hard-linked; None where
    that cannot be told (no handle, that file system is not mounted here now,
    no privilege) -- never False because a file system is not mounted."""
    if not life.startswith("fh:"):
        return None
    _, kind, hexed = life.split(":", 2)
    mount = _mount_point(home)
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


# -- a file system's home: what names it across a remount and a reboot

# statfs(2) f_type of the file systems whose f_fsid the kernel derives from
# the file system's own UUID (ext2/3/4: the two halves of s_uuid xor'ed;
# btrfs: its fsid xor the subvolume's root id). XFS and f2fs derive it from
# the device number, tmpfs from a UUID made at each mount: not a home.
_UUID_FSID = {0xEF53: "ext", 0x9123683E: "btrfs"}
_NFS = 0x6969


def _statfs(path: str) -> tuple[int, int] | None:
    """(f_type, f_fsid as one number) of the file system ``path`` is on."""
    ctypes, lib, _ = _c()
    buf = ctypes.create_string_buffer(128)  # struct statfs: 120 bytes on 64-bit Linux
    if lib.statfs(os.fsencode(path), buf) != 0:
        return None
    f_type = struct.unpack_from("q", buf.raw, 0)[0] & 0xFFFFFFFF
    low, high = struct.unpack_from("II", buf.raw, 56)  # f_fsid: two ints
    return f_type, (high << 32) | low


def filesystem_home(path: str, st: os.stat_result) -> str:
    """What names the file system ``path`` (whose stat is ``st``) is on,
    the same after a remount from another device, a reboot, an LV activated
    in another order -- ``st_dev`` is none of that:

    * ext2/3/4 and btrfs: ``fsid:<hex>``, the kernel's f_fsid, made from
      the file system's UUID (btrfs: per subvolume, as its inode numbers);
    * NFS: ``nfs:<server:/export>``, where the server's file handles live;
    * any other file system on a block device (XFS on an LV, say):
      ``vol:<the device's volume identity>`` (device-mapper UUID, a loop
      device's backing file, WWID);
    * a file system on no device (tmpfs, overlayfs): ``dev:<major>:<minor>``,
      good for this mount only. tmpfs files end with their mount; an
      overlayfs remount makes its files new images to the registry (stated
      in the contract's identity section)."""
    got = _statfs(path)
    if got is not None and got[0] in _UUID_FSID and got[1]:
        return f"fsid:{got[1]:016x}"
    dev = st.st_dev
    if got is not None and got[0] == _NFS:
        source = _mount_source(dev)
        if source:
            return f"nfs:{source}"
    if os.major(dev) != 0 and os.path.exists(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"):
        return "vol:" + volume_identity(dev)
    return f"dev:{os.major(dev)}:{os.minor(dev)}"


def mounts() -> list[tuple[int, str, str, str]]:
    """(device number, mount point, fs type, source) of every mount here
    (``/proc/self/mountinfo``, its escapes undone); [] when it cannot be
    read."""
    mounts = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
            for line in handle:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                after = line.split(" - ", 1)[1].split()
                major, minor = fields[2].split(":")
                mounts.append((os.makedev(int(major), int(minor)), _unescape(fields[4]),
                               after[0] if after else "", _unescape(after[1]) if len(after) > 1
                               else ""))
    except (OSError, ValueError):
        return []
    return mounts


def _mount_source(dev: int) -> str:
    for number, _, fstype, source in mounts():
        if number == dev and fstype.startswith("nfs"):
            return source
    return ""


_MOUNTS: dict[str, str] = {}  # home -> mount point, checked again at each use


def _mount_point(home: str) -> str | None:
    """Where the file system ``home`` names is mounted here now, if it is.
    A registry's entries share a few file systems: a remembered mount point
    is used only while it still is that file system. Only mounts that can
    be that file system are asked (a hung NFS mount is never stat'ed for an
    ext4 home)."""
    known = _MOUNTS.get(home)
    if known is not None and _home_of_folder(known) == home:
        return known
    kind = home.split(":", 1)[0]
    for dev, point, fstype, source in mounts():
        if kind == "fsid" and fstype not in ("ext2", "ext3", "ext4", "btrfs"):
            continue
        if kind == "nfs" and (not fstype.startswith("nfs") or home != f"nfs:{source}"):
            continue
        if kind == "dev" and home != f"dev:{os.major(dev)}:{os.minor(dev)}":
            continue
        if kind == "vol" and os.major(dev) == 0:
            continue
        if _home_of_folder(point) == home:
            _MOUNTS[home] = point
            return point
    return None


def _home_of_folder(folder: str) -> str | None:
    try:
        return filesystem_home(folder, os.stat(folder))
    except OSError:
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
            return (f"loop:{filesystem_home(backing, st)}:{st.st_ino}:{life}"
                    f"@{_sysfs(dev_dir, 'loop/offset')}")
    wwid = _sysfs(dev_dir, "wwid") or _sysfs(dev_dir, "device/wwid")
    if wwid:
        return f"wwid:{wwid}"
    seq = _sysfs(dev_dir, "diskseq")
    return f"dev:{major}:{minor}" + (f":seq{seq}" if seq else "")


# -- processes: a pid is handed on too

def proc_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of process ``pid``:
    the kernel's own, unmoved by clock steps."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])  # field 3: state; field 22: starttime
    except (OSError, IndexError, ValueError):
        return None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def process_identity(pid: int | None = None) -> str:
    """What names process ``pid`` (default: this one) for its whole life and
    no other: the boot, the pid, and the kernel's start time of the pid."""
    pid = os.getpid() if pid is None else pid
    start = proc_start(pid)
    return f"{_boot_id()}/{pid}/{start[1] if start else 0}"


def process_alive(identity: str) -> bool | None:
    """Whether the process ``identity`` names still runs (a zombie does
    not); None when ``identity`` is not one (an earlier version's record)."""
    try:
        boot, pid, ticks = identity.split("/")
        number, started = int(pid), int(ticks)
    except ValueError:
        return None
    if not boot or started <= 0:
        return None
    if boot != _boot_id():
        return False  # another boot: every process of that one is gone
    now = proc_start(number)
    return now is not None and now[1] == started and now[0] != "Z"


def process_exiting(pid: int) -> bool:
    """Whether process ``pid`` is gone or on its way out: a zombie, or
    SIGKILL pending. A process killed inside a system call that waits on
    the disk (an fsync under heavy writeback) keeps its files -- and its
    locks -- until that call returns: seconds, on a busy disk."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
    except OSError:
        return True
    pending = 0
    for key in ("SigPnd", "ShdPnd"):
        with contextlib.suppress(ValueError):
            pending |= int(fields.get(key, "0").strip() or "0", 16)
    return fields.get("State", "").strip()[:1] in ("Z", "X") or bool(pending & 1 << 8)
