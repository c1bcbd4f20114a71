"""Live disk relocation on real VMs. Every test compares guest-visible data;
persistent VMs are restarted afterwards, as a stale definition would lose
data only then."""

import os
import subprocess
import time

import pytest
import rig
from rig import LayerSpec, Write
from test_merge import finish, wait_for_job


def relocate(vm, config, *args):
    return rig.cli("relocate", vm.name, *args, config=config)


def same_content(a, b):
    proc = subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True)
    return proc.returncode == 0


def chain_vm(make_vm, persistent=True):
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0xA1, 0, 8)], fmt="raw"),
                                LayerSpec("B", [Write(0xB1, 4, 4)]),
                                LayerSpec("C", [Write(0xC1, 6, 1), Write(0xC2, 30, 1)]),
                                LayerSpec("D", [Write(0xD1, 12, 6)])])
    vm.start(persistent=persistent)
    return vm, disk


def test_chain_mode_keeps_every_point_in_time(make_vm, config, workdir):
    vm, disk = chain_vm(make_vm)
    A, B, C, D = disk.layers
    os.makedirs(f"{workdir}/pool2", mode=0o755)
    dest = f"{workdir}/pool2/vda-D.qcow2"
    proc = rig.cli_background("relocate", vm.name, "vda", dest, "--bandwidth", "1", config=config)
    wait_for_job(vm)
    disk.guest_write(0x61, 13, 1)
    disk.guest_write(0x62, 50, 1)
    rc, out, err = finish(proc)
    assert rc == 0, err
    new = [dest] + [f"{workdir}/pool2/{os.path.basename(p)}" for p in (C, B, A)]
    assert out["mode"] == "chain" and out["chain_after"] == new
    assert disk.live_chain() == new
    disk.assert_guest_data()
    for old, moved in zip((C, B, A), new[1:]):
        assert same_content(old, moved), f"{moved} is not the same point in time as {old}"
    assert not out["persistent_definition_fixed"]  # libvirt 9 rewrote it itself
    vm.restart()
    assert disk.live_chain() == new
    disk.assert_guest_data()
    rc, out, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, out


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_full_mode(make_vm, config, workdir, fmt):
    vm, disk = chain_vm(make_vm)
    dest = f"{workdir}/full.{fmt}"
    rc, out, err = relocate(vm, config, "vda", dest, "--mode", "full", "--format", fmt)
    assert rc == 0, err
    # most data below the active layer: auto flattens it by qemu-img
    assert out["method"] == "flatten"
    assert out["chain_after"] == [dest] and disk.live_chain() == [dest]
    disk.assert_guest_data()
    vm.restart()
    assert disk.live_chain() == [dest]
    disk.assert_guest_data()


def test_flatten_with_guest_writes_in_every_phase(make_vm, config, workdir):
    """Guest writes while the read-only layers are flattened and while the
    active layer is mirrored onto DEST: all of them end in DEST, and where
    the active layer holds nothing DEST's flattened data shows through."""
    vm, disk = chain_vm(make_vm)
    dest = f"{workdir}/flat.qcow2"
    rc, out, _ = relocate(vm, config, "vda", dest, "--mode", "full", "--dry-run")
    assert rc == 0 and out["method"] == "flatten"
    proc = rig.cli_background("relocate", vm.name, "vda", dest, "--mode", "full", "--bandwidth", "1",
                              config=config)
    deadline = time.monotonic() + 60
    while not os.path.exists(dest):
        assert proc.poll() is None, f"the relocation ended before DEST appeared: {proc.communicate()}"
        assert time.monotonic() < deadline, "DEST never appeared"
        time.sleep(0.02)
    disk.guest_write(0x71, 2, 1)  # qemu-img is flattening A, B, C
    disk.guest_write(0x00, 4, 1)  # zeros over B's data: must not show B's data in DEST
    wait_for_job(vm, timeout_s=60)
    disk.guest_write(0x72, 20, 1)  # D is mirrored onto DEST
    disk.guest_write(0x73, 7, 1)   # over C's data
    rc, out, err = finish(proc)
    assert rc == 0, err
    assert out["method"] == "flatten" and disk.live_chain() == [dest]
    disk.assert_guest_data()
    vm.restart()
    assert disk.live_chain() == [dest]
    disk.assert_guest_data()
    rc, out, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, out


