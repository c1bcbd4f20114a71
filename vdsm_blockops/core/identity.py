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

And a key names the file system by its *home* (``filesystem_home``), not
by ``st_dev``: NFS, btrfs subvolumes and overlayfs get an anonymous device
number per mount, file systems on LVs ``253:<minor>`` in activation order,
so the same retired file remounted from another device kept its number in
no earlier key (seen here: an ext4 image mounted again through another
loop device). The home is the kernel's f_fsid where it is made from the
file system's UUID (ext4, btrfs), the export for NFS, the volume
identity of the device otherwise.

A handle also lets a record about a file find out whether the file still
exists anywhere (renamed or hard-linked included: ``file_exists``), so
records of files that are gone can be dropped -- only when the file is
provably gone on its own file system, never because it is not mounted.

Keys written by earlier versions (``st_dev`` instead of the home, no
lifetime, or 0.1.0's bare path) are taken over by ``recorded_key``:
matched against the file at their recorded path by inode number (and
lifetime, where they had one), whatever device number it has now.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from typing import NamedTuple

from .lifetime import file_life, filesystem_home, handle_exists, volume_identity


class ImageKey(NamedTuple):
    """What makes two names one image. ``kind`` is ``file`` (``home``, ino),
    ``block`` (a device: ``life`` names the volume, home/ino are empty) or
    ``path`` for a name that does not resolve (yet): then the cleaned path
    itself is the key. ``home`` names the file system (module docstring);
    ``life`` tells this file from a later one that got the same number."""

    kind: str
    home: str
    ino: int
    life: str = ""
    path: str = ""

    def to_json(self) -> list[object]:
        if self.kind == "path":
            return ["path", self.path]
        return [self.kind, self.home, self.ino, self.life]

    @classmethod
    def from_json(cls, body: object) -> ImageKey | None:
        """A key in today's form; None for anything else (an earlier
        version's key: see ``recorded_key``)."""
        if not isinstance(body, list) or len(body) != 4 or body[0] not in ("file", "block"):
            return None
        kind, home, ino, life = body
        if not isinstance(life, str) or isinstance(ino, bool) or not isinstance(ino, int):
            return None
        if kind == "block" and home in ("", 0):  # 0: the same key before homes
            return cls("block", "", 0, life)
        if kind == "file" and isinstance(home, str) and home:
            return cls("file", home, ino, life)
        return None


def known_key_form(body: object) -> bool:
    """Whether ``body`` is a stored id of today's or an earlier form (no id
    at all was 0.1.0's), as opposed to one of a later version."""
    if body is None or ImageKey.from_json(body) is not None:
        return True
    return (isinstance(body, list) and len(body) in (3, 4) and body[0] in ("file", "block")
            and all(isinstance(n, int) and not isinstance(n, bool) for n in body[1:3]))


def recorded_key(body: object, path: str) -> ImageKey | None:
    """The key a stored id names, in today's form, or None when that
    cannot be known now.

    Today's keys are taken as they are. An earlier version's key (a
    device number where the home is now: ``["file", dev, ino(, life)]``,
    ``["block", rdev, 0]``; or no key at all: 0.1.0 keyed its registry by
    path) is matched against the file at its recorded ``path``: by inode
    number and lifetime where the key had them (the device number may have
    changed since: that is why it went), by device number for a device,
    and, for a bare path, the file found there (0.1.0 recorded nothing
    more). None while the path names nothing, or another file."""
    key = ImageKey.from_json(body)
    if key is not None:
        return key
    now = image_key(path)
    if now.kind == "path":
        return None
    if body is None:
        return now
    if not isinstance(body, list) or len(body) not in (3, 4):
        return None
    try:
        number = int(body[2]) if body[0] == "file" else int(body[1])
    except (TypeError, ValueError):
        return None
    if body[0] == "file" and now.kind == "file" and now.ino == number:
        return now if len(body) == 3 or str(body[3]) in ("", now.life) else None
    if body[0] == "block" and now.kind == "block":
        try:
            return now if os.stat(path).st_rdev == number else None
        except OSError:
            return None
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


def key_of_stat(st: os.stat_result, path: str) -> ImageKey:
    """The key of the image ``path`` names, whose ``os.stat`` is ``st``."""
    if stat.S_ISBLK(st.st_mode):
        return ImageKey("block", "", 0, volume_identity(st.st_rdev))
    return ImageKey("file", filesystem_home(path, st), st.st_ino, file_life(path, st))


def file_exists(key: ImageKey) -> bool | None:
    """Whether the file ``key`` names still exists anywhere (by its handle:
    renamed and hard-linked included); None where that cannot be told."""
    return handle_exists(key.home, key.life) if key.kind == "file" else None


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
    return ImageKey("path", "", 0, "", clean_path(path))


def fingerprint(path: str) -> tuple[ImageKey, int, int]:
    """What tells an image changed while it was read or copied: its
    identity, size and mtime (a guard, not a proof: mtime ticks coarsely).
    Raises OSError."""
    st = os.stat(path)
    return image_key(path), st.st_size, st.st_mtime_ns


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
    return len(a) == len(b) and all(image_key(x) == image_key(y) for x, y in zip(a, b))


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


def inside_folder(path: str, folder: str) -> bool:
    """Whether ``path`` lies in ``folder`` or below, decided on the folders'
    identities (device and inode): an alias of the folder -- a symlink to
    it, a bind mount of it -- is the folder, whatever the path strings say."""
    try:
        wanted = os.stat(folder)
    except OSError:
        return False
    here = os.path.dirname(os.path.realpath(path))
    while True:
        try:
            seen = os.stat(here)
        except OSError:
            return False
        if (seen.st_dev, seen.st_ino) == (wanted.st_dev, wanted.st_ino):
            return True
        parent = os.path.dirname(here)
        if parent == here:
            return False
        here = parent
