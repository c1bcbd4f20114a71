"""chain and jobs against a real libvirtd."""

import subprocess

import rig


def test_chain_shows_live_chain_with_metadata(vm4, config):
    rc, out, _ = rig.cli("chain", vm4.name, config=config)
    assert rc == 0 and out["ok"] and out["operation"] == "chain"
    (vda,) = out["disks"]
    assert [l["path"] for l in vda["chain"]] == list(reversed(vm4.disks["vda"].layers))
    assert vda["metadata_agrees"] and vda["problems"] == []
    assert all(l["format"] == "qcow2" and isinstance(l["index"], int) for l in vda["chain"])
    assert vda["chain"][-1]["allocation"] > 4 * rig.MIB  # A holds 6 MiB of data
    vm4.disks["vda"].assert_guest_data()


def test_chain_text_output_is_readable(vm4, config):
    proc = subprocess.run(
        [rig.sys.executable, "-m", "vdsm_blockops", "chain", vm4.name, "--config", config],
        capture_output=True, text=True)
    assert proc.returncode == 0
    assert "vda (disk): 4 layer(s), metadata agrees" in proc.stdout
    assert "(active)" in proc.stdout


def test_unknown_domain_and_disk_exit_2(vm4, config):
    rc, out, _ = rig.cli("chain", "no-such-vm-here", config=config)
    assert rc == 2 and out == {"ok": False, "error": {
        "code": "unknown-domain", "message": out["error"]["message"]}}
    rc, out, _ = rig.cli("chain", vm4.name, "vdz", config=config)
    assert rc == 2 and out["error"]["code"] == "unknown-disk"
    assert "vdz" in out["error"]["message"]
    proc = subprocess.run([rig.sys.executable, "-m", "vdsm_blockops", "chain", vm4.name, "vdz",
                           "--config", config], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_jobs_lists_a_pull_started_with_virsh(vm4, config):
    disk = vm4.disks["vda"]
    subprocess.run(["virsh", "-c", rig.TEST_URI, "blockpull", vm4.name, "vda",
                    "--bandwidth", "1"], check=True, capture_output=True)
    try:
        rc, out, _ = rig.cli("jobs", config=config)
        assert rc == 0
        mine = [j for j in out["jobs"] if j["domain"] == vm4.name]
        assert len(mine) == 1
        job = mine[0]
        assert job["disk"] == "vda" and job["type"] == "pull"
        assert job["bandwidth_mib_s"] == 1 and job["ready"] is False
        assert job["percent"] is None or 0 <= job["percent"] <= 100
        rc, out, _ = rig.cli("jobs", vm4.name, config=config)
        assert [j["disk"] for j in out["jobs"]] == ["vda"]
    finally:
        subprocess.run(["virsh", "-c", rig.TEST_URI, "blockjob", vm4.name, "vda", "--abort"],
                       capture_output=True)
    disk.assert_guest_data()
