"""What a relocation is asked and what it plans: plain data, no I/O --
the movers (copying, flatten, onto_devices, offline) and ``relocate.py``
all read it, so it sits below them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

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


@dataclass
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
