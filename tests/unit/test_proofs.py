"""The sample proof: size, head and random pieces of the copy against this
node's file, the head as it was sent (its backing name rewritten)."""

from __future__ import annotations

import os
import random
import threading

import pytest

from vdsm_blockops.core import errors
from vdsm_blockops.core.budget import Budget
from vdsm_blockops.core.migrate_plan import LayerMove
from vdsm_blockops.engine.context import Context
from vdsm_blockops.ops.proofs import (
    HEAD_SAMPLE,
    SAMPLE_BYTES,
    SAMPLE_PIECES,
    Proofs,
    as_sent,
    sample_spans,
)

MIB = 1024 * 1024


class Dest:
    """The destination's copy: a local file read as the destination would."""

    uri = "qemu+tls://b/system"

    def __init__(self, path):
        self.path = path
        self.asked = []

    def file_size(self, path):
        return os.path.getsize(self.path)

    def pieces(self, path, spans):
        self.asked.append(list(spans))
        with open(self.path, "rb") as handle:
            return [os.pread(handle.fileno(), length, offset) for offset, length in spans]


def layer(tmp_path, size=40 * MIB):
    source = str(tmp_path / "source")
    with open(source, "wb") as handle:
        handle.write(os.urandom(size))
    copy = str(tmp_path / "copy")
    with open(source, "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read())
    move = LayerMove(source=source, dest="/there/source", format="raw", size=size,
                     virtual_size=size, active=False, backing_name=None, backing_format=None,
                     rewrite=False)
    return move, copy


def sample(move, copy):
    proofs = Proofs(Context(conn=None, budget=Budget()), Dest(copy), "sample", None, None)
    try:
        proofs._sample(move)
    finally:
        proofs.close()


def test_spans_cover_the_head_and_random_pieces_inside_the_file():
    rng = random.Random(7)
    spans = sample_spans(100 * MIB, rng)
    assert spans[0] == (0, HEAD_SAMPLE) and len(spans) == SAMPLE_PIECES + 1
    assert all(o % 4096 == 0 and o + n <= 100 * MIB and n <= SAMPLE_BYTES for o, n in spans[1:])
    assert len({o for o, _ in spans[1:]}) > 1  # not one place over and over
    assert sample_spans(3 * MIB, rng) == [(0, 3 * MIB)]  # a small file: read whole
    assert sample_spans(0, rng) == []


def test_a_sample_proof_passes_an_intact_copy_and_fails_a_wrong_one(tmp_path):
    move, copy = layer(tmp_path)
    sample(move, copy)
    with open(copy, "r+b") as handle:  # the head is always read
        handle.seek(100)
        handle.write(b"\0" * 16)
    with pytest.raises(errors.OperationFailed, match="differs from it at bytes 0"):
        sample(move, copy)
    move, copy = layer(tmp_path)
    with open(copy, "ab") as handle:
        handle.write(b"x")
    with pytest.raises(errors.OperationFailed, match="holds"):
        sample(move, copy)


def test_what_was_sent_has_the_rewritten_head(tmp_path):
    path = str(tmp_path / "f")
    with open(path, "wb") as handle:
        handle.write(b"a" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert as_sent(fd, b"HEAD", 2, 4) == b"ADaa"
        assert as_sent(fd, None, 2, 4) == b"aaaa"
        assert as_sent(fd, b"HEAD", 50, 4) == b"aaaa"
    finally:
        os.close(fd)


def test_a_stopped_proof_stops(tmp_path):
    move, copy = layer(tmp_path)
    proofs = Proofs(Context(conn=None, budget=Budget()), Dest(copy), "full", None, None)
    proofs.stop.set()
    with pytest.raises(errors.Interrupted):
        proofs._check()
    proofs.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("proof")]
