"""The node-wide helpers of the public API (``vdsm_blockops.api``): the
hook's guard and what installs it -- none needs a libvirt connection."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:  # loaded by the helpers that return one: the hook's path stays light
    from ..core.reports import InstallReport


def inside_folder(path: str, folder: str) -> bool:
    """Whether ``path`` lies in ``folder`` or below, decided on identities
    (device and inode): a symlink or bind mount of the folder is the folder."""
    from ..core.identity import inside_folder as inside

    return inside(path, folder)


def log_to_syslog(logger: logging.Logger, tag: str, level: int = logging.INFO) -> None:
    """Send ``logger``'s records from ``level`` up to the system log under
    ``tag`` (nothing on a host without /dev/log), as the CLI does."""
    from ..engine.logs import add_syslog

    add_syslog(logger, tag, level)


# -- the guard and what installs it (no libvirt connection) ----------------
def guard(argv: list[str], stdin: BinaryIO) -> int:
    """The libvirt hook's decision for ``DOMAIN OP SUBOP EXTRA`` with the
    domain XML on ``stdin``: 0 go on, 1 refused (why on stderr). It never
    calls libvirt (libvirtd waits for it) and fails closed."""
    from ..engine.guard import guard as decide

    return decide(argv, stdin)


def disable_guard(reason: str, *, config: str | None = None, source: str = "api") -> InstallReport:
    """Let VMs start unchecked until :func:`enable_guard` (``hook disable``);
    ``reason`` is required and goes to the node's history."""
    return _set_guard(True, reason, config, source)


def enable_guard(*, config: str | None = None, source: str = "api") -> InstallReport:
    """Check every start again (``hook enable``)."""
    return _set_guard(False, None, config, source)


def _set_guard(off: bool, reason: str | None, config: str | None, source: str) -> InstallReport:
    from ..core.config import load_config
    from ..core.errors import BlockOpsError
    from ..engine.hookctl import set_guard
    from ..engine.state import StateDir
    from ._calls import trail

    state_dir = load_config(config).state_dir
    operation = "hook-disable" if off else "hook-enable"
    started = time.time()
    try:
        report = set_guard(state_dir, off, reason)
    except BlockOpsError as exc:
        trail(StateDir(state_dir), source, operation, None, None, started, exc)
        raise
    trail(StateDir(state_dir), source, operation, None, None, started, report, message=reason)
    return report.freeze()


def install_hook(hooks_dir: str | None = None, *, config: str | None = None,
                 reload: bool = False) -> InstallReport:
    """Write the guard into libvirt's hook folder (default
    ``/etc/libvirt/hooks/qemu.d``) and make its state folder; ``reload``:
    SIGHUP libvirtd so it sees it now."""
    from ..engine import hookctl

    return hookctl.install(hooks_dir or hookctl.HOOKS_DIR, config_path=config,
                           reload=reload).freeze()


def uninstall_hook(hooks_dir: str | None = None, *, reload: bool = False) -> InstallReport:
    """Remove the guard from libvirt's hook folder."""
    from ..engine import hookctl

    return hookctl.uninstall(hooks_dir or hookctl.HOOKS_DIR, reload=reload).freeze()


def install_units(unit_dir: str | None = None, *, config: str | None = None,
                  enable: bool = False) -> InstallReport:
    """Write the systemd units that run ``recover --queued`` (default
    ``/etc/systemd/system``); ``enable``: enable and start them."""
    from ..core.config import load_config
    from ..engine import units

    return units.install(load_config(config), config, unit_dir or units.UNIT_DIR,
                         enable=enable).freeze()


def uninstall_units(unit_dir: str | None = None, *, disable: bool = False) -> InstallReport:
    """Remove the units (``disable``: stop and disable them first)."""
    from ..engine import units

    return units.uninstall(unit_dir or units.UNIT_DIR, disable=disable).freeze()
