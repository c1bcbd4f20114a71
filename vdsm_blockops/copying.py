"""Copies of images nobody writes, proven byte for byte; and a
relocation's destination made before the mirror starts: the read-only
layers copied as files, relinked, a new overlay on top (chain mode); or an
empty standalone image (full mode). Every new file is reserved
exclusively and recorded first (``storage.FileCreator``)."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from . import errors
from .identity import device_size
from .images import ImageInfo, backing_name_for, create_image, create_overlay, set_backing
from .state import fsync_dir
from .storage import FileCreator

if TYPE_CHECKING:
    from .relocate import RelocatePlan


FICLONE = 0x40049409  # ioctl: share the source's extents (btrfs, xfs reflink)
CHUNK = 8 * 1024 * 1024
SYNC_FILE_RANGE_WRITE = 2


def copy_proven(copies: list[tuple[str, str]], creator: FileCreator) -> None:
    """Copy images nobody writes into new files (reserved and recorded
    first), two at a time, the largest first, each proven against its
    source right after its copy, while its pages are still cached: content,
    not only paths -- every copy is read back and compared (a reflink needs
    not)."""
    for _, new in copies:
        creator.reserve(new)

    def copy_one(src: str, new: str) -> None:
        if not copy_image_file(src, new, reserved=True):
            difference = content_difference(src, new)
            if difference:
                raise errors.OperationFailed(f"copy check failed: {difference}")
            _forget_cached(new)

    largest_first = sorted(copies, key=lambda copy: -device_size(copy[0]))
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for done in [pool.submit(copy_one, src, new) for src, new in largest_first]:
            done.result()


def copy_image_file(src: str, dst: str, workers: int = 2, reserved: bool = False) -> bool:
    """Copy an image that nobody writes (a read-only layer of a running
    chain: a file or a block device) into the file ``dst``, on stable
    storage before the VM may depend on it. ``reserved``: ``dst`` was
    created empty (exclusively) by the caller; else it must not exist.
    Returns True when the copy is proven already (a reflink: the filesystem
    shares the source's extents); False when the caller must prove it
    (``content_difference``).

    A reflink where the filesystem shares extents; else the data extents
    (holes stay holes) in ``workers`` threads, written through the page
    cache with each chunk's writeback started at once (sync_file_range), so
    the disk writes while we read, dirty pages never pile up and the final
    fsync finds almost nothing left -- and the proof then reads the copy
    from memory. Measured here on ext4 for a 940 MB chain: this 0.42-0.54 s
    plus 0.18 s of proof; dd with O_DIRECT 0.61-0.68 s; O_DIRECT writes
    0.6 s plus 0.7-2.1 s of proof (the copy read back from the disk);
    buffered writes without sync_file_range 0.8-2.5 s plus a 0.45 s fsync.
    """
    with open(src, "rb") as source, open(dst, "r+b" if reserved else "xb") as target:
        # A block device's st_size is 0: its size is where its end is.
        size = os.lseek(source.fileno(), 0, os.SEEK_END)
        if os.fstat(target.fileno()).st_size:
            raise errors.OperationFailed(f"{dst} is not empty: refusing to copy over it")
        if _reflink(source.fileno(), target.fileno()):
            os.fsync(target.fileno())
            return True
        os.ftruncate(target.fileno(), size)
        _copy_extents(source.fileno(), target.fileno(), list(_data_extents(source.fileno(), size)),
                      workers, src)
        os.fsync(target.fileno())
    return False


def _copy_extents(src_fd: int, dst_fd: int, extents: list[tuple[int, int]], workers: int,
                  src: str) -> None:
    start_writeback = _writeback_starter()
    chunks = [(offset, min(CHUNK, end - offset))
              for start, end in extents for offset in range(start, end, CHUNK)]
    failures: list[BaseException] = []

    def work(index: int) -> None:
        buf = bytearray(CHUNK)  # one buffer per thread, read into again and again
        view = memoryview(buf)
        try:
            for offset, length in chunks[index::workers]:
                got = os.preadv(src_fd, [view[:length]], offset)
                if got < length:
                    raise errors.OperationFailed(f"{src} ended early, at {offset + got}")
                done = 0
                while done < got:
                    done += os.pwrite(dst_fd, view[done:got], offset + done)
                start_writeback(dst_fd, offset, got)
        except BaseException as exc:  # reported by the caller
            failures.append(exc)
        finally:
            view.release()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def _writeback_starter() -> Callable[[int, int, int], object]:
    """sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE): starts the
    writeback of a range and returns (only fsync makes it durable; errors
    show there too). A no-op where libc lacks it."""
    import ctypes

    call = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if call is None:
        return lambda fd, offset, length: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, length: call(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def content_difference(src: str, dst: str, chunk: int = CHUNK) -> str | None:
    """Prove a copy: None when ``dst`` holds exactly ``src``'s bytes, else
    where they differ. Reads every data extent of either side (holes read as
    zeros on both, so they need no reading); works on block devices."""
    with open(src, "rb") as a, open(dst, "rb") as b:
        size_a = os.lseek(a.fileno(), 0, os.SEEK_END)
        size_b = os.lseek(b.fileno(), 0, os.SEEK_END)
        if size_a != size_b:
            return f"{dst} has {size_b} bytes, {src} has {size_a}"
        ranges = sorted(list(_data_extents(a.fileno(), size_a)) +
                        list(_data_extents(b.fileno(), size_b)))
        merged: list[list[int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        # Two buffers read into again and again: fresh 8 MiB objects per read
        # cost more in page faults than the comparison (memcmp) itself.
        buf_a, buf_b = bytearray(chunk), bytearray(chunk)
        for start, end in merged:
            for offset in range(start, end, chunk):
                length = min(chunk, end - offset)
                view_a, view_b = memoryview(buf_a)[:length], memoryview(buf_b)[:length]
                got_a = os.preadv(a.fileno(), [view_a], offset)
                got_b = os.preadv(b.fileno(), [view_b], offset)
                same = got_a == got_b and (buf_a == buf_b if got_a == chunk
                                           else buf_a[:got_a] == buf_b[:got_a])
                view_a.release()
                view_b.release()
                if not same:
                    return f"{dst} differs from {src} within bytes {offset}-{offset + length}"
    return None


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


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each data extent; the whole file if SEEK_DATA is unknown."""
    offset = 0
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


def prepare_chain_copy(plan: RelocatePlan, images: dict[str, ImageInfo], creator: FileCreator) -> None:
    """Copy the read-only layers as files, relink them, create the new
    active overlay."""
    copy_proven(plan.copies, creator)
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
