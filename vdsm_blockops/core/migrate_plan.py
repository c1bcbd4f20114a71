"""What a move to another node copies where (pure: no libvirt, no files).

Every disk's chain is laid out under the destination folder as it lies
under the folder the source layers share (their common folder), so a
relative backing name (``../tmpl/T``) still finds its layer; an absolute
backing name is rewritten to the layer's destination path in the copied
header (``with_backing_name``). Read-only layers are copied byte for byte
before the move; the active layer is created empty on the copied chain and
filled by the migration itself (libvirt's NON_SHARED_INC: QEMU mirrors only
the top). A layer shared by several disks (a template) is copied once.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from lxml import etree

from .errors import BadRequest
from .identity import clean_path
from .reports import JSON, Report, Retired

# The qcow2 header fields that hold the backing name (qcow2 spec).
BACKING_OFFSET = struct.Struct(">QI")  # offset, size at byte 8
CLUSTER_BITS_AT = 20
MARKER_PREFIX = ".vdsm-blockops-incoming-"  # beside a file whose upload is unfinished
# beside the files a move counts on there (made or reused), until it ended
CLAIM_PREFIX = ".vdsm-blockops-uses-"


@dataclass
class MigrateRequest:
    domain: str
    dest_uri: str
    dest_dir: str
    migrate_uri: str | None = None  # where QEMU on the destination listens (virsh --migrateuri)
    bandwidth_mib_s: int | None = None
    timeout_s: float | None = None
    dry_run: bool = False
    delete_source: bool = False  # remove the source's files once the move is verified
    # the folder the layers are laid out from (default: the one they share):
    # VMs moved from one such root to one dest_dir share their templates there
    source_root: str | None = None
    proof: str = "full"  # of each copy: "full" (read back whole) or "sample" (ops/proofs.py)


@dataclass
class LayerMove:
    """One image: where it is, where it goes, how it names its backing there."""

    source: str
    dest: str
    format: str
    size: int  # bytes of the file (what an upload sends); the active layer's allocation
    virtual_size: int
    active: bool  # created empty on the destination, filled by the migration
    backing_name: str | None  # as the destination's header names its backing file
    backing_format: str | None
    rewrite: bool  # the header's backing name changes (an absolute name)
    disks: list[str] = field(default_factory=list)


@dataclass
class DiskMove:
    disk: str
    chain_before: list[str]
    chain_after: list[str]


@dataclass
class MigratePlan:
    domain: str
    uuid: str
    dest_uri: str
    dest_dir: str
    disks: list[DiskMove]
    layers: list[LayerMove]  # read-only ones bottom first, then the active ones
    checkpoints: list[str]  # parents first
    # destination folders that did not exist when planned, deepest first:
    # a roll-back removes those left empty
    new_folders: list[str] = field(default_factory=list)

    @property
    def uploads(self) -> list[LayerMove]:
        return [layer for layer in self.layers if not layer.active]

    @property
    def bytes_to_upload(self) -> int:
        return sum(layer.size for layer in self.uploads)

    @property
    def dest_folders(self) -> list[str]:
        return sorted({os.path.dirname(layer.dest) for layer in self.layers})

    @property
    def path_map(self) -> dict[str, str]:
        return {layer.source: layer.dest for layer in self.layers}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> MigratePlan:
        return cls(**{**body, "disks": [DiskMove(**d) for d in body["disks"]],
                      "layers": [LayerMove(**layer) for layer in body["layers"]]})


@dataclass
class MigrateReport(Report):
    """A move to another node: each disk's chain there, what was copied."""

    OPERATION = "migrate"
    OPTIONAL = ("deleted", "kept", "record", "duration_s")
    domain: str
    dest_uri: str
    dest_host: str
    dest_dir: str
    dry_run: bool
    changed: bool
    chain_before: dict[str, list[str]]
    chain_after: dict[str, list[str]]  # paths on the destination node
    copied: list[JSON]  # {source, dest, bytes, sha256, reused, proof}: the read-only layers
    bytes_to_copy: int
    checkpoints: list[str]
    retired: list[Retired]
    verified: bool
    finished: bool
    deleted: list[str] | None = None
    # --delete-source: source layers not deleted (yet), {"path", "why"}
    kept: list[dict[str, str]] | None = None
    record: str | None = None
    duration_s: float | None = None


@dataclass(frozen=True)
class SourceImage:
    """What the plan needs of one image of a chain (from its header)."""

    path: str
    format: str
    size: int
    virtual_size: int
    backing_name: str | None
    backing_format: str | None


