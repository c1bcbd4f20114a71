"""Read an image's backing link straight from its header.

The libvirt hook may not call libvirt and must answer in milliseconds, so
instead of running ``qemu-img`` it reads the few header bytes that name
the backing file (qcow2 spec, docs/interop/qcow2.txt in QEMU):

    0  magic 'QFI\\xfb'      8  backing_file_offset (u64)
    4  version (u32)        16  backing_file_size (u32)
    header extensions follow the header (v3: at header_length, v2: at 72);
    type 0xE2792ACA holds the backing file's format.

Anything that is not qcow2 is taken as having no backing (raw).
"""

from __future__ import annotations

import os
import struct

from .identity import clean_path

QCOW2_MAGIC = b"QFI\xfb"
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_END = 0
MAX_CHAIN = 1000  # a loop in the backing links must not hang the hook


def read_backing(path: str) -> tuple[str | None, str | None]:
    """(absolute backing path, backing format) of one image, or (None, None)."""
    with open(path, "rb") as handle:
        header = handle.read(104)
        if len(header) < 72 or header[:4] != QCOW2_MAGIC:
            return None, None
        version, backing_offset, backing_size = struct.unpack(">IQI", header[4:20])
        if not backing_offset or not backing_size or backing_size > 4096:
            return None, None
        handle.seek(backing_offset)
        name = handle.read(backing_size).decode("utf-8", "replace")
        fmt = None
        ext_offset = struct.unpack(">I", header[100:104])[0] if version >= 3 and len(header) >= 104 else 72
        handle.seek(ext_offset)
        for _ in range(64):
            raw = handle.read(8)
            if len(raw) < 8:
                break
            ext_type, ext_len = struct.unpack(">II", raw)
            if ext_type == EXT_END:
                break
            data = handle.read((ext_len + 7) & ~7)
            if ext_type == EXT_BACKING_FORMAT:
                fmt = data[:ext_len].decode("ascii", "replace")
    if name.startswith(("json:", "nbd:", "rbd:", "gluster:", "iscsi:", "http")):
        return name, fmt  # not a local file: the caller cannot follow it
    if not os.path.isabs(name):
        name = os.path.join(os.path.dirname(path), name)
    return clean_path(name), fmt


def walk_chain(path: str) -> list[str]:
    """Every image of the chain from ``path`` down, as the headers say.
    Raises FileNotFoundError naming the first image that is missing."""
    chain = [clean_path(path)]
    while len(chain) < MAX_CHAIN:
        backing, _ = read_backing(chain[-1])
        if backing is None or not backing.startswith("/"):
            return chain
        if backing in chain:
            raise ValueError(f"backing loop at {backing}")
        if not os.path.exists(backing):
            raise FileNotFoundError(backing)
        chain.append(backing)
    raise ValueError(f"chain of {path} is longer than {MAX_CHAIN} images")
