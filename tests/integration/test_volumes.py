"""Block volumes: qcow2 written straight onto devices (LVs on an oVirt block
domain; loop devices over sparse files stand in here, grown by
tests/volume-tool as lvextend would). Guest data compared after every job."""

import os
import time

import libvirt
import pytest
import rig
from rig import LayerSpec, Write
from test_merge import finish, wait_for_job
from test_relocate import chain_vm

VOLUME_TOOL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "volume-tool")
MIB = rig.MIB


def with_volume_keys(config, extend=True, margin_mib=4, limit_mib=None):
    """``limit_mib``: extensions past it fail, as on a full volume group."""
    with open(config, "a") as handle:
        handle.write(f"volume_margin_mib: {margin_mib}\n")
        verb = f"extend-upto, {limit_mib * MIB}" if limit_mib else "extend"
        if extend:
            handle.write(f'volume_extend_command: [{VOLUME_TOOL}, {verb}, "{{path}}", '
                         '"{size_bytes}"]\n')
    return config


@pytest.fixture
def volumes(workdir):
    made = []

    def volume(name, size_mib):
        dev = rig.loop_device(workdir, name, size_mib)
        made.append(dev)
        return dev

    yield volume
    for dev in made:
        rig.remove_loop_device(dev)


def device_size(dev):
    with open(dev, "rb") as handle:
        return handle.seek(0, os.SEEK_END)


@pytest.fixture
def base_on_volume(make_vm, volumes):
    """A (raw file) <- B (qcow2 on an 8 MiB volume) <- C (16 MiB of data) <- D."""
    vm = make_vm()
    B = volumes("B", 8)
    disk = vm.add_layers("vda", [
        (f"{vm.dir}/A.raw", None, LayerSpec("A", [Write(0xA1, 0, 8)], fmt="raw")),
        (B, f"{vm.dir}/A.raw", LayerSpec("B", [Write(0xB1, 4, 1)])),
        (f"{vm.dir}/C.qcow2", B, LayerSpec("C", [Write(0xC1, 10, 16)])),
        (f"{vm.dir}/D.qcow2", f"{vm.dir}/C.qcow2", LayerSpec("D", [Write(0xD1, 30, 1)]))])
    vm.start()
    return vm, disk


def volume_of(vm, config, path):
    rc, out, _ = rig.cli("chain", vm.name, "vda", config=config)
    assert rc == 0, out
    (layer,) = [layer for layer in out["disks"][0]["chain"] if layer["path"] == path]
    return layer.get("volume")


@pytest.mark.parametrize("running", [True, False], ids=["live", "cold"])
def test_commit_into_a_small_volume_extends_it_first(base_on_volume, config, running):
    vm, disk = base_on_volume
    A, B, C, D = disk.layers
    before = volume_of(vm, config, B)
    assert before["size"] == 8 * MIB and 1 * MIB < before["end"] < 2 * MIB
    assert before["free"] == before["size"] - before["end"] and volume_of(vm, config, C) is None
    if not running:
        vm.dom.destroy()
    rc, out, err = rig.cli("merge", vm.name, "vda", "--top", C, "--base", A, "--strategy", "commit",
                           config=with_volume_keys(config))
    assert rc == 0 and out["online"] is running, (out, err)
    volume = out["volume"]
    assert volume["path"] == B and volume["size"] == 8 * MIB
    assert volume["needed"] >= volume["end"] + 16 * MIB + 4 * MIB
    assert volume["extended_to"] == volume["needed"] == device_size(B)
    after = volume_of(vm, config, B)
    assert after["size"] == device_size(B) and after["end"] >= before["end"] + 16 * MIB
    assert disk.chain() == [D, B, A]
    disk.assert_guest_data()
    rc, out, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, out
    if running:
        vm.restart()
    else:
        vm.dom.create()
    disk.assert_guest_data()


