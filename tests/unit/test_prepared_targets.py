"""Prepared targets on real qcow2 files: what is refused, and that a
prepared chain filled layer by layer reads as its source chain."""

import os
import subprocess

import pytest

from vdsm_blockops.core.errors import BadRequest, OperationFailed
from vdsm_blockops.engine import prepared


def qemu_img(*argv):
    subprocess.run(["qemu-img", *argv], check=True, capture_output=True)


def qemu_io(path, command, fmt="qcow2"):
    subprocess.run(["qemu-io", "-f", fmt, "-c", command, path], check=True, capture_output=True)


def chain(folder, names, size="16M"):
    paths = []
    for name in names:
        path = os.path.join(folder, name)
        backing = ["-b", paths[-1], "-F", "qcow2"] if paths else []
        qemu_img("create", "-q", "-f", "qcow2", *backing, path, size)
        paths.append(path)
    return paths


def test_a_prepared_image_is_checked_for_format_size_backing_and_data(tmp_path):
    a, b = chain(str(tmp_path), ["A", "B"])
    good = str(tmp_path / "G")
    qemu_img("create", "-q", "-f", "qcow2", "-b", a, "-F", "qcow2", good, "16M")
    size = 16 * 1024 * 1024
    prepared.check([prepared.Prepared(good, "qcow2", size, a, empty=True)], "DEST")
    cases = [
        (prepared.Prepared(good, "raw", size, a, True), "is qcow2, not raw"),
        (prepared.Prepared(good, "qcow2", 2 * size, a, True), "virtual size"),
        (prepared.Prepared(good, "qcow2", size, b, True), f"backs onto {a}, not {b}"),
        (prepared.Prepared(good, "qcow2", size, None, True), "must have no backing"),
        (prepared.Prepared(str(tmp_path / "none"), "qcow2", size, None, True), "cannot be read"),
    ]
    for target, words in cases:
        with pytest.raises(BadRequest, match=words):
            prepared.check([target], "DEST")
    qemu_io(good, "write -z 0 64k")  # a zero cluster masks the backing: data of its own
    with pytest.raises(BadRequest, match="holds data"):
        prepared.check([prepared.Prepared(good, "qcow2", size, a, True)], "DEST")


def test_a_prepared_chain_is_filled_layer_by_layer_and_proven(tmp_path):
    os.makedirs(tmp_path / "src")
    os.makedirs(tmp_path / "dst")
    src = chain(str(tmp_path / "src"), ["A", "B", "C"])
    qemu_io(src[0], "write -P 0xa1 0 4M")
    qemu_io(src[1], "write -P 0xb1 1M 1M")
    qemu_io(src[2], "write -z 0 64k")  # C hides A's first cluster
    qemu_io(src[2], "write -P 0xc1 3M 64k")
    dst = chain(str(tmp_path / "dst"), ["A", "B", "C"])
    copies = list(zip(src[::-1], dst[::-1]))  # from the top down
    targets = prepared.layered(copies, None, {p: 16 * 1024 * 1024 for p in src},
                               {p: "qcow2" for p in src})
    prepared.check(targets, "DEST")
    prepared.fill(copies, {p: "qcow2" for p in src}, prepared.backings(targets))
    for s, d in zip(src, dst):
        subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", s, d], check=True)
    # Each prepared layer holds its own layer's clusters, not a flattened
    # copy: the chain keeps its shape (B' over A' differs from A only
    # where B wrote).
    assert prepared.holds_data(dst[1], "qcow2", True)
    extents = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", dst[1]],
                             capture_output=True, text=True, check=True).stdout
    assert '"depth": 0' in extents and extents.count('"depth": 0') == 1


def test_a_fill_that_does_not_read_as_its_source_fails(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "src")
    os.makedirs(tmp_path / "dst")
    (src,) = chain(str(tmp_path / "src"), ["A"])
    qemu_io(src, "write -P 0xa1 0 1M")
    (dst,) = chain(str(tmp_path / "dst"), ["A"])
    monkeypatch.setattr(prepared.qemuimg, "convert", lambda *a, **k: None)  # a copy that lost it all
    with pytest.raises(OperationFailed, match="does not read as"):
        prepared.fill([(src, dst)], {src: "qcow2"}, {dst: None})
