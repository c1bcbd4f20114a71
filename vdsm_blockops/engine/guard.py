"""The guard of the libvirt QEMU hook (``shells/hook.py`` is its entry):
VMs kept from starting on invalidated images, and from migrating in the
middle of an operation.

libvirt runs ``/etc/libvirt/hooks/qemu.d/*`` as ``HOOK DOMAIN OP SUBOP EXTRA``
with the domain XML on stdin and waits for it without a timeout, so this
never calls libvirt (deadlock); it reads only stdin, the node's registry
and image headers (``headers.py``: only where the host declared qcow2,
never blocking on what a name points at). It refuses (exit 1, one line on
stderr) on evidence of danger -- and, failing closed, wherever it cannot
decide: a registry it cannot read, a state folder that is missing, checks
that fail internally or miss their hard deadline (``DEADLINE_S``: a start is
never held longer than that, whatever the storage does). Each such refusal
says how to decide. It needs the state folder and nothing else: the config
is read leniently (``guard_state_dir``). Turning it off is an explicit act
(``vdsm-blockops hook disable --reason``), written to the history, never the
side effect of a typo.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import stat
import sys
import time
from collections.abc import Callable
from typing import BinaryIO

from ..core.chain import parse_domain
from ..core.config import guard_state_dir
from ..core.headers import NotAnImage, walk_chain
from ..core.lifetime import made_at
from ..core.migrate_plan import MARKER_PREFIX
from ..core.text import printable
from .migrations import pending_move
from .pools import NAMED_POOLS, PoolFiles
from .records import records_in_domain_xml
from .state import StateDir, open_private

log = logging.getLogger("vdsm_blockops.guard")

MAX_XML_BYTES = 4 * 1024 * 1024  # a domain XML is a few KiB; refuse to parse a flood
QUEUE_OPS = {("reconnect", "begin"), ("started", "begin"), ("release", "end")}
GUARDED_OPS = {("prepare", "begin"), ("migrate", "begin"), ("restore", "begin")}
DEADLINE_S = 2.0
MARKER_MAX_BYTES = 1 << 20  # a marker names a chain's files: a few KiB
TURN_OFF = ("or, to start VMs unguarded, turn the guard off explicitly: "
            "'vdsm-blockops hook disable --reason TEXT'")
# libvirt drops a missing source with these policies instead of failing.
DROPPABLE = ("optional", "requisite")


class Refusal(Exception):
    """Positive evidence of danger: the hook says no."""


def check_start(xml: bytes, state: StateDir) -> None:
    """prepare begin: no operation on the shut-off domain may be unfinished,
    no disk may use an invalidated or missing image. The registry is read
    first, before any other file is opened."""
    try:
        invalid = state.invalid_lookup()
    except (OSError, ValueError) as exc:
        raise Refusal(f"the registry of invalidated images {state.registry_path} cannot be "
                      f"read ({exc}), so the guard cannot decide: repair it or restore it from "
                      f"a backup, {TURN_OFF}") from None
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
            if copy is not None and "unreadable" in copy:
                raise Refusal(
                    f"disk {disk.target} uses {path}, made after {copy['marker']}, the marker of "
                    f"a move to this node that cannot be read ({copy['unreadable']}): that "
                    "upload may be unfinished. Run 'vdsm-blockops recover' on the node the move "
                    "came from; remove the marker once no move into this folder is under way")
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
    upload is unfinished, when it names ``path`` (``ops/migrate.py``).

    Markers are untrusted input (any user who can write to the folder can
    make one): never followed, opened without blocking, regular files only,
    size-capped. One that cannot be read could name only files made after
    it (a move writes its marker before its first file): it is returned,
    as ``{"marker", "unreadable"}``, for those alone."""
    folder = os.path.dirname(path)
    # A folder that cannot be listed (an I/O error) may hold a marker: the
    # OSError goes up and the guard, unable to decide, refuses.
    names = sorted(n for n in os.listdir(folder) if n.startswith(MARKER_PREFIX))
    for name in names:
        marker = os.path.join(folder, name)
        try:
            body = read_marker(marker)
        except (OSError, ValueError) as exc:
            try:
                newer = made_at(path) >= made_at(marker, follow=False)
            except OSError:
                newer = True
            if newer:
                return {"marker": marker, "unreadable": str(exc) or type(exc).__name__}
            continue
        files = body.get("files")
        if isinstance(files, list) and path in files:
            return body
    return None