def test_commit_into_a_small_volume_without_an_extend_command_is_refused(base_on_volume, config):
    vm, disk = base_on_volume
    A, B, C, D = disk.layers
    rc, out, err = rig.cli("merge", vm.name, "vda", "--top", C, "--base", A, "--strategy", "commit",
                           config=with_volume_keys(config, extend=False))
    assert rc == 2, (out, err)
    message = out["error"]["message"]
    assert B in message and f"{8 * MIB} bytes" in message and "volume_extend_command" in message
    assert device_size(B) == 8 * MIB and disk.live_chain() == [D, C, B, A]
    disk.assert_guest_data()
    # the planner counts what B holds (its qcow2's end), not the volume's size
    rc, out, _ = rig.cli("merge", vm.name, "vda", "--base", A, "--strategy", "pull", "--dry-run",
                         config=config)
    assert rc == 0 and 17 * MIB < out["bytes_to_copy"] < 19 * MIB, out


def assert_never_paused(vm, err):
    state, reason = vm.dom.state()
    assert state == libvirt.VIR_DOMAIN_RUNNING, (state, reason)
    assert "paused on a write error" not in err


def busy_guest_merge(make_vm, volumes, strategy, config, interrupted=False):
    """A merge into a small volume (8 MiB) with 12 MiB of guest writes
    while it runs -- ``interrupted``: the command killed as the job starts
    and ``recover`` following the job instead; returns (vm, disk, volume,
    the finished process's rc, JSON and stderr)."""
    vm = make_vm()
    target = volumes("T", 8)
    if strategy == "commit":  # active commit of C and D into B, the volume
        layers = [("A.raw", None, "raw", [Write(0xA1, 0, 8)]), (target, "A.raw", "qcow2", []),
                  ("C.qcow2", target, "qcow2", [Write(0xC1, 10, 16)]), ("D.qcow2", "C.qcow2", "qcow2", [])]
    else:  # pull of B into D, the volume
        layers = [("A.raw", None, "raw", [Write(0xA1, 0, 8)]),
                  ("B.qcow2", "A.raw", "qcow2", [Write(0xB1, 10, 16)]), (target, "B.qcow2", "qcow2", [])]

    def where(name):
        return name if name is None or name.startswith("/") else f"{vm.dir}/{name}"

    disk = vm.add_layers("vda", [(where(p), where(b), LayerSpec(p.split(".")[0], w, fmt=f))
                                 for p, b, f, w in layers])
    vm.start()
    proc = rig.cli_background("merge", vm.name, "vda", "--base", disk.layers[0], "--strategy",
                              strategy, "--bandwidth", "4", config=config)
    try:
        wait_for_job(vm)
    except AssertionError:
        raise AssertionError(finish(proc)) from None
    if interrupted:
        proc.kill()
        proc.wait()
        proc = rig.cli_background("recover", vm.name, "--timeout", "120", "-v", config=config)
    for n in range(12):  # a busy guest, not a burst faster than an extension
        disk.guest_write(0x40 + n, 30 + n, 1)
        time.sleep(0.2)
    return vm, disk, target, finish(proc)


@pytest.mark.parametrize("strategy", ["commit", "pull"])
def test_guest_writes_during_the_job_cross_the_threshold(make_vm, config, volumes, strategy):
    """The layer the job writes into is a qcow2 on a small volume: sized
    before the job with a 20 MiB margin (also the threshold's distance from
    the end, and the step of each extension: more than QEMU's mirror writes
    in one burst, 16 MiB by default -- a 4 MiB step lost that race), then
    12 MiB of guest writes while the job runs cross its threshold; the
    volume grows during the job and the VM never pauses."""
    vm, disk, target, (rc, out, err) = busy_guest_merge(
        make_vm, volumes, strategy, with_volume_keys(config, margin_mib=20))
    A = disk.layers[0]
    assert rc == 0, (out, err)
    volume = out["volume"]
    assert volume["path"] == target and volume["extensions_during_job"] >= 1, volume
    assert device_size(target) > volume["extended_to"]
    assert_never_paused(vm, err)
    assert disk.live_chain() == [target, A]
    disk.assert_guest_data()
    rc, out, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, out
    vm.restart()
    disk.assert_guest_data()


