"""The pure part of a move to another node: where each layer goes, how
its header names its backing file there, the domain XML pointing there."""

import os
import subprocess

import pytest

from vdsm_blockops.core.errors import BadRequest
from vdsm_blockops.core.headers import parse_qcow2_header
from vdsm_blockops.core.migrate_plan import (
    SourceImage,
    checkpoint_order,
    plan_layout,
    rewrite_sources,
    with_backing_name,
)


def image(path, backing=None, fmt="qcow2"):
    return SourceImage(path=path, format=fmt, size=100, virtual_size=1 << 20, backing_name=backing,
                       backing_format="qcow2" if backing else None)


def test_layers_keep_their_layout_and_absolute_names_are_rewritten():
    chains = {
        "vda": [image("/s/img1/top", "/s/img1/mid"), image("/s/img1/mid", "../tmpl/base"),
                image("/s/tmpl/base")],
        "vdb": [image("/s/img2/top", "../tmpl/base"), image("/s/tmpl/base")],
    }
    disks, layers = plan_layout(chains, "/d/")
    assert [d.chain_after for d in disks] == [["/d/img1/top", "/d/img1/mid", "/d/tmpl/base"],
                                              ["/d/img2/top", "/d/tmpl/base"]]
    by_dest = {m.dest: m for m in layers}
    assert by_dest["/d/tmpl/base"].disks == ["vda", "vdb"]  # the shared template once
    assert [m.dest for m in layers if not m.active] == ["/d/tmpl/base", "/d/img1/mid"]  # bottom first
    assert by_dest["/d/img1/top"].backing_name == "/d/img1/mid" and by_dest["/d/img1/top"].rewrite
    assert by_dest["/d/img1/mid"].backing_name == "../tmpl/base" and not by_dest["/d/img1/mid"].rewrite
    with pytest.raises(BadRequest, match="absolute"):
        plan_layout(chains, "d")


def test_the_rewritten_header_is_the_one_qemu_img_writes(tmp_path):
    base, top = str(tmp_path / "base"), str(tmp_path / "top")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top],
                   check=True)
    with open(top, "rb") as handle:
        head = handle.read(65536)
    new = "/another/node/a/much/longer/folder/name/base.qcow2"
    patched = with_backing_name(head, new)
    header = parse_qcow2_header(lambda size, offset: patched[offset:offset + size])
    assert header is not None and header.backing_name == new and header.backing_format == "qcow2"
    subprocess.run(["qemu-img", "rebase", "-u", "-b", new, "-F", "qcow2", top], check=True)
    with open(top, "rb") as handle:
        assert handle.read(len(patched)).rstrip(b"\0") == patched.rstrip(b"\0")
    with pytest.raises(BadRequest, match="does not fit"):
        with_backing_name(head, "/x" * 40000)


def test_the_domain_xml_points_at_the_destination():
    xml = ("<domain><devices><disk type='file'><source file='/s/a//top'/><backingStore "
           "type='file'><source file='/s/b'/></backingStore></disk><disk type='file'>"
           "<source file='/other'/></disk></devices></domain>")
    out = rewrite_sources(xml, {"/s/a/top": "/d/a/top", "/s/b": "/d/b"})
    assert "file=\"/d/a/top\"" in out and "file=\"/d/b\"" in out and "file=\"/other\"" in out


def test_checkpoints_come_parents_first():
    assert checkpoint_order({"c3": "c2", "c1": None, "c2": "c1"}) == ["c1", "c2", "c3"]
    with pytest.raises(BadRequest):
        checkpoint_order({"a": "b", "b": "a"})
    assert os.path.sep == "/"


def test_a_source_root_lays_every_vm_out_as_the_node_s_folder(tmp_path):
    """--source-root: two VMs on one template, each moved on its own, name
    the template by one destination path (shared there); a layer outside
    the root is refused."""
    vm1 = {"vda": [image("/s/vm1/top", "../tmpl/base"), image("/s/tmpl/base")]}
    vm2 = {"vda": [image("/s/vm2/disk/top", "/s/tmpl/base"), image("/s/tmpl/base")]}
    (d1,), _ = plan_layout(vm1, "/d", "/s")
    (d2,), layers2 = plan_layout(vm2, "/d", "/s")
    assert d1.chain_after == ["/d/vm1/top", "/d/tmpl/base"]
    assert d2.chain_after == ["/d/vm2/disk/top", "/d/tmpl/base"]
    assert plan_layout(vm1, "/d")[0][0].chain_after == ["/d/vm1/top", "/d/tmpl/base"]
    assert plan_layout({"vda": [image("/s/vm1/a", "/s/vm1/b"), image("/s/vm1/b")]}, "/d")[0][0] \
        .chain_after == ["/d/a", "/d/b"]  # without a root: the folder the layers share
    with pytest.raises(BadRequest, match="not under the source root"):
        plan_layout(vm2, "/d", "/s/vm2")
    with pytest.raises(BadRequest, match="source root must be an absolute"):
        plan_layout(vm1, "/d", "s")


def test_a_chain_changed_while_the_move_was_planned_is_refused_under_the_locks(tmp_path):
    """A merge or snapshot that ended while the plan was made: the chains
    read again under the disk locks no longer match it by identity -- exit
    4, nothing changed (a layer become active would be uploaded while
    written)."""
    from vdsm_blockops.core.chain import parse_domain
    from vdsm_blockops.core.errors import Conflict
    from vdsm_blockops.ops.migrate import _plan_still_holds

    a, b, c = (str(tmp_path / n) for n in "abc")
    for path in (a, b, c):
        open(path, "w").close()

    class Dom:
        chain = [c, b, a]

        def spec(self):
            xml = "<backingStore/>"
            for path in reversed(self.chain[1:]):
                xml = (f"<backingStore type='file'><format type='qcow2'/><source file='{path}'/>"
                       f"{xml}</backingStore>")
            return parse_domain(f"<domain><devices><disk type='file' device='disk'><driver "
                                f"type='qcow2'/><source file='{self.chain[0]}'/>{xml}<target "
                                "dev='vda'/></disk></devices></domain>")

    disks, layers = plan_layout({"vda": [image(c, b), image(b, a), image(a)]}, "/d")
    from vdsm_blockops.core.migrate_plan import MigratePlan

    plan = MigratePlan(domain="vm", uuid="u", dest_uri="x", dest_dir="/d", disks=disks,
                       layers=layers, checkpoints=[])
    dom = Dom()
    _plan_still_holds(dom, plan)  # as planned
    dom.chain = [c, a]  # b merged meanwhile
    with pytest.raises(Conflict, match="changed while the move was planned"):
        _plan_still_holds(dom, plan)
