"""ansible-core runs real playbooks with the vdsm.blockops modules against
real VMs. Two inventory hosts stand for two nodes: both run here, reaching
the same libvirtd through two different URIs."""

import os
import re
import subprocess
import sys
import time

import libvirt
import pytest
import rig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTIONS = os.path.join(REPO, "ansible")
PLAYBOOKS = os.path.join(COLLECTIONS, "ansible_collections", "vdsm", "blockops", "playbooks")
NODES = {"node1": "qemu:///system", "node2": "qemu+unix:///system"}


@pytest.fixture
def inventory(workdir, config):
    path = os.path.join(workdir, "nodes.ini")
    with open(path, "w") as handle:
        handle.write("[nodes]\n")
        for host, uri in NODES.items():
            handle.write(f"{host} ansible_connection=local ansible_python_interpreter={sys.executable} "
                         f"blockops_uri={uri} blockops_config={config}\n")
    return path


def play(inventory, playbook, *extra, limit=None):
    """Run ansible-playbook; returns (exit code, {host: recap}, output)."""
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_HOST_KEY_CHECKING="False",
               ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="False",
               ANSIBLE_LOCAL_TEMP="/tmp/ansible-local", ANSIBLE_FORCE_COLOR="0")
    argv = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", inventory,
            playbook, *extra]
    if limit:
        argv += ["--limit", limit]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    recap = {}
    for host, body in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", proc.stdout, re.M):
        recap[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", body)}
    return proc.returncode, recap, proc.stdout + proc.stderr


def task_playbook(workdir, name, tasks, check=False):
    path = os.path.join(workdir, f"{name}.yml")
    with open(path, "w") as handle:
        handle.write("- hosts: node1\n  gather_facts: false\n  tasks:\n")
        for task in tasks:
            handle.write("    - " + task.strip().replace("\n", "\n      ") + "\n")
    return path


def test_merge_check_mode_idempotence_and_failure(make_vm, inventory, workdir):
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers())
    vm.start()
    A, B, C, D = disk.layers
    book = task_playbook(workdir, "merge", [f"""
vdsm.blockops.blockops_merge:
  domain: {vm.name}
  disk: vda
  base: {A}
  uri: "{{{{ blockops_uri }}}}"
  config: "{{{{ blockops_config }}}}"
"""])
    rc, recap, out = play(inventory, book, "--check", "--diff")
    assert rc == 0 and recap["node1"]["changed"] == 1, out
    assert disk.live_chain() == [D, C, B, A]          # check mode changed nothing
    assert "+++ after: chain (base first)" in out
    rc, recap, out = play(inventory, book)
    assert rc == 0 and recap["node1"]["changed"] == 1, out
    assert len(disk.live_chain()) == 2
    disk.assert_guest_data()
    rc, recap, out = play(inventory, book)
    assert rc == 0 and recap["node1"]["changed"] == 0, out   # second run: nothing to do
    bad = task_playbook(workdir, "bad", [f"""
vdsm.blockops.blockops_merge:
  domain: {vm.name}
  disk: vda
  base: /nowhere/base.qcow2
  config: "{{{{ blockops_config }}}}"
"""])
    rc, recap, out = play(inventory, bad)
    assert rc != 0 and recap["node1"]["failed"] == 1
    assert "/nowhere/base.qcow2 is not in the chain of vda" in out
    disk.assert_guest_data()


