"""What every operation runs in (connection, config, observer, clock) and
the checks every request goes through before anything changes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..core import errors
from ..core.budget import Budget
from ..core.chain import Disk
from ..core.config import Config
from ..core.identity import ImageSet
from ..core.model import Observer
from .records import RecordStore
from .state import StateDir

if TYPE_CHECKING:
    from ..virt import Connection, Domain
    from .images import ImageInfo

# 2^52 B/s is libvirt's own ceiling; in MiB/s that is 2^32.
MAX_BANDWIDTH_MIB_S = 2**32 - 1


@dataclass
class Context:
    conn: Connection
    config: Config = field(default_factory=Config)
    observer: Observer | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    budget: Budget = field(default_factory=Budget)  # --timeout and interrupt of one operation
    allow_vdsm_managed: bool = False  # the operator's explicit override (see refuse_vdsm_managed)

    @property
    def state(self) -> StateDir:
        return StateDir(self.config.state_dir, self.budget)

    def timed(self, timeout_s: float | None) -> Context:
        """This context for one operation whose timeout starts now (its
        interrupt stays the caller's: a cancellation reaches every step)."""
        return replace(self, budget=Budget.starting_now(timeout_s, self.clock,
                                                        self.budget.interrupted))


def check_bandwidth(bandwidth_mib_s: int | None) -> int:
    if bandwidth_mib_s is None:
        return 0
    if not isinstance(bandwidth_mib_s, int) or isinstance(bandwidth_mib_s, bool) \
            or bandwidth_mib_s < 0:
        raise errors.BadRequest(
            f"bandwidth must be a whole number of MiB/s >= 0, not {bandwidth_mib_s!r}")
    if bandwidth_mib_s > MAX_BANDWIDTH_MIB_S:
        raise errors.BadRequest(f"bandwidth {bandwidth_mib_s} MiB/s is absurdly large")
    return bandwidth_mib_s


def check_timeout(timeout_s: float | None) -> None:
    """A number of seconds, finite and above 0 (NaN compares false with
    everything: it would mean "no timeout"; an infinite one is no timeout
    either -- leave the option out for that)."""
    if timeout_s is not None and not (isinstance(timeout_s, (int, float))
                                      and math.isfinite(timeout_s) and timeout_s > 0):
        raise errors.BadRequest(f"timeout must be a finite number of seconds above 0, "
                                f"not {timeout_s!r}")


# How VDSM marks the domains it runs (vdsm/virt/xmlconstants.py): its
# metadata element <ovirt-vm:vm> and, for QoS, <ovirt-tune:qos>.
VDSM_METADATA = ("http://ovirt.org/vm/1.0", "http://ovirt.org/vm/tune/1.0")


def vdsm_managed(domain_xml: str) -> bool:
    """Whether the domain's definition carries VDSM's metadata."""
    from ..core.chain import parse_xml

    metadata = parse_xml(domain_xml).find("metadata")
    return metadata is not None and any(
        isinstance(child.tag, str) and child.tag.startswith("{") and
        child.tag[1:].split("}", 1)[0] in VDSM_METADATA for child in metadata)


def refuse_vdsm_managed(ctx: Context, domain: Domain) -> None:
    """VMs that VDSM manages are not ours to change (exit 2) unless the
    operator says so: the tool updates no VDSM volume metadata (the engine's
    view of the chain would go stale) and both would set block thresholds
    on the same drives."""
    if ctx.allow_vdsm_managed or not vdsm_managed(domain.xml()):
        return
    raise errors.BadRequest(
        f"domain {domain.name} is managed by VDSM (its definition carries VDSM's <ovirt-vm:vm> "
        "metadata): this tool would change its chains behind the oVirt engine's back (no "
        "VDSM volume metadata is updated) and set block thresholds VDSM sets too; use the "
        "engine, or pass --allow-vdsm-managed when VDSM no longer manages it")


def running_domain(ctx: Context, name: str) -> Domain:
    domain = ctx.conn.domain(name)
    if not domain.is_active():
        raise errors.BadRequest(
            f"domain {domain.name} is not running; live block operations need a running VM")
    return domain


def operation_domain(ctx: Context, name: str) -> Domain:
    """A running domain (block jobs) or a defined, shut-off one (qemu-img)."""
    domain = ctx.conn.domain(name)
    if not domain.is_active() and not domain.is_persistent():
        raise errors.BadRequest(f"domain {domain.name} is neither running nor defined")
    refuse_vdsm_managed(ctx, domain)
    return domain


def check_disk_supported(disk: Disk) -> None:
    """Refuse disks libvirt's block jobs cannot handle, before anything runs."""
    if disk.device != "disk":
        raise errors.BadRequest(f"{disk.target} is a {disk.device}, not a disk")
    if disk.readonly:
        raise errors.BadRequest(f"{disk.target} is read-only; block jobs need a writable disk")
    if disk.transient:
        raise errors.BadRequest(f"{disk.target} is a <transient/> disk; libvirt refuses block jobs on it")
    if disk.bus == "sd":
        raise errors.BadRequest(f"{disk.target} is on bus 'sd'; libvirt refuses block jobs on it")
    if not disk.chain:
        raise errors.BadRequest(f"{disk.target} has no image")
    for layer in disk.chain:
        if not layer.is_local:
            raise errors.BadRequest(
                f"{disk.target}: layer {layer.path or '?'} is a {layer.source_type} "
                "source; only local files and block devices are supported")


def check_no_job(domain: Domain, disk: Disk) -> None:
    """Refuse (exit 4) when an operation of ours or any block job holds the disk."""
    other = RecordStore(domain).load().get(disk.target)  # a read: no lock needed
    if other is not None:
        raise errors.Conflict(
            f"disk {disk.target} of {domain.name} is busy: {other.describe()}; if that process "
            f"is gone, run 'vdsm-blockops recover {domain.name}'", record=other.id)
    info = domain.block_job_info(disk.target) if domain.is_active() else None
    if info is not None or disk.mirror is not None:
        kind = info.job_type if info else disk.mirror.job if disk.mirror else "block"
        raise errors.Conflict(f"disk {disk.target} of {domain.name} already has a {kind} block job")


def as_failure(exc: BaseException) -> errors.BlockOpsError:
    """The error to report for ``exc`` once something has changed: a
    refusal (exit 2 promises "nothing changed") or an OSError becomes an
    operation failure (exit 1); timeouts and conflicts keep their codes."""
    if isinstance(exc, errors.BadRequest):
        return errors.OperationFailed(str(exc))
    if isinstance(exc, errors.BlockOpsError):
        return exc
    return errors.OperationFailed(f"{type(exc).__name__}: {exc}")


def refuse_unsupported_images(disk: Disk, images: list[ImageInfo], *, creates_images: bool,
                              offline: bool, copies_layers: bool = False,
                              deletes: Sequence[str] = ()) -> None:
    """Every disk kind is handled or refused by name, before anything
    changes (exit 2):

    * LUKS-encrypted layers: an image this tool creates (a copy's target,
      an overlay) would not be encrypted -- the guest's data would land on
      disk in plaintext -- and qemu-img would need the secret;
    * qcow2 layers with an external data file: their guest data is in that
      file, which a layer copy, a deletion or a cold qemu-img run would
      leave behind or not see.
    """
    encrypted = [layer.path for layer in disk.chain if layer.encrypted] + \
        [i.path for i in images if i.encrypted]
    if encrypted and (creates_images or offline):
        why = ("the image this operation creates would hold the guest's data in plaintext"
               if creates_images else "qemu-img would need its secret")
        raise errors.BadRequest(f"{disk.target}: {encrypted[0]} is encrypted (LUKS): {why}; "
                                "encrypted disks are refused")
    with_data = {i.path: i.data_file for i in images if i.data_file}
    if not with_data:
        return
    path, data = next(iter(with_data.items()))
    if copies_layers or offline:
        raise errors.BadRequest(
            f"{disk.target}: {path} keeps its data in the external data file {data}, which "
            f"{'a copy of the layers' if copies_layers else 'a cold operation'} would not carry; "
            "relocate it with --mode full while the VM runs")
    doomed = ImageSet(deletes)
    for holder, data in with_data.items():
        if holder in doomed:
            raise errors.BadRequest(
                f"{disk.target}: {holder} keeps its data in the external data file {data}; "
                "deleting the layer would leave that behind: delete neither (drop the option)")
