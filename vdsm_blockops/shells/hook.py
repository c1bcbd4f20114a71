"""The libvirt QEMU hook: guard VMs against invalidated images and
migrations in the middle of an operation.

libvirt runs ``/etc/libvirt/hooks/qemu.d/*`` as ``HOOK DOMAIN OP SUBOP EXTRA``
with the domain XML on stdin and waits for it without a timeout, so this
never calls libvirt (deadlock); it reads only stdin, the node's registry
and image headers (``headers.py``: only where the host declared qcow2,
never blocking on what a name points at). It refuses (exit 1, one line on
stderr) only on positive evidence of danger; its own internal errors are
logged and the VM goes ahead. The image checks run in a child process under
a hard deadline (``DEADLINE_S``): a start is never held longer than that,
whatever the storage does (a hung NFS mount); past it the start proceeds
and the reason is logged.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from typing import BinaryIO

from ..core.chain import parse_domain
from ..core.config import load_config
from ..core.headers import NotAnImage, walk_chain
from ..core.migrate_plan import MARKER_PREFIX
from ..engine.migrations import pending_move
from ..engine.pools import NAMED_POOLS, PoolFiles
from ..engine.records import records_in_domain_xml
from ..engine.state import StateDir
from .logs import add_syslog

log = logging.getLogger("vdsm_blockops.shells.hook")

MAX_XML_BYTES = 4 * 1024 * 1024  # a domain XML is a few KiB; refuse to parse a flood
QUEUE_OPS = {("reconnect", "begin"), ("started", "begin"), ("release", "end")}
DEADLINE_S = 2.0
# libvirt drops a missing source with these policies instead of failing.
DROPPABLE = ("optional", "requisite")


class Refusal(Exception):
    """Positive evidence of danger: the hook says no."""


def check_start(xml: bytes, state: StateDir) -> None:
    """prepare begin: no operation on the shut-off domain may be unfinished,
    no disk may use an invalidated or missing image."""
    spec = parse_domain(xml)
    for target, record in sorted(records_in_domain_xml(spec.metadata).items()):
        if record.unreadable:
            raise Refusal(
                f"start refused: disk {target} has an unfinished {record.describe()}; "
                f"run the vdsm-blockops version that wrote it: 'vdsm-blockops recover {spec.name}'")
        if not record.online:
            raise Refusal(
                f"start refused: disk {target} has an unfinished {record.operation} of the shut-off "
                f"domain ({record.id}, pid {record.pid}); wait for it, or run "
                f"'vdsm-blockops recover {spec.name}' if that process is gone")
    move = pending_move(state.path, spec.uuid)
    if move is not None:
        raise Refusal(
            f"start refused: {spec.name} is being moved to {move.get('dest_uri')} "
            f"({move.get('phase')}); it may run there already: run "
            f"'vdsm-blockops recover {spec.name}'")
    invalid = state.invalid_lookup()
    pools = PoolFiles()
    spec = spec.with_volumes(pools.resolve)
    for disk in spec.disks:
        active = disk.active
        if active is not None and active.source_type == "volume" and invalid:
            # Unresolved: fail closed only where it could be a file or a
            # device the registry names (a file or block pool, or a pool
            # whose definition cannot be read); network pools never hold
            # an image the tool touched.
            pool = pools.pool(active.pool or "")
            if pool is None or pool[0] in NAMED_POOLS:
                raise Refusal(f"disk {disk.target}: volume {active.path} of pool {active.pool} "
                              "cannot be resolved to a file, and the node has invalidated images")
        if active is None or not active.is_local:
            continue
        if not os.path.lexists(active.path):
            if disk.startup_policy in DROPPABLE:
                continue  # libvirt starts without it
            raise Refusal(f"disk {disk.target}: image {active.path} is missing")
        try:
            chain = walk_chain(active.path, active.format)
        except FileNotFoundError as exc:
            raise Refusal(f"disk {disk.target}: image {exc.args[0]} of its chain is missing") from None
        except NotAnImage as exc:
            raise Refusal(f"disk {disk.target}: {exc}") from None
        for path in chain:
            copy = unfinished_copy(path)
            if copy is not None:
                raise Refusal(
                    f"disk {disk.target} uses {path}, which is being copied here by a move of "
                    f"{copy.get('domain')} from {copy.get('source')} that has not finished: "
                    f"its data is incomplete (run 'vdsm-blockops recover' on "
                    f"{copy.get('source')})")
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


def unfinished_copy(path: str) -> dict[str, object] | None:
    """The marker a move to this node left beside ``path`` while its
    upload is unfinished, when it names ``path`` (``ops/migrate.py``)."""
    folder = os.path.dirname(path)
    try:
        names = [n for n in os.listdir(folder) if n.startswith(MARKER_PREFIX)]
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                body = json.load(handle)
        except (OSError, ValueError):
            return {"domain": "?", "source": "?"}  # half-written marker: an upload began
        if isinstance(body, dict) and path in body.get("files", []):
            return body
    return None


def check_no_operation(xml: bytes, what: str) -> None:
    """migrate/restore begin: not while an operation record is unfinished."""
    spec = parse_domain(xml)
    records = records_in_domain_xml(spec.metadata)
    if records:
        disk, record = sorted(records.items())[0]
        raise Refusal(
            f"{what} refused: disk {disk} has an unfinished {record.describe()}; "
            f"run 'vdsm-blockops recover {spec.name}'")


def queue_recovery(state: StateDir, domain: str) -> None:
    """Hand work to ``recover --queued`` without waiting for it."""
    folder = os.path.join(state.path, "queue")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, domain.replace("/", "_")), "w") as handle:
        handle.write(f"{time.time()}\n")


def within_deadline(check: Callable[[], None], deadline_s: float) -> str | None:
    """Run ``check`` in a child process; the refusal message it raised, or
    None when it passed, failed internally, or missed the deadline.

    A child, not a thread: a thread stuck in the kernel (a dead NFS server)
    would keep this process, and so libvirt, waiting. The child gets no
    inherited stdout/stderr, so libvirt sees the end of our output when we
    exit even if the child never returns."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            try:
                check()
                answer = b"ok"
            except Refusal as exc:
                answer = b"refuse:" + str(exc).encode()
            except Exception as exc:  # our own bug or unreadable storage: not evidence
                answer = b"error:" + f"{type(exc).__name__}: {exc}".encode()
            os.write(write_fd, answer[:65536])
        finally:
            os._exit(0)
    os.close(write_fd)
    answer, finished = b"", False
    try:
        end = time.monotonic() + deadline_s
        while (left := end - time.monotonic()) > 0:
            if not select.select([read_fd], [], [], left)[0]:
                break
            chunk = os.read(read_fd, 65536)
            if not chunk:  # the child wrote its answer and exited
                finished = True
                break
            answer += chunk
    finally:
        os.close(read_fd)
    if not finished:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, os.WNOHANG)
        log.error("image checks missed the %g s deadline; letting the start proceed unchecked",
                  deadline_s)
        return None
    os.waitpid(pid, 0)
    text = answer.decode("utf-8", "replace")
    if text.startswith("refuse:"):
        return text[len("refuse:"):]
    if text.startswith("error:"):
        log.error("image checks failed internally, letting the start proceed: %s", text[6:])
    return None


