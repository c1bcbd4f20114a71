"""``migrate``: a running VM moves to node B (a second libvirtd on this
machine, tests/node-b.sh) with its qcow2 chain and its checkpoints. The
guest's data is checked on node B from outside the VM, inside node B's
mount namespace (where its paths name its own files)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time

import libvirt
import libvirt_qemu
import nodes
import pytest
import rig
from rig import LayerSpec, Write

from vdsm_blockops.core.chain import parse_xml

MIGRATE_URI = "tcp://127.0.0.1"


def on_b(root, test_root, path):
    return nodes.on_b(root, test_root, path)


def in_b(*argv: str) -> str:
    """A command run in node B's mount namespace (it sees B's files)."""
    return rig.run("nsenter", "-t", str(nodes.libvirtd_pid()), "-m", *argv)


def hmp_write(dom, alias: str, write: Write) -> bool:
    """A guest write through the device; False when QEMU refused it (the
    VM left this node meanwhile)."""
    try:
        out = libvirt_qemu.qemuMonitorCommand(
            dom, f'qemu-io -d {alias}/virtio-backend "{write.qemu_io()}"',
            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    except libvirt.libvirtError:
        return False
    # HMP's qemu-io prints nothing when the write succeeded, the error else
    return not out.strip()


def write_both(dom, disk: rig.Disk, write: Write) -> bool:
    if not hmp_write(dom, disk.alias, write):
        return False
    rig.run("qemu-io", "-f", "raw", "-c", write.qemu_io(), disk.reference)
    return True


def migrate(vm, config, dest_dir, *extra):
    return rig.cli_background("migrate", vm.name, nodes.URI, "--dest-dir", dest_dir,
                              "--migrate-uri", MIGRATE_URI, *extra, config=config)


def finish(proc):
    out, err = proc.communicate(timeout=300)
    lines = out.strip().splitlines()
    assert len(lines) == 1, (out, err)
    return proc.returncode, json.loads(lines[0]), err


def record_of(config_dir: str, uuid: str):
    path = os.path.join(config_dir, "state", "migrations", f"{uuid}.json")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (FileNotFoundError, ValueError):
        return None


def assert_b_holds(disk: rig.Disk, top_on_b: str) -> None:
    """Node B's chain (read in its namespace) holds every write. (The
    reference goes through /var/tmp: node B does not see node A's test
    folder, it sees its own there.)"""
    with tempfile.NamedTemporaryFile(dir="/var/tmp", suffix=".raw") as reference:
        shutil.copyfile(disk.reference, reference.name)
        in_b("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", top_on_b, reference.name)


def test_a_running_vm_moves_with_its_four_layer_chain(vm4, node_b, config, workdir, test_root):
    conn_b, root = node_b
    disk = vm4.disks["vda"]
    source_dom = vm4.dom
    write_both(source_dom, disk, Write(0x51, 10, 1))  # before
    dest_dir = os.path.join(workdir, "moved")  # another folder: absolute names are rewritten
    proc = migrate(vm4, config, dest_dir)
    during = 0
    while proc.poll() is None and during < 40:
        if write_both(source_dom, disk, Write(0x60 + during % 16, 30 + during % 20, 0.25)):
            during += 1
        time.sleep(0.05)
    rc, out, err = finish(proc)
    assert rc == 0, (out, err)
    assert during > 0
    vm4.created = False
    after = [os.path.join(dest_dir, os.path.basename(p)) for p in reversed(disk.layers)]
    assert out["chain_after"] == {"vda": after} and out["verified"] and out["dest_host"] == "node-b"
    assert len(out["copied"]) == 3 and all(c["sha256"] for c in out["copied"])
    with pytest.raises(libvirt.libvirtError):
        source_dom.isActive()  # undefined on node A
    moved = conn_b.lookupByName(vm4.name)
    assert moved.isActive() and moved.isPersistent()
    assert write_both(moved, disk, Write(0x77, 50, 1))  # after, on node B
    moved.destroy()
    assert_b_holds(disk, after[0])
    # the chain on node B: four layers, each naming the next by its new path
    info = json.loads(in_b("qemu-img", "info", "-U", "--backing-chain", "--output=json", after[0]))
    assert [i["filename"] for i in info] == after
    # node A: the source layers retired (the hook would refuse them)
    registry = json.load(open(os.path.join(workdir, "state", "invalidated.json")))
    assert {e["path"] for e in registry.values()} == set(disk.layers)
    assert not os.listdir(os.path.join(workdir, "state", "migrations"))  # settled
    assert b_pools(conn_b, workdir) == []  # the pool started for the folder is stopped


def b_pools(conn_b, folder: str) -> list[str]:
    """Node B's storage pools on ``folder`` or below it."""
    return [p.name() for p in conn_b.listAllStoragePools()
            if (parse_xml(p.XMLDesc(0)).findtext("target/path") + "/").startswith(folder + "/")]


