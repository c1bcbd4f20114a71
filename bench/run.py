"""Benchmarks: vdsm-blockops side by side with virsh on identical chains,
alternating contenders run by run, medians reported; plus the machine's
limit (qemu-img convert, dd), the pure parts' scale, the command's memory
and the hook's time. Writes docs/benchmarks.rst and docs/benchmarks.png.

    bash bench/run.sh            # from a fresh checkout (sets the node up)
    .venv/bin/python bench/run.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

import rig  # noqa: E402  (the test rig builds the chains and VMs)
from rig import LayerSpec, Write  # noqa: E402

MIB = 1024 * 1024
VBO = [sys.executable, "-m", "vdsm_blockops"]
VIRSH = ["virsh", "-q", "-c", rig.TEST_URI]


def layer(name, mib, offset=0):
    return LayerSpec(name, [Write(0x10 + len(name) + offset % 200, offset, mib)] if mib else [])


class Bench:
    def __init__(self, root: str, repeats: int):
        self.root = root
        self.repeats = repeats
        self.conn = rig.Libvirt()
        self.rows: list[dict] = []
        self.config = os.path.join(root, "config.yaml")
        with open(self.config, "w") as handle:
            handle.write(f"state_dir: {root}/state\n")
        self.vms: list[rig.VM] = []

    def vm(self, chains: dict[str, list[LayerSpec]], size_mib: int = 1024,
           start: bool = True) -> rig.VM:
        vm = rig.VM(self.conn, self.root)
        for target, layers in chains.items():
            vm.add_chain(target, layers, size_mib=size_mib)
        if start:
            vm.start(persistent=True)
        else:
            vm.define()
        self.vms.append(vm)
        return vm

    def drop(self, vm: rig.VM) -> None:
        vm.destroy()
        for device in getattr(vm, "volumes", []):
            rig.remove_loop_device(device)
        shutil.rmtree(vm.dir, ignore_errors=True)

    @staticmethod
    def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
        started = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True,
                              env=None if env is None else {**os.environ, **env})
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {proc.stderr or proc.stdout}")
        return elapsed, proc.stdout

    def ours(self, *args: str, env: dict[str, str] | None = None) -> tuple[float, dict]:
        elapsed, out = self.timed([*VBO, *args, "--json", "--config", self.config], env)
        return elapsed, json.loads(out)

    def contest(self, case: str, chains, contenders: dict, size_mib: int = 1024,
                reference: str | None = "virsh", start: bool = True, build=None) -> None:
        """Run each contender ``repeats`` times on a fresh identical chain
        (or VM: ``build()``), alternating contenders run by run."""
        times: dict[str, list[float]] = {name: [] for name in contenders}
        copied: dict[str, int | None] = {}
        for repeat in range(self.repeats):
            # every other round in reverse: no contender always runs after
            # the same one (the disk's writeback of a drop lands in the next)
            order = list(contenders.items())
            for name, run in order[::-1] if repeat % 2 else order:
                vm = build() if build else \
                    self.vm(chains() if callable(chains) else chains, size_mib, start)
                # Every contender starts with the chain written out: else the
                # writeback of the chain just built (and of the previous run's
                # leftovers) lands in whichever run comes next.
                os.sync()
                try:
                    elapsed, bytes_copied = run(vm)
                    times[name].append(elapsed)
                    copied[name] = bytes_copied
                    for disk in vm.disks.values():
                        disk.assert_guest_data(active=None if start else _defined_active(vm, disk))
                finally:
                    self.drop(vm)
        base = statistics.median(times[reference]) if reference in times else None
        for name, values in times.items():
            median = statistics.median(values)
            self.rows.append({"case": case, "contender": name, "median_s": median,
                              "runs_s": [round(v, 3) for v in values],
                              "bytes_copied": copied.get(name),
                              "ratio": (median / base) if base and name != reference else None})
            print(f"{case:38} {name:28} {median:7.3f} s"
                  + (f"  ratio {median / base:5.2f}" if base and name != reference else ""),
                  flush=True)


def dd_limit(b: Bench, vm: rig.VM) -> tuple[float, None]:
    """The machine's limit for copying a chain's files: dd with O_DIRECT writes."""
    elapsed = 0.0
    for path in vm.disks["vda"].layers:
        elapsed += b.timed(["dd", f"if={path}", f"of={path}.dd", "bs=4M", "oflag=direct",
                            "status=none"])[0]
    return elapsed, None


def _defined_active(vm: rig.VM, disk: rig.Disk) -> str:
    from vdsm_blockops.core.chain import parse_domain

    return parse_domain(vm.dom.XMLDesc(0)).disk(disk.target).paths[0]


# ------------------------------------------------------------------ cases
def tiny(b: Bench) -> None:
    chain = [layer("A", 4), layer("B", 2, 4), layer("C", 1, 8), layer("D", 0)]

    def ours_pull(vm):
        elapsed, out = b.ours("merge", vm.name, "vda", "--strategy", "pull")
        return elapsed, out["bytes_to_copy"]

    def virsh_pull(vm):
        return b.timed([*VIRSH, "blockpull", vm.name, "vda", "--wait"])[0], None

    def ours_commit(vm):
        elapsed, out = b.ours("merge", vm.name, "vda", "--strategy", "commit")
        return elapsed, out["bytes_to_copy"]

    def virsh_commit(vm):
        return b.timed([*VIRSH, "blockcommit", vm.name, "vda", "--active", "--pivot", "--wait"])[0], None

    b.contest("tiny merge: pull", {"vda": chain},
              {"virsh": virsh_pull, "vdsm-blockops": ours_pull}, size_mib=64)
    b.contest("tiny merge: active commit", {"vda": chain},
              {"virsh": virsh_commit, "vdsm-blockops": ours_commit}, size_mib=64)


def strategies(b: Bench, quick: bool) -> None:
    shapes = {
        "big lower layer (B 768M, C+D 24M)": [layer("A", 256), layer("B", 768, 0),
                                              layer("C", 8, 100), layer("D", 16, 200)],
        "big active layer (D 512M)": [layer("A", 256), layer("B", 16, 300), layer("C", 16, 400),
                                      layer("D", 512, 0)],
    }
    for depth in (16,) if quick else (16, 64):
        shapes[f"{depth} layers of 4M"] = [layer(f"L{i:02d}", 4, (i * 4) % 1000) for i in range(depth)]
    for shape, chain in shapes.items():
        bottom = f"vda-{chain[0].name}.qcow2"

        def ours(strategy, chain=chain, bottom=bottom):
            def run(vm):
                elapsed, out = b.ours("merge", vm.name, "vda", "--base", f"{vm.dir}/{bottom}",
                                      "--strategy", strategy)
                return elapsed, out["bytes_to_copy"]
            return run

        def virsh(vm, bottom=bottom):
            return b.timed([*VIRSH, "blockpull", vm.name, "vda", "--base", f"{vm.dir}/{bottom}",
                            "--wait"])[0], None

        b.contest(f"merge --base bottom: {shape}", {"vda": chain},
                  {"virsh": virsh, "auto": ours("auto"), "pull": ours("pull"), "commit": ours("commit")})


def relocation(b: Bench) -> None:
    chain = [layer("A", 768), layer("B", 128, 768), layer("C", 128, 896), layer("D", 16, 100)]
    total = 768 + 128 + 128 + 16

    def ours(mode):
        def run(vm):
            folder = f"{vm.dir}/moved"
            os.makedirs(folder, mode=0o755)
            elapsed, out = b.ours("relocate", vm.name, "vda", f"{folder}/vda.qcow2", "--mode", mode)
            return elapsed, out["bytes_to_copy"]
        return run

    def virsh(vm):
        return b.timed([*VIRSH, "blockcopy", vm.name, "vda", f"{vm.dir}/copy.qcow2", "--wait",
                        "--pivot", "--transient-job", "--format", "qcow2"])[0], None

    def convert(vm):
        active = vm.disks["vda"].layers[-1]
        return b.timed(["qemu-img", "convert", "-U", "-W", "-m", "8", "-O", "qcow2", active,
                        f"{vm.dir}/converted.qcow2"])[0], None

    def dd(vm):
        return dd_limit(b, vm)

    b.contest(f"relocate ~{total} MiB chain", {"vda": chain},
              {"virsh": virsh, "chain mode": ours("chain"), "full mode": ours("full"),
               "shallow mode": ours("shallow"), "qemu-img convert": convert, "dd (limit)": dd})
    for row in b.rows:
        if row["case"].startswith("relocate"):
            row["throughput_mib_s"] = round(total / row["median_s"], 1)


def offline(b: Bench) -> None:
    """Shut-off VMs: our verbs against the same qemu-img by hand (and the
    dd limit for the file copies of chain mode). The merges run on the
    ~900 MiB chain and on one four times its size (3.5 GiB: still a small
    snapshot chain for a real VM): what the command costs beyond qemu-img
    is a fixed cost (Python, libvirt, the record, verify), which the two
    sizes show apart from the copy."""
    small = [layer("A", 256), layer("B", 128, 256), layer("C", 256, 384), layer("D", 256, 640)]
    big = [layer("A", 1024), layer("B", 512, 1024), layer("C", 1024, 1536), layer("D", 1024, 2560)]
    total = 256 + 128 + 256 + 256

    # qemu-img as our command runs it, timed by a shim in front of it on
    # PATH: what the command costs beyond qemu-img, run by run, apart from
    # the disk's noise (the same qemu-img rebase of the 3.5 GiB chain took
    # 2.5-4.5 s here, run after run)
    shim_dir = os.path.join(b.root, "shim")
    os.makedirs(shim_dir, exist_ok=True)
    clock = os.path.join(b.root, "qemu-img-times")
    with open(os.path.join(shim_dir, "qemu-img"), "w") as handle:
        handle.write('#!/bin/bash\nstart=$EPOCHREALTIME\n/usr/bin/qemu-img "$@"\nrc=$?\n'
                     'echo "$start $EPOCHREALTIME" >> "$QEMU_IMG_TIMES"\nexit $rc\n')
    os.chmod(os.path.join(shim_dir, "qemu-img"), 0o755)
    beyond_qemu_img: dict[str, list[float]] = {}

    def ours(*args, case=""):
        def run(vm):
            a = vm.disks["vda"].layers[0]
            if args[0] == "relocate":
                folder = f"{vm.dir}/moved"
                os.makedirs(folder, mode=0o755)
                elapsed, out = b.ours("relocate", vm.name, "vda", f"{folder}/vda.qcow2", *args[1:])
                return elapsed, out["bytes_to_copy"]
            elapsed, out = b.ours("merge", vm.name, "vda", "--base", a, *args[1:],
                                  env={"PATH": f"{shim_dir}:{os.environ['PATH']}",
                                       "QEMU_IMG_TIMES": clock})
            with open(clock) as handle:
                spans = [line.split() for line in handle]
            os.unlink(clock)
            in_qemu_img = sum(float(end) - float(start) for start, end in spans)
            beyond_qemu_img.setdefault(case, []).append(elapsed - in_qemu_img)
            return elapsed, out["bytes_to_copy"]
        return run

    def by_hand(kind):
        def run(vm):
            a, bl, c, d = vm.disks["vda"].layers
            argv = {"commit": ["qemu-img", "commit", "-q", "-d", "-b", bl, d],
                    "rebase": ["qemu-img", "rebase", "-q", "-b", a, "-F", "qcow2", d],
                    # by hand too, the copy is flushed before a definition may name it
                    "convert": ["sh", "-c", f"qemu-img convert -O qcow2 {d} {vm.dir}/conv.qcow2 && "
                                f"sync {vm.dir}/conv.qcow2"]}[kind]
            return b.timed(argv)[0], None
        return run

    def dd(vm):
        return dd_limit(b, vm)

    for label, chain, size_mib in (("", small, 1024), (" 3.5 GiB", big, 4096)):
        case = f"offline merge{label}: active commit"
        b.contest(case, {"vda": chain},
                  {"qemu-img commit": by_hand("commit"),
                   "vdsm-blockops": ours("merge", "--strategy", "commit", case=case)},
                  size_mib=size_mib, reference="qemu-img commit", start=False)
        case = f"offline merge{label}: pull"
        b.contest(case, {"vda": chain},
                  {"qemu-img rebase": by_hand("rebase"),
                   "vdsm-blockops": ours("merge", "--strategy", "pull", case=case)},
                  size_mib=size_mib, reference="qemu-img rebase", start=False)
    b.contest(f"offline relocate ~{total} MiB chain", {"vda": small},
              {"dd (limit)": dd, "chain mode": ours("relocate", "--mode", "chain"),
               "qemu-img convert": by_hand("convert"), "full mode": ours("relocate", "--mode", "full")},
              reference="dd (limit)", start=False)
    for row in b.rows:
        if row["case"].startswith("offline relocate") and row["contender"] == "full mode":
            by_hand_row = _row(b, "offline relocate", "qemu-img convert")
            if by_hand_row:
                row["vs_by_hand"] = round(row["median_s"] / by_hand_row["median_s"], 2)
        if row["case"].startswith("offline merge") and row["contender"] == "vdsm-blockops":
            by_hand_row = next(r for r in b.rows if r["case"] == row["case"] and r is not row)
            beyond = statistics.median(beyond_qemu_img[row["case"]])
            row["beyond_qemu_img_ms"] = round(beyond * 1e3)
            # the ratio with the command's own cost measured run by run,
            # on the by-hand median: the disk's noise cancels out
            row["ratio_split"] = round((by_hand_row["median_s"] + beyond) / by_hand_row["median_s"], 3)


def block_volume(b: Bench) -> None:
    """A commit into a qcow2 on a block volume too small for it (a loop
    device stands in for the LV, tests/volume-tool for lvextend): ours
    measures, extends and merges; by hand, the volume extended to the same
    size, then virsh blockcommit --wait."""
    tool = os.path.join(REPO, "tests", "volume-tool")
    config = os.path.join(b.root, "volumes.yaml")
    with open(config, "w") as handle:
        handle.write(f"state_dir: {b.root}/state\nvolume_margin_mib: 64\n"
                     f'volume_extend_command: [{tool}, extend, "{{path}}", "{{size_bytes}}"]\n')
    extensions: list[int] = []

    def build() -> rig.VM:
        vm = rig.VM(b.conn, b.root)
        device = rig.loop_device(vm.dir, "B", 64)
        vm.volumes = [device]
        vm.add_layers("vda", [(f"{vm.dir}/A.raw", None, LayerSpec("A", layer("A", 256).writes, "raw")),
                              (device, f"{vm.dir}/A.raw", layer("B", 32, 256)),
                              (f"{vm.dir}/C.qcow2", device, layer("C", 384, 288)),
                              (f"{vm.dir}/D.qcow2", f"{vm.dir}/C.qcow2", layer("D", 16, 700))],
                      size_mib=1024)
        vm.start(persistent=True)
        b.vms.append(vm)
        return vm

    def ours(vm):
        a, _, c, _ = vm.disks["vda"].layers
        elapsed, out = b.timed([*VBO, "merge", vm.name, "vda", "--top", c, "--base", a,
                                "--strategy", "commit", "--json", "--config", config])
        report = json.loads(out)
        volume = report["volume"]
        extensions.append(("extended_to" in volume) + volume.get("extensions_during_job", 0))
        return elapsed, report["bytes_to_copy"]

    def by_hand(vm):
        _, device, c, _ = vm.disks["vda"].layers
        size = json.loads(b.timed([*VBO, "merge", vm.name, "vda", "--top", c, "--base",
                                   vm.disks["vda"].layers[0], "--strategy", "commit", "--dry-run",
                                   "--json", "--config", config])[1])["volume"]["needed"]
        started = time.perf_counter()  # the size is the operator's to know: not timed
        subprocess.run([tool, "extend", device, str(size)], check=True)
        subprocess.run([*VIRSH, "blockcommit", vm.name, "vda", "--top", c, "--base", device,
                        "--wait"], check=True, capture_output=True)
        return time.perf_counter() - started, None

    b.contest("block volume: merge needing extension", None,
              {"extend + virsh blockcommit": by_hand, "vdsm-blockops": ours},
              reference="extend + virsh blockcommit", build=build)
    row = _row(b, "block volume", "vdsm-blockops")
    if row and extensions:
        row["extensions"] = max(extensions)


def concurrency(b: Bench, quick: bool) -> None:
    for count in (1, 2, 4) if quick else (1, 2, 4, 8):
        chains = {f"vd{chr(ord('a') + i)}": [layer("A", 64), layer("B", 32, 64)] for i in range(count)}

        def ours(vm):
            return b.ours("merge", vm.name, "all", "--strategy", "pull")[0], None

        def virsh(vm, chains=chains):
            elapsed = 0.0
            for target in chains:
                elapsed += b.timed([*VIRSH, "blockpull", vm.name, target, "--wait"])[0]
            return elapsed, None

        b.contest(f"merge {count} disk(s) of one VM", chains, {"virsh": virsh, "vdsm-blockops all": ours},
                  size_mib=128)


def memory(b: Bench) -> None:
    chains = {f"vd{chr(ord('a') + i)}": [layer("A", 64), layer("B", 32, 64)] for i in range(8)}
    vm = b.vm(chains, 128)
    try:
        # Commits: all 8 jobs run at once (pulls of one VM take turns).
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", *VBO, "merge", vm.name, "all",
                               "--strategy", "commit", "--bandwidth", "64", "--config", b.config],
                              capture_output=True, text=True)
        peak_kib = int(proc.stderr.strip().splitlines()[-1])
    finally:
        b.drop(vm)
    b.rows.append({"case": "peak memory watching 8 jobs", "contender": "vdsm-blockops",
                   "median_s": None, "peak_rss_mib": round(peak_kib / 1024, 1)})
    print(f"peak RSS watching 8 jobs: {peak_kib / 1024:.1f} MiB")


def _define_idle(b: Bench, count: int, base: str) -> None:
    """Define throwaway domains (never started) until ``count`` exist, each
    on an overlay of ``base``: the crowd an operation must not slow down in."""
    existing = {n for n in b.conn.listDefinedDomains() if n.startswith("vbo-test-crowd-")}
    for i in range(count):
        name = f"vbo-test-crowd-{i:04d}"
        if name in existing:
            continue
        top = os.path.join(b.root, f"{name}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top],
                       check=True)
        b.conn.defineXML(
            f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{top}'/>"
            "<target dev='vda' bus='virtio'/></disk></devices></domain>")


def scaling(b: Bench, quick: bool) -> None:
    """Merge (and its dry run) on a small chain with 0, 50, 200, 500 other
    domains defined and 10 running: the cost must not grow with the node."""
    chain = [layer("A", 4), layer("B", 2, 4), layer("C", 1, 8), layer("D", 0)]
    base = os.path.join(b.root, "crowd-base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "64M"], check=True)
    running: list[rig.VM] = []
    try:
        for crowd, others in ((0, 0), (0, 10), (50, 10), (200, 10), (500, 10)):
            if quick and crowd not in (0, 500):
                continue
            while len(running) < others:
                running.append(b.vm({"vda": [layer("X", 1)]}, size_mib=64))
            _define_idle(b, crowd, base)
            case = f"scale: {crowd} defined + {others} running"
            dry, full = [], []
            for run in range(b.repeats + 1):
                vm = b.vm({"vda": chain}, size_mib=64)
                try:
                    a = vm.disks["vda"].layers[0]
                    elapsed, _ = b.ours("merge", vm.name, "vda", "--base", a, "--dry-run")
                    if run:  # the first run of a crowd fills the definitions cache
                        dry.append(elapsed)
                    elapsed, out = b.ours("merge", vm.name, "vda", "--base", a, "--strategy", "commit")
                    if run:
                        full.append(elapsed)
                    vm.disks["vda"].assert_guest_data()
                finally:
                    b.drop(vm)
            for name, values in (("merge --dry-run", dry), ("merge (commit)", full)):
                b.rows.append({"case": case, "contender": name, "median_s": statistics.median(values),
                               "runs_s": [round(v, 3) for v in values], "crowd": crowd,
                               "running": others})
                print(f"{case:38} {name:28} {statistics.median(values):7.3f} s", flush=True)
    finally:
        for vm in running:
            b.drop(vm)
        for name in b.conn.listDefinedDomains():
            if name.startswith("vbo-test-crowd-"):
                b.conn.lookupByName(name).undefine()


def many_jobs(b: Bench) -> None:
    """``jobs`` on a node with 20 running VMs, each with a block job."""
    vms = [b.vm({"vda": [layer("A", 8), layer("B", 0)]}, size_mib=64) for _ in range(20)]
    try:
        for vm in vms:
            b.timed([*VIRSH, "blockpull", vm.name, "vda", "--bandwidth", "1"])
        ours, theirs = [], []
        for _ in range(b.repeats):
            elapsed, out = b.ours("jobs")
            assert len(out["jobs"]) == 20, out
            ours.append(elapsed)
            started = time.perf_counter()
            for vm in vms:
                b.timed([*VIRSH, "blockjob", vm.name, "vda", "--info"])
            theirs.append(time.perf_counter() - started)
        base = statistics.median(theirs)
        for name, values in (("virsh blockjob --info x20", theirs), ("vdsm-blockops jobs", ours)):
            median = statistics.median(values)
            b.rows.append({"case": "jobs: 20 VMs with a job", "contender": name, "median_s": median,
                           "runs_s": [round(v, 3) for v in values],
                           "ratio": median / base if name != "virsh blockjob --info x20" else None})
            print(f"{'jobs: 20 VMs with a job':38} {name:28} {median:7.3f} s", flush=True)
    finally:
        for vm in vms:
            b.drop(vm)


def pure_parts(b: Bench) -> None:
    from vdsm_blockops.core.chain import parse_domain
    from vdsm_blockops.core.planner import plan_merge

    for depth in (1, 10, 100, 500):
        inner = "<backingStore/>"
        for i in range(depth - 1, 0, -1):
            inner = (f"<backingStore type='file' index='{i + 1}'><format type='qcow2'/>"
                     f"<source file='/i/L{i}.qcow2'/>{inner}</backingStore>")
        xml = (f"<domain><name>x</name><uuid>u</uuid><devices><disk type='file' device='disk'>"
               f"<driver type='qcow2'/><source file='/i/L0.qcow2' index='1'/>{inner}"
               f"<target dev='vda'/></disk></devices></domain>")
        parse_s = min(timeit.repeat(lambda: parse_domain(xml), number=20, repeat=3)) / 20
        disk = parse_domain(xml).disk("vda")
        alloc = {p: MIB for p in disk.paths}
        plan_s = min(timeit.repeat(lambda: plan_merge(disk, top_pos=0, base_pos=len(disk.paths) - 1
                                                      if depth > 1 else None, allocation=alloc),
                                   number=20, repeat=3)) / 20
        b.rows.append({"case": f"parse + plan, {depth} layers", "contender": "pure parts",
                       "median_s": parse_s + plan_s, "parse_ms": round(parse_s * 1e3, 3),
                       "plan_ms": round(plan_s * 1e3, 3)})
        print(f"parse {depth:3} layers {parse_s * 1e3:7.3f} ms, plan {plan_s * 1e3:7.3f} ms")


def hook_time(b: Bench) -> None:
    from vdsm_blockops.engine import hookctl

    vm_dir = tempfile.mkdtemp(dir=b.root)
    hooks = os.path.join(vm_dir, "hooks")
    hookctl.install(hooks, config_path=b.config)
    image = os.path.join(vm_dir, "a.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"], check=True)
    xml = (f"<domain><name>h</name><devices><disk type='file' device='disk'><driver type='qcow2'/>"
           f"<source file='{image}'/><target dev='vda'/></disk></devices></domain>").encode()
    times = []
    for _ in range(10):
        started = time.perf_counter()
        subprocess.run([os.path.join(hooks, "vdsm-blockops"), "h", "prepare", "begin", "-"],
                       input=xml, check=True)
        times.append(time.perf_counter() - started)
    b.rows.append({"case": "hook on a normal start (prepare begin)", "contender": "hook",
                   "median_s": statistics.median(times)})
    print(f"hook prepare begin: {statistics.median(times) * 1e3:.0f} ms")


def startup(b: Bench) -> None:
    """Where a command's fixed cost goes, cold process by cold process: the
    interpreter, the libvirt and lxml bindings every verb needs, the CLI
    without libvirt (--version), and a verb that connects (jobs)."""
    venv_python = sys.executable
    steps = {
        "python -c pass": [venv_python, "-c", "pass"],
        "import libvirt, lxml.etree": [venv_python, "-c", "import libvirt, lxml.etree"],
        "vdsm-blockops --version": [*VBO, "--version"],
        "vdsm-blockops jobs (connects)": [*VBO, "jobs", "--json", "--config", b.config],
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(15):  # alternating, as the contests do
        for name, argv in steps.items():
            times[name].append(b.timed(argv)[0])
    for name, values in times.items():
        b.rows.append({"case": "fixed cost: a cold process", "contender": name,
                       "median_s": statistics.median(values),
                       "runs_s": [round(v, 4) for v in values]})
        print(f"fixed cost {name:32} {statistics.median(values) * 1e3:6.1f} ms", flush=True)


# ----------------------------------------------------------------- output
def _row(b: Bench, case_prefix: str, contender: str) -> dict | None:
    for row in b.rows:
        if row["case"].startswith(case_prefix) and row["contender"] == contender:
            return row
    return None


def targets(b: Bench) -> list[str]:
    """The issues' targets next to what was measured."""
    lines = []

    def check(text: str, value: float | None, limit: float, unit: str = "x virsh") -> None:
        if value is None:
            lines.append(f"- {text}: not measured in this run")
            return
        verdict = "met" if value <= limit else "MISSED"
        lines.append(f"- {text}: target <= {limit:g} {unit}, measured {value:.2f} {unit}: {verdict}")

    for case in ("tiny merge: pull", "tiny merge: active commit"):
        row = _row(b, case, "vdsm-blockops")
        check(f"{case} (whole command)", row and row["ratio"], 0.25)
    full_live = _row(b, "relocate ~", "full mode")
    check("full-mode relocation of a ~1 GiB chain, small active layer, vs virsh blockcopy --pivot",
          full_live and full_live["ratio"], 0.5)
    auto = _row(b, "merge --base bottom: big lower", "auto")
    pull = _row(b, "merge --base bottom: big lower", "pull")
    if auto and pull:
        check("big lower layer, bytes auto copies vs a pull", auto["bytes_copied"] / pull["bytes_copied"],
              0.10, "x pull's bytes")
    check("big lower layer, auto vs virsh blockpull --base", auto and auto["ratio"], 0.5)
    chain = _row(b, "relocate", "chain mode")
    check("chain-mode relocation of a ~1 GiB chain vs virsh blockcopy --pivot", chain and chain["ratio"], 0.5)
    for kind in ("active commit", "pull"):
        row = _row(b, f"offline merge 3.5 GiB: {kind}", "vdsm-blockops")
        check(f"offline merge, 3.5 GiB chain: {kind} vs qemu-img by hand (by hand's median + "
              "the command's own cost, run by run)", row and row.get("ratio_split"), 1.1,
              "x by hand")
        by_hand = row and next(r for r in b.rows if r["case"] == row["case"] and r is not row)
        small = _row(b, f"offline merge: {kind}", "vdsm-blockops")
        if row and by_hand and small and "beyond_qemu_img_ms" in small:
            lines.append(
                f"  - medians of whole runs: {row['ratio']:.2f} x by hand (runs: by hand "
                f"{min(by_hand['runs_s']):.1f}-{max(by_hand['runs_s']):.1f} s, ours "
                f"{min(row['runs_s']):.1f}-{max(row['runs_s']):.1f} s); the command's own cost "
                f"{row['beyond_qemu_img_ms']} ms; on the ~900 MiB chain "
                f"{small['beyond_qemu_img_ms']} ms, {small['ratio']:.2f} x by hand")
    small = _row(b, "offline merge: pull", "vdsm-blockops")
    check("the command's own cost beyond qemu-img (offline pull, run by run)",
          small and small.get("beyond_qemu_img_ms"), 40, "ms")
    big_pull = _row(b, "offline merge 3.5 GiB: pull", "vdsm-blockops")
    check("offline pull of the 3.5 GiB chain vs qemu-img rebase by hand (by hand's median + "
          "the command's own cost, run by run)", big_pull and big_pull.get("ratio_split"), 1.05,
          "x by hand")
    floor = {r["contender"]: r["median_s"] * 1e3 for r in b.rows
             if r["case"] == "fixed cost: a cold process"}
    if floor:
        lines.append("  - of that cost, in a cold process: the interpreter "
                     f"{floor['python -c pass']:.0f} ms; with the libvirt and lxml bindings "
                     f"{floor['import libvirt, lxml.etree']:.0f} ms; the CLI's --version "
                     f"{floor['vdsm-blockops --version']:.0f} ms; a verb that connects (jobs) "
                     f"{floor['vdsm-blockops jobs (connects)']:.0f} ms")
    full = _row(b, "offline relocate", "full mode")
    check("offline relocation, full mode vs qemu-img convert by hand", full and full.get("vs_by_hand"),
          1.1, "x by hand")
    chain_row = _row(b, "offline relocate", "chain mode")
    check("offline relocation, chain mode vs the dd limit", chain_row and chain_row["ratio"], 1.3,
          "x dd")
    volume = _row(b, "block volume", "vdsm-blockops")
    if volume:
        lines.append(f"- merge into a block volume needing extension: {volume['median_s']:.2f} s, "
                     f"{volume.get('extensions', '?')} extension(s), "
                     f"{volume['ratio']:.2f} x extending by hand + virsh blockcommit (no target set)")
    empty = _row(b, "scale: 0 defined + 0 running", "merge (commit)")
    crowded = _row(b, "scale: 500 defined + 10 running", "merge (commit)")
    check("merge with 500 defined + 10 running domains vs an empty node",
          crowded and empty and crowded["median_s"] / empty["median_s"], 1.3, "x empty node")
    return lines


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    virsh = subprocess.run(["virsh", "--version"], capture_output=True, text=True).stdout.strip()
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return (f"{os.cpu_count()} x {cpu}, {mem:.0f} GiB, {platform.platform()}, libvirt {virsh}, "
            f"{qemu}, Python {platform.python_version()}")


