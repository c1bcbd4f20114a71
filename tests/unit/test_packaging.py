"""What a user installs: the wheel works on its own (hook and units verbs),
the sdist carries tests, docs, hooks, the collection and the license."""

import glob
import os
import subprocess
import sys
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_wheel_gives_working_hook_and_units_verbs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), ROOT], check=True, capture_output=True)
    wheel, = glob.glob(str(tmp_path / "dist" / "vdsm_blockops-*.whl"))
    site = tmp_path / "site"  # pip install of the wheel alone (its dependencies come from .venv)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(site), wheel], check=True, capture_output=True)
    assert any(name.endswith("LICENSE") for name in zipfile.ZipFile(wheel).namelist())
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import vdsm_blockops; "
            "assert vdsm_blockops.__file__.startswith(sys.argv[1]), vdsm_blockops.__file__; "
            "from vdsm_blockops.shells.cli import main; sys.exit(main(sys.argv[2:]))")
    for verb in (["hook", "install", "--hooks-dir", str(tmp_path / "hooks")],
                 ["units", "install", "--unit-dir", str(tmp_path / "units")]):
        proc = subprocess.run([sys.executable, "-c", code, str(site), *verb, "--json"],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.access(tmp_path / "hooks" / "vdsm-blockops", os.X_OK)
    assert len(os.listdir(tmp_path / "units")) == 3


def test_sdist_carries_everything(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True)
    sdist, = glob.glob(str(tmp_path / "vdsm-blockops-*.tar.gz")) or \
        glob.glob(str(tmp_path / "vdsm_blockops-*.tar.gz"))
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    for wanted in ("LICENSE", "CHANGELOG.rst", "tests/rig.py", "tests/unit/test_packaging.py",
                   "hooks/vdsm-blockops-guard", "docs/libvirt-notes.rst", "scripts/test.sh",
                   "ansible/ansible_collections/vdsm/blockops/galaxy.yml",
                   "ansible/ansible_collections/vdsm/blockops/plugins/modules/blockops_merge.py"):
        assert wanted in names, wanted