def test_snapshot_relocate_info(make_vm, inventory, workdir):
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers())
    vm.start()
    os.makedirs(f"{workdir}/moved", mode=0o755)
    snap = task_playbook(workdir, "snap", [f"""
name: snapshot
vdsm.blockops.blockops_snapshot:
  domain: {vm.name}
  disk: vda
  overlay: {workdir}/vda-E.qcow2
  config: "{{{{ blockops_config }}}}"
"""])
    move = task_playbook(workdir, "move", [f"""
name: relocate
vdsm.blockops.blockops_relocate:
  domain: {vm.name}
  disk: vda
  dest: {workdir}/moved/vda-E.qcow2
  config: "{{{{ blockops_config }}}}"
""", f"""
name: info
vdsm.blockops.blockops_info:
  domain: {vm.name}
  config: "{{{{ blockops_config }}}}"
register: info
""", """
name: chain has five layers, all moved
when: not ansible_check_mode
assert:
  that:
    - info.domains[0].disks[0].chain | length == 5
    - info.domains[0].disks[0].chain | map(attribute='path') | select('search', '/moved/') | list | length == 5
    - info.domains[0].disks[0].metadata_agrees
"""])
    for book in (snap, move):
        rc, recap, out = play(inventory, book, "--check")
        assert rc == 0 and recap["node1"]["failed"] == 0, out
        rc, recap, out = play(inventory, book)
        assert rc == 0 and recap["node1"]["changed"] == 1, out
        disk.assert_guest_data()
        rc, recap, out = play(inventory, book)
        assert rc == 0 and recap["node1"]["changed"] == 0, out
    disk.assert_guest_data()


def test_evacuate_and_consolidate_across_two_nodes(make_vm, inventory, workdir):
    old, new = f"{workdir}/old", f"{workdir}/new"
    os.makedirs(new, mode=0o755)
    vms = {}
    for node in NODES:          # three VMs "on each node", one of them shut off
        for running in (True, True, False):
            vm = make_vm()
            vm.add_chain("vda", rig.four_layers(), directory=f"{old}/{node}/{vm.name}")
            vm.start() if running else vm.define()
            vms[vm] = node
    # Only the base on the old storage (through an alias of its folder), the
    # overlays elsewhere: it must move too.
    alias = f"{workdir}/old-alias"
    os.symlink(old, alias)
    based = make_vm()
    for folder in (f"{old}/node1/{based.name}", f"{workdir}/elsewhere/{based.name}"):
        os.makedirs(folder)
    base_disk = based.add_layers("vda", [
        (f"{alias}/node1/{based.name}/base.qcow2", None, rig.LayerSpec("A", [rig.Write(0xA1, 0, 4)])),
        (f"{workdir}/elsewhere/{based.name}/top.qcow2", f"{alias}/node1/{based.name}/base.qcow2",
         rig.LayerSpec("B", [rig.Write(0xB1, 2, 1)]))])
    based.start()
    vms[based] = "node1"
    # Both inventory hosts reach the same libvirtd, so each node's VMs live
    # under its own source folder (a host variable): the nodes stay apart.
    with open(inventory, "a") as handle:
        handle.write("[nodes:vars]\nsource_path=" + old + "/{{ inventory_hostname }}\n")
    evacuate = os.path.join(PLAYBOOKS, "evacuate.yml")
    started = time.monotonic()
    rc, recap, out = play(inventory, evacuate, "-e", "target_hosts=nodes", "-e", f"dest_path={new}",
                          "-e", "per_node_limit=2")
    elapsed = time.monotonic() - started
    assert rc == 0 and set(recap) == set(NODES), out
    assert all(r["failed"] == 0 and r["changed"] >= 3 for r in recap.values()), out
    print(f"evacuate: {len(vms)} VMs on {len(NODES)} nodes in {elapsed:.1f} s")
    for vm in vms:
        chain = vm.disks["vda"].chain()
        assert len(chain) == len(vm.disks["vda"].layers)
        assert all(p.startswith(f"{new}/{vm.name}/vda/") for p in chain), chain
        vm.disks["vda"].assert_guest_data()
        assert f"{vm.name} vda: moved to {new}/{vm.name}/vda/" in out, vm.name  # the report
    assert base_disk.chain()[0] == f"{new}/{based.name}/vda/top.qcow2"
    rc, recap, out = play(inventory, evacuate, "-e", "target_hosts=nodes", "-e",
                          f"dest_path={new}")   # safe to re-run
    assert rc == 0 and all(r["changed"] == 0 and r["failed"] == 0 for r in recap.values()), out
    consolidate = os.path.join(PLAYBOOKS, "consolidate.yml")
    for expect_changes in (True, False):
        rc, recap, out = play(inventory, consolidate, "-e", "target_hosts=node1", "-e",
                              "max_layers=2")
        assert rc == 0, out
        assert (recap["node1"]["changed"] > 0) is expect_changes, out
    for vm in vms:
        assert len(vm.disks["vda"].chain()) == 2
        vm.disks["vda"].assert_guest_data()
    # no hosts named, nothing runs: there is no "all" default
    rc, recap, out = play(inventory, evacuate, "-e", f"dest_path={new}")
    assert rc != 0 and "target_hosts" in out and not recap, out
    for role in ("evacuate", "consolidate"):
        doc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-doc"), "-t",
                              "role", f"vdsm.blockops.{role}"], capture_output=True, text=True,
                             env=dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS))
        assert doc.returncode == 0 and f"{role}_" in doc.stdout, doc.stdout + doc.stderr


