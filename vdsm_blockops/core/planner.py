"""The merge planner: a pure function from a chain to a plan.

``A <- B <- C <- D`` is the chain ``[D, C, B, A]``. A merge collapses the
*segment* of layers strictly above BASE up to and including TOP into one
image X, which then backs onto BASE. The planner chooses how:

* ``pull``   blockRebase(base): X is TOP (must be the active image); copies
  the segment's layers below TOP into it. Retired layers stay valid.
* ``commit`` blockCommit(top=TOP, base=L), L the lowest segment layer; X is
  L; copies the segment's layers above L into it; ACTIVE + pivot when TOP
  is active. Retired layers become invalid.
* ``noop``   the segment is already one layer.

``auto`` picks whichever copies fewer allocated bytes, but never commits
into a layer that another chain on the node uses (it would change what the
other VM sees). No libvirt here: ``--dry-run`` and Ansible check mode are
this function's output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .chain import Disk
from .errors import BadRequest, UnsafeRequest
from .model import Strategy


@dataclass(frozen=True)
class RetiredLayer:
    path: str
    valid: bool


@dataclass(frozen=True)
class MergePlan:
    disk: str
    strategy: Strategy  # pull | commit | noop
    base: str | None  # path kept as backing (None: X becomes standalone)
    top: str
    result: str  # X, the image that holds the segment afterwards
    active: bool  # TOP is the active image
    chain_before: list[str]
    chain_after: list[str]
    retired: list[RetiredLayer]
    bytes_to_copy: int
    alternatives: dict[str, int | str] = field(default_factory=dict)
    keep_relative: bool = False  # libvirt's RELATIVE flags for the new backing names

    @property
    def two_phase(self) -> bool:
        """Active commit ends only by a pivot."""
        return self.strategy is Strategy.COMMIT and self.active

    @property
    def libvirt_call(self) -> str:
        if self.strategy is Strategy.PULL:
            return f"blockRebase({self.disk}, base={self.base})"
        if self.strategy is Strategy.COMMIT:
            flags = " ACTIVE, then pivot" if self.active else ""
            return f"blockCommit({self.disk}, base={self.result}, top={self.top}){flags}"
        return "none"

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["strategy"] = self.strategy.value
        body["libvirt_call"] = self.libvirt_call
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> MergePlan:
        """The plan an operation record holds."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in body.items() if k in names}
        values["strategy"] = Strategy(values["strategy"])
        values["retired"] = [RetiredLayer(**r) for r in values.get("retired", [])]
        return cls(**values)


def plan_merge(
    disk: Disk,
    *,
    top_pos: int,
    base_pos: int | None,
    strategy: Strategy | str = Strategy.AUTO,
    allocation: Mapping[str, int],
    users: Mapping[str, Sequence[str]] | None = None,
) -> MergePlan:
    """Plan collapsing ``chain[top_pos:base_pos]`` of ``disk``.

    ``base_pos`` None means "no base": the segment reaches the bottom and X
    ends up standalone. ``allocation`` maps path -> allocated bytes;
    ``users`` maps path -> other chains ("domain/disk") using that image.
    """
    if strategy not in ("auto", "pull", "commit"):  # NOOP is a plan, never a request
        raise BadRequest(f"unknown strategy {strategy!r} (choose from auto, pull, commit)")
    strategy = Strategy(strategy)
    chain = disk.paths
    users = users or {}
    end = len(chain) if base_pos is None else base_pos
    if not 0 <= top_pos < len(chain):
        raise BadRequest(f"top position {top_pos} is outside the chain of {disk.target}")
    if base_pos is not None and base_pos <= top_pos:
        raise BadRequest(
            f"top {chain[top_pos]} is not above base {chain[base_pos]} in "
            f"the chain of {disk.target}"
        )
    segment = chain[top_pos:end]
    base = chain[base_pos] if base_pos is not None else None
    top = chain[top_pos]
    active = top_pos == 0
    common: dict[str, Any] = dict(
        disk=disk.target, base=base, top=top, active=active, chain_before=list(chain)
    )
    if len(segment) == 1:
        return MergePlan(
            strategy=Strategy.NOOP, result=top, chain_after=list(chain), retired=[],
            bytes_to_copy=0, **common,
        )

    def cost(paths: Sequence[str]) -> int:
        return sum(int(allocation.get(p, 0)) for p in paths)

    lowest = segment[-1]
    pull_cost: int | str = cost(segment[1:]) if active else "TOP is not the active image"
    lowest_users = sorted(users.get(lowest, ()))
    commit_cost: int | str = (
        cost(segment[:-1])
        if not lowest_users
        else f"{lowest} is used by {', '.join(lowest_users)}"
    )
    alternatives = {"pull": pull_cost, "commit": commit_cost}

    if strategy is Strategy.AUTO:
        if isinstance(pull_cost, int) and (
            not isinstance(commit_cost, int) or pull_cost <= commit_cost
        ):
            # Ties go to pull: it leaves the retired layers valid.
            chosen = Strategy.PULL
        elif isinstance(commit_cost, int):
            chosen = Strategy.COMMIT
        else:
            raise UnsafeRequest(
                f"cannot merge {disk.target}: a pull needs the active image as "
                f"TOP and a commit would write into {lowest}, which "
                f"{', '.join(lowest_users)} also uses"
            )
    else:
        chosen = strategy
    if chosen is Strategy.PULL and not isinstance(pull_cost, int):
        raise BadRequest(
            f"strategy pull needs the active image as TOP; {top} is an "
            f"internal layer of {disk.target} (use commit or auto)"
        )
    if chosen is Strategy.COMMIT and not isinstance(commit_cost, int):
        raise UnsafeRequest(
            f"refusing to commit into {lowest}: it is also used by "
            f"{', '.join(lowest_users)}, whose data would change"
        )

    if chosen is Strategy.PULL:
        result = top
        retired = [RetiredLayer(p, True) for p in segment[1:]]
        bytes_to_copy = pull_cost
    else:
        result = lowest
        retired = [RetiredLayer(p, False) for p in segment[:-1]]
        bytes_to_copy = commit_cost
    chain_after = chain[:top_pos] + [result] + chain[end:]
    return MergePlan(
        strategy=chosen, result=result, chain_after=chain_after, retired=retired,
        bytes_to_copy=int(bytes_to_copy), alternatives=alternatives, **common,
    )
