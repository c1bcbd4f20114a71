"""``hook install|uninstall``: put the guard into libvirt's hook folder."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

from ..core.config import guard_state_dir
from ..core.errors import BadRequest, OperationFailed
from ..core.reports import InstallReport
from .state import StateDir

HOOKS_DIR = "/etc/libvirt/hooks/qemu.d"
HOOK_NAME = "vdsm-blockops"
DAEMONS = ("libvirtd", "virtqemud")


_HOOK_PYTHON = """
import sys
try:
    from vdsm_blockops.shells.hook import main
except Exception as exc:
    sys.stderr.write("package unusable (%s: %s)" % (type(exc).__name__, exc))
    sys.exit(99)
sys.exit(main())
"""


def hook_script(config_path: str | None, state_dir: str, python: str = sys.executable) -> str:
    """The installed hook: a shell wrapper around the package's interpreter.

    When the package breaks (its virtualenv removed, an import failing) the
    guard cannot decide, so it fails closed: the starts it guards (prepare,
    migrate, restore) are refused with a message saying how to repair it,
    in the system log (daemon.err) and on stderr -- unless the operator
    turned the guard off ('hook disable', a file in the state folder this
    wrapper was installed with). Lifecycle notices pass."""
    config = (f'[ -n "$VDSM_BLOCKOPS_CONFIG" ] || VDSM_BLOCKOPS_CONFIG={shlex.quote(config_path)}\n'
              "export VDSM_BLOCKOPS_CONFIG\n" if config_path else "")
    python = shlex.quote(python)
    return (
        "#!/bin/sh\n"
        "# libvirt QEMU hook of vdsm-blockops (written by 'vdsm-blockops hook install').\n"
        "# It never calls libvirt: libvirtd waits on it. See vdsm_blockops/shells/hook.py.\n"
        "# A broken package refuses guarded starts and says how to repair it (fail closed).\n"
        f"{config}"
        f"PY={python}\n"
        f"STATE={shlex.quote(state_dir)}\n"
        'if [ -x "$PY" ]; then\n'
        f'    why=$("$PY" -I -c {shlex.quote(_HOOK_PYTHON)} "$@" 2>&1 >/dev/null)\n'
        '    rc=$?\n'
        '    [ "$rc" -ne 99 ] && { [ -n "$why" ] && echo "$why" >&2; exit "$rc"; }\n'
        "else\n"
        '    why="interpreter $PY is gone"\n'
        "fi\n"
        'case "$2 $3" in "prepare begin"|"migrate begin"|"restore begin") ;; *) exit 0 ;; esac\n'
        'if [ -e "$STATE/guard-disabled.json" ]; then\n'
        '    msg="vdsm-blockops hook: $why; the guard is disabled (hook disable): $1 $2 not checked"\n'
        '    rc=0\n'
        "else\n"
        '    msg="vdsm-blockops hook: $why, so the guard cannot decide and refuses $1 $2: '
        "reinstall the package and run 'vdsm-blockops hook install'; to start VMs unguarded "
        "meanwhile, remove this hook or create $STATE/guard-disabled.json with your reason\"\n"
        '    rc=1\n'
        "fi\n"
        'logger -t vdsm-blockops-hook -p daemon.err "$msg" 2>/dev/null\n'
        'echo "$msg" >&2\n'
        'exit "$rc"\n'
    )


def reload_daemons() -> list[str]:
    """SIGHUP makes libvirtd/virtqemud re-scan the hook folder -- only this
    node's: a daemon is found by name but signalled only when it runs in
    this mount namespace (a libvirtd of another node on the same host, in
    a container or its own namespace, reads another hook folder)."""
    signalled = []
    mine = _mount_namespace("self")
    for name in DAEMONS:
        proc = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True)
        for pid in proc.stdout.split():
            if mine is None or _mount_namespace(pid) != mine:
                continue
            os.kill(int(pid), signal.SIGHUP)
            signalled.append(f"{name}[{pid}]")
    return signalled


def _mount_namespace(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def install(hooks_dir: str = HOOKS_DIR, config_path: str | None = None,
            reload: bool = False) -> InstallReport:
    """Write the hook, and make (or tighten) the state folder it guards
    with: the hook refuses starts while that folder is missing."""
    path = os.path.join(hooks_dir, HOOK_NAME)
    tmp = path + ".tmp"
    state_dir = guard_state_dir(config_path)[0]
    try:
        StateDir(state_dir).upgrade()
    except OSError as exc:
        raise OperationFailed(f"cannot make the state folder {state_dir}: {exc}") from exc
    try:
        os.makedirs(hooks_dir, mode=0o755, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(hook_script(os.path.abspath(config_path) if config_path else None,
                                     state_dir))
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


def set_guard(state_dir: str, off: bool, reason: str | None) -> InstallReport:
    """``hook disable --reason``/``hook enable``: the only way to start VMs
    unguarded while the hook is installed; the reason goes to the state
    folder (the hook reads it) and, by the CLI, to the history."""
    state = StateDir(state_dir)
    if off and not (reason or "").strip():
        raise BadRequest("hook disable needs --reason: it is written to the node's history")
    import getpass
    import time

    why = {"reason": reason, "by": getpass.getuser(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} if off else None
    try:
        state.ensure()
        state.set_guard_disabled(why)
    except OSError as exc:
        raise OperationFailed(f"cannot write to the state folder {state_dir}: {exc}") from exc
    note = (f"the guard is disabled: VM starts go unchecked until 'hook enable' ({reason})"
            if off else "the guard checks every start again")
    return InstallReport(operation="hook-disable" if off else "hook-enable",
                         path=state.guard_off_path, note=note)


def shipped_hook() -> str:
    """The guard as ``hooks/vdsm-blockops-guard`` ships it: what ``hook
    install`` writes, for a package installed into the system's python3."""
    return hook_script(None, "/var/lib/vdsm-blockops", python="/usr/bin/python3")
