"""Image identity: the file, not the string (symlinked folders, ``..``
names, block devices), and what the planner, registry, records and
requests make of it."""

import os

import pytest

from vdsm_blockops.core.chain import Disk, Layer, check_reference, parse_domain
from vdsm_blockops.core.errors import OperationFailed, UnknownImage, UnsafeRequest
from vdsm_blockops.core.identity import (
    ImageKey,
    ImageSet,
    clean_path,
    device_size,
    image_key,
    same_image,
    under_root,
)
from vdsm_blockops.core.planner import plan_merge
from vdsm_blockops.engine.copying import copy_image_file
from vdsm_blockops.engine.records import OperationRecord
from vdsm_blockops.engine.state import StateDir


@pytest.fixture
def ovirt(tmp_path):
    """oVirt's file-domain shape: mnt/<server:_export>/<sd>/images/<img>/<vol>,
    reached through the pool link <pool>/<sd> -> ../mnt/<server:_export>/<sd>."""
    sd = tmp_path / "mnt" / "srv:_export" / "sd1"
    for img in ("img-tmpl", "img1"):
        (sd / "images" / img).mkdir(parents=True)
    (sd / "images" / "img-tmpl" / "T").write_bytes(b"template")
    (sd / "images" / "img1" / "V1").write_bytes(b"v1")
    (tmp_path / "pool").mkdir()
    os.symlink("../mnt/srv:_export/sd1", tmp_path / "pool" / "sd1")
    return tmp_path


def test_clean_path_removes_dots_lexically_when_no_symlink_is_stepped_out_of(ovirt):
    raw = f"{ovirt}/pool/sd1/images/img1/../img-tmpl/T"
    assert clean_path(raw) == f"{ovirt}/pool/sd1/images/img-tmpl/T"  # the pool link stays
    assert clean_path("/a//b/./c/") == "/a/b/c"
    assert clean_path("relative/../x") == "relative/../x"
    assert clean_path("") == ""


def test_clean_path_resolves_a_symlink_before_stepping_out_of_it(tmp_path):
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "real" / "T").write_bytes(b"x")
    os.symlink(tmp_path / "real" / "deep", tmp_path / "link")
    # link/.. is physically real/, not tmp_path/
    assert clean_path(f"{tmp_path}/link/../T") == f"{tmp_path}/real/T"
    assert same_image(f"{tmp_path}/link/../T", f"{tmp_path}/real/T")


def test_aliases_are_one_image_and_copies_are_not(ovirt):
    via_pool = f"{ovirt}/pool/sd1/images/img-tmpl/T"
    via_mnt = f"{ovirt}/mnt/srv:_export/sd1/images/img-tmpl/T"
    via_dots = f"{ovirt}/pool/sd1/images/img1/../img-tmpl/T"
    assert via_pool != via_mnt
    assert image_key(via_pool) == image_key(via_mnt) == image_key(via_dots)
    assert image_key(via_pool).kind == "file"
    copy = ovirt / "T-copy"
    copy.write_bytes(b"template")
    assert not same_image(via_pool, str(copy))
    images = ImageSet([via_mnt])
    assert via_pool in images and via_dots in images and str(copy) not in images
    assert images.name_of(via_pool) == via_mnt


def test_missing_files_compare_by_cleaned_path(tmp_path):
    assert image_key(f"{tmp_path}/x/../nope") == ImageKey("path", "", 0, "", f"{tmp_path}/nope")
    assert same_image(f"{tmp_path}/nope", f"{tmp_path}/./nope")


def test_under_root_decides_on_resolved_folders(ovirt):
    assert under_root(f"{ovirt}/pool/sd1/images/img1/new", f"{ovirt}/mnt/srv:_export/sd1")
    assert under_root(f"{ovirt}/mnt/srv:_export/sd1/x", f"{ovirt}/pool/sd1")
    assert not under_root(f"{ovirt}/pool/sd1/../../etc/x", f"{ovirt}/pool/sd1")
    assert not under_root("/srv/vmx/a", "/srv/vm")


def test_position_matches_by_identity_and_refuses_malformed_references(ovirt):
    t = f"{ovirt}/pool/sd1/images/img1/../img-tmpl/T"
    v1 = f"{ovirt}/pool/sd1/images/img1/V1"
    spec = parse_domain(
        f"<domain><name>d</name><devices><disk type='file' device='disk'>"
        f"<source file='{v1}' index='2'/><backingStore type='file' index='3'>"
        f"<format type='qcow2'/><source file='{t}'/><backingStore/></backingStore>"
        f"<target dev='vda'/></disk></devices></domain>")
    vda = spec.disk("vda")
    assert vda.paths == [v1, f"{ovirt}/pool/sd1/images/img-tmpl/T"]  # cleaned where parsed
    assert vda.position(f"{ovirt}/mnt/srv:_export/sd1/images/img-tmpl/T") == 1
    assert vda.position("vda[3]") == 1
    for bad in ("", " ", "vda[3]\n", " vda[3]", f"{v1}\n", "vda[3]\x00", "\t"):
        with pytest.raises(UnknownImage):
            vda.position(bad)
    with pytest.raises(UnknownImage):
        check_reference("/x\n", "DEST")


