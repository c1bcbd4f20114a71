"""Read an image's backing link straight from its header -- safely.

The libvirt hook may not call libvirt and must answer in milliseconds, so
instead of running ``qemu-img`` it reads the few header bytes that name
the backing file (qcow2 spec, docs/interop/qcow2.txt in QEMU):

    0  magic 'QFI\\xfb'      8  backing_file_offset (u64)
    4  version (u32)        16  backing_file_size (u32)
    header extensions follow the header (v3: at header_length, v2: at 72);
    type 0xE2792ACA holds the backing file's format.

A guest controls the bytes of a raw disk, so headers are read only where
the host declared qcow2: the disk's ``<driver type>`` for the active image,
then each qcow2 header's recorded backing format (no format recorded: not
followed, as libvirt refuses to probe). Names are opened only when they are
regular files or block devices, without blocking (a FIFO or a device named
in a header must not stall or touch anything).
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Callable
from typing import NamedTuple

from .identity import clean_path

QCOW2_MAGIC = b"QFI\xfb"
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
EXT_BITMAPS = 0x23852875
BITMAP_IN_USE, BITMAP_AUTO = 1 << 0, 1 << 1
AUTOCLEAR_BITMAPS = 1 << 0  # the bitmaps extension is consistent
EXT_END = 0
# Incompatible feature bits that change nothing read here: dirty (0),
# compression type (3), extended L2 entries (4). Corrupt (1) and an
# external data file (2) are QEMU's to interpret.
KNOWN_INCOMPATIBLE = 1 << 0 | 1 << 3 | 1 << 4
MAX_CHAIN = 1000  # a loop in the backing links must not hang the hook

# QEMU takes a name for a protocol (nbd:, json:, http:) only when a colon
# comes before the first slash: "httpd-data.qcow2" is a file.
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class NotAnImage(ValueError):
    """A backing name resolves to something that is not a regular file or
    a block device (a FIFO, a socket, a character device, a folder)."""


def is_protocol(name: str) -> bool:
    return bool(_PROTOCOL.match(name)) and ("/" not in name or name.index(":") < name.index("/"))


def open_image(path: str) -> int:
    """Open ``path`` for reading only if it is a regular file or a block
    device, without blocking, and make sure it is still what was checked."""
    before = os.stat(path)  # FileNotFoundError goes to the caller
    if not (stat.S_ISREG(before.st_mode) or stat.S_ISBLK(before.st_mode)):
        raise NotAnImage(f"{path} is not a regular file or block device")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino, stat.S_IFMT(after.st_mode)) != \
            (before.st_dev, before.st_ino, stat.S_IFMT(before.st_mode)):
        os.close(fd)
        raise NotAnImage(f"{path} changed while it was opened")
    return fd


class Bitmap(NamedTuple):
    """A persistent dirty bitmap, as ``qemu-img info`` describes it."""

    name: str
    granularity: int
    flags: tuple[str, ...]  # "in-use" (open for writing, or left inconsistent), "auto"

    @property
    def consistent(self) -> bool:
        """Not ``in-use``: in a file no QEMU has open for writing, in-use
        means its writer died, and the bitmap cannot be trusted."""
        return "in-use" not in self.flags

    @property
    def recording(self) -> bool:
        """``auto``: writes mark it (a checkpoint's bitmap must)."""
        return "auto" in self.flags

    @property
    def usable(self) -> bool:
        """What a backup can start from: consistent and recording."""
        return self.consistent and self.recording


class Qcow2Header(NamedTuple):
    virtual_size: int
    backing_name: str | None  # as written (may be relative or a protocol)
    backing_format: str | None
    # Nothing that only QEMU should interpret: no encryption, no external
    # data file, not marked corrupt, a known version.
    plain: bool
    bitmaps: tuple[Bitmap, ...] = ()


# Reads ``size`` bytes at ``offset`` of an image: from a file, or from the
# first bytes of one downloaded from another node.
Reader = Callable[[int, int], bytes]


def read_qcow2_header(fd: int, with_bitmaps: bool = False) -> Qcow2Header | None:
    """The fields of an open qcow2 image this tool uses; None if it is not
    qcow2 (by its magic). The bitmap directory only ``with_bitmaps`` (the
    hook needs just the backing link)."""
    return parse_qcow2_header(lambda size, offset: os.pread(fd, size, offset), with_bitmaps)


def parse_qcow2_header(pread: Reader, with_bitmaps: bool = False) -> Qcow2Header | None:
    """``read_qcow2_header`` of the image ``pread`` reads."""
    header = pread(104, 0)
    if len(header) < 72 or header[:4] != QCOW2_MAGIC:
        return None
    version, backing_offset, backing_size = struct.unpack(">IQI", header[4:20])
    virtual_size, crypt_method = struct.unpack(">QI", header[24:36])
    incompatible = struct.unpack(">Q", header[72:80])[0] if version >= 3 and len(header) >= 80 else 0
    autoclear = struct.unpack(">Q", header[88:96])[0] if version >= 3 and len(header) >= 96 else 0
    bitmaps: tuple[Bitmap, ...] = ()
    plain = version in (2, 3) and crypt_method == 0 and not incompatible & ~KNOWN_INCOMPATIBLE
    name = None
    if backing_offset and 0 < backing_size <= 1023:  # QEMU's limit for the name
        # QEMU copies the name with strndup: a NUL byte ends it there.
        raw_name = pread(backing_size, backing_offset).split(b"\0", 1)[0]
        # Bytes, as QEMU opens them: a name that is no UTF-8 (Latin-1's
        # caf\xe9.raw) keeps its bytes through surrogateescape, so the
        # file QEMU opens is the file looked at here. Printed names are
        # escaped (``core.text.printable``).
        name = os.fsdecode(raw_name) or None
    fmt = None
    offset = struct.unpack(">I", header[100:104])[0] if version >= 3 and len(header) >= 104 else 72
    for _ in range(64):
        raw = pread(8, offset)
        if len(raw) < 8:
            break
        ext_type, ext_len = struct.unpack(">II", raw)
        if ext_type == EXT_END:
            break
        if ext_type == EXT_BACKING_FORMAT:
            fmt = pread(min(ext_len, 64), offset + 8).decode("ascii", "replace")
        elif ext_type == EXT_DATA_FILE:
            plain = False
        elif ext_type == EXT_BITMAPS and with_bitmaps and autoclear & AUTOCLEAR_BITMAPS:
            bitmaps = _read_bitmaps(pread, pread(min(ext_len, 24), offset + 8))
        offset += 8 + ((ext_len + 7) & ~7)
    return Qcow2Header(virtual_size, name, fmt, plain, bitmaps)


def _read_bitmaps(pread: Reader, extension: bytes) -> tuple[Bitmap, ...]:
    """The bitmap directory (qcow2 spec, "Bitmaps extension")."""
    if len(extension) < 24:
        return ()
    count, _, size, offset = struct.unpack(">IIQQ", extension)
    if size > 64 * 1024 * 1024:
        return ()
    directory = pread(size, offset)
    bitmaps, pos = [], 0
    for _ in range(count):
        if pos + 24 > len(directory):
            break
        flags, _, granularity_bits, name_size, extra_size = struct.unpack(
            ">IBBHI", directory[pos + 12:pos + 24])
        start = pos + 24 + extra_size
        name = directory[start:start + name_size].decode("utf-8", "replace")
        words = tuple(word for bit, word in ((BITMAP_IN_USE, "in-use"), (BITMAP_AUTO, "auto"))
                      if flags & bit)
        bitmaps.append(Bitmap(name, 1 << granularity_bits, words))
        pos = (start + name_size + 7) & ~7
    return tuple(bitmaps)


def read_backing(path: str) -> tuple[str | None, str | None]:
    """(backing name, backing format) of one qcow2 image, the name made
    absolute and clean unless it is a protocol; (None, None) for an image
    without backing or that is not qcow2."""
    fd = open_image(path)
    try:
        header = read_qcow2_header(fd)
    finally:
        os.close(fd)
    if header is None or header.backing_name is None:
        return None, None
    name, fmt = header.backing_name, header.backing_format
    if is_protocol(name):
        return name, fmt  # not a local file: the caller cannot follow it
    return resolve_backing(path, name), fmt


def resolve_backing(holder: str, name: str) -> str:
    """The clean absolute path a backing name in ``holder``'s header means:
    a relative name counts from ``holder``'s folder, as QEMU reads it."""
    return clean_path(os.path.join(os.path.dirname(holder), name))


def walk_chain(path: str, fmt: str | None) -> list[str]:
    """Every local image of the chain from ``path`` (declared ``fmt``) down,
    as the headers say. Raises FileNotFoundError naming the first image that
    is missing, NotAnImage for a name that is no image."""
    chain = [clean_path(path)]
    while fmt == "qcow2" and len(chain) < MAX_CHAIN:
        backing, fmt = read_backing(chain[-1])
        if backing is None or is_protocol(backing):
            return chain
        if backing in chain:
            raise ValueError(f"backing loop at {backing}")
        if not os.path.lexists(backing):
            raise FileNotFoundError(backing)
        chain.append(backing)
        _open_close(backing)  # refuses FIFOs, sockets, folders even at the bottom
    if len(chain) >= MAX_CHAIN:
        raise ValueError(f"chain of {path} is longer than {MAX_CHAIN} images")
    return chain


def _open_close(path: str) -> None:
    os.close(open_image(path))
