"""The system log, as every way in writes to it: the CLI (tag
``vdsm-blockops``), the hook (``vdsm-blockops-hook``) and the Ansible
modules (``vdsm-blockops-ansible``)."""

from __future__ import annotations

import logging
import os


def add_syslog(logger: logging.Logger, tag: str, level: int = logging.INFO) -> None:
    """Send ``logger``'s records from ``level`` up to the system log (none
    on a host without /dev/log)."""
    if not os.path.exists("/dev/log"):
        return
    from logging.handlers import SysLogHandler

    try:
        handler = SysLogHandler(address="/dev/log")
    except OSError:
        return
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(f"{tag}[%(process)d]: %(message)s"))
    logger.addHandler(handler)
