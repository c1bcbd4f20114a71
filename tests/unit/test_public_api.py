"""The public API is the only door: the shells (CLI, hook, Ansible
collection) import nothing else of the package, every public name
resolves and is documented, results are frozen, errors say exit codes."""

import ast
import dataclasses
import glob
import os
import re

import pytest

import vdsm_blockops
from vdsm_blockops import api

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.dirname(vdsm_blockops.__file__)
PUBLIC = {"vdsm_blockops", "vdsm_blockops.api"}


COLLECTION = os.path.join(ROOT, "ansible", "ansible_collections", "vdsm", "blockops", "plugins")


def shell_files():
    """The CLI's modules, and the collection's plugins where the tests run
    in the checkout (the packaging test runs a copy of them against the
    installed wheel, which has no collection)."""
    shells = sorted(glob.glob(os.path.join(PACKAGE, "shells", "*.py")))
    assert len(shells) >= 9
    plugins = sorted(glob.glob(os.path.join(COLLECTION, "**", "*.py"), recursive=True))
    assert plugins or not os.path.isdir(os.path.join(ROOT, "ansible"))
    return shells + plugins


def private_imports(path, source=None):
    """The modules of the package ``path`` imports that are not public
    (a shell's own modules, ``vdsm_blockops.shells.*``, count as its own)."""
    tree = ast.parse(source if source is not None else open(path, encoding="utf-8").read())
    in_shells = os.path.dirname(path) == os.path.join(PACKAGE, "shells")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if not in_shells:
                    continue
                if node.level == 1:  # another shell module
                    continue
                module = ".".join(["vdsm_blockops", *filter(None, [node.module])])
            else:
                module = node.module or ""
            names = [module] if node.module or node.level > 1 else []
            if module == "vdsm_blockops":  # from vdsm_blockops import api / __version__
                names = [f"vdsm_blockops.{a.name}" if a.name != "__version__" else module
                         for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [n for n in names if n.split(".")[0] == "vdsm_blockops"
                  and n not in PUBLIC and not n.startswith("vdsm_blockops.shells.")]
    return found


def test_the_shells_import_only_the_public_api():
    files = shell_files()
    found = {os.path.relpath(f, ROOT): private_imports(f) for f in files}
    assert {f: names for f, names in found.items() if names} == {}


@pytest.mark.parametrize("source", [
    "from ..core.errors import BadRequest\n",
    "from vdsm_blockops.ops.merge import merge\n",
    "import vdsm_blockops.engine.state\n",
    "from vdsm_blockops import core\n",
    "def f():\n    from ..engine import history\n",
])
def test_the_check_sees_a_private_import(source):
    path = os.path.join(PACKAGE, "shells", "cli.py")
    assert private_imports(path, source) != []


@pytest.mark.parametrize("source", [
    "from ..api import Node\n", "from .. import api\n", "from .. import __version__\n",
    "from .progress import make_progress\n", "from vdsm_blockops.api import Node\n",
])
def test_the_check_lets_public_imports_pass(source):
    assert private_imports(os.path.join(PACKAGE, "shells", "cli.py"), source) == []


def test_every_public_name_resolves_and_says_what_it_is():
    assert len(set(api.__all__)) == len(api.__all__)
    for name in api.__all__:
        value = getattr(api, name)
        if name in ("__version__", "Progress"):
            continue
        doc = (value.__doc__ or "").strip()
        assert doc and not doc.startswith(f"{name}("), f"{name} has no docstring"
    assert sorted(dir(api)) == sorted(api.__all__)
    with pytest.raises(AttributeError):
        api.Context  # noqa: B018 (private: not reachable through the API)


def test_a_result_handed_out_is_frozen():
    report = api.SpeedReport(domain="vm", disk="vda", bandwidth_mib_s=5)
    report.bandwidth_mib_s = 6  # inside the package a report is built up
    multi = api.MultiReport(operation="merge", domain="vm", results=[report]).freeze()
    with pytest.raises(dataclasses.FrozenInstanceError):
        multi.domain = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.bandwidth_mib_s = 7  # frozen with the report that holds it
    assert multi.to_json()["results"][0]["bandwidth_mib_s"] == 6


def test_the_error_classes_say_the_exit_codes():
    assert api.BadRequest("x").exit_code == 2
    assert api.UnknownDomain("x").exit_code == 2
    assert api.JobTimeout("x").exit_code == 3
    assert api.Conflict("x").exit_code == 4
    for failed in (api.OperationFailed, api.Interrupted, api.VerificationFailed,
                   api.ConnectionLost, api.BlockOpsError):
        assert failed("x").exit_code == 1
    error = api.JobFailed("boom", record="r1", settled="rolled-back", domain="vm", disk="vda")
    copy = error.with_message("boom, again")
    assert (copy.record, copy.settled, copy.domain, copy.disk) == ("r1", "rolled-back", "vm",
                                                                    "vda")
    assert copy.to_json()["details"] == {"record": "r1", "settled": "rolled-back"}


def test_a_bad_request_through_the_api_changes_nothing_and_names_its_fields(tmp_path):
    config = tmp_path / "c.conf"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    node = api.Node("qemu+ssh://elsewhere.invalid/system", config=str(config))
    with pytest.raises(api.BadRequest) as caught:
        node.merge("vm1", "vda", base="vda[1]")
    assert (caught.value.domain, caught.value.disk) == ("vm1", "vda")
    assert "another host" in str(caught.value)
    assert not node.connected  # refused before libvirt was asked anything
    (line,) = node.history().entries  # the refusal is in the node's history, by its source
    assert (line["operation"], line["outcome"], line["source"]) == ("merge", "bad-request", "api")


def test_importing_the_api_loads_no_operation_until_used():
    import json
    import subprocess
    import sys

    code = ("import json, sys; from vdsm_blockops.api import Strategy, BadRequest; "
            "print(json.dumps([sorted(m for m in sys.modules if m.startswith('vdsm_blockops.')), "
            "'dataclasses' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    modules, dataclasses_loaded = json.loads(out)
    assert set(modules) == {"vdsm_blockops.api", "vdsm_blockops.core", "vdsm_blockops.core.errors",
                            "vdsm_blockops.core.choices"}
    assert not dataclasses_loaded  # what the CLI's --help needs: the choices, enums only


def test_the_reference_lists_every_public_name():
    if not os.path.exists(os.path.join(ROOT, "setup.py")):
        return  # the packaging test's copy of the unit tests: no docs beside it
    reference = open(os.path.join(ROOT, "docs", "api.rst"), encoding="utf-8").read()
    listed = set(re.findall(r"vdsm_blockops\.api\.(\w+)", reference))
    listed |= {name.strip() for block in re.findall(r":members: ([\w,\s]+?)\n\s*:", reference)
               for name in block.split(",")}
    assert set(api.__all__) - {"__version__"} - listed == set()


def test_a_renamed_argument_keeps_working_with_a_deprecation_warning():
    from vdsm_blockops.api._calls import renamed

    @renamed(bandwidth_mib_s="bandwidth")
    def speed(domain, *, bandwidth=0):
        return domain, bandwidth

    with pytest.warns(DeprecationWarning, match="'bandwidth_mib_s' is deprecated, use 'bandwidth'"):
        assert speed("vm", bandwidth_mib_s=5) == ("vm", 5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert speed("vm", bandwidth=6) == ("vm", 6)
    with pytest.raises(TypeError):
        speed("vm", bandwidth=1, bandwidth_mib_s=2)
