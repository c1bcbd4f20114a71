"""Machinery shared by the operations (merge, relocate): the context they
run in, request checks, running one block job to its end (with pivot),
and checking the result against the live and persistent definitions."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from lxml import etree

from . import errors
from .chain import Disk, parse_xml
from .config import Config
from .identity import ImageSet, clean_path, existing_key, image_key, is_block_device
from .inspect import chain_users, disk_problems, resolved_paths
from .jobs import JobWatch, Observer, Outcome
from .records import OperationRecord, Phase, RecordStore
from .state import StateDir
from .virt import Connection, Domain

log = logging.getLogger(__name__)

# 2^52 B/s is libvirt's own ceiling; in MiB/s that is 2^32.
MAX_BANDWIDTH_MIB_S = 2**32 - 1


@dataclass
class Context:
    conn: Connection
    config: Config = field(default_factory=Config)
    observer: Observer | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    @property
    def state(self) -> StateDir:
        return StateDir(self.config.state_dir)


def check_bandwidth(bandwidth_mib_s: int | None) -> int:
    if bandwidth_mib_s is None:
        return 0
    if not isinstance(bandwidth_mib_s, int) or bandwidth_mib_s < 0:
        raise errors.BadRequest(f"bandwidth must be a whole number of MiB/s >= 0, not {bandwidth_mib_s!r}")
    if bandwidth_mib_s > MAX_BANDWIDTH_MIB_S:
        raise errors.BadRequest(f"bandwidth {bandwidth_mib_s} MiB/s is absurdly large")
    return bandwidth_mib_s


def check_timeout(timeout_s: float | None) -> None:
    if timeout_s is not None and timeout_s <= 0:
        raise errors.BadRequest(f"timeout must be positive, not {timeout_s!r}")


def running_domain(ctx: Context, name: str) -> Domain:
    domain = ctx.conn.domain(name)
    if not domain.is_active():
        raise errors.BadRequest(
            f"domain {domain.name} is not running; live block operations need a running VM"
        )
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
                "source; only local files and block devices are supported"
            )


def check_no_job(domain: Domain, disk: Disk) -> None:
    """Refuse (exit 4) when an operation of ours or any block job holds the disk."""
    other = RecordStore(domain).load().get(disk.target)  # a read: no lock needed
    if other is not None:
        raise errors.Conflict(
            f"disk {disk.target} of {domain.name} is busy: {other.operation} {other.id} "
            f"(pid {other.pid}, phase {other.phase.value}); if that process is gone, run "
            f"'vdsm-blockops recover {domain.name}'", record=other.id)
    info = domain.block_job_info(disk.target)
    if info is not None or disk.mirror is not None:
        kind = info.job_type if info else disk.mirror.job
        raise errors.Conflict(f"disk {disk.target} of {domain.name} already has a {kind} block job")


def norm(paths: list[str]) -> list[str]:
    return [clean_path(p) for p in paths]


def as_failure(exc: BaseException) -> errors.BlockOpsError:
    """The error to report for ``exc`` once something has changed: a
    refusal (exit 2 promises "nothing changed") or an OSError becomes an
    operation failure (exit 1); timeouts and conflicts keep their codes."""
    if isinstance(exc, errors.BadRequest):
        return errors.OperationFailed(str(exc))
    if isinstance(exc, errors.BlockOpsError):
        return exc
    return errors.OperationFailed(f"{type(exc).__name__}: {exc}")


def running_pull(domain: Domain, exclude: str) -> str | None:
    """The disk of ``domain`` (other than ``exclude``) with a pull job."""
    for disk in domain.spec().disks:
        if disk.target == exclude or not disk.chain or disk.device != "disk":
            continue
        info = domain.block_job_info(disk.target)
        if info is not None and info.job_type == "pull":
            return disk.target
    return None


@contextlib.contextmanager
def exclusive_pull(ctx: Context, domain: Domain, target: str, wait: bool):
    """Start a pull only while no other pull runs in the VM (QEMU 7.2 can
    crash when two end together, see ``StateDir.stream_lock``).

    The lock serialises the processes starting or waiting on pulls; a pull
    started with --no-wait outlives its starter, so the running jobs are
    looked at too. Waiting callers wait their turn (and hold the lock for
    their whole job); ``wait=False`` is refused with Conflict (exit 4)
    naming the running pull, before anything changed."""
    with ctx.state.stream_lock(domain.uuid, wait=wait):
        while (other := running_pull(domain, exclude=target)) is not None:
            if not wait:
                raise errors.Conflict(
                    f"a block pull is running on {domain.name} {other}; pulls of one VM "
                    "run one at a time (QEMU 7.2 can crash when two end together): "
                    "wait for it, or merge without --no-wait to queue behind it")
            log.info("%s %s: waiting for the pull on %s to end", domain.name, target, other)
            ctx.sleep(ctx.config.poll_interval_s)
        yield


def run_per_disk(items: list, work: Callable) -> list:
    """Run ``work(item)`` for each disk concurrently (one libvirt event loop
    serves them all); results in input order, exceptions re-raised after
    every disk finished."""
    if len(items) == 1:
        return [work(items[0])]
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(items)) as pool:
        futures = [pool.submit(work, item) for item in items]
        concurrent.futures.wait(futures)
    return [f.result() if f.exception() is None else f.exception() for f in futures]


def combine_reports(operation: str, domain: Domain, target: str, results: list,
                    duration_s: float) -> dict:
    """One report for one disk, or a report with ``results`` for ``all``.
    With ``all``, a failure of any disk fails the whole (the worst exit
    code wins) and carries every disk's result in its details."""
    failures = [r for r in results if isinstance(r, Exception)]
    if target != "all":
        if failures:
            raise failures[0]
        report = results[0]
        report["duration_s"] = round(duration_s, 3)
        return report
    reports = [
        {"ok": False, "error": r.to_json() if isinstance(r, errors.BlockOpsError)
         else {"code": "failed", "message": str(r)}} if isinstance(r, Exception) else r
        for r in results
    ]
    if failures:
        worst = max(failures, key=lambda e: getattr(e, "exit_code", 1))
        if not isinstance(worst, errors.BlockOpsError):
            raise worst
        raise type(worst)(f"{len(failures)} of {len(results)} disks failed: {worst}",
                          results=reports)
    return {"ok": True, "operation": operation, "domain": domain.name, "disk": "all",
            "results": reports, "duration_s": round(duration_s, 3)}


