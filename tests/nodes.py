"""Node B: a second libvirtd on this machine (tests/node-b.sh), for the
cross-node tests and the benchmark. Started in its own mount and UTS
namespace, reached over TCP on loopback, stopped by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import libvirt

HERE = os.path.dirname(os.path.abspath(__file__))
PORT = 16510
URI = f"qemu+tcp://127.0.0.1:{PORT}/system"


def namespaced_daemons() -> list[int]:
    """Pids of libvirtd and virtlogd in another mount namespace than ours."""
    ours = os.readlink("/proc/self/ns/mnt")
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as handle:
                name = handle.read().strip()
            if name in ("libvirtd", "virtlogd") and os.readlink(f"/proc/{pid}/ns/mnt") != ours:
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def libvirtd_pid() -> int:
    """Node B's libvirtd."""
    for pid in namespaced_daemons():
        with open(f"/proc/{pid}/comm") as handle:
            if handle.read().strip() == "libvirtd":
                return pid
    raise LookupError("node B's libvirtd is not running")


def stop(pids: list[int] | None = None, sig: int = signal.SIGTERM) -> None:
    pids = namespaced_daemons() if pids is None else pids
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def start(root: str, images: str) -> libvirt.virConnect:
    """Node B with its own files under ``root``, whose ``images`` folder
    (the path node A uses too) shows ``root``/images; a connection to it.
    ``root`` survives a restart (its pools, domains and images stay)."""
    proc = subprocess.run(["unshare", "--mount", "--uts", "--fork", "bash",
                           os.path.join(HERE, "node-b.sh"), root, images, str(PORT)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"node B did not start: {proc.stdout}{proc.stderr}")
    os.chmod(os.path.join(root, "images"), 0o755)
    for _ in range(50):
        try:
            conn = libvirt.open(URI)
        except libvirt.libvirtError:
            time.sleep(0.2)
            continue
        if conn.getHostname() != "node-b":
            raise RuntimeError(f"{URI} is not node B but {conn.getHostname()}")
        return conn
    raise RuntimeError("node B's libvirtd cannot be reached")


def on_b(root: str, images: str, path: str) -> str:
    """Where node A finds the file node B sees at ``path`` (under ``images``)."""
    return os.path.join(root, "images", os.path.relpath(path, images))


def restart_libvirtd() -> libvirt.virConnect:
    """Start node B's libvirtd again in its namespace (after a kill), as a
    node's init would; a connection to it."""
    logd = [pid for pid in namespaced_daemons()
            if open(f"/proc/{pid}/comm").read().strip() == "virtlogd"]
    if not logd:
        raise LookupError("node B's namespace is gone (no virtlogd in it)")
    subprocess.run(["nsenter", "-t", str(logd[0]), "-m", "-u", "libvirtd", "-d", "--listen"],
                   check=True, timeout=30)
    for _ in range(100):
        try:
            return libvirt.open(URI)
        except libvirt.libvirtError:
            time.sleep(0.2)
    raise RuntimeError("node B's libvirtd did not come back")