def plan_layout(chains: dict[str, list[SourceImage]], dest_dir: str,
                source_root: str | None = None) -> tuple[list[DiskMove], list[LayerMove]]:
    """Where each disk's layers go under ``dest_dir`` (``chains``: each
    disk's images, active first): as they lie under ``source_root``, by
    default under the folder they share."""
    for what, folder in (("destination folder", dest_dir), ("source root", source_root)):
        if folder is not None and not os.path.isabs(folder):
            raise BadRequest(f"the {what} must be an absolute path, not {folder!r}")
    dest_dir = clean_path(dest_dir)
    paths = [image.path for chain in chains.values() for image in chain]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    if source_root is not None:
        outside = [p for p in paths if os.path.commonpath([p, clean_path(source_root)])
                   != clean_path(source_root)]
        if outside:
            raise BadRequest(f"{outside[0]} is not under the source root {source_root}: "
                             "choose a source root that holds every layer of the VM")
        root = clean_path(source_root)

    def dest_of(path: str) -> str:
        return os.path.join(dest_dir, os.path.relpath(path, root))

    disks: list[DiskMove] = []
    read_only: dict[str, LayerMove] = {}
    active: list[LayerMove] = []
    for disk, chain in chains.items():
        disks.append(DiskMove(disk, [i.path for i in chain], [dest_of(i.path) for i in chain]))
        for pos, image in enumerate(chain):
            backing = chain[pos + 1].path if pos + 1 < len(chain) else None
            name = image.backing_name
            rewrite = False
            if backing is not None and name is not None and name.startswith("/"):
                rewrite = name != dest_of(backing)
                name = dest_of(backing)
            move = LayerMove(source=image.path, dest=dest_of(image.path), format=image.format,
                             size=image.size, virtual_size=image.virtual_size, active=pos == 0,
                             backing_name=name, backing_format=image.backing_format,
                             rewrite=rewrite, disks=[disk])
            if pos == 0:
                active.append(move)
            elif image.path in read_only:
                read_only[image.path].disks.append(disk)
            else:
                read_only[image.path] = move
    shared = [m.source for m in active if m.source in read_only]
    if shared:
        raise BadRequest(f"{shared[0]} is the active layer of one disk and a read-only layer "
                         "of another")
    # bottom layers first: a layer is complete on the destination before
    # anything that names it
    ordered = sorted(read_only.values(), key=lambda m: -_depth(m, chains))
    return disks, ordered + active


def _depth(move: LayerMove, chains: dict[str, list[SourceImage]]) -> int:
    """How far below its active layer ``move`` lies (the deepest, where shared)."""
    return max([i.path for i in chain].index(move.source)
               for chain in chains.values() if move.source in [i.path for i in chain])


def with_backing_name(head: bytes, name: str) -> bytes:
    """``head`` (the first cluster of a qcow2 image, or more) with its
    backing file name replaced by ``name``, as ``qemu-img rebase -u`` would
    write it: the name stays where the header put it and must end inside
    the first cluster."""
    offset, size = BACKING_OFFSET.unpack_from(head, 8)
    cluster = 1 << struct.unpack_from(">I", head, CLUSTER_BITS_AT)[0]
    raw = name.encode()
    if not offset or offset + max(len(raw), size) > min(cluster, len(head)) or len(raw) > 1023:
        raise BadRequest(f"the backing name {name!r} does not fit in the image's header")
    patched = bytearray(head)
    patched[offset:offset + max(size, len(raw))] = raw.ljust(max(size, len(raw)), b"\0")
    BACKING_OFFSET.pack_into(patched, 8, offset, len(raw))
    return bytes(patched)


def rewrite_sources(domain_xml: str, path_map: dict[str, str]) -> str:
    """``domain_xml`` with every disk source (and backing store) that
    ``path_map`` names pointing at its destination path."""
    root = etree.fromstring(domain_xml.encode())
    for source in root.iterfind(".//devices/disk//source"):
        name = source.get("file")
        if name is not None and clean_path(name) in path_map:
            source.set("file", path_map[clean_path(name)])
    return etree.tostring(root, encoding="unicode")


def checkpoint_order(parents: dict[str, str | None]) -> list[str]:
    """Checkpoint names, each after its parent (redefinition needs that)."""
    ordered: list[str] = []
    while len(ordered) < len(parents):
        ready = sorted(n for n, p in parents.items()
                       if n not in ordered and (p is None or p in ordered or p not in parents))
        if not ready:
            raise BadRequest("the checkpoints' parents form a loop")
        ordered += ready
    return ordered


def marker_name(uuid: str, dest: str = "") -> str:
    """The marker of the unfinished upload of ``dest`` by the move of
    domain ``uuid`` (one per file: a file is named until it is proven)."""
    tag = f"-{hashlib.sha1(os.path.basename(dest).encode()).hexdigest()[:12]}" if dest else ""
    return f"{MARKER_PREFIX}{uuid}{tag}.json"


def claim_name(uuid: str) -> str:
    return f"{CLAIM_PREFIX}{uuid}.json"