class JobRunner:
    """Runs one block job on one disk to its end, recording phases."""

    def __init__(self, ctx: Context, domain: Domain, disk: str,
                 store: RecordStore, record: OperationRecord) -> None:
        self.ctx = ctx
        self.domain = domain
        self.disk = disk
        self.store = store
        self.record = record

    def mirror_ready(self) -> bool:
        disk = self.domain.spec().disk(self.disk)
        return bool(disk.mirror and disk.mirror.is_ready)

    def run(self, start: Callable[[], None], *, two_phase: bool, pivot: bool,
            timeout_s: float | None, wait: bool) -> Outcome | None:
        """Start the job and wait. Returns COMPLETED / VANISHED (caller
        checks the XML), CANCELED for a two-phase job deliberately ended
        without pivot, or None with ``wait=False``. Raises JobFailed,
        JobTimeout (after aborting the job)."""
        with JobWatch(self.domain, self.disk, poll_interval_s=self.ctx.config.poll_interval_s,
                      clock=self.ctx.clock, sleep=self.ctx.sleep) as watch:
            start()
            self.store.advance(self.record, Phase.STARTED)
            if not wait:
                return None
            try:
                outcome = watch.wait(
                    until_ready=two_phase, timeout_s=timeout_s,
                    observer=self.ctx.observer,
                    ready_check=self.mirror_ready if two_phase else None,
                )
            except errors.JobTimeout:
                self._abort_after_timeout()
                raise
            if outcome in (Outcome.FAILED, Outcome.CANCELED):
                raise errors.JobFailed(
                    f"the block job on {self.domain.name} {self.disk} ended {outcome.value}"
                )
            if not two_phase:
                return outcome
            if outcome is not Outcome.READY:
                raise errors.JobFailed(
                    f"the block job on {self.domain.name} {self.disk} ended "
                    f"({outcome.value}) before it was ready to pivot"
                )
            self.store.advance(self.record, Phase.READY)
            if not pivot:
                self.domain.abort_job(self.disk, pivot=False)
                return Outcome.CANCELED
            self.pivot()
            self.store.advance(self.record, Phase.PIVOTED)
            return Outcome.COMPLETED

    def pivot(self) -> None:
        """Pivot once ready, retrying libvirt's "not ready" a bounded number
        of times (QEMU may drop out of ready briefly under guest writes)."""
        retries = self.ctx.config.pivot_retries
        for attempt in range(retries + 1):
            try:
                self.domain.abort_job(self.disk, pivot=True)
                return
            except errors.PivotNotReady:
                if attempt == retries:
                    raise errors.JobFailed(
                        f"{self.domain.name} {self.disk}: mirror never became "
                        f"ready for pivot after {retries} retries"
                    ) from None
                log.info("pivot not ready yet on %s %s (try %d)", self.domain.name,
                         self.disk, attempt + 1)
                self.ctx.sleep(0.5)

    def _abort_after_timeout(self) -> None:
        try:
            self.domain.abort_job(self.disk, pivot=False)
        except errors.BlockOpsError as exc:
            log.warning("abort after timeout on %s %s: %s", self.domain.name, self.disk, exc)