def write_report(b: Bench, path: str, plot: str | None, measured_on: str | None = None) -> None:
    lines = ["==========", "Benchmarks", "==========", "",
             f"Measured {time.strftime('%Y-%m-%d')} on {measured_on or machine()}.", "",
             "Each contender runs on a freshly built, identical chain; contenders alternate",
             "run by run; the figure is the median of the runs. Whole-command wall time",
             "(process start to exit, verification included for vdsm-blockops). Every run's",
             "guest-visible data is checked with ``qemu-img compare`` afterwards.", "",
             "Reproduce with ``bash bench/run.sh`` (``--quick`` for a shorter run).", ""]
    header = ["case", "contender", "median s", "x virsh", "bytes copied", "other"]
    table = []
    for row in b.rows:
        other = ", ".join(f"{k}={row[k]}" for k in ("throughput_mib_s", "peak_rss_mib", "parse_ms",
                                                       "plan_ms", "beyond_qemu_img_ms") if k in row)
        table.append([row["case"], row["contender"],
                      f"{row['median_s']:.3f}" if row.get("median_s") is not None else "-",
                      f"{row['ratio']:.2f}" if row.get("ratio") else "",
                      f"{row['bytes_copied'] / MIB:.1f} MiB" if row.get("bytes_copied") else "",
                      other])
    widths = [max(len(str(r[i])) for r in table + [header]) for i in range(len(header))]
    sep = "  ".join("=" * w for w in widths)
    lines += [sep, "  ".join(h.ljust(w) for h, w in zip(header, widths)), sep]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in table]
    lines += [sep, "", "Targets", "-------", ""]
    lines += targets(b)
    own = [r["beyond_qemu_img_ms"] for r in b.rows if "beyond_qemu_img_ms" in r]
    own_ms = f"{min(own)}-{max(own)}" if own else "?"
    lines += ["", "Notes", "-----", "",
              "- Full mode here is ``--method flatten`` (auto's choice: the read-only layers",
              "  hold nearly all data): qemu-img flattens them into DEST with O_DIRECT at the",
              "  disk's speed (about 0.65 s of the run), then two short block jobs move the",
              "  active layer. That copy is the floor: a faster DEST needs a faster disk.",
              "- Chain mode proves every file copy byte for byte before the pivot: each",
              "  chunk is written through the page cache with its writeback started at once,",
              "  read back from memory and compared, and leaves the cache once written out",
              "  (the next chunk reuses its pages: this machine is slow to hand out pages",
              "  never used before, 1.5-1.7 s for the copy instead of 0.6). dd does no proof.",
              "- The offline merges run on two chain sizes: the command's own cost beyond",
              f"  qemu-img (Python, libvirt, the record, the checks) is fixed, {own_ms} ms,",
              "  measured run by run by timing qemu-img inside it (a shim on PATH); the",
              "  disk's run-to-run spread on the 3.5 GiB chain is larger than that, so the",
              "  3.5 GiB ratios are given as by hand's median plus that measured cost. Most",
              "  of the cost is a cold process's: the interpreter and the libvirt binding",
              "  alone (its shared library's loading) take most of 40 ms here, before the",
              "  command does anything (see \"fixed cost\" above).",
              "- The disk of this machine is mounted with ``discard``: deleting the previous",
              "  run's GiBs makes the next writes slower for a while, buffered writes more",
              "  than O_DIRECT ones; every run starts after an os.sync(), yet run-to-run",
              "  spread is large (every run's time is in benchmarks.json).",
              "- The 64-layer chain costs both tools mostly QEMU's per-layer job work.",
              "- QEMU's job engines copy at a few hundred MiB/s here; a file copy of the",
              "  immutable layers runs at the disk's speed, which is why chain mode copies",
              "  read-only layers as files and mirrors only the active layer.",
              "- virsh notices the end of a job on a 500 ms poll; vdsm-blockops waits on the",
              "  BLOCK_JOB_2 event, so tiny jobs end in well under that.",
              "- Moves to another node (``migrate`` against ``virsh migrate",
              "  --copy-storage-all``) are measured by ``bench/migrate.py``: see",
              "  :doc:`benchmarks-migrate`.", ""]
    if plot:
        lines += [f".. image:: {os.path.basename(plot)}", ""]
    if os.path.exists(os.path.join(os.path.dirname(path), "scaling.png")):
        lines += ["Scaling: an operation's cost against the number of domains on the node", "",
                  ".. image:: scaling.png", ""]
    with open(path, "w") as handle:
        handle.write("\n".join(lines))
    print(f"wrote {path}")


