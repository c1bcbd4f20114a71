"""The libvirt QEMU hook's entry (``/etc/libvirt/hooks/qemu.d/vdsm-blockops``
runs it): the decision is the public API's :func:`vdsm_blockops.api.guard`;
this shell only logs to the system log and exits with its answer."""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from ..api import guard, log_to_syslog

    log_to_syslog(logging.getLogger("vdsm_blockops.guard"), "vdsm-blockops-hook",
                  logging.NOTSET)
    return guard(sys.argv[1:] if argv is None else argv, sys.stdin.buffer)
