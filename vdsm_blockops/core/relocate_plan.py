"""The relocation planner: a pure function from what was asked and what
the node looks like (``RelocateFacts``, gathered first) to a frozen
``RelocatePlan`` -- the relocation's counterpart of the merge planner. No
I/O here: ``--dry-run`` and Ansible check mode are this function's output,
and nothing downstream changes a plan. The checks that need the node
(identity, room, prepared targets, places) run on the plan afterwards, in
``ops/relocate.py``."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import BadRequest
from .model import ImageFormat, Method, Mode


@dataclass(frozen=True)
class RelocateRequest:
    domain: str
    disk: str
    dest: str
    mode: str = "chain"
    method: str = "auto"
    format: str = "qcow2"
    reuse_external: bool = False
    sync_writes: bool = False
    pivot: bool = True
    delete_source: bool = False
    bandwidth_mib_s: int = 0
    timeout_s: float | None = None
    wait: bool = True
    dry_run: bool = False


@dataclass(frozen=True)
class RelocatePlan:
    disk: str
    mode: Mode
    method: Method
    format: ImageFormat
    dest: str
    chain_before: list[str]
    chain_after: list[str]  # when pivoted
    copies: list[tuple[str, str]] = field(default_factory=list)  # (source layer, new path)
    bytes_to_copy: int = 0
    persistent: bool = False

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body.update(mode=self.mode.value, method=self.method.value, format=self.format.value)
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> RelocatePlan:
        """The plan an operation record holds."""
        values = {k: v for k, v in body.items() if k in {f.name for f in fields(cls)}}
        values.update(mode=Mode(values["mode"]), method=Method(values["method"]),
                      format=ImageFormat(values["format"]),
                      copies=[(src, new) for src, new in values.get("copies", [])])
        return cls(**values)


@dataclass(frozen=True)
class RelocateFacts:
    """What the planner needs to know of one disk and its destination."""

    disk: str
    chain: list[str]  # cleaned paths, active first
    allocation: dict[str, int]  # bytes each layer holds
    dest: str  # this disk's DEST, cleaned
    dest_is_folder: bool  # chain mode onto block volumes: one per layer in it
    dest_is_device: bool  # a pre-created device (--reuse-external)
    online: bool
    persistent: bool
    checkpoints: tuple[str, ...] = ()  # the checkpoints that track the disk


def plan_relocation(req: RelocateRequest, mode: Mode, method: Method, fmt: ImageFormat,
                    facts: RelocateFacts) -> RelocatePlan:
    """Where every layer goes, how the data moves, and how many bytes."""
    chain, dest = facts.chain, facts.dest
    plan = RelocatePlan(disk=facts.disk, mode=mode, method=method, format=fmt, dest=dest,
                        chain_before=chain, chain_after=[dest], persistent=facts.persistent,
                        bytes_to_copy=sum(facts.allocation.values()))
    if mode is Mode.CHAIN and facts.dest_is_folder:
        # one new volume per layer, named as the layers
        new = {src: os.path.join(dest, os.path.basename(src)) for src in chain}
        if len(set(new.values())) != len(chain):
            raise BadRequest(f"{facts.disk}: layers share a name; one volume each is impossible")
        if req.reuse_external:
            raise BadRequest(f"{facts.disk}: chain mode onto block volumes creates them; "
                             "--reuse-external does not apply")
        return replace(plan, dest=new[chain[0]], copies=[(src, new[src]) for src in chain[1:]],
                        chain_after=[new[src] for src in chain],
                        method=_only_mirror(facts.disk, method))
    if mode is Mode.CHAIN and len(chain) > 1:
        folder = os.path.dirname(dest)
        copies = [(src, os.path.join(folder, os.path.basename(src))) for src in chain[1:]]
        plan = replace(plan, copies=copies, chain_after=[dest] + [new for _, new in copies])
        if len(set(plan.chain_after)) != len(plan.chain_after):
            raise BadRequest(f"{facts.disk}: layers share a file name; chain mode would put "
                             "two of them at one path")
    elif mode is Mode.SHALLOW:
        plan = replace(plan, chain_after=[dest] + chain[1:],
                        bytes_to_copy=facts.allocation[chain[0]])
    if facts.dest_is_device:
        if plan.copies:
            raise BadRequest(f"{facts.disk}: chain mode copies every layer as a file; onto a "
                             "block device use --mode full or --mode shallow")
        return replace(plan, method=_only_mirror(facts.disk, method))
    return replace(plan, method=_method_for(req, mode, method, facts))


def _only_mirror(disk: str, method: Method) -> Method:
    """Onto devices the mirror copies (flatten and snapshot-stream write
    files their own way)."""
    if method not in (Method.AUTO, Method.MIRROR):
        raise BadRequest(f"{disk}: onto block devices only --method mirror copies, "
                         f"not {method.value}")
    return Method.MIRROR


def _method_for(req: RelocateRequest, mode: Mode, method: Method, facts: RelocateFacts) -> Method:
    """``auto``: flatten a full copy when the read-only layers hold more
    than the active one (qemu-img copies them at file speed; QEMU's mirror
    runs at a few hundred MiB/s), else mirror. Never flatten a disk a
    checkpoint tracks: qemu-img would not carry the bitmaps of the layers
    it flattens, while libvirt's mirror keeps the checkpoint usable
    (measured), and the next backup would silently be full."""
    if method not in (Method.AUTO, Method.FLATTEN):
        return method
    chain, alloc = facts.chain, facts.allocation
    if not (mode is Mode.FULL and len(chain) > 1 and facts.online):
        if method is Method.FLATTEN:
            raise BadRequest(f"{facts.disk}: --method flatten needs a running VM and a chain "
                             "of more than one layer")
        return Method.MIRROR
    if method is Method.FLATTEN:
        if facts.checkpoints:
            raise BadRequest(
                f"{facts.disk} is tracked by checkpoint(s) {', '.join(facts.checkpoints)}: "
                "--method flatten would drop their bitmaps; use --method mirror")
        return Method.FLATTEN
    below = sum(alloc.get(path, 0) for path in chain[1:])
    if req.pivot and req.wait and below > alloc.get(chain[0], 0) and not facts.checkpoints:
        return Method.FLATTEN
    return Method.MIRROR
