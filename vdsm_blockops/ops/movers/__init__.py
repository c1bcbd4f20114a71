"""One mover per way a relocation moves data, each with the same shape
(``base.Mover``), chosen by the plan (``choose``): the libvirt mirror
(``mirror``), the flatten-then-mirror of a full copy (``flatten``), the
snapshot and pull of ``--method snapshot-stream`` (``snapshot_stream``),
and the copies of a shut-off domain (``cold``). ``Relocate.execute`` is
prepare -> run -> finish on whichever mover the plan names; ``recover``
follows an interrupted relocation through the same mover."""

from __future__ import annotations

from ...core.model import Method
from .base import Move, Mover
from .cold import ColdCopy
from .flatten import Flatten
from .mirror import Mirror
from .snapshot_stream import SnapshotStream

__all__ = ["Move", "Mover", "choose"]


def choose(move: Move) -> Mover:
    """The mover the plan names (a shut-off domain is always copied cold)."""
    if not move.online:
        return ColdCopy(move)
    if move.plan.method is Method.SNAPSHOT_STREAM:
        return SnapshotStream(move)
    if move.plan.method is Method.FLATTEN:
        return Flatten(move)
    return Mirror(move)