def check_then_restart(vm, disk, config, running, pattern):
    """verify clean, the guest's data right after one more write, and again
    once the VM (re)starts from its persistent definition."""
    rc, report, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, report
    if running:
        disk.guest_write(pattern, 33, 1)
        disk.assert_guest_data()
        vm.restart()
    else:
        vm.dom.create()
    disk.assert_guest_data()


# ------------------------------------------------ relocation onto devices
ONTO_DEVICE = {
    # case: (mode, format, device MiB, layers of the source DEST backs onto)
    "full-qcow2": ("full", "qcow2", 16, 0),  # extended: 20 MiB of data
    "full-raw": ("full", "raw", 64, 0),  # the disk's size: no room to find
    "shallow-qcow2": ("shallow", "qcow2", 4, 3),  # extended: 6 MiB in the active layer
}


@pytest.mark.parametrize("running", [True, False], ids=["live", "cold"])
@pytest.mark.parametrize("case", list(ONTO_DEVICE))
def test_relocation_onto_a_device(make_vm, config, volumes, case, running):
    """A pre-created volume as DEST (--reuse-external): the tool extends it
    where the copy needs more, writes the image onto it and copies; the
    persistent definition names the device (type='block')."""
    vm, disk = chain_vm(make_vm)
    mode, fmt, mib, kept = ONTO_DEVICE[case]
    dest = volumes("DST", mib)
    if not running:
        vm.dom.destroy()
    rc, out, err = rig.cli("relocate", vm.name, "vda", dest, "--mode", mode, "--format", fmt,
                           "--reuse-external", config=with_volume_keys(config))
    assert rc == 0, (out, err)
    assert out["volume"]["path"] == dest and out["online"] is running
    if fmt == "qcow2":
        assert out["volume"]["extended_to"] == device_size(dest) > mib * MIB
    else:
        assert "extended_to" not in out["volume"] and device_size(dest) == 64 * MIB
    assert disk.chain() == [dest] + disk.layers[::-1][1:1 + kept]
    assert f"<source dev='{dest}'" in vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    check_then_restart(vm, disk, config, running, 0x5A)


def test_relocation_onto_devices_that_cannot_fit_is_refused(make_vm, config, volumes):
    vm, disk = chain_vm(make_vm)
    small, big = volumes("SMALL", 8), volumes("BIG", 128)
    rc, out, _ = rig.cli("relocate", vm.name, "vda", small, "--mode", "full", "--reuse-external",
                         config=with_volume_keys(config, extend=False))
    assert rc == 2 and f"{small} is a block volume of {8 * MIB} bytes" in out["error"]["message"]
    rc, out, _ = rig.cli("relocate", vm.name, "vda", big, "--mode", "full", "--format", "raw",
                         "--reuse-external", config=with_volume_keys(config))
    assert rc == 2 and "bigger disk" in out["error"]["message"], out
    rc, out, _ = rig.cli("relocate", vm.name, "vda", big, "--mode", "chain", "--reuse-external",
                         config=config)
    assert rc == 2 and "--mode full or --mode shallow" in out["error"]["message"], out
    rc, out, _ = rig.cli("relocate", vm.name, "vda", os.path.dirname(small), "--mode", "chain",
                         config=config)
    assert rc == 2 and "needs volume_create_command" in out["error"]["message"], out
    # another VM's volume (only defined: no QEMU lock guards it) is never written over
    used = volumes("USED", 64)
    other = make_vm()
    other.add_layers("vda", [(used, None, LayerSpec("X", [Write(0x77, 0, 1)]))])
    other.define()
    for verb, args in (("relocate", ("--mode", "full")), ("snapshot", ())):
        rc, out, _ = rig.cli(verb, vm.name, "vda", used, *args, "--reuse-external",
                             config=config)
        assert rc == 2 and f"{used} is an image of domain {other.name}" in out["error"]["message"], out
    other.disks["vda"].assert_guest_data(active=used)
    assert device_size(small) == 8 * MIB and disk.live_chain() == disk.layers[::-1]
    disk.assert_guest_data()