def run(argv: list[str], stdin: BinaryIO, state: StateDir, deadline_s: float = DEADLINE_S) -> int:
    if len(argv) < 3:
        return 0
    domain, op, sub = argv[0], argv[1], argv[2]
    try:
        if (op, sub) == ("prepare", "begin"):
            xml = read_xml(stdin)
            refusal = within_deadline(lambda: check_start(xml, state), deadline_s)
            if refusal:
                raise Refusal(refusal)
        elif (op, sub) in (("migrate", "begin"), ("restore", "begin")):
            check_no_operation(read_xml(stdin), op)
        elif (op, sub) in QUEUE_OPS:
            queue_recovery(state, domain)
    except Refusal as exc:
        sys.stderr.write(f"vdsm-blockops: {domain}: {exc}\n")
        _trail_refusal(state, domain, op, str(exc))
        return 1
    except Exception as exc:  # never block a VM on our own bug
        log.error("hook %s %s %s: internal error, letting it go: %s", domain, op, sub, exc)
    return 0


def _trail_refusal(state: StateDir, domain: str, op: str, why: str) -> None:
    from ..engine import history

    history.append(state, history.entry(
        source="hook", operation="start" if op == "prepare" else op, domain=domain, disk=None,
        started=time.time(), exit_code=1, outcome="refused", message=why))


def read_xml(stdin: BinaryIO) -> bytes:
    data = stdin.read(MAX_XML_BYTES + 1)
    if len(data) > MAX_XML_BYTES:
        raise ValueError(f"domain XML larger than {MAX_XML_BYTES} bytes; not parsed")
    return data


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    add_syslog(log, "vdsm-blockops-hook", logging.NOTSET)
    try:
        state = StateDir(load_config().state_dir)
    except Exception as exc:
        sys.stderr.write(f"vdsm-blockops hook: config unreadable, not guarding: {exc}\n")
        log.error("config unreadable, not guarding %s: %s", " ".join(argv[:3]), exc)
        return 0
    return run(argv, sys.stdin.buffer, state)
