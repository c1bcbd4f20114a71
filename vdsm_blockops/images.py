"""The images' own view of a chain: ``qemu-img info --backing-chain``.

libvirt's XML says what QEMU opened; the qcow2 headers say what a fresh
start would open. Both must agree, or a VM restart silently runs on
another chain. Pure apart from running ``qemu-img`` (the runner is passed
in so tests can feed recorded output).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Callable, Sequence

from .chain import Disk
from .errors import OperationFailed

Runner = Callable[[Sequence[str]], str]


def run_command(argv: Sequence[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OperationFailed(
            f"{argv[0]} failed: {proc.stderr.strip() or proc.returncode}"
        )
    return proc.stdout


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    actual_size: int  # bytes allocated on the host: our cost measure
    backing_name: str | None  # as written in the header (may be relative)
    backing_path: str | None  # resolved absolute path
    backing_format: str | None


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
    infos = []
    for pos, item in enumerate(data):
        # qemu-img names the first image as given and the others by their
        # resolved backing names; take the previous entry's resolved name.
        own = path if pos == 0 else infos[-1].backing_path or item["filename"]
        infos.append(
            ImageInfo(
                path=os.path.normpath(own),
                format=item.get("format", ""),
                virtual_size=int(item.get("virtual-size", 0)),
                actual_size=int(item.get("actual-size", 0)),
                backing_name=item.get("backing-filename"),
                backing_path=(
                    os.path.normpath(item["full-backing-filename"])
                    if item.get("full-backing-filename")
                    else None
                ),
                backing_format=item.get("backing-filename-format"),
            )
        )
    return infos


def chain_problems(disk: Disk, images: Sequence[ImageInfo]) -> list[str]:
    """Where libvirt's chain of ``disk`` and the images' headers disagree."""
    problems = []
    xml_paths = [os.path.normpath(p) for p in disk.paths]
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
def copy_image_file(src: str, dst: str, run: Runner = run_command) -> None:
    """Byte-for-byte copy of an image file that nobody writes (a read-only
    layer of a running chain). ``cp`` keeps holes and uses reflinks or
    copy_file_range where the filesystem has them: several times faster
    than any QEMU job, which has to go through the block layer."""
    run(["cp", "--reflink=auto", "--sparse=always", "--", src, dst])


def set_backing(path: str, backing: str, backing_format: str, run: Runner = run_command) -> None:
    """Rewrite only the backing link in ``path``'s header (unsafe rebase):
    right when the new backing holds exactly the same data as the old."""
    run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", backing, "-F", backing_format, path])


def create_overlay(path: str, backing: str, backing_format: str, size_bytes: int,
                   run: Runner = run_command) -> None:
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_format,
         path, str(size_bytes)])
