"""Block volumes: qcow2 (or raw) written straight onto a device, as every
volume of an oVirt block storage domain is an LV. A file grows as qcow2
allocates; a device does not: before a job writes into a qcow2 on one, the
room it may need is measured and the device extended by the node's
configured command -- or the job is refused before anything changed.

What a job may write into a layer: the data of the layers merged into it
(``qemu-img measure`` of just those layers, backing cut below them, plus
their bitmaps), placed after what the layer already uses (qcow2 never
reuses space below its end on a device: ``qemu-img check``'s image end
offset), capped by a fully allocated image; plus a margin for the guest's
writes while the job runs, which is also the step of each extension.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..core import errors
from ..core.identity import device_size, is_block_device
from .images import ImageInfo, Runner, create_image, create_overlay, run_command

if TYPE_CHECKING:
    from ..core.budget import Budget
    from ..core.config import Config
    from ..core.model import ThresholdEvent
    from ..virt import Domain

log = logging.getLogger(__name__)

MIB = 1 << 20


def whole_mib(size: int) -> int:
    """Rounded up to a MiB: devices grow by extents, never by bytes."""
    return -(-size // MIB) * MIB


@dataclass(frozen=True)
class Room:
    """A job's need for room in one volume, against the device's size."""

    path: str
    size: int  # the device's size now
    end: int  # where the qcow2's used space ends
    needed: int  # what the job may grow it to, margin included

    @property
    def short(self) -> bool:
        return self.needed > self.size

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def qcow2_end(path: str) -> int:
    """Where a qcow2's used space ends (clusters are never placed in holes
    below it on a device). ``qemu-img check`` exits 3 for leaked clusters
    -- wasted space, harmless, and its answer still right."""
    import subprocess

    proc = subprocess.run(["qemu-img", "check", "-U", "--output=json", "-f", "qcow2", path],
                          capture_output=True, text=True, check=False)
    if proc.returncode not in (0, 3):
        raise errors.OperationFailed(f"qemu-img check {path} failed: "
                                     f"{proc.stderr.strip() or proc.returncode}")
    return int(json.loads(proc.stdout)["image-end-offset"])


def _node(layers: Sequence[ImageInfo]) -> dict[str, Any] | None:
    """``layers`` (top first) as one blockdev tree whose bottom has no
    backing: measuring it counts just their data."""
    if not layers:
        return None
    top = layers[0]
    node: dict[str, Any] = {
        "driver": top.format,
        "file": {"driver": "host_device" if is_block_device(top.path) else "file",
                 "filename": top.path},
    }
    if top.format == "qcow2":
        node["backing"] = _node(layers[1:])
    return node


def allocation(image: ImageInfo) -> int:
    """The bytes an image holds, the planner's cost measure: for a qcow2 on
    a device where its used space ends (the device's size says only how
    big the LV was made), else what ``ImageInfo`` has."""
    if image.format == "qcow2" and is_block_device(image.path):
        return qcow2_end(image.path)
    return image.actual_size


def node_command(template: Sequence[str], **values: object) -> list[str]:
    """A configured command (``volume_extend_command``,
    ``volume_create_command``) with its ``{placeholders}`` filled in."""
    argv = list(template)
    for key, value in values.items():
        argv = [word.replace("{" + key + "}", str(value)) for word in argv]
    return argv


def _measure_empty(virtual_size: int, run: Runner) -> dict[str, Any]:
    """``qemu-img measure`` of a new qcow2 of ``virtual_size``: ``required``
    (empty) and ``fully-allocated``."""
    result: dict[str, Any] = json.loads(run(["qemu-img", "measure", "--output=json", "-O", "qcow2",
                                             "--size", str(virtual_size)]))
    return result


def measure(layers: Sequence[ImageInfo], virtual_size: int, run: Runner = run_command) -> int:
    """Bytes a qcow2 needs to hold ``layers``' data and bitmaps, at most a
    fully allocated one of ``virtual_size`` with those bitmaps."""
    if not layers:
        return 0
    data = json.loads(run(["qemu-img", "measure", "-U", "--output=json", "-O", "qcow2",
                           "json:" + json.dumps(_node(layers))]))
    full = _measure_empty(virtual_size, run)
    bitmaps = int(data.get("bitmaps", 0))
    return min(int(data["required"]), int(full["fully-allocated"])) + bitmaps


def room_for(target: ImageInfo, incoming: Sequence[ImageInfo], margin_mib: int,
             end: int | None = None, run: Runner = run_command) -> Room | None:
    """The room a job writing ``incoming``'s data into ``target`` needs,
    or None when ``target`` is no qcow2 on a device (files grow; a raw
    device already holds every block of the disk). ``end``: where its data
    ends, when the caller has it already (``allocation``)."""
    if target.format != "qcow2" or not is_block_device(target.path):
        return None
    end = qcow2_end(target.path) if end is None else end
    needed = end + measure(incoming, target.virtual_size, run) + margin_mib * MIB
    return Room(path=target.path, size=device_size(target.path), end=end, needed=whole_mib(needed))


def refuse_if_short(room: Room | None, extend_command: Sequence[str]) -> None:
    """Exit 2, nothing changed, when a device is too small and nothing may
    extend it."""
    if room is not None and room.short and not extend_command:
        raise errors.BadRequest(
            f"{room.path} is a block volume of {room.size} bytes and the job may need "
            f"{room.needed} bytes ({room.needed - room.size} more); extend it (on LVM: "
            f"lvextend -L {room.needed}b {room.path}) or configure volume_extend_command")


def extend(path: str, size: int, command: Sequence[str], run: Runner = run_command,
           budget: Budget | None = None) -> int:
    """Run the node's extend command for ``path`` to ``size`` bytes; the
    size is read back from the device, which must now be big enough. A
    command still running when ``budget`` runs out is stopped, its children
    with it (JobTimeout names it)."""
    before = device_size(path)
    argv = node_command(command, path=path, size_bytes=size)
    log.info("extending %s from %d to %d bytes: %s", path, before, size, " ".join(argv))
    try:
        if budget is not None:
            run_command(argv, budget, f"the extension of {path} ({argv[0]})")
        else:
            run(argv)
    except errors.OperationFailed as exc:
        raise errors.VolumeNotExtended(f"extending {path} to {size} bytes failed: {exc}") from exc
    after = device_size(path)
    if after < size:
        raise errors.VolumeNotExtended(f"{path} is {after} bytes after {argv[0]} asked for {size}")
    return after


def make_room(room: dict[str, Any], command: Sequence[str], budget: Budget | None = None) -> None:
    """Extend a planned room's volume (``room`` as the report carries it)
    where it is short, noting ``extended_to``."""
    if room["needed"] > room["size"]:
        room["extended_to"] = extend(room["path"], room["needed"], command, budget=budget)


class VolumeGuard:
    """Keeps a qcow2 on a device ahead of a running job and the guest, as
    VDSM does: a block threshold a step below the device's end; when
    QEMU writes past it (BLOCK_THRESHOLD, one-shot), the device grows by a
    step and the threshold is set again. A VM that QEMU paused on ENOSPC
    all the same (a burst faster than the event) is extended and resumed."""

    def __init__(self, domain: Domain, locate: Callable[[], str], path: str,
                 command: Sequence[str], step: int) -> None:
        self.domain, self.locate, self.path = domain, locate, path
        self.command, self.step = tuple(command), step
        self.dev = ""  # libvirt's name of the layer (``vda[N]``), once the job runs
        self.extensions = 0

    @classmethod
    def configured(cls, config: Config, domain: Domain, locate: Callable[[], str],
                   path: str) -> VolumeGuard:
        """A guard extending by the node's command, a margin at a time (at
        least a MiB: a step of 0 would never get ahead of the writes)."""
        return cls(domain, locate, path, config.volume_extend_command,
                   max(config.volume_margin_mib, 1) * MIB)

    def arm(self) -> None:
        """Set the threshold; where libvirt refuses, the job goes on with
        the room measured before it (and a pause on ENOSPC still heals)."""
        try:
            self.dev = self.dev or self.locate()
            self.domain.set_block_threshold(self.dev, max(device_size(self.path) - self.step, 1))
        except errors.BlockOpsError as exc:
            log.warning("%s: no block threshold (%s); relying on the room made before the job",
                        self.path, exc)

    def disarm(self) -> None:
        if not self.dev:
            return
        try:
            self.domain.set_block_threshold(self.dev, 0)  # 0: no threshold
        except errors.BlockOpsError:
            pass  # the layer may be gone with the job (active commit, pull)

    def _grow(self) -> None:
        extend(self.path, device_size(self.path) + self.step, self.command)
        self.extensions += 1
        self.arm()

    def on_threshold(self, event: ThresholdEvent) -> None:
        log.info("%s: QEMU wrote %d bytes past the threshold on %s", self.path, event.excess,
                 event.dev)
        self._grow()

    def tick(self) -> None:
        if self.domain.paused_on_io_error():
            log.warning("%s: the VM paused on a write error; extending and resuming", self.path)
            self._grow()
            self.domain.resume()


def destination_room(dest: str, fmt: str, copied: Sequence[ImageInfo], virtual_size: int,
                     margin_mib: int, run: Runner = run_command) -> Room:
    """A relocation onto a pre-created device (an LV made for it): what
    it must hold. qcow2: ``copied``'s data measured, plus the margin for
    the guest's writes while the mirror runs. raw: the disk, exactly -- a
    bigger device would show the guest a bigger disk after the pivot (libvirt
    ``<slices>`` are not used here), so it is refused before anything."""
    size = device_size(dest)
    if fmt == "raw":
        if size > virtual_size:
            raise errors.BadRequest(
                f"{dest} is a block device of {size} bytes and the disk has {virtual_size}: a raw "
                "copy onto it would show the guest a bigger disk; use --format qcow2, or a "
                f"device of {virtual_size} bytes")
        return Room(path=dest, size=size, end=0, needed=virtual_size)
    needed = measure(copied, virtual_size, run) + margin_mib * MIB
    return Room(path=dest, size=size, end=0, needed=whole_mib(needed))


def overlay_room(overlay: str, virtual_size: int, margin_mib: int,
                 run: Runner = run_command) -> Room:
    """A snapshot overlay on a pre-created device starts empty: it needs
    an empty qcow2's metadata and the margin for the guest's writes."""
    needed = int(_measure_empty(virtual_size, run)["required"]) + margin_mib * MIB
    return Room(path=overlay, size=device_size(overlay), end=0, needed=whole_mib(needed))


def format_destination(dest: str, fmt: str, virtual_size: int, backing: str | None = None,
                       backing_format: str = "qcow2") -> None:
    """A device given as DEST holds no image yet (an LV comes empty, or
    with an old volume's bytes): qcow2 is written onto it, over
    ``backing`` for a shallow copy; a raw device is the image itself."""
    if fmt != "qcow2":
        return
    if backing is None:
        create_image(dest, "qcow2", virtual_size)
    else:
        create_overlay(dest, backing, backing_format, virtual_size)
