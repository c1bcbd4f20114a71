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
