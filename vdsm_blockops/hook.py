"""The libvirt QEMU hook: guard VMs against invalidated images and
migrations in the middle of an operation.

libvirt runs ``/etc/libvirt/hooks/qemu.d/*`` as ``HOOK DOMAIN OP SUBOP EXTRA``
with the domain XML on stdin and waits for it, so this never calls libvirt
(deadlock); it reads only stdin, the node's registry and image headers. It
refuses (exit 1, one line on stderr) only on positive evidence of danger;
its own internal errors are logged and the VM goes ahead.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from .chain import parse_domain
from .config import load_config
from .headers import walk_chain
from .records import records_in_domain_xml
from .state import StateDir

log = logging.getLogger("vdsm_blockops.hook")

MAX_XML_BYTES = 4 * 1024 * 1024  # a domain XML is a few KiB; refuse to parse a flood
QUEUE_OPS = {("reconnect", "begin"), ("started", "begin"), ("release", "end")}


class Refusal(Exception):
    """Positive evidence of danger: the hook says no."""


def check_start(xml: bytes, state: StateDir) -> None:
    """prepare begin: no disk may use an invalidated or missing image."""
    spec = parse_domain(xml)
    invalid = state.invalid_lookup()
    for disk in spec.disks:
        active = disk.active
        if active is None or not active.is_local:
            continue
        try:
            chain = walk_chain(active.path) if os.path.exists(active.path) else None
        except FileNotFoundError as exc:
            raise Refusal(f"disk {disk.target}: image {exc.args[0]} of its chain is missing") from None
        if chain is None:
            raise Refusal(f"disk {disk.target}: image {active.path} is missing")
        # By identity: the registry may name the image through another
        # folder alias than this domain's chain does.
        for path in chain + list(disk.paths[1:]):
            why = invalid.why(path)
            if why is not None:
                raise Refusal(
                    f"disk {disk.target} uses {path}, invalidated by "
                    f"{why.get('operation', 'a merge')} of {why.get('domain')} "
                    f"{why.get('disk')} at {why.get('time')}: its data is no longer a "
                    "valid point in time")


def check_no_operation(xml: bytes, what: str) -> None:
    """migrate/restore begin: not while an operation record is unfinished."""
    spec = parse_domain(xml)
    records = records_in_domain_xml(spec.metadata)
    if records:
        disk, record = sorted(records.items())[0]
        raise Refusal(
            f"{what} refused: disk {disk} has an unfinished {record.operation} "
            f"({record.id}, phase {record.phase.value}); run 'vdsm-blockops recover {spec.name}'")


def queue_recovery(state: StateDir, domain: str) -> None:
    """Hand work to ``recover --queued`` without waiting for it."""
    folder = os.path.join(state.path, "queue")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, domain.replace("/", "_")), "w") as handle:
        handle.write(f"{time.time()}\n")


def run(argv: list[str], stdin, state: StateDir) -> int:
    if len(argv) < 3:
        return 0
    domain, op, sub = argv[0], argv[1], argv[2]
    try:
        if (op, sub) == ("prepare", "begin"):
            check_start(read_xml(stdin), state)
        elif (op, sub) in (("migrate", "begin"), ("restore", "begin")):
            check_no_operation(read_xml(stdin), op)
        elif (op, sub) in QUEUE_OPS:
            queue_recovery(state, domain)
    except Refusal as exc:
        sys.stderr.write(f"vdsm-blockops: {domain}: {exc}\n")
        return 1
    except Exception as exc:  # never block a VM on our own bug
        log.error("hook %s %s %s: internal error, letting it go: %s", domain, op, sub, exc)
    return 0


def read_xml(stdin) -> bytes:
    data = stdin.read(MAX_XML_BYTES + 1)
    if len(data) > MAX_XML_BYTES:
        raise ValueError(f"domain XML larger than {MAX_XML_BYTES} bytes; not parsed")
    return data


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        state = StateDir(load_config().state_dir)
    except Exception as exc:
        sys.stderr.write(f"vdsm-blockops hook: config unreadable, not guarding: {exc}\n")
        return 0
    return run(argv, sys.stdin.buffer, state)
