"""Fixtures for the tests that count: a real libvirtd and real QEMU.

These never skip. Without a reachable libvirtd they fail, with a message
that says how to start one (``.ci/run`` does it on a fresh machine).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import libvirt
import nodes
import pytest
import rig


@pytest.fixture(scope="session")
def conn():
    try:
        import libvirt
    except ImportError as exc:  # pragma: no cover - CI installs it
        pytest.fail(f"libvirt-python is not installed: {exc}", pytrace=False)
    try:
        connection = rig.Libvirt(rig.TEST_URI)
    except libvirt.libvirtError as exc:
        pytest.fail(
            f"cannot reach libvirtd at {rig.TEST_URI}: {exc}. Start it "
            "(virtlogd -d; libvirtd -d) or run bash .ci/run.", pytrace=False)
    rig.cleanup_stale(connection)
    # A hook left installed by a crashed run would guard with a dead config.
    stale_hook = "/etc/libvirt/hooks/qemu.d/vdsm-blockops"
    if os.path.exists(stale_hook):
        os.unlink(stale_hook)
    yield connection
    rig.cleanup_stale(connection)
    connection.close()


@pytest.fixture(scope="session")
def test_root():
    os.makedirs(rig.TEST_ROOT, mode=0o755, exist_ok=True)
    os.chmod(rig.TEST_ROOT, 0o755)
    path = tempfile.mkdtemp(prefix="run-", dir=rig.TEST_ROOT)
    os.chmod(path, 0o755)  # QEMU runs as libvirt-qemu and must reach the images
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir(test_root, request):
    name = f"{request.module.__name__}-{request.node.name}"[:80]
    path = os.path.join(test_root, name.replace("/", "_").replace("[", "-").replace("]", ""))
    os.makedirs(path, mode=0o755)
    return path


@pytest.fixture
def config(workdir):
    """A config file whose state directory is private to the test."""
    state = os.path.join(workdir, "state")
    path = os.path.join(workdir, "config.yaml")
    with open(path, "w") as handle:
        handle.write(f"state_dir: {state}\nconnect: {rig.TEST_URI}\n")
    return path


@pytest.fixture
def make_vm(conn, workdir):
    vms: list[rig.VM] = []

    def factory(name: str | None = None) -> rig.VM:
        vm = rig.VM(conn, workdir, name)
        vms.append(vm)
        return vm

    yield factory
    for vm in vms:
        vm.destroy()


@pytest.fixture
def vm4(make_vm):
    """A running persistent VM whose vda is A <- B <- C <- D."""
    vm = make_vm()
    vm.add_chain("vda", rig.four_layers())
    return vm.start()


@pytest.fixture
def installed_hook(config):
    """The hook in libvirt's folder, guarding with the test's state dir."""
    import time

    rc, out, err = rig.cli("hook", "install", "--reload", config=config)
    assert rc == 0, err
    assert out["path"] == "/etc/libvirt/hooks/qemu.d/vdsm-blockops" and out["reloaded"]
    time.sleep(1)  # libvirtd re-scans the hook folder on SIGHUP
    try:
        yield out["path"]
    finally:
        if os.path.exists(out["path"]):
            rig.cli("hook", "uninstall", "--reload", config=config)


@pytest.fixture(scope="module")
def node_b_root(test_root):
    """Node B, started for the module and stopped by pid: its root folder
    (node B sees its ``images`` at ``test_root``)."""
    nodes.stop()  # a node B a killed run left
    root = os.path.join(os.path.dirname(test_root), "node-b-" + os.path.basename(test_root))
    nodes.start(root, test_root).close()
    try:
        yield root
    finally:
        try:
            conn = libvirt.open(nodes.URI)  # it may have been restarted
            for dom in conn.listAllDomains():
                rig.remove_domain(dom)
            conn.close()
        except libvirt.libvirtError:
            pass
        nodes.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def node_b(node_b_root):
    """(a connection to node B, its root folder): a connection per test,
    since a test may kill and restart node B's libvirtd."""
    conn = libvirt.open(nodes.URI)
    yield conn, node_b_root
    try:
        conn.close()
    except libvirt.libvirtError:
        pass


@pytest.fixture(scope="module")
def node_c_root(test_root):
    """Node C, a third node, as node B (its own port, host name node-c)."""
    nodes.stop(port=nodes.C_PORT)
    root = os.path.join(os.path.dirname(test_root), "node-c-" + os.path.basename(test_root))
    nodes.start(root, test_root, nodes.C_PORT, "node-c").close()
    try:
        yield root
    finally:
        try:
            conn = libvirt.open(nodes.C_URI)
            for dom in conn.listAllDomains():
                rig.remove_domain(dom)
            conn.close()
        except libvirt.libvirtError:
            pass
        nodes.stop(port=nodes.C_PORT)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def node_c(node_c_root):
    """(a connection to node C, its root folder)."""
    conn = libvirt.open(nodes.C_URI)
    yield conn, node_c_root
    try:
        conn.close()
    except libvirt.libvirtError:
        pass
