"""The proof of each copy a move makes on the destination, run beside the
upload of the next layer.

- ``full`` (the default): the whole copy read back through the
  destination's libvirt and its SHA-256 compared with that of what was
  sent. Proves the destination stores every byte sent.
- ``sample``: the copy's size, its first ``HEAD_SAMPLE`` bytes (the qcow2
  header and the backing name written into it) and ``SAMPLE_PIECES``
  pieces of ``SAMPLE_BYTES`` at random offsets, each compared with this
  node's file. Proves the copy has the right size, header and -- with high
  likelihood -- no gross truncation or misplacement; it does NOT prove every
  byte arrived: for transports that already authenticate every byte (TLS,
  SSH), where what remains to catch is the destination's own storage.

Neither proves the copy is on the destination's disk (``retire.py``).
One proof at a time runs beside the next upload: the read-back and the
upload share the destination's libvirtd, and a proof that fails stops the
copy. A proven copy is entered in the record (its digest, durably) and its
marker removed at once -- another move waiting for that file goes on -- by
the proof's thread, under ``lock``, which the uploading thread holds too
while it changes the record.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..core import errors
from ..core.migrate_plan import LayerMove, with_backing_name
from ..engine.context import Context
from ..engine.migrations import MigrationRecord, MigrationStore
from ..virt.remote import RemoteNode
from .move_plan import HEAD_BYTES

log = logging.getLogger(__name__)
KINDS = ("full", "sample")
HEAD_SAMPLE = HEAD_BYTES  # the header (its backing name rewritten there) and its cluster
SAMPLE_PIECES = 16
SAMPLE_BYTES = 1024 * 1024


class Proofs:
    """The proofs of one move's copies, one beside the next upload."""

    def __init__(self, ctx: Context, dest: RemoteNode, kind: str, record: MigrationRecord,
                 store: MigrationStore) -> None:
        if kind not in KINDS:
            raise errors.BadRequest(f"unknown proof {kind!r} (choose from {', '.join(KINDS)})")
        self.ctx, self.dest, self.kind = ctx, dest, kind
        self.record, self.store = record, store
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="proof")
        self.pending: deque[Future[None]] = deque()
        self.lock = threading.Lock()  # over the record

    def add(self, move: LayerMove, entry: dict[str, Any], marker: str, sent: str,
            upload_s: float) -> None:
        """Prove ``move``'s copy (``sent``: the SHA-256 of what was sent)
        while the caller uploads the next one; the previous proof ended
        first. An active layer (a header) is always read back whole."""
        self.wait()
        self.pending.append(self.pool.submit(self._prove, move, entry, marker, sent, upload_s))

    def wait(self) -> None:
        """Every proof under way ended (its failure raised here)."""
        while self.pending:
            self.pending[0].result()
            self.pending.popleft()

    def close(self) -> None:
        """Stop what still runs (a failure elsewhere) and wait for it."""
        self.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)

    # -- in the proof thread
    def _check(self) -> None:
        if self.stop.is_set():
            raise errors.Interrupted("the proof was stopped: the copy failed")
        self.ctx.budget.check("the proof of the copies")

    def _prove(self, move: LayerMove, entry: dict[str, Any], marker: str, sent: str,
               upload_s: float) -> None:
        started = time.monotonic()
        kind = "full" if move.active else self.kind
        if kind == "full":
            if self.dest.digest(move.dest, self._check) != sent:
                raise errors.OperationFailed(f"the copy of {move.source} on {self.dest.uri} "
                                             f"({move.dest}) does not read back as sent")
        else:
            self._sample(move)
        with self.lock:
            entry.update(digest=sent, proof=kind)
            self.store.save(self.record)
        self.dest.delete(marker)
        with self.lock:
            self.record.markers.remove(marker)
            self.store.save(self.record)
        log.info("%s: %d bytes uploaded in %.2f s, proven (%s) in %.2f s", move.dest, move.size,
                 upload_s, kind, time.monotonic() - started)

    def _sample(self, move: LayerMove) -> None:
        fd = os.open(move.source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            there = self.dest.file_size(move.dest)
            if there != size:
                raise errors.OperationFailed(f"the copy of {move.source} on {self.dest.uri} "
                                             f"({move.dest}) holds {there} bytes, not {size}")
            head = None
            if move.rewrite and move.backing_name is not None:
                head = with_backing_name(os.pread(fd, HEAD_SAMPLE, 0), move.backing_name)
            spans = sample_spans(size, random.SystemRandom())
            self._check()
            for (offset, length), piece in zip(spans, self.dest.pieces(move.dest, spans)):
                if piece != as_sent(fd, head, offset, length):
                    raise errors.OperationFailed(
                        f"the copy of {move.source} on {self.dest.uri} ({move.dest}) differs "
                        f"from it at bytes {offset}..{offset + length}")
        finally:
            os.close(fd)


def sample_spans(size: int, rng: random.Random) -> list[tuple[int, int]]:
    """The pieces a sample proof reads: the head, then SAMPLE_PIECES pieces
    at random 4 KiB-aligned offsets (all of a small file)."""
    if size <= HEAD_SAMPLE + SAMPLE_PIECES * SAMPLE_BYTES:
        return [(0, size)] if size else []
    spans = [(0, HEAD_SAMPLE)]
    for _ in range(SAMPLE_PIECES):
        offset = rng.randrange(HEAD_SAMPLE, size - SAMPLE_BYTES + 1) & ~4095
        spans.append((offset, min(SAMPLE_BYTES, size - offset)))
    return spans


def as_sent(fd: int, head: bytes | None, offset: int, length: int) -> bytes:
    """The bytes at ``offset`` of what was sent: the file's, but for the
    rewritten head (``head``)."""
    data = bytearray(os.pread(fd, length, offset))
    if head is not None and offset < len(head):
        part = head[offset:offset + length]
        data[:len(part)] = part
    return bytes(data)
