import json

from vdsm_blockops.chain import Disk, Layer
from vdsm_blockops.images import chain_problems, read_backing_chain

QEMU_IMG = json.dumps([
    {"filename": "/i/D", "format": "qcow2", "virtual-size": 64, "actual-size": 5,
     "backing-filename": "C", "full-backing-filename": "/i/C", "backing-filename-format": "qcow2"},
    {"filename": "/i/C", "format": "qcow2", "virtual-size": 64, "actual-size": 7,
     "backing-filename": "/i/A", "full-backing-filename": "/i/A", "backing-filename-format": "raw"},
    {"filename": "/i/A", "format": "raw", "virtual-size": 64, "actual-size": 9},
])


def fake_run(argv):
    assert argv[:5] == ["qemu-img", "info", "-U", "--backing-chain", "--output=json"]
    return QEMU_IMG


def test_read_backing_chain_resolves_names():
    infos = read_backing_chain("/i/D", "qcow2", run=fake_run)
    assert [i.path for i in infos] == ["/i/D", "/i/C", "/i/A"]
    assert [i.actual_size for i in infos] == [5, 7, 9]
    assert infos[0].backing_name == "C" and infos[0].backing_path == "/i/C"


def layers(*paths):
    return tuple(Layer(p, "raw" if p.endswith("A") else "qcow2") for p in paths)


def test_agreeing_chain_has_no_problems():
    disk = Disk("vda", "disk", layers("/i/D", "/i/C", "/i/A"), chain_complete=True)
    assert chain_problems(disk, read_backing_chain("/i/D", run=fake_run)) == []


def test_disagreeing_chain_is_reported():
    disk = Disk("vda", "disk", layers("/i/D", "/i/B", "/i/A"), chain_complete=True)
    (problem,) = chain_problems(disk, read_backing_chain("/i/D", run=fake_run))
    assert "image metadata" in problem


def test_persistent_definition_compares_its_prefix():
    disk = Disk("vda", "disk", layers("/i/D"), chain_complete=False)
    assert chain_problems(disk, read_backing_chain("/i/D", run=fake_run)) == []


def test_copy_image_file_keeps_data_and_holes(tmp_path):
    import os

    from vdsm_blockops.images import copy_image_file

    src = tmp_path / "src.raw"
    with open(src, "wb") as handle:
        handle.truncate(64 * 1024 * 1024)
        handle.seek(1024 * 1024)
        handle.write(b"x" * 4096)
        handle.seek(40 * 1024 * 1024)
        handle.write(os.urandom(1024 * 1024))
    dst = tmp_path / "dst.raw"
    copy_image_file(str(src), str(dst))
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks * 512 < 8 * 1024 * 1024  # holes stayed holes
    import pytest

    with pytest.raises(FileExistsError):
        copy_image_file(str(src), str(dst))  # never overwrites
