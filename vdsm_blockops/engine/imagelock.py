"""QEMU's own image locks, taken by the tool's own copies.

QEMU (and qemu-img) lock an image file with open file description locks
on single bytes (block/file-posix.c): byte 100+i says "I use permission
i", byte 200+i "I do not let others have permission i". A VM starting on
an image needs ``write`` (bit 1): it fails when anyone holds byte 201. So
a copy of a shut-off VM's image that holds 100 (consistent read) and 201,
203 (no writer, no resize beside it) makes a start during the copy fail,
as it fails beside ``qemu-img convert`` -- instead of a guest writing to
the source while the copy is taken from it (the copy then stale, the
definition pointed at it). Conflicts are checked after the locks are
applied, as QEMU does."""

from __future__ import annotations

import fcntl
import os
import struct

from ..core import errors

CONSISTENT_READ, WRITE, RESIZE = 0, 1, 3  # permission bits (include/block/block.h)
PERM_BASE, SHARED_BASE = 100, 200
_HELD = (PERM_BASE + CONSISTENT_READ, SHARED_BASE + WRITE, SHARED_BASE + RESIZE)
# Whoever holds one of these wants what we do not share, or does not share
# reading.
_CONFLICTS = (PERM_BASE + WRITE, PERM_BASE + RESIZE, SHARED_BASE + CONSISTENT_READ)


def _flock(kind: int, start: int) -> bytes:
    # struct flock on Linux 64-bit: short l_type, short l_whence, off_t
    # l_start, off_t l_len, pid_t l_pid (0 for OFD locks)
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, start, 1, 0)


def lock_for_copy(fd: int, path: str) -> None:
    """Hold, for as long as ``fd`` is open, the locks qemu-img convert holds
    on its source; raise Conflict when a process (a VM) writes the image."""
    for byte in _HELD:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, byte))
    for byte in _CONFLICTS:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
        if struct.unpack("hhqqi4x", answer)[0] != fcntl.F_UNLCK:
            raise errors.Conflict(f"{path} is in use by another process (a VM started on it?): "
                                  "it is not copied")