def test_history_names_cli_ansible_and_hook_refusals(make_vm, inventory, workdir, config,
                                                     installed_hook):
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers())
    vm.start()
    A, B, C, D = disk.layers
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "commit",
                           config=config)
    assert rc == 0, (out, err)
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", "/nowhere.qcow2", config=config)
    assert rc == 2, (out, err)
    other = make_vm()
    other_disk = other.add_chain("vda", rig.four_layers()[:2])
    other.start()
    book = task_playbook(workdir, "merge", [f"""
vdsm.blockops.blockops_merge:
  domain: {other.name}
  disk: vda
  uri: "{{{{ blockops_uri }}}}"
  config: "{{{{ blockops_config }}}}"
"""])
    rc, recap, out = play(inventory, book)
    assert rc == 0, out
    other_disk.assert_guest_data()
    stale = make_vm()  # an old definition still on the committed-out D: refused
    stale.disks["vda"] = rig.Disk(stale, "vda", 0, [D], disk.reference)
    with pytest.raises(libvirt.libvirtError):
        stale.start()
    rc, out, err = rig.cli("history", config=config)
    assert rc == 0, (out, err)
    seen = [(e["source"], e["operation"], e["domain"], e["outcome"], e["exit_code"])
            for e in out["entries"]]
    assert seen == [("cli", "merge", vm.name, "ok", 0),
                    ("cli", "merge", vm.name, "unknown-image", 2),
                    ("ansible", "merge", other.name, "ok", 0),
                    ("hook", "start", stale.name, "refused", 1)], seen
    first = out["entries"][0]
    assert first["disk"] == "vda" and first["method"] == "commit" and first["start"] <= first["end"]
    refusal = out["entries"][-1]
    assert "invalidated" in refusal["message"] and D in refusal["message"]
    rc, out, err = rig.cli("history", other.name, config=config)
    assert [e["source"] for e in out["entries"]] == ["ansible"], out


