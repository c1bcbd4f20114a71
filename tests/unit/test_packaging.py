"""What a user installs: the wheel works on its own (hook and units verbs)
and on the oldest Python supported (its manual page found by man, its
unit tests passing); the shipped manual, completions and hook are the ones
the code makes; the sdist carries every file the demo and the tests use."""

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from vdsm_blockops.engine.hookctl import shipped_hook
from vdsm_blockops.shells.manual import SHIPPED, readme_with_verbs
from vdsm_blockops.shells.parser import shipped_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OLDEST = "3.9"  # python_requires in setup.py


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    dist = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=ROOT,
                   check=True, capture_output=True)
    found, = glob.glob(str(dist / "vdsm-blockops-*.tar.gz")) or \
        glob.glob(str(dist / "vdsm_blockops-*.tar.gz"))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, sdist):
    """Built from the sdist, as a user's pip would (a build/ folder left in
    the source tree by an earlier layout once put stale modules in it)."""
    dist = tmp_path_factory.mktemp("dist")
    with tarfile.open(sdist) as tar:
        tar.extractall(dist)
    source, = glob.glob(str(dist / "vdsm*-*"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), source], check=True, capture_output=True)
    found, = glob.glob(str(dist / "vdsm_blockops-*.whl"))
    return found


def test_wheel_gives_working_hook_and_units_verbs(tmp_path, wheel):
    site = tmp_path / "site"  # pip install of the wheel alone (its dependencies come from .venv)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(site), wheel], check=True, capture_output=True)
    names = zipfile.ZipFile(wheel).namelist()
    assert any(name.endswith("LICENSE") for name in names)
    for path in SHIPPED:  # data files: man page and completions
        assert any(name.endswith(".data/data/" + path) for name in names), path
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


def test_shipped_manual_completions_and_hook_are_current():
    """One source of truth: the files in the repository are what the code
    makes (run scripts/make-docs.sh after changing a verb or the hook)."""
    stale = [path for path, kind in SHIPPED.items()
             if open(os.path.join(ROOT, path), encoding="utf-8").read()
             != shipped_text(kind)]
    hook = os.path.join(ROOT, "hooks", "vdsm-blockops-guard")
    if open(hook, encoding="utf-8").read() != shipped_hook():
        stale.append("hooks/vdsm-blockops-guard")
    readme = open(os.path.join(ROOT, "README.rst"), encoding="utf-8").read()
    if readme_with_verbs(readme) != readme:
        stale.append("README.rst (its verbs section)")
    assert stale == [], "stale: run scripts/make-docs.sh"
    assert os.access(hook, os.X_OK)


def test_the_manual_page_can_be_indexed_and_has_every_section(tmp_path):
    page = tmp_path / "vdsm-blockops.1"
    page.write_text(shipped_text("manpage"))
    proc = subprocess.run(["lexgrog", str(page)], capture_output=True, text=True)
    assert proc.returncode == 0 and "vdsm-blockops - live block operations" in proc.stdout, proc
    text = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                          env={**os.environ, "MANPAGER": "cat", "COLUMNS": "100"}).stdout
    for heading in ("NAME", "SYNOPSIS", "VERBS", "EXAMPLES", "EXIT STATUS", "ENVIRONMENT",
                    "FILES", "SEE ALSO"):
        assert f"\n{heading}\n" in text, heading
    # what a verb means, not only its options: the README's own words
    assert "names the image that stays, as the backing file" in " ".join(text.split())
    assert "vdsm-blockops merge web01 vda --base" in text.split("\nEXAMPLES\n")[1]
    for verb in ("merge", "relocate", "jobs", "abort", "recover", "verify", "hook"):
        assert f"COMMAND 'vdsm-blockops {verb}'" in text, verb


def _tree(*folders):
    for folder in folders:
        for top, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
            for name in files:
                if not name.endswith((".pyc", ".pyo")):
                    yield os.path.relpath(os.path.join(top, name), ROOT)


def test_sdist_carries_everything(sdist):
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    # every file the demo, the tests, the docs and the hook need
    wanted = set(_tree("tests", "scripts", "docs", "hooks", "share", "bench", ".ci"))
    wanted |= {"LICENSE", "CHANGELOG.rst", "README.rst", "pytest.ini", "ruff.toml", "setup.cfg",
               "ansible/ansible_collections/vdsm/blockops/galaxy.yml",
               "ansible/ansible_collections/vdsm/blockops/plugins/modules/blockops_merge.py"}
    assert {"scripts/demo.py", "tests/data/reports.json", "tests/volume-tool"} <= wanted
    assert sorted(wanted - names) == []


def _oldest_python():
    """pyenv's build of the oldest version (its shim on PATH may not be
    active), else one on PATH."""
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(os.path.join(pyenv, "versions", f"{OLDEST}.*", "bin", "python")))
    found = candidates[-1] if candidates else shutil.which(f"python{OLDEST}")
    assert found, (f"no Python {OLDEST} on this machine (pyenv or PATH): the oldest "
                   "supported interpreter must be tested")
    return found


def test_the_wheel_installs_and_runs_on_the_oldest_python(tmp_path, wheel):
    venv = tmp_path / "oldest"
    subprocess.run([_oldest_python(), "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", wheel, "pytest", "mock"],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    version = subprocess.run([str(venv / "bin" / "vdsm-blockops"), "--version"],
                             capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("vdsm-blockops "), version
    # man finds the page beside the venv's bin folder on PATH
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "MANPAGER": "cat"}
    env.pop("MANPATH", None)
    where = subprocess.run(["man", "-w", "vdsm-blockops"], capture_output=True, text=True, env=env)
    assert where.stdout.strip() == str(venv / "share/man/man1/vdsm-blockops.1"), where
    page = subprocess.run(["man", "-l", where.stdout.strip()], capture_output=True, text=True,
                          env=env)
    assert page.returncode == 0 and "EXIT STATUS" in page.stdout
    assert (venv / "share/bash-completion/completions/vdsm-blockops").exists()
    # the unit tests, against the installed package (a copy of the tests,
    # away from the source tree)
    tests = tmp_path / "tests"
    shutil.copytree(os.path.join(ROOT, "tests", "unit"), tests / "unit",
                    # the collection's roles and Ansible are not the package's
                    ignore=shutil.ignore_patterns("__pycache__", "test_packaging.py",
                                                  "test_role_outcomes.py"))
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tests)
    shutil.copytree(os.path.join(ROOT, "tests", "data"), tests / "data")
    run = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p",
                          "no:cacheprovider", str(tests / "unit")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_one_version_across_package_collection_and_changelogs():
    import re

    import vdsm_blockops

    version = vdsm_blockops.__version__
    galaxy = open(os.path.join(ROOT, "ansible/ansible_collections/vdsm/blockops/galaxy.yml")).read()
    assert re.search(r"^version: (\S+)$", galaxy, re.M).group(1) == version
    changelog = open(os.path.join(ROOT, "CHANGELOG.rst")).read()
    assert re.search(r"^(\d+\.\d+\.\d+) \(", changelog, re.M).group(1) == version
    setup = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True,
                           text=True)
    assert setup.stdout.strip().splitlines()[-1] == version