def b_folder(root: str, vm) -> str:
    """The VM's folder on node B, as node A sees it (under node B's root)."""
    return nodes.on_b(root, os.path.dirname(os.path.dirname(vm.dir)), vm.dir)


def b_files(root: str, vm) -> list[str]:
    """Every file node B holds in the VM's folder."""
    return sorted(os.path.join(d, f) for d, _, files in os.walk(b_folder(root, vm))
                  for f in files)


def test_a_checkpoint_survives_the_move(make_vm, node_b, config, workdir, test_root):
    conn_b, root = node_b
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 8)]),
                                LayerSpec("B", [Write(0x22, 4, 2)])])
    vm.start()
    rig.virsh("checkpoint-create-as", vm.name, "cp1", "--diskspec", "vda,checkpoint=bitmap")
    since = [Write(0x33, 20, 1)]
    write_both(vm.dom, disk, since[0])
    rc, out, err = rig.cli("migrate", vm.name, nodes.URI, "--dest-dir", vm.dir,
                           "--migrate-uri", MIGRATE_URI, config=config)
    assert rc == 0, (out, err)
    vm.created = False
    assert out["checkpoints"] == ["cp1"]
    moved = conn_b.lookupByName(vm.name)
    assert [c.getName() for c in moved.listAllCheckpoints()] == ["cp1"]
    since.append(Write(0x44, 40, 1))
    assert write_both(moved, disk, since[1])
    # node B's libvirt judges the checkpoint: exactly the writes since it
    target = os.path.join(test_root, f"backup-{vm.name}.qcow2")  # node B's path
    assert rig.incremental_backup(vm, "cp1", target, uri=nodes.URI) == "2.000 MiB"
    rig.assert_backup_holds(on_b(root, test_root, target), since)
    moved.destroy()
    assert_b_holds(disk, disk.layers[-1])  # same folder on node B


def test_refusals_change_nothing_on_either_node(vm4, node_b, config, workdir, test_root):
    conn_b, root = node_b
    disk = vm4.disks["vda"]
    # node B already has a file of that name, with other bytes
    clash = on_b(root, test_root, disk.layers[1])
    os.makedirs(os.path.dirname(clash), exist_ok=True)
    rig.run("qemu-img", "create", "-q", "-f", "qcow2", clash, "64M")
    before_b = b_files(root, vm4)
    for args, words in [
            ((nodes.URI, "--dest-dir", vm4.dir), "already has"),
            (("qemu:///system", "--dest-dir", vm4.dir), "is this node"),
            ((nodes.URI, "--dest-dir", "relative/dir"), "absolute"),
    ]:
        rc, out, err = rig.cli("migrate", vm4.name, *args, "--migrate-uri", MIGRATE_URI,
                               config=config)
        assert rc == 2 and words in out["error"]["message"], (args, out, err)
        assert b_files(root, vm4) == before_b
        assert vm4.dom.isActive() and vm4.name not in [d.name() for d in conn_b.listAllDomains()]
        assert not os.path.exists(os.path.join(workdir, "state", "migrations", f"{vm4.dom.UUIDString()}.json"))
    # a dry run plans, and changes nothing either
    os.unlink(clash)
    rc, out, err = rig.cli("migrate", vm4.name, nodes.URI, "--dest-dir", vm4.dir, "--dry-run",
                           config=config)
    assert rc == 0 and out["dry_run"] and not out["changed"], (out, err)
    assert out["chain_after"] == {"vda": list(reversed(disk.layers))}
    assert out["bytes_to_copy"] == sum(os.path.getsize(p) for p in disk.layers[:-1])
    assert b_files(root, vm4) == []
    disk.assert_guest_data()