def delete_unused(ctx: Context, domain: Domain, target: str, paths: list[str]) -> list[str]:
    """Unlink those of ``paths`` no chain uses -- decided by identity, so a
    layer another VM names through an alias is kept."""
    users = chain_users(ctx.conn, paths, exclude=(domain.uuid, target))
    live = ImageSet(domain.spec().disk(target).paths)
    deleted, keys = [], []
    for path in paths:
        if users.get(path) or path in live:
            log.warning("keeping %s: still used by %s", path, users.get(path) or "this disk")
            continue
        key = existing_key(path)
        if key is None:
            continue
        os.unlink(path)
        deleted.append(path)
        keys.append(key)
    ctx.state.forget(deleted, keys)
    return deleted


def live_chain_problems(domain: Domain, target: str, expected: list[str]) -> list[str]:
    """Problems of the chain of ``target`` against the expected chain and
    the images' own metadata; a running VM's persistent definition must
    use the same active image. For a shut-off VM the chain is the one the
    images' headers give from the persistent definition's active image."""
    running = domain.is_active()
    disk = domain.spec().disk(target)
    where = "live" if running else "stored"
    chain = resolved_paths(disk)
    problems = []
    if norm(chain) != norm(expected):
        problems.append(f"{target}: {where} chain is {chain}, expected {expected}")
    if disk.mirror is not None:
        problems.append(f"{target}: a {disk.mirror.job} job is still attached")
    problems += disk_problems(disk, None, "live" if running else "persistent")
    if running and domain.is_persistent():
        stored = domain.spec(inactive=True).disk(target)
        if stored.active is None or image_key(stored.active.path) != image_key(expected[0]):
            problems.append(
                f"{target}: persistent definition uses "
                f"{stored.active.path if stored.active else None}, not {expected[0]}"
            )
    return problems


def require_live_chain(domain: Domain, target: str, expected: list[str]) -> None:
    """Raise VerificationFailed listing every problem ``live_chain_problems`` finds."""
    problems = live_chain_problems(domain, target, expected)
    if problems:
        raise errors.VerificationFailed("; ".join(problems), problems=problems)


def point_persistent_definition(domain: Domain, target: str, path: str, fmt: str) -> bool:
    """Make the persistent definition's disk use ``path``; True if changed.

    libvirt 9.0 rewrites it itself after a pivot when the old source
    matched; this is the safety net for when it did not (a VM restarted on a
    stale definition silently loses the data written since)."""
    if not domain.is_persistent():
        return False
    root = parse_xml(domain.xml(inactive=True))
    for disk_elem in root.iterfind("devices/disk"):
        target_elem = disk_elem.find("target")
        if target_elem is None or target_elem.get("dev") != target:
            continue
        source = disk_elem.find("source")
        old = source.get("dev") or source.get("file") if source is not None else None
        if old and image_key(old) == image_key(path) and \
                (disk_elem.get("type") == "block") == is_block_device(path):
            return False
        if source is None:
            source = etree.SubElement(disk_elem, "source")
        source.attrib.clear()
        kind = "block" if is_block_device(path) else "file"
        disk_elem.set("type", kind)
        source.set("dev" if kind == "block" else "file", path)
        driver = disk_elem.find("driver")
        if driver is not None:
            driver.set("type", fmt)
        for backing in disk_elem.findall("backingStore"):
            disk_elem.remove(backing)
        domain.define(etree.tostring(root, encoding="unicode"))
        log.warning("%s %s: pointed the persistent definition at %s", domain.name, target, path)
        return True
    return False
