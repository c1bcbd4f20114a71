"""The images' own view of a chain: ``qemu-img info --backing-chain``.

libvirt's XML says what QEMU opened; the qcow2 headers say what a fresh
start would open. Both must agree, or a VM restart silently runs on
another chain. Pure apart from running ``qemu-img`` (the runner is passed
in so tests can feed recorded output).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.chain import Disk
from ..core.errors import OperationFailed
from ..core.headers import (
    MAX_CHAIN,
    Bitmap,
    NotAnImage,
    is_protocol,
    open_image,
    read_qcow2_header,
    resolve_backing,
)
from ..core.identity import clean_path, device_size, is_block_device

if TYPE_CHECKING:
    from ..core.budget import Budget

Runner = Callable[[Sequence[str]], str]


def run_command(argv: Sequence[str], budget: Budget | None = None, doing: str = "") -> str:
    """Run ``argv``; its stdout. With ``budget`` the wait ends with the
    operation's (``--timeout``: JobTimeout naming ``doing``; Ctrl-C). The
    command runs in a session of its own, and a command stopped -- by the
    budget, Ctrl-C or SIGTERM of this process -- is stopped with all its
    children (a configured ``lvextend`` wrapper, say): none outlives us."""
    import subprocess  # most commands read chains from headers and never run one

    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if budget is not None:
                    budget.check(doing or argv[0])
    finally:
        if proc.poll() is None:
            _stop_group(proc)
    if proc.returncode != 0:
        raise OperationFailed(f"{argv[0]} failed: {err.strip() or proc.returncode}")
    return out


def _stop_group(proc: Any) -> None:
    """SIGTERM to the command's whole process group, SIGKILL after 2 s."""
    import signal
    import subprocess

    for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.communicate(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    actual_size: int  # bytes allocated on the host: our cost measure
    backing_name: str | None  # as written in the header (may be relative)
    backing_path: str | None  # resolved absolute path
    backing_format: str | None
    bitmaps: tuple[Bitmap, ...] = ()  # persistent dirty bitmaps (qcow2)
    encrypted: bool = False  # LUKS (qcow2 encrypt.format=luks, or a luks image)
    data_file: str | None = None  # a qcow2's external data file (its guest data)

    def bitmap(self, name: str) -> Bitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)

    @property
    def names_backing_relatively(self) -> bool:
        """Whether the header names the backing file by a relative name
        (oVirt's ``V1``, ``../<template-img>/<vol>``)."""
        return bool(self.backing_name) and not str(self.backing_name).startswith("/")


def backing_name_for(image: ImageInfo, new_backing: str, holder: str) -> str:
    """How the image at ``holder`` names ``new_backing`` in the style
    ``image`` named its own backing: relative to ``holder``'s folder when
    that was relative, else the absolute path. A relative name QEMU would
    read as a protocol (``snap-10:00.qcow2`` -> protocol ``snap-10``) gets a
    ``./`` in front: still relative, read as a file."""
    if image.names_backing_relatively:
        name = os.path.relpath(new_backing, os.path.dirname(holder))
        return f"./{name}" if is_protocol(name) else name
    return new_backing


