"""``hook install|uninstall``: put the guard into libvirt's hook folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from .errors import BadRequest, OperationFailed

HOOKS_DIR = "/etc/libvirt/hooks/qemu.d"
HOOK_NAME = "vdsm-blockops"
DAEMONS = ("libvirtd", "virtqemud")


def hook_script(config_path: str | None) -> str:
    config_line = (f"os.environ.setdefault('VDSM_BLOCKOPS_CONFIG', {config_path!r})\n"
                   if config_path else "")
    return (
        f"#!{sys.executable} -I\n"
        "# libvirt QEMU hook of vdsm-blockops (written by 'vdsm-blockops hook install').\n"
        "# It never calls libvirt: libvirtd waits on it. See vdsm_blockops/hook.py.\n"
        "import os\nimport sys\n"
        f"{config_line}"
        "from vdsm_blockops.hook import main\n"
        "sys.exit(main())\n"
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


def install(hooks_dir: str = HOOKS_DIR, config_path: str | None = None, reload: bool = False) -> dict:
    os.makedirs(hooks_dir, mode=0o755, exist_ok=True)
    path = os.path.join(hooks_dir, HOOK_NAME)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(hook_script(os.path.abspath(config_path) if config_path else None))
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except OSError as exc:
        raise OperationFailed(f"cannot write the hook to {path}: {exc}") from exc
    return _report("install", path, reload)


def uninstall(hooks_dir: str = HOOKS_DIR, reload: bool = False) -> dict:
    path = os.path.join(hooks_dir, HOOK_NAME)
    try:
        os.unlink(path)
    except FileNotFoundError:
        raise BadRequest(f"no vdsm-blockops hook at {path}") from None
    return _report("uninstall", path, reload)


def _report(action: str, path: str, reload: bool) -> dict:
    signalled = reload_daemons() if reload else []
    note = ("libvirtd reads its hooks when it starts or on SIGHUP; "
            + (f"signalled {', '.join(signalled)}" if signalled else
               "run again with --reload (or 'systemctl reload libvirtd') to apply it now"))
    return {"ok": True, "operation": f"hook-{action}", "path": path, "reloaded": signalled,
            "note": note}