@pytest.mark.parametrize("mode", ["chain", "full", "shallow"])
def test_relocation_from_a_device(make_vm, config, volumes, workdir, mode):
    """The active layer a qcow2 on a device, moved to files in each mode."""
    vm = make_vm()
    D = volumes("D", 16)
    disk = vm.add_layers("vda", [
        (f"{vm.dir}/A.raw", None, LayerSpec("A", [Write(0xA1, 0, 8)], fmt="raw")),
        (f"{vm.dir}/B.qcow2", f"{vm.dir}/A.raw", LayerSpec("B", [Write(0xB1, 4, 2)])),
        (D, f"{vm.dir}/B.qcow2", LayerSpec("D", [Write(0xD1, 20, 3)]))])
    vm.start()
    os.makedirs(f"{workdir}/dst")
    dest = f"{workdir}/dst/D.qcow2"
    rc, out, err = rig.cli("relocate", vm.name, "vda", dest, "--mode", mode, config=config)
    assert rc == 0, (out, err)
    assert disk.live_chain()[0] == dest and "volume" not in out
    assert f"<source file='{dest}'" in vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    disk.guest_write(0x5B, 40, 1)
    disk.assert_guest_data()
    vm.restart()
    disk.assert_guest_data()


@pytest.mark.parametrize("running", [True, False], ids=["live", "cold"])
def test_snapshot_onto_a_device(make_vm, config, volumes, running):
    """OVERLAY a pre-created volume too small for the margin: extended,
    the overlay written onto it, the VM (restarted) writes into it."""
    vm, disk = chain_vm(make_vm)
    overlay = volumes("E", 2)
    if not running:
        vm.dom.destroy()
    rc, out, err = rig.cli("snapshot", vm.name, "vda", overlay, "--reuse-external",
                           config=with_volume_keys(config))
    assert rc == 0, (out, err)
    assert out["volume"]["extended_to"] == device_size(overlay) >= 4 * MIB
    assert disk.chain() == [overlay] + disk.layers[::-1]
    assert f"<source dev='{overlay}'" in vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    if running:
        vm.restart()
    else:
        vm.dom.create()
    disk.guest_write(0x5C, 44, 1)
    disk.assert_guest_data()
    assert volume_of(vm, config, overlay)["end"] > 1 * MIB
    rc, out, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, out


def with_create_command(config, folder):
    with open(config, "a") as handle:
        handle.write(f'volume_create_command: [{VOLUME_TOOL}, create, {folder}, "{{name}}", '
                     '"{size_bytes}"]\n'
                     f'volume_remove_command: [{VOLUME_TOOL}, remove, "{{path}}"]\n')
    return config


@pytest.mark.parametrize("running", [True, False], ids=["live", "cold"])
def test_chain_mode_onto_block_volumes(make_vm, config, workdir, running):
    """DEST a directory of device nodes: one volume per layer, created by
    the configured command (tests/volume-tool: a loop device linked into
    the directory, as LVM links LVs into /dev/<vg>), each layer written by
    qemu-img and proven, relinked by device paths."""
    vm, disk = chain_vm(make_vm)
    vg = f"{workdir}/vg"
    os.makedirs(vg)
    config = with_create_command(with_volume_keys(config), vg)
    if not running:
        vm.dom.destroy()
    try:
        rc, out, err = rig.cli("relocate", vm.name, "vda", vg, "--mode", "chain", config=config)
        assert rc == 0, (out, err)
        new = [f"{vg}/{os.path.basename(p)}" for p in disk.layers[::-1]]
        assert out["chain_after"] == new and disk.chain() == new
        assert all(rig.is_device(p) for p in new)
        assert f"<source dev='{new[0]}'" in vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        check_then_restart(vm, disk, config, running, 0x5D)
        rc, out, _ = rig.cli("relocate", vm.name, "vda", vg, "--mode", "chain", config=config)
        assert rc == 2 and "exist" in out["error"]["message"], out
    finally:
        vm.destroy()
        for name in os.listdir(vg):
            if not name.startswith("."):
                rig.remove_loop_device(os.path.realpath(f"{vg}/{name}"))


