"""Copies of images nobody writes, each chunk read back and compared
with the source as it is written (through the page cache: a proof of the
tool's own writes, not of the disk's, see ``copy_image_file``); and a
relocation's destination made before the mirror starts: the read-only
layers copied as files, relinked, a new overlay on top (chain mode); or an
empty standalone image (full mode). Every new file is reserved
exclusively and recorded first (``storage.FileCreator``)."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..core import errors
from ..core.budget import Budget, wait_all
from ..core.identity import device_size
from .imagelock import lock_for_copy
from .images import ImageInfo, backing_name_for, create_image, create_overlay, set_backing
from .state import fsync_dir
from .storage import FileCreator

if TYPE_CHECKING:
    from ..core.relocate_plan import RelocatePlan


FICLONE = 0x40049409  # ioctl: share the source's extents (btrfs, xfs reflink)
CHUNK = 8 * 1024 * 1024
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_ALL = 1 | 2 | 4  # wait for earlier writeback, write, wait for it


class Pace:
    """Holds copies to ``rate_mib_s`` (0: unlimited) across every thread
    and file of one operation: ``--bandwidth`` bounds the tool's own
    copies as it bounds libvirt's jobs and qemu-img (``-r``). Each chunk
    also asks the operation's ``budget`` whether to go on (timeout,
    interrupt)."""

    def __init__(self, rate_mib_s: int = 0, budget: Budget | None = None) -> None:
        self.rate = rate_mib_s * 1024 * 1024
        self.budget = budget or Budget()
        self.started = time.monotonic()
        self.sent = 0
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more keep the average within the rate."""
        self.budget.check("the copy of the layers")
        if not self.rate:
            return
        with self.lock:
            self.sent += nbytes
            due = self.started + self.sent / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            self.budget.sleep(delay, doing="the copy of the layers")


def copy_proven(copies: list[tuple[str, str]], creator: FileCreator,
                rate_mib_s: int = 0, budget: Budget | None = None) -> None:
    """Copy images nobody writes into new files (reserved and recorded
    first), two at a time, the largest first, each proven as it is copied
    (``copy_image_file``): content, not only paths. ``rate_mib_s`` bounds
    them all together."""
    for _, new in copies:
        creator.reserve(new)
    pace = Pace(rate_mib_s, budget)

    # Two threads in all: one per file when there are several (measured for
    # a 4-layer 900 MiB chain: 0.52-0.66 s, against 0.55-1.27 s with two
    # threads per file -- four streams of writeback on two cores).
    workers = 2 if len(copies) == 1 else 1

    def copy_one(src: str, new: str) -> None:
        copy_image_file(src, new, workers, reserved=True, pace=pace)
        _forget_cached(new)

    largest_first = sorted(copies, key=lambda copy: -device_size(copy[0]))
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(copy_one, src, new) for src, new in largest_first]
        wait_all(futures, pace.budget)  # on Ctrl-C each copy stops at its next chunk
        for done in futures:
            done.result()


def copy_image_file(src: str, dst: str, workers: int = 2, reserved: bool = False,
                    pace: Pace | None = None) -> None:
    """Copy an image that nobody writes (a read-only layer of a running
    chain, or any layer of a shut-off domain: a file or a block device)
    into the file ``dst`` and prove the copy, on stable storage before the
    VM may depend on it. ``reserved``: ``dst`` was created empty
    (exclusively) by the caller; else it must not exist. Raises
    OperationFailed when the copy does not hold the source's bytes.

    A reflink where the filesystem shares extents (nothing to prove: the
    copy *is* the source's extents); else the data extents (holes stay
    holes: both read as zeros) in ``workers`` threads, written through the
    page cache with each chunk's writeback started at once
    (sync_file_range), so the disk writes while we read. Each chunk is read
    back from ``dst`` at once and compared with the bytes read from the
    source. That read is served by the page cache: it proves what this
    code wrote (offsets, lengths, holes, no lost chunk), not what the disk
    keeps -- the fsync below hands that to the storage, as any copy tool
    does. The proof costs a read from memory while the disk is busy,
    where a second pass re-read both files (measured for a 940 MB chain on
    ext4: copy 0.42-0.54 s plus 0.18 s for that pass). Then the chunk
    before it, written out by now, leaves the page cache: a thread holds
    at most two chunks there, the copy of a big layer pushes nothing else
    out, and the next chunk gets the pages just freed (measured here for
    the 900 MiB chain: 0.58-0.66 s; letting the copy fill the cache with
    fresh pages took 1.5-1.7 s). A source that changed meanwhile (its
    mtime, its size; a guard, not a proof: mtime ticks coarsely and a
    device has none) fails the copy: the chunks read early would be stale.
    """
    with open(src, "rb") as source, open(dst, "r+b" if reserved else "x+b") as target:
        lock_for_copy(source.fileno(), src)  # a VM start meanwhile fails, as beside qemu-img
        before = os.fstat(source.fileno())
        # A block device's st_size is 0: its size is where its end is.
        size = os.lseek(source.fileno(), 0, os.SEEK_END)
        if os.fstat(target.fileno()).st_size:
            raise errors.OperationFailed(f"{dst} is not empty: refusing to copy over it")
        if _reflink(source.fileno(), target.fileno()):
            os.fsync(target.fileno())
            return
        os.ftruncate(target.fileno(), size)
        _copy_extents(source.fileno(), target.fileno(), list(data_extents(source.fileno(), size)),
                      workers, src, dst, pace or Pace())
        os.fsync(target.fileno())
        after = os.fstat(source.fileno())
        if (before.st_mtime_ns, before.st_size) != (after.st_mtime_ns, after.st_size):
            raise errors.OperationFailed(f"{src} changed while it was copied: the copy is not proven")