def wait_for_phase(workdir, uuid, phases, proc, timeout=120):
    """The migration record reaches one of ``phases`` (with a file created,
    for "copying"), while the command still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = record_of(workdir, uuid)
        if record and record["phase"] in phases and (
                record["phase"] != "copying" or record["created"]):
            return record
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"the move never reached {phases}")


def recover(vm, config):
    rc, out, err = rig.cli("recover", vm.name, "--timeout", "120", config=config)
    assert rc == 0, (out, err)
    assert [r["operation"] for r in out["records"]] == ["migrate"], out
    return out["records"][0]["result"]


def one_running_copy(vm, conn_b):
    """Where the VM runs now ("a" or "b"): exactly one node runs it."""
    on_a = [d for d in vm.conn.listAllDomains() if d.name() == vm.name and d.isActive()]
    on_b_ = [d for d in conn_b.listAllDomains() if d.name() == vm.name and d.isActive()]
    assert len(on_a) + len(on_b_) == 1, (on_a, on_b_)
    return "a" if on_a else "b"


def big_vm(make_vm, base_mib=400, top_mib=8):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, base_mib)]),
                                LayerSpec("B", [Write(0x22, 4, 2)]),
                                LayerSpec("C", [Write(0x33, 100, top_mib)])], size_mib=512)
    vm.start()
    return vm, disk


def test_killed_during_the_upload_recover_rolls_back(make_vm, node_b, config, workdir):
    conn_b, root = node_b
    vm, disk = big_vm(make_vm)
    proc = migrate(vm, config, vm.dir)
    record = wait_for_phase(workdir, vm.dom.UUIDString(), ["copying"], proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert record["markers"] and b_files(root, vm)  # it had begun there
    write_both(vm.dom, disk, Write(0x55, 200, 1))
    assert recover(vm, config) == "rolled-back"
    assert one_running_copy(vm, conn_b) == "a"
    assert b_files(root, vm) == []  # the half-written copy and the marker are gone
    assert b_pools(conn_b, vm.dir) == [] and not os.path.exists(b_folder(root, vm))
    disk.assert_guest_data()
    assert rig.cli("verify", vm.name, config=config)[0] == 0
    # and the move can be made again
    rc, out, err = rig.cli("migrate", vm.name, nodes.URI, "--dest-dir", vm.dir,
                           "--migrate-uri", MIGRATE_URI, config=config)
    assert rc == 0, (out, err)
    vm.created = False
    conn_b.lookupByName(vm.name).destroy()
    assert_b_holds(disk, disk.layers[-1])


def test_killed_during_the_migration_recover_ends_with_one_vm(make_vm, node_b, config, workdir):
    conn_b, root = node_b
    vm, disk = big_vm(make_vm, base_mib=8, top_mib=160)  # the migration copies the top
    proc = migrate(vm, config, vm.dir, "--bandwidth", "40")
    wait_for_phase(workdir, vm.dom.UUIDString(), ["migrating"], proc)
    time.sleep(1)
    rc, jobs, err = rig.cli("jobs", vm.name, config=config)  # the operator sees the move
    # the migration, and the mirror of the active layer libvirt runs for it
    assert rc == 0 and "migration" in [j["type"] for j in jobs["jobs"]], (jobs, err)
    assert [(o["operation"], o["running"]) for o in jobs["operations"]] == [("migrate", True)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = recover(vm, config)
    where = one_running_copy(vm, conn_b)
    assert (result, where) in (("finished", "b"), ("rolled-back", "a")), (result, where)
    if where == "a":
        assert b_files(root, vm) == []
        disk.assert_guest_data()
        assert rig.cli("verify", vm.name, config=config)[0] == 0
    else:
        vm.created = False
        conn_b.lookupByName(vm.name).destroy()
        assert_b_holds(disk, disk.layers[-1])


def test_node_b_libvirtd_killed_mid_way_recover_rolls_back(make_vm, node_b, config, workdir):
    conn_b, root = node_b
    vm, disk = big_vm(make_vm, base_mib=8, top_mib=160)
    proc = migrate(vm, config, vm.dir, "--bandwidth", "40")
    wait_for_phase(workdir, vm.dom.UUIDString(), ["migrating"], proc)
    time.sleep(1)
    os.kill(nodes.libvirtd_pid(), signal.SIGKILL)
    rc, out, err = finish(proc)
    assert rc == 1 and not out["ok"], (out, err)
    assert record_of(workdir, vm.dom.UUIDString()) is not None  # left for recover
    assert vm.dom.isActive()
    conn_b = nodes.restart_libvirtd()
    assert recover(vm, config) == "rolled-back"
    assert one_running_copy(vm, conn_b) == "a"
    assert b_files(root, vm) == []
    disk.assert_guest_data()
    assert rig.cli("verify", vm.name, config=config)[0] == 0


def test_the_drain_role_moves_every_running_vm_and_runs_again(make_vm, node_b, config, workdir):
    from test_ansible import PLAYBOOKS, play

    conn_b, root = node_b
    vms = []
    for _ in range(2):
        vm = make_vm()
        disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 4)]),
                                    LayerSpec("B", [Write(0x22, 2, 1)])])
        vms.append((vm.start(), disk))
    inventory = os.path.join(workdir, "nodes.ini")
    with open(inventory, "w") as handle:
        handle.write(f"[nodes]\nnode1 ansible_connection=local ansible_python_interpreter="
                     f"{sys.executable} blockops_uri={rig.TEST_URI} blockops_config={config}\n")
    extra = json.dumps({"target_hosts": "node1", "destinations": [nodes.URI],
                        "dest_dir": os.path.join(workdir, "drained"), "per_node_limit": 1,
                        "migrate_uris": {nodes.URI: MIGRATE_URI}})
    for attempt in range(2):  # the second run finds nothing left to move
        rc, recap, out = play(inventory, os.path.join(PLAYBOOKS, "drain.yml"), "-e", extra)
        assert rc == 0 and recap["node1"]["failed"] == 0, out
        for vm, _ in vms:
            assert (f"{vm.name}: moved to {nodes.URI}" in out if attempt == 0
                    else vm.name not in out), (attempt, out)
    for vm, disk in vms:
        vm.created = False
        moved = conn_b.lookupByName(vm.name)
        assert moved.isActive() and not [d for d in vm.conn.listAllDomains() if d.name() == vm.name]
        moved.destroy()
        top = os.path.join(workdir, "drained", vm.name, os.path.basename(disk.layers[-1]))
        assert_b_holds(disk, top)


def test_the_drain_role_in_check_mode_predicts_and_changes_nothing(make_vm, node_b, config,
                                                                  workdir):
    """``drain --check`` against node B: every running VM predicted to move
    (changed), the host passes, and nothing changed on either node: the VMs
    run here on their chains, node B holds no file and no domain, no record
    or history line was written."""
    from test_ansible import PLAYBOOKS, play

    conn_b, root = node_b
    vm, disk = big_vm(make_vm, base_mib=4, top_mib=1)
    inventory = os.path.join(workdir, "nodes.ini")
    with open(inventory, "w") as handle:
        handle.write(f"[nodes]\nnode1 ansible_connection=local ansible_python_interpreter="
                     f"{sys.executable} blockops_uri={rig.TEST_URI} blockops_config={config}\n")
    extra = json.dumps({"target_hosts": "node1", "destinations": [nodes.URI],
                        "dest_dir": os.path.join(workdir, "drained"), "source_root": workdir,
                        "migrate_uris": {nodes.URI: MIGRATE_URI}})
    chain = disk.live_chain()
    rc, recap, out = play(inventory, os.path.join(PLAYBOOKS, "drain.yml"), "--check", "-e", extra)
    assert rc == 0 and recap["node1"]["failed"] == 0 and recap["node1"]["changed"] >= 1, out
    assert f"{vm.name}: moved to {nodes.URI}" in out, out  # predicted
    assert one_running_copy(vm, conn_b) == "a" and disk.live_chain() == chain
    assert not os.path.exists(nodes.on_b(root, os.path.dirname(os.path.dirname(vm.dir)),
                                         os.path.join(workdir, "drained")))
    assert vm.name not in [d.name() for d in conn_b.listAllDomains()]
    assert not os.path.exists(os.path.join(workdir, "state", "migrations")) or \
        not os.listdir(os.path.join(workdir, "state", "migrations"))
    disk.assert_guest_data()


def test_a_move_past_its_timeout_is_rolled_back(make_vm, node_b, config, workdir):
    """--timeout bounds the whole move (here the paced upload): exit 3,
    nothing left on node B, the VM runs on here as it was."""
    conn_b, root = node_b
    vm, disk = big_vm(make_vm, base_mib=40, top_mib=1)
    started = time.monotonic()
    rc, out, err = rig.cli("migrate", vm.name, nodes.URI, "--dest-dir", vm.dir,
                           "--migrate-uri", MIGRATE_URI, "--bandwidth", "4", "--timeout", "2",
                           config=config)
    assert rc == 3 and out["error"]["code"] == "timeout", (out, err)
    assert "rolled back" in out["error"]["message"] and time.monotonic() - started < 15
    assert b_files(root, vm) == [] and one_running_copy(vm, conn_b) == "a"
    assert b_pools(conn_b, vm.dir) == []
    assert record_of(workdir, vm.dom.UUIDString()) is None
    disk.assert_guest_data()
    assert rig.cli("verify", vm.name, config=config)[0] == 0


def test_abort_stops_a_move_and_rolls_it_back(make_vm, node_b, config, workdir):
    """``abort DOMAIN all`` stops the migrate command as Ctrl-C would (here
    in its paced upload): it rolls back, the VM runs on here as it was,
    nothing is left on node B; a pivot or another disk is refused first."""
    conn_b, root = node_b
    vm, disk = big_vm(make_vm, base_mib=40, top_mib=1)
    proc = migrate(vm, config, vm.dir, "--bandwidth", "4")
    wait_for_phase(workdir, vm.dom.UUIDString(), ["copying"], proc)
    for args, why in ((("all", "--pivot"), "no pivot"), (("vdz",), "abort the move with 'all'")):
        rc, out, err = rig.cli("abort", vm.name, *args, config=config)
        assert rc == 2 and why in out["error"]["message"], (out, err)
    assert proc.poll() is None and b_files(root, vm)  # refusals stopped nothing
    rc, out, err = rig.cli("abort", vm.name, "all", config=config)
    assert rc == 0, (out, err)
    assert [(r["operation"], r["result"]) for r in out["recover"]] == [("migrate", "rolled-back")]
    rc, moved, err = finish(proc)
    assert rc == 1 and moved["error"]["code"] == "aborted", (moved, err)
    assert "rolled back" in moved["error"]["message"] and "abort" in moved["error"]["message"]
    assert b_files(root, vm) == [] and one_running_copy(vm, conn_b) == "a"
    assert b_pools(conn_b, vm.dir) == []
    assert record_of(workdir, vm.dom.UUIDString()) is None
    disk.assert_guest_data()
    assert rig.cli("verify", vm.name, config=config)[0] == 0


def test_node_b_hook_refuses_a_vm_on_a_half_copied_layer(make_vm, node_b, config, workdir):
    """Our hook installed on node B refuses to start a domain there on a
    layer whose upload is unfinished (the marker beside it names it)."""
    conn_b, root = node_b
    vm, disk = big_vm(make_vm, base_mib=40, top_mib=1)
    side = tempfile.mkdtemp(dir="/var/tmp")  # node B sees /var/tmp as node A does
    b_config = os.path.join(side, "config.yaml")
    with open(b_config, "w") as handle:
        handle.write(f"state_dir: {side}/state\n")
    hooks = os.path.join(root, "etc", "hooks", "qemu.d")  # node B's /etc/libvirt/hooks/qemu.d
    rc, out, err = rig.cli("hook", "install", "--hooks-dir", hooks, config=b_config)
    assert rc == 0, (out, err)
    os.kill(nodes.libvirtd_pid(), signal.SIGHUP)  # libvirtd reads its hooks again
    time.sleep(1)
    try:
        proc = migrate(vm, config, vm.dir, "--bandwidth", "4")
        record = wait_for_phase(workdir, vm.dom.UUIDString(), ["copying"], proc)
        half = record["created"][0]["path"]
        xml = (f"<domain type='qemu'><name>{vm.name}-b</name><memory unit='MiB'>64</memory>"
               "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
               f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source "
               f"file='{half}'/><target dev='vda' bus='virtio'/></disk></devices></domain>")
        with pytest.raises(libvirt.libvirtError, match="being copied here by a move"):
            conn_b.createXML(xml, 0)
        assert proc.poll() is None  # the move goes on
        assert rig.cli("abort", vm.name, "all", config=config)[0] == 0
        assert finish(proc)[0] == 1
        assert b_files(root, vm) == [] and one_running_copy(vm, conn_b) == "a"
    finally:
        os.unlink(os.path.join(hooks, "vdsm-blockops"))
        os.kill(nodes.libvirtd_pid(), signal.SIGHUP)
        shutil.rmtree(side, ignore_errors=True)


def test_a_taken_name_and_a_shared_disk_are_refused_before_any_byte(make_vm, node_b, config,
                                                                     workdir):
    """Exit 2 before anything is uploaded: a domain of that name already on
    the destination (libvirt refused it only after the whole copy), and a
    <shareable/> disk (its copy would diverge from the disk other VMs use)."""
    conn_b, root = node_b
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 4)]),
                                LayerSpec("B", [Write(0x22, 8, 1)])])
    shared = vm.add_layers("vdb", [(os.path.join(vm.dir, "shared.raw"), None,
                                    LayerSpec("S", [Write(0x33, 0, 1)], fmt="raw"))])
    xml = vm.xml().replace("<target dev='vdb' bus='virtio'/>",
                           "<target dev='vdb' bus='virtio'/><shareable/>")
    xml = xml.replace("<driver name='qemu' type='raw'/>",
                      "<driver name='qemu' type='raw' cache='none'/>")
    vm.conn.defineXML(xml)
    vm.created = True
    vm.dom.create()
    rc, out, err = rig.cli("migrate", vm.name, nodes.URI, "--dest-dir", vm.dir, config=config)
    assert rc == 2 and "shareable" in out["error"]["message"], (out, err)
    assert b_files(root, vm) == []
    placeholder = conn_b.defineXML(
        f"<domain type='qemu'><name>{vm.name}</name><memory unit='MiB'>16</memory>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>")
    try:
        vm.dom.detachDeviceFlags(
            "<disk type='file' device='disk'><source file='"
            f"{shared.layers[0]}'/><target dev='vdb' bus='virtio'/></disk>",
            libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        vm.restart()
        rc, out, err = rig.cli("migrate", vm.name, nodes.URI, "--dest-dir", vm.dir,
                               "--migrate-uri", MIGRATE_URI, config=config)
        assert rc == 2 and "already has a domain with the name" in out["error"]["message"], out
        assert b_files(root, vm) == []  # nothing uploaded
    finally:
        placeholder.undefine()
    assert vm.dom.isActive()
    disk.assert_guest_data()


def test_abort_of_a_move_whose_command_died_aborts_its_migration(make_vm, node_b, config,
                                                                 workdir):
    """The command killed during a slow migration leaves the migration job
    running: abort stops that job and rolls the move back at once (it
    waited 60 s, said "waiting" and exited 0)."""
    conn_b, root = node_b
    vm, disk = big_vm(make_vm, base_mib=2, top_mib=40)  # the migration copies the top
    proc = migrate(vm, config, vm.dir, "--bandwidth", "1")
    wait_for_phase(workdir, vm.dom.UUIDString(), ["migrating"], proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    started = time.monotonic()
    rc, out, err = rig.cli("abort", vm.name, "all", config=config)
    assert rc == 0 and [o["result"] for o in out["recover"]] == ["rolled-back"], (out, err)
    assert time.monotonic() - started < 30
    assert one_running_copy(vm, conn_b) == "a" and b_files(root, vm) == []
    assert record_of(workdir, vm.dom.UUIDString()) is None
    disk.assert_guest_data()


def test_a_layer_that_changes_during_its_upload_is_not_taken_as_proven(make_vm, node_b, config,
                                                                       workdir):
    """The read back proves what was sent arrived; a layer rewritten while
    it was sent (libvirt's checkpoint-delete rewrites bitmaps in backing
    layers) may mix two versions: the move fails and rolls back."""
    conn_b, root = node_b
    vm, disk = big_vm(make_vm, base_mib=12, top_mib=1)
    base = disk.layers[0]
    proc = migrate(vm, config, vm.dir, "--bandwidth", "2")
    wait_for_phase(workdir, vm.dom.UUIDString(), ["copying"], proc)
    time.sleep(1)
    os.utime(base)  # its mtime moves, as any write would move it
    rc, out, err = finish(proc)
    assert rc == 1 and "changed while it was uploaded" in out["error"]["message"], (out, err)
    assert "rolled back" in out["error"]["message"]
    assert one_running_copy(vm, conn_b) == "a" and b_files(root, vm) == []
    disk.assert_guest_data()


def test_an_encrypted_or_pool_volume_disk_is_refused_before_any_byte(make_vm, node_b, config,
                                                                     workdir, conn):
    """Exit 2, nothing on node B: a LUKS disk (the secret defined on both
    nodes -- the move got as far as uploading everything before QEMU there
    refused the plaintext active layer), and a disk named as a volume of a
    storage pool (parsed as a file and rewritten wrongly before)."""
    from test_disk_kinds import create_luks

    conn_b, root = node_b
    passphrase = "vbo-test-passphrase"
    secret_xml = ("<secret ephemeral='no' private='yes'><usage type='volume'>"
                  f"<volume>{workdir}/luks</volume></usage></secret>")
    secret = conn.secretDefineXML(secret_xml)
    secret.setValue(passphrase.encode())
    there = conn_b.secretDefineXML(secret_xml.replace(
        "<usage", f"<uuid>{secret.UUIDString()}</uuid><usage"))
    there.setValue(passphrase.encode())
    pool = vm = other = None
    try:
        vm = make_vm()
        image = os.path.join(vm.dir, "vda-luks.qcow2")
        create_luks(image, passphrase)
        vm.add_layers("vda", [(image, None, LayerSpec("luks", fmt="qcow2"))])
        conn.defineXML(vm.xml().replace(
            f"<source file='{image}'/>",
            f"<source file='{image}'><encryption format='luks'>"
            f"<secret type='passphrase' uuid='{secret.UUIDString()}'/></encryption></source>"))
        vm.created = True
        vm.dom.create()
        other = make_vm()
        other.add_chain("vda", [LayerSpec("A", [Write(0x11, 0, 1)])])
        pool = conn.storagePoolCreateXML(
            f"<pool type='dir'><name>vbo-test-{os.path.basename(other.dir)}</name><target>"
            f"<path>{other.dir}</path></target></pool>", 0)
        conn.defineXML(other.xml().replace(
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{other.disks['vda'].layers[0]}'/>",
            f"<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source pool='{pool.name()}' volume='vda-A.qcow2'/>"))
        other.created = True
        other.dom.create()
        for moving, words in ((vm, "encrypted"), (other, "volume")):
            rc, out, err = rig.cli("migrate", moving.name, nodes.URI, "--dest-dir", moving.dir,
                                   "--migrate-uri", MIGRATE_URI, config=config)
            assert rc == 2 and words in out["error"]["message"], (out, err)
            assert b_files(root, moving) == [] and one_running_copy(moving, conn_b) == "a"
            assert record_of(workdir, moving.dom.UUIDString()) is None
    finally:
        for dom_vm in (vm, other):
            if dom_vm is not None and dom_vm.created:
                rig.remove_domain(dom_vm.dom)
                dom_vm.created = False
        if pool is not None:
            pool.destroy()
        secret.undefine()
        there.undefine()
