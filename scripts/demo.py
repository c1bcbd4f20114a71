"""Demonstration: a throwaway VM with A <- B <- C <- D, merged and relocated
live, with the guest writing during the job, verified, then cleaned up.

Every step prints the command a user would type, then runs it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time

ROOT = "/var/lib/vdsm-blockops-demo"
NAME = "vdsm-blockops-demo"
VBO = [sys.executable, "-m", "vdsm_blockops"]


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m" if sys.stdout.isatty() else f"\n== {title}", flush=True)


def sh(*argv: str, show: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    shown = ["vdsm-blockops", *argv[len(VBO):]] if list(argv[: len(VBO)]) == VBO else argv
    if show:
        print("$ " + " ".join(shlex.quote(a) for a in shown), flush=True)
    proc = subprocess.run(argv, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: step failed with exit {proc.returncode}")
    return proc


def hmp(command: str) -> None:
    subprocess.run(["virsh", "-q", "qemu-monitor-command", NAME, "--hmp", command],
                   check=True, capture_output=True)


def cleanup() -> None:
    subprocess.run(["virsh", "-q", "destroy", NAME], capture_output=True)
    subprocess.run(["virsh", "-q", "undefine", NAME], capture_output=True)
    shutil.rmtree(ROOT, ignore_errors=True)


def main() -> None:
    cleanup()
    os.makedirs(f"{ROOT}/pool-a", mode=0o755)
    os.makedirs(f"{ROOT}/pool-b", mode=0o755)
    config = os.path.join(ROOT, "config.yaml")
    with open(config, "w") as handle:
        handle.write(f"state_dir: {ROOT}/state\n")
    os.environ["VDSM_BLOCKOPS_CONFIG"] = config
    try:
        step("a four-layer chain A <- B <- C <- D, each layer with its own data")
        layers = {"A": ("0xa1", "0 64M"), "B": ("0xb1", "16M 8M"), "C": ("0xc1", "32M 8M"), "D": ("0xd1", "48M 1M")}
        previous = None
        for name, (pattern, where) in layers.items():
            path = f"{ROOT}/pool-a/{name}.qcow2"
            backing = ["-b", previous, "-F", "qcow2"] if previous else []
            sh("qemu-img", "create", "-q", "-f", "qcow2", *backing, path, "256M")
            offset, length = where.split()
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", path],
                           check=True, capture_output=True)
            previous = path
        xml = (f"<domain type='qemu'><name>{NAME}</name><memory unit='MiB'>64</memory>"
               "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
               "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
               f"<source file='{previous}'/><target dev='vda' bus='virtio'/></disk>"
               "</devices></domain>")
        xml_path = os.path.join(ROOT, "domain.xml")
        with open(xml_path, "w") as handle:
            handle.write(xml)
        sh("virsh", "-q", "define", xml_path)
        sh("virsh", "-q", "start", NAME)

        step("the chain as libvirt and the images see it")
        sh(*VBO, "chain", NAME)

        step("what a merge down to A would do (nothing changes)")
        sh(*VBO, "merge", NAME, "vda", "--base", f"{ROOT}/pool-a/A.qcow2", "--dry-run")

        step("snapshot live merge: B, C, D collapse into one image over A, guest writing meanwhile")
        print("$ vdsm-blockops merge ... --bandwidth 8   (throttled so the progress shows)")
        proc = subprocess.Popen([*VBO, "merge", NAME, "vda", "--base", f"{ROOT}/pool-a/A.qcow2",
                                 "--bandwidth", "8"])
        time.sleep(0.5)
        hmp('qemu-io -d virtio-disk0/virtio-backend "write -P 0x99 100M 1M"')
        print("   (guest wrote 1 MiB of 0x99 at 100 MiB during the merge)")
        if proc.wait() != 0:
            raise SystemExit("demo: merge failed")
        sh(*VBO, "chain", NAME)

        step("live relocation of the disk, with its remaining snapshots, to pool-b")
        if relocate_available():
            sh(*VBO, "relocate", NAME, "vda", f"{ROOT}/pool-b/vda.qcow2")
            sh(*VBO, "chain", NAME)
        else:
            print("(relocate is not available in this version)")

        step("verify: live and persistent definitions against the images' metadata")
        sh(*VBO, "verify", NAME)
        print("\ndemo finished: the VM ran the whole time; cleaning up")
    finally:
        cleanup()


def relocate_available() -> bool:
    return subprocess.run([*VBO, "relocate", "--help"], capture_output=True).returncode == 0


if __name__ == "__main__":
    main()
