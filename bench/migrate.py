"""Benchmark of a move to another node: ``vdsm-blockops migrate`` (chain
and checkpoints kept) against ``virsh migrate --copy-storage-all`` (chain
flattened into one image, checkpoints left behind) on the same VM -- a
~1 GiB three-layer chain -- moving to node B, a second libvirtd on this
machine (tests/node-b.sh). Contenders alternate run by run; medians.
Writes docs/benchmarks-migrate.rst.

    .venv/bin/python bench/migrate.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

import libvirt  # noqa: E402
import nodes  # noqa: E402  (node B, as the tests start it)
import rig  # noqa: E402
from rig import LayerSpec, Write  # noqa: E402

from vdsm_blockops.core.chain import parse_domain  # noqa: E402

MIGRATE_URI = "tcp://127.0.0.1"
# ~1 GiB of data: a 700 MiB base, a 250 MiB snapshot, a 50 MiB active layer
LAYERS = [LayerSpec("A", [Write(0xA1, 0, 700)]), LayerSpec("B", [Write(0xB1, 700, 250)]),
          LayerSpec("C", [Write(0xC1, 950, 50)])]


def make_vm(conn, folder):
    vm = rig.VM(conn, folder)
    vm.add_chain("vda", LAYERS, size_mib=1024)
    vm.start()
    rig.virsh("checkpoint-create-as", vm.name, "cp1", "--diskspec", "vda,checkpoint=bitmap")
    return vm


PHASES = {"plan": re.compile(r"planned in ([0-9.]+) s"),
          "upload": re.compile(r"uploaded in ([0-9.]+) s"),
          "proof (beside the next upload)": re.compile(r"proven \(\w+\) in ([0-9.]+) s"),
          "verify and settle": re.compile(r"verified and settled in ([0-9.]+) s")}


def ours(vm, config, proof):
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "vdsm_blockops", "migrate", vm.name, nodes.URI,
                          "--dest-dir", vm.dir, "--migrate-uri", MIGRATE_URI, "--json",
                          "--proof", proof, "-v", "--config", config],
                         capture_output=True, text=True, cwd=REPO)
    print(out.stderr.strip(), flush=True)
    took = time.monotonic() - started
    report = json.loads(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    phases = {name: sum(float(m) for m in pattern.findall(out.stderr))
              for name, pattern in PHASES.items()}
    return took, len(report["chain_after"]["vda"]), report["checkpoints"], phases


def virsh(vm, conn_b):
    # libvirt makes the destination image itself in a pool covering its folder
    pool = conn_b.storagePoolCreateXML(
        f"<pool type='dir'><name>bench-{vm.name}</name><target><path>{vm.dir}</path></target>"
        "</pool>", libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
    started = time.monotonic()
    rig.run("virsh", "-c", rig.TEST_URI, "migrate", "--live", "--p2p", "--copy-storage-all",
            "--persistent", "--undefinesource", "--migrateuri", MIGRATE_URI, vm.name, nodes.URI)
    took = time.monotonic() - started
    moved = conn_b.lookupByName(vm.name)
    chain = len(parse_domain(moved.XMLDesc(0)).disk("vda").paths)
    checkpoints = [c.getName() for c in moved.listAllCheckpoints()]
    pool.destroy()
    return took, chain, checkpoints


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks-migrate.rst"))
    parser.add_argument("--append", action="store_true",
                        help="add this run's figures to the report (a second run, same hour)")
    args = parser.parse_args()
    conn = rig.Libvirt(rig.TEST_URI)
    os.makedirs(rig.TEST_ROOT, exist_ok=True)
    test_root = tempfile.mkdtemp(prefix="bench-", dir=rig.TEST_ROOT)
    os.chmod(test_root, 0o755)
    root = os.path.join(rig.TEST_ROOT, "node-b-" + os.path.basename(test_root))
    nodes.stop()
    conn_b = nodes.start(root, test_root)
    # A fresh libvirtd probes QEMU's capabilities on the first call that
    # needs them (~8 s here, its cache is empty): not part of a move.
    conn_b.getCapabilities()
    config = os.path.join(test_root, "config.yaml")
    with open(config, "w") as handle:
        handle.write(f"state_dir: {test_root}/state\nconnect: {rig.TEST_URI}\n")
    full, sample, virsh_ = ("vdsm-blockops migrate", "vdsm-blockops migrate --proof sample",
                            "virsh migrate --copy-storage-all")
    times = {full: [], sample: [], virsh_: []}
    phases = {full: [], sample: []}
    kept = {}
    read_only = 0
    try:
        for run in range(args.runs):
            for name in (list(times) if run % 2 == 0 else list(reversed(times))):
                vm = make_vm(conn, os.path.join(test_root, f"run{run}-{len(kept)}"))
                read_only = sum(os.path.getsize(p) for p in vm.disks["vda"].layers[:-1])
                if name == virsh_:
                    took, layers, checkpoints = virsh(vm, conn_b)
                else:
                    took, layers, checkpoints, spent = ours(vm, config, name.split()[-1]
                                                            if name == sample else "full")
                    phases[name].append(spent)
                times[name].append(took)
                kept[name] = (layers, checkpoints)
                rig.remove_domain(conn_b.lookupByName(vm.name))
                shutil.rmtree(nodes.on_b(root, test_root, vm.dir), ignore_errors=True)
                shutil.rmtree(vm.dir, ignore_errors=True)
                print(f"run {run}: {name}: {took:.2f} s, {layers} layer(s), checkpoints {checkpoints}",
                      flush=True)
    finally:
        conn_b.close()
        nodes.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(test_root, ignore_errors=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    theirs_s = medians[virsh_]
    lines = ["Moving a VM to another node", "===========================", "",
             "A running TCG VM (64 MiB RAM) on a three-layer qcow2 chain holding ~1 GiB (700, 250,",
             "50 MiB), moved to node B (a second libvirtd on this machine, over TCP on loopback);",
             f"{args.runs} runs each, contenders alternating, medians. Made by ``bench/migrate.py``",
             f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    for name, target in ((full, 1.15), (sample, 1.05)):
        ratio = medians[name] / theirs_s
        lines.append(f"- {name}: {medians[name]:.2f} s, {ratio:.2f}x virsh (target <= "
                     f"{target}x: {'met' if ratio <= target else 'NOT met'}); chain kept "
                     f"({kept[name][0]} layers), checkpoints kept "
                     f"({', '.join(kept[name][1]) or 'none'})")
        spent = {phase: statistics.median(p[phase] for p in phases[name]) for phase in PHASES}
        lines.append("  phases (medians, s): " + ", ".join(f"{phase} {secs:.2f}"
                                                          for phase, secs in spent.items()))
    lines += [f"- {virsh_}: {theirs_s:.2f} s; {kept[virsh_][0]} layer (flattened), checkpoints "
              f"{', '.join(kept[virsh_][1]) or 'lost'}",
              f"- ours (full proof), the whole move per GiB of read-only data: "
              f"{medians[full] / (read_only / 2**30):.2f} s/GiB",
              "- each proof runs beside the upload of the next layer; the phases are each",
              "  layer's own times summed (the proof of the last layer has nothing beside it)", ""]
    text = "\n".join(lines)
    print(text)
    with open(args.output, "a" if args.append else "w") as handle:
        handle.write(text if not args.append else
                     f"\nAnother run of the bench ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}):"
                     "\n" + "\n".join(lines[7:]))


if __name__ == "__main__":
    main()