def read_marker(path: str) -> dict[str, object]:
    """A marker's body; OSError or ValueError when it is not a whole one."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MARKER_MAX_BYTES:
            raise ValueError(f"larger than {MARKER_MAX_BYTES} bytes")
        data = os.read(fd, MARKER_MAX_BYTES + 1)
    finally:
        os.close(fd)
    body = json.loads(data)  # empty or half-written: ValueError
    if not isinstance(body, dict) or not isinstance(body.get("files"), list):
        raise ValueError("not a marker's body")
    return body


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
    state.ensure()
    folder = os.path.join(state.path, "queue")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd = open_private(os.path.join(folder, domain.replace("/", "_")), os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{time.time()}\n")


def within_deadline(check: Callable[[], None], deadline_s: float) -> str | None:
    """Run ``check`` in a child process; None when it passed, else the
    refusal: the one it raised, or -- failing closed -- why it could not
    decide (it failed internally, or missed the deadline).

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
                answer = b"refuse:" + str(exc).encode("utf-8", "surrogateescape")
            except Exception as exc:  # our own bug or unreadable storage: cannot decide
                answer = b"error:" + f"{type(exc).__name__}: {exc}".encode("utf-8",
                                                                          "surrogateescape")
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
        return (f"the image checks did not finish within {deadline_s:g} s (storage not "
                "answering?), so the guard cannot decide: start again once the images' "
                f"storage answers, {TURN_OFF}")
    os.waitpid(pid, 0)
    text = answer.decode("utf-8", "surrogateescape")  # names keep their bytes
    if text.startswith("refuse:"):
        return text[len("refuse:"):]
    if text.startswith("error:"):
        return (f"the image checks failed ({text[6:]}), so the guard cannot decide: "
                f"see the system log, {TURN_OFF}")
    return None if text == "ok" else "the image checks gave no answer; " + TURN_OFF


def run(argv: list[str], stdin: BinaryIO, state: StateDir, deadline_s: float = DEADLINE_S) -> int:
    if len(argv) < 3:
        return 0
    domain, op, sub = argv[0], argv[1], argv[2]
    try:
        off = state.guard_disabled() if os.path.isdir(state.path) else None
        if off is not None:
            log.warning("guard disabled (%s): %s %s %s not checked", off.get("reason"),
                        domain, op, sub)
            return 0
        if (op, sub) == ("prepare", "begin") and not os.path.isdir(state.path):
            raise Refusal(f"the state folder {state.path} is missing, so the guard cannot "
                          "know which images are invalidated: mount or restore it (or run "
                          f"'vdsm-blockops hook install' to make an empty one), {TURN_OFF}")
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
        sys.stderr.write(f"vdsm-blockops: {printable(domain)}: {printable(str(exc))}\n")
        _trail_refusal(state, domain, op, str(exc))
        return 1
    except Exception as exc:  # fail closed, out loud
        message = printable(f"vdsm-blockops: {domain}: the guard failed ({type(exc).__name__}: "
                            f"{exc}) and cannot decide; {TURN_OFF}")
        log.error("hook %s %s %s: %s", domain, op, sub, message)
        if (op, sub) not in GUARDED_OPS:
            return 0  # a lifecycle notice, not a decision: nothing to refuse
        sys.stderr.write(message + "\n")
        return 1
    return 0


def _trail_refusal(state: StateDir, domain: str, op: str, why: str) -> None:
    from . import history

    if not os.path.isdir(state.path):
        return  # a missing state folder is not made here (an unmounted file system?)
    history.append(state, history.entry(
        source="hook", operation="start" if op == "prepare" else op, domain=domain, disk=None,
        started=time.time(), exit_code=1, outcome="refused", message=why))


def read_xml(stdin: BinaryIO) -> bytes:
    data = stdin.read(MAX_XML_BYTES + 1)
    if len(data) > MAX_XML_BYTES:
        raise ValueError(f"domain XML larger than {MAX_XML_BYTES} bytes; not parsed")
    return data


def guard(argv: list[str], stdin: BinaryIO, deadline_s: float = DEADLINE_S) -> int:
    """The hook's decision on ``HOOK DOMAIN OP SUBOP EXTRA`` (``argv``
    from DOMAIN on) with the domain XML on ``stdin``: 0 go on, 1 refuse
    (the reason on stderr)."""
    try:
        state_dir, warnings = guard_state_dir()
    except OSError as exc:
        sys.stderr.write(f"vdsm-blockops hook: the config cannot be read ({exc}), so the guard "
                         f"does not know its state folder: make it readable, {TURN_OFF}\n")
        return 1 if tuple(argv[1:3]) in GUARDED_OPS else 0
    for warning in warnings:  # guarding goes on: only the state folder is needed
        log.warning("config read leniently, still guarding: %s", warning)
    return run(argv, stdin, StateDir(state_dir), deadline_s)
