"""Test rig: throwaway VMs on the real libvirtd with qcow2 chains holding
known data, guest writes through the VM's own device, and guest-visible
data checks against a reference image.

Every write the rig makes -- into a layer before the VM starts, or through
the running guest's disk -- is also applied to a raw *reference* image.
``assert_guest_data`` flushes the guest's disk and compares the active
chain with the reference using ``qemu-img compare``: the chain must show
the guest exactly the bytes it wrote, whatever the job did to the layers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field

import libvirt
import libvirt_qemu

MIB = 1024 * 1024
TEST_ROOT = os.environ.get("VDSM_BLOCKOPS_TEST_ROOT", "/var/lib/vdsm-blockops-test")
TEST_URI = os.environ.get("VDSM_BLOCKOPS_TEST_URI", "qemu:///system")
DOMAIN_PREFIX = "vbo-test-"

# The rig reports libvirt errors through exceptions; keep libvirt's default
# handler from also printing each one (lookups of undefined test VMs).
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr or proc.stdout}")
    return proc.stdout


@dataclass
class Write:
    pattern: int
    offset_mib: float
    length_mib: float

    def qemu_io(self) -> str:
        return (f"write -P 0x{self.pattern:02x} {int(self.offset_mib * MIB)} "
                f"{int(self.length_mib * MIB)}")


@dataclass
class LayerSpec:
    name: str
    writes: list[Write] = field(default_factory=list)
    fmt: str = "qcow2"


def four_layers() -> list[LayerSpec]:
    """A <- B <- C <- D, each with its own pattern, some overlapping."""
    return [
        LayerSpec("A", [Write(0xA1, 0, 4), Write(0xA2, 16, 2)]),
        LayerSpec("B", [Write(0xB1, 1, 1), Write(0xB2, 20, 1)]),
        LayerSpec("C", [Write(0xC1, 2, 1), Write(0xC2, 0, 0.0625)]),
        LayerSpec("D", [Write(0xD1, 3, 0.5)]),
    ]


class Disk:
    def __init__(self, vm: VM, target: str, alias_index: int, layers: list[str], reference: str):
        self.vm = vm
        self.target = target
        self.alias = f"virtio-disk{alias_index}"
        self.layers = layers  # paths, bottom first
        self.reference = reference

    def guest_write(self, pattern: int, offset_mib: float, length_mib: float) -> None:
        """Write through the guest's own virtio device, like a guest would."""
        w = Write(pattern, offset_mib, length_mib)
        self.vm.hmp(f'qemu-io -d {self.alias}/virtio-backend "{w.qemu_io()}"')
        run("qemu-io", "-f", "raw", "-c", w.qemu_io(), self.reference)

    def flush(self) -> None:
        self.vm.hmp(f'qemu-io -d {self.alias}/virtio-backend "flush"')

    def live_chain(self) -> list[str]:
        from vdsm_blockops.core.chain import parse_domain

        return parse_domain(self.vm.dom.XMLDesc(0)).disk(self.target).paths

    def chain(self) -> list[str]:
        """The chain the disk runs on, or -- shut off -- would start with (the
        persistent definition's active image and its backing files)."""
        if self.vm.dom.isActive():
            return self.live_chain()
        from vdsm_blockops.core.chain import parse_domain

        active = parse_domain(self.vm.dom.XMLDesc(0)).disk(self.target).paths[0]
        images = json.loads(run("qemu-img", "info", "-U", "--backing-chain", "--output=json", active))
        return [active] + [i["full-backing-filename"] for i in images if i.get("full-backing-filename")]

    def assert_guest_data(self, active: str | None = None) -> None:
        """The guest sees exactly what was written (compares the whole disk)."""
        if self.vm.dom.isActive():
            self.flush()
            active = active or self.live_chain()[0]
        elif self.vm.created:
            active = active or self.chain()[0]
        assert active, "no active image to compare"
        fmt = json.loads(run("qemu-img", "info", "-U", "--output=json", active))["format"]
        proc = subprocess.run(
            ["qemu-img", "compare", "-U", "-f", fmt, "-F", "raw", active, self.reference],
            capture_output=True, text=True)
        assert proc.returncode == 0, f"guest data differs: {proc.stdout} {proc.stderr}"


