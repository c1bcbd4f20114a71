"""Draining node A, whose running VMs are built on two shared templates,
onto nodes B and C (each a libvirtd in its own mount and UTS namespace on
this machine, with its own host UUID and port) with the drain role, three
moves at a time, the guests writing: every VM runs on its destination on
its chain, each template crosses the wire once per destination, and every
VM starts again there with all its data (compared from outside, in that
node's namespace). Then the same with one move aborted and one command
killed midway, and the play run again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import nodes
import pytest
import rig
from rig import LayerSpec, Write
from test_ansible import COLLECTIONS, PLAYBOOKS, play
from test_migrate import record_of, write_both

MIGRATE_URI = "tcp://127.0.0.1"
PORTS = {nodes.URI: nodes.PORT, nodes.C_URI: nodes.C_PORT}


def holds(port: int, disk: rig.Disk, top: str) -> None:
    """The node on ``port`` (read in its namespace) holds every write of
    ``disk`` in the chain of ``top``."""
    with tempfile.NamedTemporaryFile(dir="/var/tmp", suffix=".raw") as reference:
        shutil.copyfile(disk.reference, reference.name)
        rig.run("nsenter", "-t", str(nodes.libvirtd_pid(port)), "-m", "qemu-img", "compare",
                "-U", "-f", "qcow2", "-F", "raw", top, reference.name)


def six_vms(make_vm, workdir):
    """Six running VMs, three on each of two templates (tmpl/t1, tmpl/t2)."""
    folder = os.path.join(workdir, "tmpl")
    os.makedirs(folder)
    templates = {}
    vms = []
    for pos in range(6):
        name = "t1" if pos < 3 else "t2"
        base = os.path.join(folder, f"{name}.qcow2")
        first = name not in templates
        templates.setdefault(name, base)
        vm = make_vm()
        writes = [Write(0x10 + pos // 3, 0, 12), Write(0x30 + pos // 3, 20, 4)] if first else []
        disk = vm.add_layers("vda", [
            (base, None, LayerSpec(name, writes)),
            (os.path.join(vm.dir, "top.qcow2"), base, LayerSpec("top", [Write(0x50 + pos, 30, 1)]))],
            reference_from=None if first else base)
        vms.append((vm.start(), disk, name))
    return templates, vms


class Writers:
    """Guests writing while they move: each write through the VM's device
    on node A, and into its reference -- until its move reaches the
    migration. (These writes come through the monitor, not a guest: at the
    switchover the source QEMU pauses the guest, yet would still take a
    monitor write after the disk's mirror ended -- lost, as no paused guest
    writes. The single-VM move test writes through the migration itself.)"""

    def __init__(self, vms, workdir):
        self.vms, self.workdir = vms, workdir
        self.stop, self.count = threading.Event(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        step = 0
        while not self.stop.is_set():
            for vm, disk, _ in self.vms:
                try:
                    dom = vm.dom
                    uuid = dom.UUIDString()
                except Exception:  # noqa: BLE001 -- it left node A
                    continue
                phase = (record_of(self.workdir, uuid) or {}).get("phase", "planned")
                if phase in ("planned", "copying", "copied") and \
                        write_both(dom, disk, Write(0x70 + step % 16, 40 + step % 20, 0.25)):
                    self.count += 1
            step += 1
            time.sleep(0.1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def drain_inventory(workdir, config):
    path = os.path.join(workdir, "nodes.ini")
    with open(path, "w") as handle:
        handle.write(f"[nodes]\nnode1 ansible_connection=local ansible_python_interpreter="
                     f"{sys.executable} blockops_uri={rig.TEST_URI} blockops_config={config}\n")
    return path


def drain_vars(workdir, **more):
    return json.dumps({"target_hosts": "node1", "destinations": [nodes.URI, nodes.C_URI],
                       "dest_dir": os.path.join(workdir, "drained"), "source_root": workdir,
                       "per_node_limit": 3,
                       "migrate_uris": {nodes.URI: MIGRATE_URI, nodes.C_URI: MIGRATE_URI},
                       **more})


def where_each_went(vms, out):
    went = {}
    for vm, _, _ in vms:
        found = [uri for uri in PORTS if f"{vm.name}: moved to {uri}" in out]
        assert len(found) == 1, (vm.name, out)
        went[vm.name] = found[0]
    return went


def each_restarts_with_its_data(vms, went, conns, workdir):
    for vm, disk, _ in vms:
        vm.created = False
        dom = conns[went[vm.name]].lookupByName(vm.name)
        assert dom.isActive() and dom.isPersistent()
        dom.destroy()
        dom.create()  # every file of its chain is there
        dom.destroy()
        holds(PORTS[went[vm.name]], disk, os.path.join(workdir, "drained", vm.name, "top.qcow2"))


def test_six_vms_on_two_templates_drain_onto_two_nodes(make_vm, node_b, node_c, config,
                                                        workdir):
    conns = {nodes.URI: node_b[0], nodes.C_URI: node_c[0]}
    templates, vms = six_vms(make_vm, workdir)
    inventory = drain_inventory(workdir, config)
    with Writers(vms, workdir) as writers:
        rc, recap, out = play(inventory, os.path.join(PLAYBOOKS, "drain.yml"), "-e",
                              drain_vars(workdir))
    assert rc == 0 and recap["node1"]["failed"] == 0, out
    assert writers.count > 0
    went = where_each_went(vms, out)
    # each template crossed the wire once per destination it went to
    moves = {e["domain"]: e["bytes"] for e in rig.cli("history", config=config)[1]["entries"]
             if e["operation"] == "migrate" and e["outcome"] == "ok"}
    for name, path in templates.items():
        for uri in set(went.values()):
            sent = [moves[vm.name] for vm, _, t in vms if t == name and went[vm.name] == uri]
            if sent:
                assert sorted(b >= os.path.getsize(path) for b in sent) == \
                    [False] * (len(sent) - 1) + [True], (name, uri, sent)
    assert len(set(went.values())) == 2  # both nodes took VMs
    each_restarts_with_its_data(vms, went, conns, workdir)


def test_a_drain_with_a_move_aborted_and_a_command_killed_settles_when_run_again(
        make_vm, node_b, node_c, config, workdir):
    conns = {nodes.URI: node_b[0], nodes.C_URI: node_c[0]}
    templates, vms = six_vms(make_vm, workdir)
    inventory = drain_inventory(workdir, config)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCAL_TEMP="/tmp/ansible-local")
    slow = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", inventory,
         os.path.join(PLAYBOOKS, "drain.yml"), "-e", drain_vars(workdir, migrate_bandwidth=2)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    # the identities up front: a VM that moved off is no domain here any more
    uuids = {vm.name: vm.dom.UUIDString() for vm, _, _ in vms}

    def in_flight(candidates):
        """The first of ``candidates`` whose move has made files (waited for)."""
        deadline = time.monotonic() + 120
        while True:
            for vm in candidates:
                if (record_of(workdir, uuids[vm.name]) or {}).get("created"):
                    return vm
            assert time.monotonic() < deadline and slow.poll() is None, slow.communicate()
            time.sleep(0.05)

    try:
        aborted = in_flight([vms[0][0]])
        rc, out, err = rig.cli("abort", aborted.name, "all", config=config)
        assert rc == 0, (out, err)
        # whichever other move is still under way (the abort took its time)
        killed = in_flight([vm for vm, _, _ in vms[1:]])
        os.kill(record_of(workdir, uuids[killed.name])["pid"], signal.SIGKILL)
        first, _ = slow.communicate(timeout=900)
    finally:
        if slow.poll() is None:
            slow.kill()
    assert slow.returncode != 0 and f"{aborted.name}: NOT moved" in first, first
    assert f"{killed.name}: NOT moved" in first, first
    rc, recap, out = play(inventory, os.path.join(PLAYBOOKS, "drain.yml"), "-e",
                          drain_vars(workdir))
    assert rc == 0 and recap["node1"]["failed"] == 0, out
    for vm in (aborted, killed):
        assert f"{vm.name}: moved to" in out, out
    went = {vm.name: uri for vm, _, _ in vms
            for uri, conn in conns.items() if vm.name in [d.name() for d in conn.listAllDomains()]}
    assert len(went) == 6, went
    rc, jobs, err = rig.cli("jobs", config=config)
    assert not jobs["operations"], jobs  # nothing left unsettled on node A
    assert not os.listdir(os.path.join(workdir, "state", "migrations"))
    each_restarts_with_its_data(vms, went, conns, workdir)


@pytest.fixture(autouse=True)
def _ansible_temp():
    os.makedirs("/tmp/ansible-local", exist_ok=True)