def read_backing_chain(
    path: str, fmt: str | None = None, run: Runner = run_command
) -> list[ImageInfo]:
    """Every image of the chain starting at ``path``, as the headers say.

    ``-U`` (force share) lets us read images a running QEMU holds locked;
    we only read metadata, so that is safe.
    """
    argv = ["qemu-img", "info", "-U", "--backing-chain", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    data = json.loads(run(argv + [path]))
    if isinstance(data, dict):
        data = [data]
    infos: list[ImageInfo] = []
    for pos, item in enumerate(data):
        # qemu-img names the first image as given and the others by their
        # resolved backing names; take the previous entry's resolved name.
        own = clean_path(path) if pos == 0 else infos[-1].backing_path or item["filename"]
        virtual_size = int(item.get("virtual-size", 0))
        actual_size = int(item.get("actual-size", 0))
        if is_block_device(own):
            # qemu-img says 0 for a device; all of it counts (a raw device's
            # bytes are its data; for qcow2 the device size bounds them).
            actual_size = device_size(own)
            if item.get("format") == "raw":
                actual_size = min(actual_size, virtual_size) or actual_size
        specific = item.get("format-specific", {}).get("data", {})
        infos.append(
            ImageInfo(
                path=own,
                format=item.get("format", ""),
                virtual_size=virtual_size,
                actual_size=actual_size,
                backing_name=item.get("backing-filename"),
                backing_path=(
                    clean_path(item["full-backing-filename"])
                    if item.get("full-backing-filename")
                    else None
                ),
                backing_format=item.get("backing-filename-format"),
                bitmaps=tuple(Bitmap(b["name"], int(b["granularity"]), tuple(b.get("flags", [])))
                              for b in specific.get("bitmaps", [])),
                encrypted=bool(item.get("encrypted")) or item.get("format") == "luks",
                data_file=_data_file(own, specific.get("data-file")),
            )
        )
    return infos


def _data_file(holder: str, name: str | None) -> str | None:
    """A data file's name as QEMU reads it: relative to the image's folder."""
    if not name:
        return None
    return name if is_protocol(name) else resolve_backing(holder, name)


def read_chain(path: str, fmt: str | None) -> list[ImageInfo]:
    """The chain from ``path`` down, read from the headers where every
    image is a plain qcow2 (or a raw bottom) whose backing format is
    recorded -- the usual chain, read in well under a millisecond -- else
    by ``qemu-img info`` (which also says why a chain is broken). Both give
    the same answer: tests/unit/test_images.py compares them."""
    return _chain_from_headers(path, fmt) or read_backing_chain(path, fmt)


def _chain_from_headers(path: str, fmt: str | None) -> list[ImageInfo] | None:
    infos: list[ImageInfo] = []
    current: str | None = clean_path(path)
    while current is not None:
        if fmt not in ("qcow2", "raw") or len(infos) >= MAX_CHAIN:
            return None  # a format to probe, or a loop: qemu-img's to judge
        try:
            fd = open_image(current)
        except (OSError, NotAnImage):
            return None
        try:
            st = os.fstat(fd)
            block = stat.S_ISBLK(st.st_mode)
            size = os.lseek(fd, 0, os.SEEK_END) if block else st.st_size
            header = read_qcow2_header(fd, with_bitmaps=True) if fmt == "qcow2" else None
        finally:
            os.close(fd)
        # qemu-img's actual-size: the blocks a file holds; for a device (0
        # there) all of it, as read_backing_chain counts it
        actual_size = size if block else st.st_blocks * 512
        if fmt == "raw":
            infos.append(ImageInfo(current, "raw", size, actual_size, None, None, None))
            return infos
        if header is None or not header.plain:
            return None
        name, backing_path = header.backing_name, None
        if name is not None:
            if is_protocol(name) or header.backing_format is None:
                return None  # not a local file, or a format qemu-img would probe
            backing_path = resolve_backing(current, name)
        infos.append(ImageInfo(current, "qcow2", header.virtual_size, actual_size, name,
                               backing_path, header.backing_format, header.bitmaps))
        current, fmt = backing_path, header.backing_format
    return infos


def chain_problems(disk: Disk, images: Sequence[ImageInfo]) -> list[str]:
    """Where libvirt's chain of ``disk`` and the images' headers disagree."""
    problems = []
    xml_paths = [clean_path(p) for p in disk.paths]
    img_paths = [i.path for i in images]
    if disk.chain_complete and xml_paths != img_paths:
        problems.append(
            f"{disk.target}: libvirt chain {xml_paths} but image metadata "
            f"chain {img_paths}"
        )
    elif not disk.chain_complete and img_paths[: len(xml_paths)] != xml_paths:
        problems.append(
            f"{disk.target}: definition names {xml_paths} but image metadata "
            f"chain starts {img_paths[: len(xml_paths)]}"
        )
    for layer, image in zip(disk.chain, images):
        if layer.format and image.format and layer.format != image.format:
            problems.append(
                f"{disk.target}: {layer.path} is {image.format} but libvirt "
                f"uses it as {layer.format}"
            )
    for upper, lower in zip(images, images[1:]):
        if upper.backing_format and upper.backing_format != lower.format:
            problems.append(
                f"{disk.target}: {upper.path} records backing format "
                f"{upper.backing_format} for {lower.path}, which is {lower.format}"
            )
    return problems


def missing_images(disk: Disk) -> list[str]:
    return [
        layer.path
        for layer in disk.chain
        if layer.is_local and not os.path.exists(layer.path)
    ]


# ------------------------------------------------------- making images
def set_backing(path: str, backing: str, backing_format: str, run: Runner = run_command) -> None:
    """Rewrite only the backing link in ``path``'s header (unsafe rebase):
    right when the new backing holds exactly the same data as the old."""
    run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", backing, "-F", backing_format, path])


def enable_bitmap(path: str, name: str, enabled: bool, run: Runner = run_command) -> None:
    run(["qemu-img", "bitmap", "--enable" if enabled else "--disable", path, name])


def add_bitmap(path: str, name: str, granularity: int, run: Runner = run_command) -> None:
    run(["qemu-img", "bitmap", "--add", "-g", str(granularity), path, name])


def remove_bitmap(path: str, name: str, run: Runner = run_command) -> None:
    run(["qemu-img", "bitmap", "--remove", path, name])


def merge_bitmap(name: str, source: str, source_format: str, dest: str,
                 run: Runner = run_command) -> None:
    """Merge bitmap ``name`` of SOURCE into DEST's bitmap of that name."""
    run(["qemu-img", "bitmap", "--merge", name, "-b", source, "-F", source_format, dest, name])


def create_overlay(path: str, backing: str, backing_format: str, size_bytes: int,
                   run: Runner = run_command) -> None:
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_format,
         path, str(size_bytes)])


def create_image(path: str, fmt: str, size_bytes: int, run: Runner = run_command) -> None:
    """A new standalone image (qemu-img writes into a reserved file in place)."""
    run(["qemu-img", "create", "-q", "-f", fmt, path, str(size_bytes)])


def reserve_file(path: str) -> None:
    """Create ``path`` empty and exclusively: it was not there before, so it
    is ours to fill and, on failure, to remove."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