def test_an_extension_that_fails_during_the_job_aborts_it(make_vm, config, volumes):
    """The volume group fills up: the extension at the threshold fails, the
    job is aborted (exit 1) and the chain and the guest's data are as
    before the merge, verify clean."""
    vm, disk, target, (rc, out, err) = busy_guest_merge(
        make_vm, volumes, "commit", with_volume_keys(config, margin_mib=20, limit_mib=40))
    assert rc == 1 and "Insufficient free space" in out["error"]["message"], (out, err)
    assert "aborted, the chain is as before" in out["error"]["message"]
    assert disk.live_chain() == disk.layers[::-1]
    disk.assert_guest_data()
    rc, report, _ = rig.cli("verify", vm.name, config=config)
    assert rc == 0, report


def test_a_busy_guest_during_a_mirror_onto_a_device(make_vm, config, volumes):
    """Full relocation onto a small volume: sized for the data plus a
    20 MiB margin; 12 MiB of guest writes during the mirror cross the
    threshold set on the copy's target (``vda[N]`` of the <mirror>): the
    volume grows during the job, the VM never pauses."""
    vm, disk = chain_vm(make_vm)
    dest = volumes("DST", 8)
    proc = rig.cli_background("relocate", vm.name, "vda", dest, "--mode", "full", "--method",
                              "mirror", "--reuse-external", "--bandwidth", "4",
                              config=with_volume_keys(config, margin_mib=20))
    wait_for_job(vm)
    for n in range(12):
        disk.guest_write(0x60 + n, 30 + n, 1)
        time.sleep(0.2)
    rc, out, err = finish(proc)
    assert rc == 0, (out, err)
    volume = out["volume"]
    assert volume["extensions_during_job"] >= 1 and device_size(dest) > volume["extended_to"], volume
    assert_never_paused(vm, err)
    assert disk.live_chain() == [dest]
    check_then_restart(vm, disk, config, True, 0x6F)


def test_recover_watches_the_volume_of_an_interrupted_merge(make_vm, config, volumes):
    """The merge command dies as its job starts; recover follows the job
    with the same threshold on the volume: the busy guest's writes get
    room, the job ends, the VM never pauses."""
    vm, disk, target, (rc, out, err) = busy_guest_merge(
        make_vm, volumes, "commit", with_volume_keys(config, margin_mib=20), interrupted=True)
    assert rc == 0 and [r["result"] for r in out["records"]] == ["finished"], (out, err)
    assert "past the threshold" in err and "extending" in err, err
    assert_never_paused(vm, err)
    assert disk.live_chain() == [target, disk.layers[0]]
    check_then_restart(vm, disk, config, True, 0x6E)


def test_volumes_a_timed_out_chain_relocation_created_are_removed(make_vm, config, workdir):
    """Created means removed, volumes too: chain mode onto block volumes
    stopped by its timeout while qemu-img writes the layers: every volume
    it created is removed by volume_remove_command, the chain as before."""
    vm, disk = chain_vm(make_vm)
    vg = f"{workdir}/vg"
    os.makedirs(vg)
    config = with_create_command(with_volume_keys(config), vg)
    try:
        rc, out, err = rig.cli("relocate", vm.name, "vda", vg, "--mode", "chain", "--bandwidth",
                               "1", "--timeout", "2", config=config)
        assert rc == 3 and out["error"]["code"] == "timeout", (out, err)
        assert os.listdir(vg) == [], os.listdir(vg)
        assert disk.live_chain() == disk.layers[::-1]
        rc, out, _ = rig.cli("verify", vm.name, config=config)
        assert rc == 0 and out["ok"], out
        disk.assert_guest_data()
        rc, out, err = rig.cli("relocate", vm.name, "vda", vg, "--mode", "chain", config=config)
        assert rc == 0, (out, err)
        disk.assert_guest_data()
    finally:
        vm.destroy()
        for name in os.listdir(vg):
            if not name.startswith("."):
                rig.remove_loop_device(os.path.realpath(f"{vg}/{name}"))
