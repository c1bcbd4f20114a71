"""A layer is sent as its data and its holes: what the chunks describe is
the file's content byte for byte, and a hole is never read or sent as
zeros."""

from __future__ import annotations

import hashlib
import os

from vdsm_blockops.ops.move_plan import file_chunks

MIB = 1024 * 1024


def sparse_file(path, pieces, size):
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset, data in pieces:
            handle.seek(offset)
            handle.write(data)


def rebuilt(path, start=0):
    out = bytearray()
    holes = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for chunk in file_chunks(fd, start):
            if isinstance(chunk, int):
                holes += chunk
                out += bytes(chunk)
            else:
                out += chunk
    finally:
        os.close(fd)
    return bytes(out), holes


def test_holes_are_sent_as_lengths_and_the_content_is_whole(tmp_path):
    path = str(tmp_path / "layer.raw")
    sparse_file(path, [(0, b"A" * MIB), (9 * MIB, b"B" * MIB)], 16 * MIB)
    content, holes = rebuilt(path)
    with open(path, "rb") as handle:
        assert content == handle.read()
    assert holes >= 13 * MIB  # 8 MiB between the pieces, 6 after them (fs blocks aside)


def test_a_file_without_holes_and_a_start_inside_it(tmp_path):
    path = str(tmp_path / "dense")
    data = os.urandom(3 * MIB + 17)
    with open(path, "wb") as handle:
        handle.write(data)
    assert rebuilt(path) == (data, 0)
    assert rebuilt(path, start=MIB + 5) == (data[MIB + 5:], 0)


def test_a_file_that_is_all_hole(tmp_path):
    path = str(tmp_path / "empty.raw")
    sparse_file(path, [], 5 * MIB)
    content, holes = rebuilt(path)
    assert holes == 5 * MIB and content == bytes(5 * MIB)
    assert hashlib.sha256(content).hexdigest() == hashlib.sha256(bytes(5 * MIB)).hexdigest()