def test_an_interrupted_merge_settles_on_the_next_run_of_the_play(make_vm, inventory, workdir,
                                                                   config):
    """A merge whose command died (an async kill, an SSH drop) leaves its
    record; the play run again settles it first (blockops_recover) and
    then does what is still to do. Check mode reports it, changes nothing."""
    import signal

    from test_merge import wait_for_job

    vm = make_vm()
    disk = vm.add_chain("vda", [rig.LayerSpec("A", [rig.Write(0x11, 0, 4)]),
                                rig.LayerSpec("B", [rig.Write(0x22, 4, 2)]),
                                rig.LayerSpec("C", [rig.Write(0x33, 8, 8)]),
                                rig.LayerSpec("D", [rig.Write(0x44, 20, 1)])])
    vm.start()
    A, B, C, D = disk.layers
    proc = rig.cli_background("merge", vm.name, "vda", "--base", A, "--strategy", "commit",
                              "--top", C, "--bandwidth", "1", config=config)
    wait_for_job(vm)
    proc.send_signal(signal.SIGKILL)  # no hand-over: the record stays
    proc.wait()
    rc, out, err = rig.cli("jobs", vm.name, config=config)
    assert [o["record"] for o in out["operations"]], out
    settle = f"""
vdsm.blockops.blockops_recover:
  domain: {vm.name}
  timeout: 300
  uri: "{{{{ blockops_uri }}}}"
  config: "{{{{ blockops_config }}}}"
"""
    rc, recap, out = play(inventory, task_playbook(workdir, "check", [settle]), "--check")
    assert rc == 0 and recap["node1"]["changed"] == 1, out
    rc, jobs, err = rig.cli("jobs", vm.name, config=config)
    assert jobs["operations"], jobs  # check mode settled nothing
    book = task_playbook(workdir, "settle", [settle, f"""
vdsm.blockops.blockops_merge:
  domain: {vm.name}
  disk: vda
  base: {A}
  uri: "{{{{ blockops_uri }}}}"
  config: "{{{{ blockops_config }}}}"
"""])
    rc, recap, out = play(inventory, book)
    assert rc == 0 and recap["node1"]["failed"] == 0, out
    rc, jobs, err = rig.cli("jobs", vm.name, config=config)
    assert not jobs["operations"], jobs
    chain = disk.live_chain()
    assert len(chain) == 2 and chain[-1] == A, chain
    disk.assert_guest_data()
    rc, recap, out = play(inventory, book)
    assert rc == 0 and recap["node1"]["changed"] == 0, out  # settled: nothing left to do


def _snapshot_of(workdir, vms):
    """What a check run must not change: every chain, every file under the
    test's folder (its state folder, records and history included) -- but
    the plays and the cache of domain definitions (rebuilt when stale)."""
    files = sorted(os.path.relpath(os.path.join(top, name), workdir)
                   for top, _, names in os.walk(workdir) for name in names
                   if not name.endswith((".yml", ".ini", ".retry")) and name != "definitions.json")
    return [vm.disks["vda"].chain() for vm in vms], files


def test_roles_in_check_mode_change_nothing_and_predict(make_vm, inventory, workdir):
    old, new = f"{workdir}/old", f"{workdir}/new"
    os.makedirs(new, mode=0o755)
    vms = []
    for running in (True, False):
        vm = make_vm()
        vm.add_chain("vda", rig.four_layers(), directory=f"{old}/node1/{vm.name}")
        vm.start() if running else vm.define()
        vms.append(vm)
    with open(inventory, "a") as handle:
        handle.write("[nodes:vars]\nsource_path=" + old + "/{{ inventory_hostname }}\n")
    before = _snapshot_of(workdir, vms)
    for book, extra in (("evacuate.yml", ["-e", f"dest_path={new}"]),
                        ("consolidate.yml", ["-e", "max_layers=2"])):
        rc, recap, out = play(inventory, os.path.join(PLAYBOOKS, book), "--check",
                              "-e", "target_hosts=node1", *extra)
        assert rc == 0 and recap["node1"]["failed"] == 0, out
        assert recap["node1"]["changed"] >= 1, out   # predicted (a loop counts as one task)
        assert _snapshot_of(workdir, vms) == before, book
    for vm in vms:
        vm.disks["vda"].assert_guest_data()