def test_planner_refuses_commit_into_a_template_named_two_ways(ovirt):
    """The merge looks users up under the name its own chain uses; the
    users map (built by identity) is keyed by that name."""
    t_dots = clean_path(f"{ovirt}/pool/sd1/images/img1/../img-tmpl/T")
    disk = Disk(target="vda", device="disk", chain_complete=True,
                chain=(Layer("/i/V2", "qcow2"), Layer("/i/V1", "qcow2"), Layer(t_dots, "qcow2")))
    alloc = {"/i/V2": 1, "/i/V1": 1, t_dots: 10**9}
    with pytest.raises(UnsafeRequest, match="other-vm"):
        plan_merge(disk, top_pos=0, base_pos=None, strategy="commit", allocation=alloc,
                   users={t_dots: ["domain other-vm (persistent vda)"]})
    assert plan_merge(disk, top_pos=0, base_pos=None, allocation=alloc,
                      users={t_dots: ["domain other-vm (persistent vda)"]}).strategy == "pull"


def test_registry_matches_an_invalidated_image_under_any_name(ovirt, tmp_path):
    state = StateDir(str(tmp_path / "state"))
    via_mnt = f"{ovirt}/mnt/srv:_export/sd1/images/img1/V1"
    state.invalidate([via_mnt], domain="d", disk="vda", operation="merge x")
    lookup = state.invalid_lookup()
    assert lookup.why(f"{ovirt}/pool/sd1/images/img1/V1")["operation"] == "merge x"
    assert lookup.why(f"{ovirt}/pool/sd1/images/img-tmpl/../img1/V1") is not None
    assert lookup.why(f"{ovirt}/pool/sd1/images/img-tmpl/T") is None
    # forgotten by identity, whatever name the deleter used
    key = image_key(via_mnt)
    state.forget([key])
    assert state.invalidated() == {}


def test_created_files_are_deleted_only_while_they_are_the_same_file(tmp_path):
    path = tmp_path / "new.qcow2"
    path.write_bytes(b"ours")
    record = OperationRecord(operation="relocate", disk="vda", request={}, plan={},
                             created_files=[{"path": str(path), "id": image_key(str(path)).to_json()}])
    entry = record.created_files[0]
    assert record.still_ours(entry)
    os.rename(path, tmp_path / "moved-away")
    path.write_bytes(b"someone else's file at the same name")
    assert not record.still_ours(entry)
    # records of earlier versions (bare paths, no identity) never delete
    old = OperationRecord.from_json({"operation": "relocate", "disk": "vda", "request": {},
                                     "plan": {}, "created_files": [str(path)]})
    assert old.created_files == []


def test_copy_and_proof_of_a_file_with_holes(tmp_path):
    src = tmp_path / "src"
    with open(src, "wb") as handle:
        handle.seek(5 * 1024 * 1024)
        handle.write(b"x" * 4096)
        handle.seek(9 * 1024 * 1024 + 17)
        handle.write(b"tail")
    dst = tmp_path / "dst"
    copy_image_file(str(src), str(dst))
    assert dst.read_bytes() == src.read_bytes()
    assert device_size(str(dst)) == os.path.getsize(src)


def test_a_copy_that_reads_back_wrong_fails(tmp_path, monkeypatch):
    """The proof reads each chunk back from the copy: a write that went
    astray (here: one byte flipped on its way) fails the copy."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    real_pwrite = os.pwrite

    def flipping_pwrite(fd, data, offset):
        data = bytearray(data)
        data[len(data) // 2] ^= 0xFF
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", flipping_pwrite)
    with pytest.raises(OperationFailed, match="differs from"):
        copy_image_file(str(src), str(tmp_path / "dst"))


def test_a_source_written_during_its_copy_fails_it(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(1024 * 1024))
    os.utime(src, ns=(0, 0))  # mtime ticks coarsely: make the late write show
    real_fsync = os.fsync

    def fsync_then_touch(fd):  # the copy's fsync; meanwhile someone writes the source
        real_fsync(fd)
        with open(src, "r+b") as handle:
            handle.write(b"late")

    monkeypatch.setattr(os, "fsync", fsync_then_touch)
    with pytest.raises(OperationFailed, match="changed while it was copied"):
        copy_image_file(str(src), str(tmp_path / "dst"))


def test_failures_after_a_change_are_never_exit_2():
    from vdsm_blockops.core import errors
    from vdsm_blockops.engine.context import as_failure

    gone = as_failure(errors.BadRequest("domain is not running"))
    assert type(gone) is errors.OperationFailed and gone.exit_code == 1
    assert as_failure(OSError(28, "No space left on device")).exit_code == 1
    assert as_failure(errors.JobTimeout("t")).exit_code == 3
    assert as_failure(errors.Conflict("c")).exit_code == 4


def test_chains_compare_by_identity(ovirt):
    from vdsm_blockops.core.identity import same_images

    pool = f"{ovirt}/pool/sd1/images"
    mnt = f"{ovirt}/mnt/srv:_export/sd1/images"
    assert same_images([f"{pool}/img1/V1", f"{pool}/img1/../img-tmpl/T"],
                       [f"{mnt}/img1/V1", f"{mnt}/img-tmpl/T"])
    assert not same_images([f"{pool}/img1/V1"], [f"{pool}/img-tmpl/T"])
    assert not same_images([f"{pool}/img1/V1"], [f"{pool}/img1/V1", f"{pool}/img-tmpl/T"])
