"""Pulls of one VM run one at a time: QEMU 7.2 can crash when two
block-stream jobs of a VM end together (see ``StateDir.stream_lock``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..core import errors

if TYPE_CHECKING:
    from ..virt import Domain
    from .context import Context

log = logging.getLogger(__name__)


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
def exclusive_pull(ctx: Context, domain: Domain, target: str, wait: bool) -> Iterator[None]:
    """Start a pull only while no other pull runs in the VM (QEMU 7.2 can
    crash when two end together, see ``StateDir.stream_lock``).

    The lock serialises the processes starting or waiting on pulls; a pull
    started with --no-wait outlives its starter, so the running jobs are
    looked at too. Waiting callers wait their turn (and hold the lock for
    their whole job); ``wait=False`` is refused with Conflict (exit 4)
    naming the running pull, before anything changed."""
    queued = f"the wait for the other pulls of {domain.name} to end"

    def still_waiting() -> None:  # the operation's timeout holds while queued too
        ctx.budget.check(queued)

    with ctx.state.stream_lock(domain.uuid, wait=wait, between_tries=still_waiting):
        while (other := running_pull(domain, exclude=target)) is not None:
            if not wait:
                raise errors.Conflict(
                    f"a block pull is running on {domain.name} {other}; pulls of one VM "
                    "run one at a time (QEMU 7.2 can crash when two end together): "
                    "wait for it, or merge without --no-wait to queue behind it")
            log.info("%s %s: waiting for the pull on %s to end", domain.name, target, other)
            ctx.budget.sleep(ctx.config.poll_interval_s, ctx.sleep, queued)
        yield
