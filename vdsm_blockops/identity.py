"""An image is a file or a device, not a path string.

The same image is reached through many names on a real node: symlinked
folders (oVirt's ``/rhev/data-center/<pool>/<sd>`` -> ``mnt/<server>/<sd>``),
bind mounts, and libvirt's un-normalised relative backing paths
(``/…/images/img1/../tmpl/T``). Every safety decision -- who else uses a
layer, may a file be deleted, is an image invalidated, is DEST inside the
source chain or a storage root -- compares *identities*: ``(st_dev,
st_ino)`` of the file a path resolves to, or the device number of a block
device. Paths are only for display, and are cleaned once where they enter
(``clean_path``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from typing import NamedTuple


class ImageKey(NamedTuple):
    """What makes two names one image. ``kind`` is ``file`` (dev, ino),
    ``block`` (the device number, ino 0) or ``path`` for a name that does
    not resolve (yet): then the cleaned path itself is the key."""

    kind: str
    dev: int
    ino: int
    path: str = ""

    def to_json(self) -> list[object]:
        return [self.kind, self.dev, self.ino] if self.kind != "path" else ["path", self.path]

    @classmethod
    def from_json(cls, body: object) -> ImageKey | None:
        if isinstance(body, list) and len(body) == 3 and body[0] in ("file", "block"):
            return cls(str(body[0]), int(body[1]), int(body[2]))
        return None


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


def key_of_stat(st: os.stat_result) -> ImageKey:
    if stat.S_ISBLK(st.st_mode):
        return ImageKey("block", st.st_rdev, 0)
    return ImageKey("file", st.st_dev, st.st_ino)


def image_key(path: str) -> ImageKey:
    """The identity of the image ``path`` names (symlinks followed)."""
    try:
        return key_of_stat(os.stat(path))
    except (OSError, ValueError):  # missing, unreachable, or a NUL in the name
        return ImageKey("path", 0, 0, clean_path(path))


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