def test_shallow_mode(make_vm, config, workdir):
    vm, disk = chain_vm(make_vm)
    A, B, C, D = disk.layers
    dest = f"{workdir}/shallow.qcow2"
    rc, out, err = relocate(vm, config, "vda", dest, "--mode", "shallow")
    assert rc == 0, err
    assert disk.live_chain() == [dest, C, B, A]
    disk.assert_guest_data()
    vm.restart()
    disk.assert_guest_data()


def test_snapshot_stream_method(make_vm, config, workdir):
    vm, disk = chain_vm(make_vm)
    dest = f"{workdir}/streamed.qcow2"
    rc, out, err = relocate(vm, config, "vda", dest, "--mode", "full", "--method", "snapshot-stream")
    assert rc == 0, err
    assert out["method"] == "snapshot-stream" and disk.live_chain() == [dest]
    disk.assert_guest_data()
    vm.restart()
    assert disk.live_chain() == [dest]
    disk.assert_guest_data()


def test_transient_domain_with_sync_writes(make_vm, config, workdir):
    vm, disk = chain_vm(make_vm, persistent=False)
    dest = f"{workdir}/t.qcow2"
    rc, out, err = relocate(vm, config, "vda", dest, "--mode", "full", "--sync-writes")
    assert rc == 0, err
    assert disk.live_chain() == [dest]
    disk.assert_guest_data()


def test_no_pivot_leaves_a_consistent_copy(make_vm, config, workdir):
    vm, disk = chain_vm(make_vm)
    before = list(reversed(disk.layers))
    dest = f"{workdir}/copy.qcow2"
    rc, out, err = relocate(vm, config, "vda", dest, "--mode", "full", "--no-pivot")
    assert rc == 0, err
    assert disk.live_chain() == before and out["chain_after"] == before
    disk.assert_guest_data()            # the VM, still on the source
    disk.assert_guest_data(active=dest)  # the copy holds the same data


def test_delete_source(make_vm, config, workdir):
    vm, disk = chain_vm(make_vm)
    os.makedirs(f"{workdir}/new", mode=0o755)
    dest = f"{workdir}/new/vda-D.qcow2"
    rc, out, err = relocate(vm, config, "vda", dest, "--delete-source")
    assert rc == 0, err
    assert sorted(out["deleted"]) == sorted(disk.layers)
    assert not any(os.path.exists(p) for p in disk.layers)
    disk.assert_guest_data()
    vm.restart()
    disk.assert_guest_data()


def test_merge_after_chain_relocation(make_vm, config, workdir):
    vm, disk = chain_vm(make_vm)
    os.makedirs(f"{workdir}/moved", mode=0o755)
    dest = f"{workdir}/moved/vda-D.qcow2"
    assert relocate(vm, config, "vda", dest)[0] == 0
    new_a = f"{workdir}/moved/vda-A.raw"
    rc, out, err = rig.cli("merge", vm.name, "vda", "--base", new_a, config=config)
    assert rc == 0, err
    assert out["chain_after"][-1] == new_a and len(out["chain_after"]) == 2
    disk.assert_guest_data()


def test_destination_fills_up(make_vm, config, workdir):
    """Out of space mid-copy: job ends, VM stays on source, partial files go."""
    small = f"{workdir}/small"
    os.makedirs(small, mode=0o755)
    # Mounted before the VM starts: QEMU lives in its own mount namespace,
    # and on a host whose mounts are private (containers) a later mount
    # never shows up there ("No such file or directory" from blockdev-add).
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", small], check=True)
    vm = make_vm()
    disk = vm.add_chain("vda", [LayerSpec("A", [Write(0xA1, 0, 12)])])
    vm.start()
    try:
        dest = f"{small}/full.qcow2"
        proc = rig.cli_background("relocate", vm.name, "vda", dest, "--mode", "full",
                                  "--bandwidth", "4", config=config)
        wait_for_job(vm)
        disk.guest_write(0x5A, 20, 10)   # now 22 MiB of data: cannot fit
        rc, out, err = finish(proc)
        assert rc == 1 and out["error"]["code"] in ("job-failed", "operation-failed"), out
        assert disk.live_chain() == disk.layers[::-1]
        assert not os.path.exists(dest)
        disk.assert_guest_data()
        rc, out, _ = rig.cli("verify", vm.name, config=config)
        assert rc == 0, out
    finally:
        subprocess.run(["umount", "-l", small])


