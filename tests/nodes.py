"""Node B: a second libvirtd on this machine (tests/node-b.sh), for the
cross-node tests and the benchmark. Started in its own mount and UTS
namespace, reached over TCP on loopback, stopped by pid. Node C is one
more, on its own port (``C_PORT``): each function takes the node's port,
node B's by default."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import libvirt

HERE = os.path.dirname(os.path.abspath(__file__))
PORT = 16510
C_PORT = 16810  # node C (node B's migration ports are 16610..16673)


def uri_of(port: int) -> str:
    return f"qemu+tcp://127.0.0.1:{port}/system"


URI = uri_of(PORT)
C_URI = uri_of(C_PORT)


def _port_of(pid: str) -> int | None:
    """The TCP port of the node whose namespace process ``pid`` runs in
    (its libvirtd.conf, as that process sees /etc/libvirt)."""
    try:
        with open(f"/proc/{pid}/root/etc/libvirt/libvirtd.conf") as handle:
            found = re.findall(r'^tcp_port = "(\d+)"', handle.read(), re.M)
    except OSError:
        return None
    return int(found[-1]) if found else None


def namespaced_daemons(port: int | None = None) -> list[int]:
    """Pids of libvirtd and virtlogd in another mount namespace than ours
    (of the node on ``port`` only, when given)."""
    ours = os.readlink("/proc/self/ns/mnt")
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as handle:
                name = handle.read().strip()
            if name in ("libvirtd", "virtlogd") and os.readlink(f"/proc/{pid}/ns/mnt") != ours \
                    and (port is None or _port_of(pid) == port):
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def libvirtd_pid(port: int = PORT) -> int:
    """The libvirtd of the node on ``port`` (node B's by default)."""
    for pid in namespaced_daemons(port):
        with open(f"/proc/{pid}/comm") as handle:
            if handle.read().strip() == "libvirtd":
                return pid
    raise LookupError(f"the libvirtd on port {port} is not running")


def stop(pids: list[int] | None = None, sig: int = signal.SIGTERM,
         port: int | None = PORT) -> None:
    """Stop the daemons ``pids``, or those of the node on ``port`` (every
    other node's with None)."""
    pids = namespaced_daemons(port) if pids is None else pids
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def start(root: str, images: str, port: int = PORT, name: str = "node-b") -> libvirt.virConnect:
    """Node B (or node ``name`` on ``port``) with its own files under
    ``root``, whose ``images`` folder (the path node A uses too) shows
    ``root``/images; a connection to it. ``root`` survives a restart (its
    pools, domains and images stay)."""
    proc = subprocess.run(["unshare", "--mount", "--uts", "--fork", "bash",
                           os.path.join(HERE, "node-b.sh"), root, images, str(port), name],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} did not start: {proc.stdout}{proc.stderr}")
    os.chmod(os.path.join(root, "images"), 0o755)
    for _ in range(50):
        try:
            conn = libvirt.open(uri_of(port))
        except libvirt.libvirtError:
            time.sleep(0.2)
            continue
        if conn.getHostname() != name:
            raise RuntimeError(f"{uri_of(port)} is not {name} but {conn.getHostname()}")
        return conn
    raise RuntimeError(f"{name}'s libvirtd cannot be reached")


def on_b(root: str, images: str, path: str) -> str:
    """Where node A finds the file node B sees at ``path`` (under ``images``)."""
    return os.path.join(root, "images", os.path.relpath(path, images))


def restart_libvirtd() -> libvirt.virConnect:
    """Start node B's libvirtd again in its namespace (after a kill), as a
    node's init would; a connection to it."""
    logd = [pid for pid in namespaced_daemons(PORT)
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
