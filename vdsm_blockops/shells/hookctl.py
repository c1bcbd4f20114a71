"""``hook install|uninstall``: put the guard into libvirt's hook folder."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

from ..core.errors import BadRequest, OperationFailed
from ..core.reports import InstallReport

HOOKS_DIR = "/etc/libvirt/hooks/qemu.d"
HOOK_NAME = "vdsm-blockops"
DAEMONS = ("libvirtd", "virtqemud")


_HOOK_PYTHON = """
import sys
try:
    from vdsm_blockops.shells.hook import main
except Exception as exc:
    import syslog
    message = ("vdsm-blockops hook: package unusable (%s: %s); NOT guarding %s"
               % (type(exc).__name__, exc, " ".join(sys.argv[1:4])))
    syslog.openlog("vdsm-blockops-hook")
    syslog.syslog(syslog.LOG_ERR, message)
    sys.stderr.write(message + chr(10))
    sys.exit(0)
sys.exit(main())
"""


def hook_script(config_path: str | None, python: str = sys.executable) -> str:
    """The installed hook: a shell wrapper around the package's interpreter.

    When the package breaks (its virtualenv removed, an import failing) the
    hook lets every start go ahead -- a broken guard must not brick all VMs
    of the node -- and says so on every start, in the system log
    (daemon.err) and on stderr. That is the documented choice: fail open,
    loudly."""
    config = (f'[ -n "$VDSM_BLOCKOPS_CONFIG" ] || VDSM_BLOCKOPS_CONFIG={shlex.quote(config_path)}\n'
              "export VDSM_BLOCKOPS_CONFIG\n" if config_path else "")
    python = shlex.quote(python)
    return (
        "#!/bin/sh\n"
        "# libvirt QEMU hook of vdsm-blockops (written by 'vdsm-blockops hook install').\n"
        "# It never calls libvirt: libvirtd waits on it. See vdsm_blockops/shells/hook.py.\n"
        "# A broken package lets starts proceed and logs it (fail open, loudly).\n"
        f"{config}"
        f"PY={python}\n"
        'if [ -x "$PY" ]; then\n'
        f'    exec "$PY" -I -c {shlex.quote(_HOOK_PYTHON)} "$@"\n'
        "fi\n"
        'msg="vdsm-blockops hook: interpreter $PY is gone; NOT guarding $1 $2 $3 '
        "(reinstall the package, then run 'vdsm-blockops hook install')\"\n"
        'logger -t vdsm-blockops-hook -p daemon.err "$msg" 2>/dev/null\n'
        'echo "$msg" >&2\n'
        "exit 0\n"
    )


def reload_daemons() -> list[str]:
    """SIGHUP makes libvirtd/virtqemud re-scan the hook folder."""
    signalled = []
    for name in DAEMONS:
        proc = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True)
        for pid in proc.stdout.split():
            os.kill(int(pid), signal.SIGHUP)
            signalled.append(f"{name}[{pid}]")
    return signalled


def install(hooks_dir: str = HOOKS_DIR, config_path: str | None = None,
            reload: bool = False) -> InstallReport:
    path = os.path.join(hooks_dir, HOOK_NAME)
    tmp = path + ".tmp"
    try:
        os.makedirs(hooks_dir, mode=0o755, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(hook_script(os.path.abspath(config_path) if config_path else None))
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except OSError as exc:
        raise OperationFailed(f"cannot write the hook to {path}: {exc}") from exc
    return _report("install", path, reload)


def uninstall(hooks_dir: str = HOOKS_DIR, reload: bool = False) -> InstallReport:
    path = os.path.join(hooks_dir, HOOK_NAME)
    try:
        os.unlink(path)
    except FileNotFoundError:
        raise BadRequest(f"no vdsm-blockops hook at {path}") from None
    return _report("uninstall", path, reload)


def _report(action: str, path: str, reload: bool) -> InstallReport:
    signalled = reload_daemons() if reload else []
    note = ("libvirtd reads its hooks when it starts or on SIGHUP; "
            + (f"signalled {', '.join(signalled)}" if signalled else
               "run again with --reload (or 'systemctl reload libvirtd') to apply it now"))
    return InstallReport(operation=f"hook-{action}", path=path, reloaded=signalled, note=note)