def test_refusals_change_nothing(make_vm, config, workdir):
    vm, disk = chain_vm(make_vm)
    A, B, C, D = disk.layers
    existing = f"{workdir}/exists.qcow2"
    open(existing, "w").close()
    roots_config = f"{workdir}/roots.yaml"
    with open(roots_config, "w") as handle:
        handle.write(open(config).read() + "storage_roots: [/srv/allowed]\n")
    cases = [
        ([existing], "bad-request", "exists"),
        ([C], "bad-request", "source chain"),
        ([f"{workdir}/missing/x.qcow2"], "bad-request", "does not exist"),
        ([f"{workdir}/x.raw", "--format", "raw"], "bad-request", "mode full"),
        ([f"{workdir}/x.qcow2", "--method", "snapshot-stream"], "bad-request", "mode full"),
        ([f"{workdir}/x.qcow2", "--mode", "sideways"], "bad-request", "invalid choice"),
        (["relative.qcow2"], "bad-request", "absolute"),
        ([f"{workdir}/x.qcow2", "--reuse-external"], "bad-request", "does not exist"),
    ]
    for args, code, words in cases:
        rc, out, _ = relocate(vm, config, "vda", *args)
        assert (rc, out["error"]["code"]) == (2, code), (args, out)
        assert words in out["error"]["message"], (args, out)
    rc, out, _ = rig.cli("relocate", vm.name, "vda", f"{workdir}/y.qcow2", config=roots_config)
    assert rc == 2 and "storage roots" in out["error"]["message"]
    # A directory DEST (chain mode onto block volumes) gets the same checks,
    # before any volume is created.
    dir_config = f"{workdir}/dir.yaml"
    with open(dir_config, "w") as handle:
        handle.write(open(roots_config).read()
                     + f'volume_create_command: [/usr/bin/touch, "{workdir}/ran-{{name}}-{{size_bytes}}"]\n'
                     + 'volume_remove_command: [/usr/bin/true, "{path}"]\n')
    os.makedirs(f"{workdir}/vg")
    rc, out, _ = rig.cli("relocate", vm.name, "vda", f"{workdir}/vg", "--mode", "chain",
                         config=dir_config)
    assert rc == 2 and "storage roots" in out["error"]["message"], out
    assert not [n for n in os.listdir(workdir) if n.startswith("ran-")]
    rc, out, _ = rig.cli("relocate", vm.name, "vda", f"{workdir}/vg", "--mode", "chain",
                         config=config)
    assert rc == 2 and f"{workdir}/vg/{os.path.basename(D)}" in out["error"]["message"], out
    small = f"{workdir}/tiny"
    os.makedirs(small, mode=0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small], check=True)
    try:
        rc, out, _ = relocate(vm, config, "vda", f"{small}/z.qcow2", "--mode", "full")
        assert rc == 2 and "not enough space" in out["error"]["message"]
    finally:
        subprocess.run(["umount", "-l", small])
    assert disk.live_chain() == [D, C, B, A]
    assert not os.path.exists(f"{workdir}/x.qcow2") and not os.path.exists(f"{workdir}/y.qcow2")
    disk.assert_guest_data()


def test_all_disks_into_a_folder(make_vm, config, workdir):
    vm = make_vm()
    vda = vm.add_chain("vda", rig.four_layers())
    vdb = vm.add_chain("vdb", [LayerSpec("A", [Write(0x31, 0, 3)]), LayerSpec("B", [Write(0x32, 1, 1)])])
    vm.start()
    target = f"{workdir}/everything"
    os.makedirs(target, mode=0o755)
    rc, out, err = relocate(vm, config, "all", target)
    assert rc == 0, err
    assert all(p.startswith(target + "/") for p in vda.live_chain() + vdb.live_chain())
    assert len(vda.live_chain()) == 4 and len(vdb.live_chain()) == 2
    vda.assert_guest_data()
    vdb.assert_guest_data()


def test_snapshot_verb(vm4, config, workdir):
    disk = vm4.disks["vda"]
    overlay = f"{workdir}/E.qcow2"
    rc, out, err = rig.cli("snapshot", vm4.name, "vda", overlay, config=config)
    assert rc == 0, err
    assert disk.live_chain() == [overlay] + disk.layers[::-1]
    disk.guest_write(0x42, 5, 1)
    disk.assert_guest_data()
    rc, out, _ = rig.cli("snapshot", vm4.name, "vda", overlay, config=config)
    assert rc == 2 and "source chain" in out["error"]["message"]
    other = f"{workdir}/F.qcow2"
    open(other, "w").close()
    rc, out, _ = rig.cli("snapshot", vm4.name, "vda", other, config=config)
    assert rc == 2 and "exists" in out["error"]["message"]
    vm4.restart()
    disk.assert_guest_data()