class Libvirt:
    """The rig's own connection, reopened when libvirtd was restarted."""

    def __init__(self, uri: str = TEST_URI):
        self.uri = uri
        self._conn = libvirt.open(uri)

    def __getattr__(self, name):
        def call(*args, **kwargs):
            try:
                return getattr(self._conn, name)(*args, **kwargs)
            except libvirt.libvirtError as exc:
                # Without an event loop the client notices a restarted
                # daemon only when a call fails on the dead socket.
                if exc.get_error_domain() != libvirt.VIR_FROM_RPC and \
                        "socket is closed" not in str(exc):
                    raise
                self._conn = libvirt.open(self.uri)
                return getattr(self._conn, name)(*args, **kwargs)
        return call


class VM:
    """A throwaway TCG domain (no guest OS) with qcow2 chains."""

    def __init__(self, conn: Libvirt, workdir: str, name: str | None = None):
        self.conn = conn
        self.name = name or DOMAIN_PREFIX + uuid.uuid4().hex[:8]
        self.dir = os.path.join(workdir, self.name)
        os.makedirs(self.dir, mode=0o755)
        self.disks: dict[str, Disk] = {}
        self.created = False

    @property
    def dom(self) -> libvirt.virDomain | None:
        """Looked up each time: a virDomain dies with its connection."""
        if not self.created:
            return None
        return self.conn.lookupByName(self.name)

    def add_chain(self, target: str, layers: list[LayerSpec], size_mib: int = 64,
                  relative: bool = False, directory: str | None = None) -> Disk:
        """``layers`` as ``<target>-<name>.<fmt>`` files in one folder, each
        backing onto the one before (by file name with ``relative``)."""
        directory = directory or self.dir
        os.makedirs(directory, mode=0o755, exist_ok=True)
        placed: list[tuple[str, str | None, LayerSpec]] = []
        for layer in layers:
            path = os.path.join(directory, f"{target}-{layer.name}.{layer.fmt}")
            below = placed[-1][0] if placed else None
            placed.append((path, os.path.basename(below) if below and relative else below, layer))
        return self.add_layers(target, placed, size_mib)

    def add_overlay_on(self, target: str, other: Disk, base: str) -> Disk:
        """A new overlay on ``base``, an image of ``other``'s chain: two VMs
        sharing a layer, as clones of one template do. The guest data is
        that of ``other`` as far as ``base`` -- so only share a layer whose
        content equals ``other``'s reference (its active image's backing
        when nothing wrote above it)."""
        reference = os.path.join(self.dir, f"{target}-reference.raw")
        run("qemu-img", "convert", "-U", "-O", "raw", base, reference)
        path = os.path.join(self.dir, f"{target}-overlay.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", path)
        disk = Disk(self, target, len(self.disks), [base, path], reference)
        self.disks[target] = disk
        return disk

    def add_layers(self, target: str, layers: list[tuple[str, str | None, LayerSpec]],
                   size_mib: int = 64, reference_from: str | None = None) -> Disk:
        """A chain laid out anywhere: ``layers`` are (path, backing name as
        written into the header or None, spec), bottom first. Existing
        images (a shared template) are used as they are; ``reference_from``
        seeds the reference with an existing chain's data."""
        reference = os.path.join(self.dir, f"{target}-reference.raw")
        if reference_from:
            run("qemu-img", "convert", "-U", "-O", "raw", reference_from, reference)
        else:
            run("qemu-img", "create", "-q", "-f", "raw", reference, f"{size_mib}M")
        paths: list[str] = []
        for pos, (path, backing, layer) in enumerate(layers):
            fresh = is_device(path) or not os.path.exists(path)
            if fresh and not (is_device(path) and layer.fmt == "raw"):
                argv = ["qemu-img", "create", "-q", "-f", layer.fmt]
                if backing:
                    argv += ["-b", backing, "-F", layers[pos - 1][2].fmt]
                run(*argv, path, f"{size_mib}M")
            for w in layer.writes:
                run("qemu-io", "-f", layer.fmt, "-c", w.qemu_io(), path)
                run("qemu-io", "-f", "raw", "-c", w.qemu_io(), reference)
            paths.append(path)
        disk = Disk(self, target, len(self.disks), paths, reference)
        self.disks[target] = disk
        return disk

    def xml(self) -> str:
        disks = []
        for disk in self.disks.values():
            top = disk.layers[-1]
            fmt = json.loads(run("qemu-img", "info", "-U", "--output=json", top))["format"]
            kind, attr = ("block", "dev") if is_device(top) else ("file", "file")
            disks.append(
                f"<disk type='{kind}' device='disk'><driver name='qemu' type='{fmt}'/>"
                f"<source {attr}='{top}'/><target dev='{disk.target}' bus='virtio'/></disk>"
            )
        return (
            f"<domain type='qemu'><name>{self.name}</name><memory unit='MiB'>64</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
            "<on_crash>destroy</on_crash>"
            f"<devices>{''.join(disks)}</devices></domain>"
        )

    def define(self) -> VM:
        """Defined, never started: only the tool's own checks guard its images."""
        self.conn.defineXML(self.xml())
        self.created = True
        return self

    def start(self, persistent: bool = True) -> VM:
        if persistent:
            dom = self.conn.defineXML(self.xml())
            self.created = True  # defined: clean it up even if the start fails
            dom.create()
        else:
            self.conn.createXML(self.xml(), 0)
            self.created = True
        return self

    def hmp(self, command: str) -> str:
        return libvirt_qemu.qemuMonitorCommand(
            self.dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)

    def destroy(self) -> None:
        if self.created:
            try:
                remove_domain(self.dom)
            except libvirt.libvirtError:
                pass  # already gone

    def restart(self) -> None:
        """Power-cycle a persistent VM: it boots from its persistent definition."""
        dom = self.dom
        dom.destroy()
        dom.create()