def make_plot(b: Bench, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install '.[bench]'): no plot")
        return None
    rows = [r for r in b.rows if r.get("ratio") and not r["case"].startswith("scale")]
    labels = [f"{r['case']}\n{r['contender']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [r["ratio"] for r in rows],
            color=["#2a9d8f" if r["ratio"] <= 1 else "#e76f51" for r in rows])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("wall time relative to virsh (lower is better; 1.0 = virsh)")
    ax.set_title("vdsm-blockops vs virsh, same chains, medians")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    scale = [r for r in b.rows if r["case"].startswith("scale") and r.get("crowd") is not None
             and r.get("running")]
    if scale:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name in ("merge --dry-run", "merge (commit)"):
            points = sorted((r["crowd"], r["median_s"]) for r in scale if r["contender"] == name)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        empty = _row(b, "scale: 0 defined + 0 running", "merge (commit)")
        if empty:
            ax.axhline(empty["median_s"] * 1.3, color="grey", linestyle="--",
                       label="1.3 x merge on an empty node")
        ax.set_xlabel("other domains defined (plus 10 running)")
        ax.set_ylabel("seconds (whole command)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.set_title("An operation's cost and the node's size")
        fig.tight_layout()
        fig.savefig(os.path.join(os.path.dirname(path), "scaling.png"), dpi=110)
        plt.close(fig)
    return path


def _report_again() -> None:
    """The report and plot from the last run's rows (e.g. once matplotlib
    is installed), without running anything."""
    docs = os.path.join(REPO, "docs")
    with open(os.path.join(docs, "benchmarks.json")) as handle:
        saved = json.load(handle)
    b = Bench.__new__(Bench)
    b.rows = saved["rows"]
    plot = make_plot(b, os.path.join(docs, "benchmarks.png"))
    write_report(b, os.path.join(docs, "benchmarks.rst"), plot, saved.get("machine"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer runs and cases")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--only", nargs="+", metavar="CASE",
                        choices=["tiny", "scaling", "jobs", "offline", "strategies", "relocation",
                                 "concurrency", "memory", "pure", "hook", "volume", "startup"],
                        help="run only these cases; the other rows are kept from the last report")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report and the plot again from docs/benchmarks.json")
    args = parser.parse_args()
    if args.report_only:
        _report_again()
        return
    # An installed package has its bytecode compiled by pip; an editable
    # checkout may not (PYTHONDONTWRITEBYTECODE), which would bill the
    # compiler to every command. Compile once, as an install would.
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(REPO, "vdsm_blockops")],
                   check=True)
    os.makedirs(rig.TEST_ROOT, mode=0o755, exist_ok=True)
    root = tempfile.mkdtemp(prefix="bench-", dir=rig.TEST_ROOT)
    os.chmod(root, 0o755)
    b = Bench(root, args.repeats or (3 if args.quick else 5))
    cases = {
        "tiny": lambda: tiny(b),
        "scaling": lambda: scaling(b, args.quick),
        "jobs": lambda: many_jobs(b),
        "offline": lambda: offline(b),
        "volume": lambda: block_volume(b),
        "strategies": lambda: strategies(b, args.quick),
        "relocation": lambda: relocation(b),
        "concurrency": lambda: concurrency(b, args.quick),
        "memory": lambda: memory(b),
        "pure": lambda: pure_parts(b),
        "hook": lambda: hook_time(b),
        "startup": lambda: startup(b),
    }
    report = os.path.join(REPO, "docs", "benchmarks.json")
    if args.only and os.path.exists(report):
        with open(report) as handle:  # keep the rows of the cases not run now
            kept = json.load(handle)["rows"]
        prefixes = {"tiny": "tiny", "scaling": "scale", "jobs": "jobs:", "strategies": "merge --base",
                    "relocation": "relocate", "concurrency": "merge ", "memory": "peak memory",
                    "pure": "parse", "hook": "hook", "offline": "offline",
                    "volume": "block volume", "startup": "fixed cost"}
        ran = tuple(prefixes.get(c, c) for c in args.only)
        b.rows = [r for r in kept if not r["case"].startswith(ran)]
    try:
        for name, run in cases.items():
            if args.only and name not in args.only:
                continue
            run()
            if name == "scaling":  # the five-run cases above, three-run ones below
                b.repeats = args.repeats or (1 if args.quick else 3)
    finally:
        for vm in b.vms:
            vm.destroy()
        shutil.rmtree(root, ignore_errors=True)
    docs = os.path.join(REPO, "docs")
    plot = make_plot(b, os.path.join(docs, "benchmarks.png"))
    write_report(b, os.path.join(docs, "benchmarks.rst"), plot)
    with open(os.path.join(docs, "benchmarks.json"), "w") as handle:
        json.dump({"machine": machine(), "rows": b.rows}, handle, indent=1)


if __name__ == "__main__":
    main()