def test_a_copy_without_pivot_runs_again_as_ok_until_it_changes(make_vm, inventory, workdir):
    """The module's own second EXAMPLE (pivot: false) run twice: the second
    run finds the copy the first one made and reports ok (it failed, naming
    a CLI flag); once the copy is written to, it is not ours any more and
    is refused in the module's words. disk=all shows a diff per disk."""
    vm = make_vm()
    disk = vm.add_chain("vda", rig.four_layers())
    vm.add_chain("vdb", [rig.LayerSpec("A", [rig.Write(0x41, 0, 1)]),
                         rig.LayerSpec("B", [rig.Write(0x42, 1, 1)])])
    vm.start()
    copy = f"{workdir}/backup/vda.raw"
    os.makedirs(os.path.dirname(copy), mode=0o755)
    book = task_playbook(workdir, "copy", [f"""
vdsm.blockops.blockops_relocate:
  domain: {vm.name}
  disk: vda
  dest: {copy}
  mode: full
  format: raw
  pivot: false
  config: "{{{{ blockops_config }}}}"
register: copied
""", """
assert:
  that: [copied.copied, not copied.relocated]
"""])
    rc, recap, out = play(inventory, book)
    assert rc == 0 and recap["node1"]["changed"] == 1, out
    rig.run("qemu-img", "compare", "-f", "raw", "-F", "raw", copy, disk.reference)
    assert disk.live_chain()[0] == disk.layers[-1]  # no pivot
    rc, recap, out = play(inventory, book)
    assert rc == 0 and recap["node1"]["changed"] == 0 and recap["node1"]["failed"] == 0, out
    assert "an earlier run made" in out or recap["node1"]["ok"] == 2, out
    with open(copy, "r+b") as handle:  # written to since: not the copy we made
        handle.write(b"\0" * 512)
    rc, recap, out = play(inventory, book)
    assert rc != 0 and recap["node1"]["failed"] == 1, out
    assert "--reuse-external" not in out and "--no-pivot" not in out, out
    disk.assert_guest_data()
    all_disks = task_playbook(workdir, "all", [f"""
vdsm.blockops.blockops_relocate:
  domain: {vm.name}
  disk: all
  dest: {workdir}/moved
  config: "{{{{ blockops_config }}}}"
"""])
    os.makedirs(f"{workdir}/moved", mode=0o755)
    rc, recap, out = play(inventory, all_disks, "--check", "--diff")
    assert rc == 0 and recap["node1"]["changed"] == 1, out
    assert "vda:" in out and "vdb:" in out and "+++ after: chain (base first)" in out, out


def test_an_evacuation_stopped_by_ansible_fails_the_host_and_settles_on_a_run_again(
        make_vm, inventory, workdir, config):
    """The relocation outlives the job time Ansible gives it (async): the
    job is killed -- the role reports that disk NOT moved and fails the
    host (an async timeout carries none of the keys it once looked for).
    The play run again settles what the killed relocation left and moves
    the disk, every write kept."""
    old, new = f"{workdir}/old", f"{workdir}/new"
    os.makedirs(new, mode=0o755)
    vm = make_vm()
    disk = vm.add_chain("vda", [rig.LayerSpec("A", [rig.Write(0x11, 0, 24)]),
                                rig.LayerSpec("B", [rig.Write(0x22, 30, 1)])],
                        directory=f"{old}/{vm.name}")
    vm.start()
    evacuate = os.path.join(PLAYBOOKS, "evacuate.yml")
    common = ("-e", "target_hosts=node1", "-e", f"source_path={old}", "-e", f"dest_path={new}")
    rc, recap, out = play(inventory, evacuate, *common, "-e", "job_timeout=3",
                          "-e", "relocate_bandwidth=1")
    assert rc != 0 and recap["node1"]["failed"] == 1, out
    assert f"{vm.name} vda: NOT moved" in out and f"{vm.name} vda: moved" not in out, out
    assert all(p.startswith(old) for p in disk.live_chain()), disk.live_chain()
    disk.assert_guest_data()
    rc, recap, out = play(inventory, evacuate, *common)
    assert rc == 0 and recap["node1"]["failed"] == 0, out
    assert f"{vm.name} vda: moved to {new}/{vm.name}/vda/" in out, out
    assert all(p.startswith(f"{new}/{vm.name}/vda/") for p in disk.live_chain())
    rc, jobs, err = rig.cli("jobs", vm.name, config=config)
    assert not jobs["operations"], jobs  # nothing left unsettled
    disk.assert_guest_data()
    assert rig.cli("verify", vm.name, config=config)[0] == 0