def cli_background(*args: str, config: str) -> subprocess.Popen[str]:
    """The real command started and left running (for guest writes, kills
    and other processes while its job runs); its one JSON object comes on
    stdout at the end."""
    return subprocess.Popen([sys.executable, "-m", "vdsm_blockops", *args, "--json",
                             "--config", config],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli(*args: str, config: str, check_json: bool = True) -> tuple[int, dict | None, str]:
    """Run the real command as a user would; returns (exit, json, stderr)."""
    argv = [sys.executable, "-m", "vdsm_blockops", *args, "--config", config]
    if check_json:
        argv.append("--json")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    data = None
    if check_json:
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1, f"--json must print one object, got {proc.stdout!r} {proc.stderr}"
        data = json.loads(lines[0])
    return proc.returncode, data, proc.stderr


def is_device(path: str) -> bool:
    import stat
    return os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode)


def loop_device(workdir: str, name: str, size_mib: int) -> str:
    """A stand-in volume: a loop device over a sparse file (no LVM here)."""
    backing = os.path.join(workdir, f"{name}.volume")
    run("truncate", "-s", f"{size_mib}M", backing)
    return run("losetup", "--find", "--show", backing).strip()


def remove_loop_device(dev: str) -> None:
    subprocess.run(["losetup", "-d", dev], capture_output=True)


def remove_domain(dom: libvirt.virDomain) -> None:
    """Stop and undefine, whatever state the domain is in."""
    try:
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            # a domain with checkpoints or snapshots is not undefined without these
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    except libvirt.libvirtError:
        pass


def cleanup_stale(conn: Libvirt) -> None:
    """Remove test domains a crashed earlier run left behind."""
    for dom in conn.listAllDomains(0):
        if dom.name().startswith(DOMAIN_PREFIX):
            remove_domain(dom)


def virsh(*args: str, uri: str = TEST_URI) -> str:
    proc = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def incremental_backup(vm: VM, checkpoint: str, target: str, disk: str = "vda",
                       uri: str = TEST_URI) -> str:
    """libvirt's own judge of a checkpoint: a push-mode backup with
    ``<incremental>``; returns domjobinfo's "File processed" (the bytes
    written since the checkpoint), e.g. "2.000 MiB"."""
    import time

    xml = f"{target}.xml"
    with open(xml, "w") as handle:
        handle.write(f"<domainbackup><incremental>{checkpoint}</incremental><disks>"
                     f"<disk name='{disk}' type='file'><target file='{target}'/>"
                     f"<driver type='qcow2'/></disk></disks></domainbackup>")
    virsh("backup-begin", vm.name, xml, uri=uri)
    deadline = time.monotonic() + 60
    while "Backup" in virsh("domjobinfo", vm.name, uri=uri) and time.monotonic() < deadline:
        time.sleep(0.1)
    info = virsh("domjobinfo", vm.name, "--completed", uri=uri)
    processed = [line for line in info.splitlines() if line.startswith("File processed")]
    assert processed, info
    return " ".join(processed[0].split()[2:4])


def assert_backup_holds(target: str, writes: list[Write]) -> None:
    """The incremental backup's image has each write's pattern where the
    guest wrote it (the rest of it is unallocated: read as zeros)."""
    for w in writes:
        out = run("qemu-io", "-f", "qcow2", "-r", "-U", "-c", w.qemu_io().replace("write", "read"),
                  target)
        assert "verification failed" not in out, (w, out)
