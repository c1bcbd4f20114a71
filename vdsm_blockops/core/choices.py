"""The choices of the options (strategy, mode, method, format): enums
only, so that the CLI's parser -- and ``--help`` or ``--version`` -- load
nothing more to offer them."""

from __future__ import annotations

import enum


class StrEnum(str, enum.Enum):
    """``enum.StrEnum`` (3.11) for Python 3.9 and 3.10: members are their
    values as strings -- in str(), format() and comparisons."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return str(self.value).__format__(spec)


class Operation(StrEnum):
    MERGE = "merge"
    RELOCATE = "relocate"
    SNAPSHOT = "snapshot"


class Strategy(StrEnum):
    """How a merge runs. AUTO is a request, NOOP only ever a plan."""

    AUTO = "auto"
    PULL = "pull"
    COMMIT = "commit"
    NOOP = "noop"


class Mode(StrEnum):
    """What a relocation copies: the whole chain, only the top (shallow), or all flattened
    (full)."""

    CHAIN = "chain"
    FULL = "full"
    SHALLOW = "shallow"


class Method(StrEnum):
    """How a relocation copies: a block-copy mirror, flatten, or snapshot then stream."""

    AUTO = "auto"  # resolved by the planner: flatten where it copies faster, else mirror
    MIRROR = "mirror"
    SNAPSHOT_STREAM = "snapshot-stream"
    FLATTEN = "flatten"  # full mode: read-only part by qemu-img, then only the active layer mirrored
    # What a shut-off domain's relocation runs (reported, never asked for):
    COPY = "copy"  # the tool's own proven file copies
    CONVERT = "convert"  # qemu-img convert


class ImageFormat(StrEnum):
    """The format of a relocation's destination."""

    QCOW2 = "qcow2"
    RAW = "raw"
