"""``units install|uninstall``: the systemd units that run ``recover
--queued`` when the hook queues a domain (path unit) and every few minutes
(timer), written with this installation's interpreter, config and state
folder -- so they work as installed, from a wheel or a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from ..core.config import Config
from ..core.errors import BadRequest, OperationFailed
from ..core.reports import InstallReport

UNIT_DIR = "/etc/systemd/system"
NAMES = ("vdsm-blockops-recover.service", "vdsm-blockops-recover.path",
         "vdsm-blockops-recover.timer")


def _quote(arg: str) -> str:
    """An ExecStart word: systemd splits on spaces and honours double quotes."""
    if arg and not any(c in arg for c in ' \t"\\\'$%;'):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def unit_texts(config: Config, config_path: str | None) -> dict[str, str]:
    command = [sys.executable, "-m", "vdsm_blockops", "recover", "--queued", "--timeout", "1500"]
    if config_path:
        command += ["--config", os.path.abspath(config_path)]
    queue = os.path.join(config.state_dir, "queue")
    return {
        "vdsm-blockops-recover.service": (
            "[Unit]\n"
            "Description=Finish or roll back interrupted vdsm-blockops operations\n"
            "Documentation=man:vdsm-blockops(1)\n"
            "After=libvirtd.service virtqemud.service\n\n"
            "[Service]\n"
            "Type=oneshot\n"
            f"ExecStart={' '.join(_quote(a) for a in command)}\n"
            # recover waits at most 1500 s on a job; this bounds the rest.
            "TimeoutStartSec=30min\n"
        ),
        "vdsm-blockops-recover.path": (
            "[Unit]\n"
            "Description=Run vdsm-blockops recover when the libvirt hook queues a domain\n\n"
            "[Path]\n"
            # The hook writes a file here on reconnect/started/release; entries
            # that keep failing move to failed/ (beside queue/), so a bad one
            # cannot re-trigger this unit until systemd gives up on it.
            f"DirectoryNotEmpty={queue}\n"
            "MakeDirectory=yes\n"
            "Unit=vdsm-blockops-recover.service\n\n"
            "[Install]\n"
            "WantedBy=paths.target\n"
        ),
        "vdsm-blockops-recover.timer": (
            "[Unit]\n"
            "Description=Retry vdsm-blockops recovery (queued and failed entries)\n\n"
            "[Timer]\n"
            "OnBootSec=2min\n"
            "OnUnitActiveSec=5min\n"
            "Unit=vdsm-blockops-recover.service\n\n"
            "[Install]\n"
            "WantedBy=timers.target\n"
        ),
    }


def install(config: Config, config_path: str | None, unit_dir: str = UNIT_DIR,
            enable: bool = False) -> InstallReport:
    written = []
    try:
        os.makedirs(unit_dir, mode=0o755, exist_ok=True)
        for name, text in unit_texts(config, config_path).items():
            path = os.path.join(unit_dir, name)
            with open(path + ".tmp", "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(path + ".tmp", path)
            written.append(path)
    except OSError as exc:
        raise OperationFailed(f"cannot write the units to {unit_dir}: {exc}") from exc
    report = InstallReport(operation="units-install", units=written, enabled=False)
    if enable:
        _systemctl("daemon-reload")
        _systemctl("enable", "--now", "vdsm-blockops-recover.path", "vdsm-blockops-recover.timer")
        report.enabled = True
    else:
        report.note = ("run 'systemctl daemon-reload; systemctl enable --now "
                       "vdsm-blockops-recover.path vdsm-blockops-recover.timer' (or --enable)")
    return report


def uninstall(unit_dir: str = UNIT_DIR, disable: bool = False) -> InstallReport:
    """Remove the units; with ``disable``, stop and disable them first --
    where systemd runs: without it nothing can have enabled them, so there
    is nothing to disable and the files still go."""
    note = None
    if disable and _systemd_running():
        _systemctl("disable", "--now", "vdsm-blockops-recover.path", "vdsm-blockops-recover.timer")
    elif disable:
        note = "systemd is not running on this node: nothing was enabled, nothing to disable"
    removed = []
    for name in NAMES:
        path = os.path.join(unit_dir, name)
        if os.path.exists(path):
            os.unlink(path)
            removed.append(path)
    if not removed:
        raise BadRequest(f"no vdsm-blockops units in {unit_dir}")
    return InstallReport(operation="units-uninstall", units=removed, note=note)


def _systemd_running() -> bool:
    return shutil.which("systemctl") is not None and os.path.isdir("/run/systemd/system")


def _systemctl(*args: str) -> None:
    if not _systemd_running():
        raise OperationFailed("systemd is not running on this node; the units were written "
                              "but cannot be enabled here")
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise OperationFailed(f"systemctl {' '.join(args)}: {proc.stderr.strip()}")