def _copy_extents(src_fd: int, dst_fd: int, extents: list[tuple[int, int]], workers: int,
                  src: str, dst: str, pace: Pace) -> None:
    sync_range = _sync_file_range()
    chunks = [(offset, min(CHUNK, end - offset))
              for start, end in extents for offset in range(start, end, CHUNK)]
    failures: list[BaseException] = []

    def work(index: int) -> None:
        # Two buffers per thread, read into again and again: fresh 8 MiB
        # objects per read cost more in page faults than the comparison.
        buf, check = bytearray(CHUNK), bytearray(CHUNK)
        view, check_view = memoryview(buf), memoryview(check)
        previous: tuple[int, int] | None = None
        try:
            for offset, length in chunks[index::workers]:
                pace.take(length)
                got = os.preadv(src_fd, [view[:length]], offset)
                if got < length:
                    raise errors.OperationFailed(f"{src} ended early, at {offset + got}")
                done = 0
                while done < got:
                    done += os.pwrite(dst_fd, view[done:got], offset + done)
                sync_range(dst_fd, offset, got, SYNC_FILE_RANGE_WRITE)
                if os.preadv(dst_fd, [check_view[:got]], offset) != got or not (
                        buf == check if got == CHUNK else buf[:got] == check[:got]):
                    raise errors.OperationFailed(
                        f"copy check failed: {dst} differs from {src} within bytes "
                        f"{offset}-{offset + got}")
                if previous is not None:  # proven and written out: its pages go
                    sync_range(dst_fd, *previous, SYNC_FILE_RANGE_WAIT_ALL)
                    os.posix_fadvise(dst_fd, *previous, os.POSIX_FADV_DONTNEED)
                previous = (offset, got)
        except BaseException as exc:  # reported by the caller
            failures.append(exc)
        finally:
            view.release()
            check_view.release()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def _sync_file_range() -> Callable[[int, int, int, int], object]:
    """sync_file_range(fd, offset, length, flags): WRITE starts the
    writeback of a range and returns; WAIT_ALL also waits for it (neither
    makes it durable: only fsync does, and errors show there too). A no-op
    where libc lacks it."""
    import ctypes

    call = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if call is None:
        return lambda fd, offset, length, flags: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call  # type: ignore[no-any-return]


def _forget_cached(path: str) -> None:
    """Drop a proven copy's pages from the page cache (clean after the
    fsync): a VM opens its images with O_DIRECT, so they would only push
    other data out."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _reflink(src_fd: int, dst_fd: int) -> bool:
    import fcntl

    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return True
    except OSError:
        return False


def data_extents(fd: int, size: int, offset: int = 0) -> Iterator[tuple[int, int]]:
    """(start, end) of each data extent from ``offset`` on; the whole rest
    if SEEK_DATA is unknown."""
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            yield offset, size
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        offset = end


def prepare_chain_copy(plan: RelocatePlan, images: dict[str, ImageInfo], creator: FileCreator,
                       rate_mib_s: int = 0, budget: Budget | None = None) -> None:
    """Copy the read-only layers as files, relink them, create the new
    active overlay."""
    copy_proven(plan.copies, creator, rate_mib_s, budget)
    creator.reserve(plan.dest)
    # Relink each copy to the copy of its backing; relative names stay
    # relative (the layers sit side by side in DEST's folder).
    new_of = dict(plan.copies)
    for src, new in plan.copies:
        info = images[src]
        if info.backing_path is None:
            continue
        new_backing = new_of[info.backing_path]
        set_backing(new, backing_name_for(info, new_backing, new),
                    info.backing_format or images[info.backing_path].format)
    top_src, top_new = plan.copies[0]
    active = images[plan.chain_before[0]]
    create_overlay(plan.dest, backing_name_for(active, top_new, plan.dest), images[top_src].format,
                   active.virtual_size)
    fsync_dir(os.path.dirname(plan.dest))  # the new names survive a host crash


def prepare_full_copy(plan: RelocatePlan, images: dict[str, ImageInfo], creator: FileCreator) -> None:
    """DEST for a full mirror, made by us (and then reused by libvirt) so
    that it is reserved and recorded before anything is written into it."""
    creator.reserve(plan.dest)
    create_image(plan.dest, plan.format.value, images[plan.chain_before[0]].virtual_size)
    fsync_dir(os.path.dirname(plan.dest))


def prepare_shallow_copy(plan: RelocatePlan, images: dict[str, ImageInfo],
                         creator: FileCreator) -> None:
    """DEST for a shallow mirror: an empty overlay on the old chain below
    the active layer, made by us (libvirt would create it unrecorded: a
    timed-out or aborted copy left it behind and the retry was refused)."""
    active = images[plan.chain_before[0]]
    below = images[plan.chain_before[1]]
    creator.reserve(plan.dest)
    # onto the old chain where it is, by the name the chain uses (as
    # libvirt names it, and the cold shallow copy): a relative name across
    # folders would resolve through symlinked folders differently
    create_overlay(plan.dest, below.path, below.format, active.virtual_size)
    fsync_dir(os.path.dirname(plan.dest))
