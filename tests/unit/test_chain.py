import os

import pytest

from vdsm_blockops.core.chain import parse_domain, parse_xml
from vdsm_blockops.core.errors import BadRequest, UnknownDisk, UnknownImage

DATA = os.path.join(os.path.dirname(__file__), "..", "data")


def load(name):
    with open(os.path.join(DATA, name)) as handle:
        return parse_domain(handle.read())


def test_live_four_layer_chain():
    spec = load("four-layer-live.xml")
    vda = spec.disk("vda")
    assert vda.paths == ["/tmp/exp/d.qcow2", "/tmp/exp/c.qcow2", "/tmp/exp/b.qcow2", "/tmp/exp/a.qcow2"]
    assert [l.index for l in vda.chain] == [2, 3, 4, 5]
    assert all(l.format == "qcow2" and l.source_type == "file" for l in vda.chain)
    assert vda.chain_complete and vda.mirror is None and vda.alias == "virtio-disk0"
    vdb = spec.disk("vdb")
    assert vdb.paths == ["/tmp/exp/r.raw"] and vdb.chain[0].format == "raw" and vdb.chain_complete


def test_persistent_definition_names_only_the_active_image():
    vda = load("four-layer-inactive.xml").disk("vda")
    assert vda.paths == ["/tmp/exp/d.qcow2"] and not vda.chain_complete
    assert vda.chain[0].index is None


@pytest.mark.parametrize("name, ready", [("active-commit-running.xml", False),
                                         ("active-commit-ready.xml", True)])
def test_active_commit_mirror(name, ready):
    mirror = load(name).disk("vda").mirror
    assert mirror.job == "active-commit" and mirror.path == "/tmp/exp/b.qcow2"
    assert mirror.is_ready is ready


def test_copy_mirror():
    mirror = load("copy-running.xml").disk("vda").mirror
    assert mirror.job == "copy" and mirror.path == "/tmp/exp/copy.qcow2"
    assert mirror.format == "qcow2" and not mirror.is_ready


@pytest.mark.parametrize("ref, pos", [
    ("/tmp/exp/d.qcow2", 0), ("/tmp/exp/b.qcow2", 2), ("/tmp/exp//a.qcow2", 3),
    ("vda[2]", 0), ("vda[5]", 3),
])
def test_position_of_references(ref, pos):
    assert load("four-layer-live.xml").disk("vda").position(ref) == pos


@pytest.mark.parametrize("ref", ["a.qcow2", "/tmp/exp/zz.qcow2", "vda[9]", "vdb[1]", "vda[x]", ""])
def test_bad_references(ref):
    with pytest.raises(UnknownImage):
        load("four-layer-live.xml").disk("vda").position(ref)


def test_unknown_disk_names_the_known_ones():
    with pytest.raises(UnknownDisk, match="vda, vdb"):
        load("four-layer-live.xml").disk("vdz")


def test_select_all_skips_empty_cdroms():
    xml = """<domain><name>x</name><uuid>u</uuid><devices>
      <disk type='file' device='cdrom'><target dev='sda'/></disk>
      <disk type='file' device='disk'><source file='/a'/><target dev='vda'/></disk>
    </devices></domain>"""
    assert [d.target for d in parse_domain(xml).select("all")] == ["vda"]


def test_entities_are_not_expanded():
    hostile = """<?xml version="1.0"?>
    <!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>
    <domain><name>&x;</name><devices/></domain>"""
    spec = parse_domain(hostile)
    assert "root" not in spec.name


def test_not_xml_is_a_bad_request():
    with pytest.raises(BadRequest):
        parse_xml("<domain>")


def test_very_long_chain_parses():
    """libxml2 stops at nesting depth 256 unless told otherwise; a chain is
    nested <backingStore> elements, so 500 layers need huge_tree."""
    inner = "<backingStore/>"
    for i in range(499, 0, -1):
        inner = (f"<backingStore type='file' index='{i + 1}'><format type='qcow2'/>"
                 f"<source file='/i/L{i}'/>{inner}</backingStore>")
    xml = (f"<domain><name>x</name><devices><disk type='file' device='disk'><driver type='qcow2'/>"
           f"<source file='/i/L0' index='1'/>{inner}<target dev='vda'/></disk></devices></domain>")
    vda = parse_domain(xml).disk("vda")
    assert len(vda.chain) == 500 and vda.chain_complete and vda.position("vda[500]") == 499


@pytest.mark.parametrize("xml, words", [
    ("<disk type='file' device='cdrom'><source file='/a.iso'/><target dev='sda' bus='sata'/><readonly/></disk>", "cdrom"),
    ("<disk type='file' device='disk'><source file='/a'/><target dev='vda'/><readonly/></disk>", "read-only"),
    ("<disk type='file' device='disk'><source file='/a'/><target dev='vda'/><transient/></disk>", "transient"),
    ("<disk type='file' device='disk'><source file='/a'/><target dev='sda' bus='sd'/></disk>", "bus 'sd'"),
    ("<disk type='network' device='disk'><source protocol='rbd' name='pool/img'/><target dev='vda'/></disk>", "network"),
    ("<disk type='file' device='disk'><target dev='vda'/></disk>", "no image"),
])
def test_disks_block_jobs_cannot_handle_are_refused(xml, words):
    from vdsm_blockops.engine.context import check_disk_supported

    disk = parse_domain(f"<domain><name>x</name><devices>{xml}</devices></domain>").disks[0]
    with pytest.raises(BadRequest, match=words):
        check_disk_supported(disk)


def test_xml_attr_round_trips_any_path():
    from vdsm_blockops.core.chain import parse_xml, xml_attr

    for value in ["/srv/vm/a b.qcow2", "/x/it's \"quoted\" & <odd>", "/tab\there\nnewline\r"]:
        assert parse_xml(f"<source file={xml_attr(value)}/>").get("file") == value
