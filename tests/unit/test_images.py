import json

from vdsm_blockops.core.chain import Disk, Layer
from vdsm_blockops.engine.images import chain_problems, read_backing_chain

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

    from vdsm_blockops.engine.copying import copy_image_file

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


def _qemu_img(*args):
    import subprocess

    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _chains_to_read(tmp_path):
    """(top, declared format, whether the headers alone may answer)."""
    folder = tmp_path / "imgs"
    (folder / "tmpl").mkdir(parents=True)
    (folder / "vol").mkdir()
    (tmp_path / "link").symlink_to(folder / "vol")
    raw, t, a, b = (str(folder / "base.raw"), str(folder / "tmpl" / "T"),
                    str(folder / "vol" / "A"), str(folder / "vol" / "B"))
    _qemu_img("create", "-f", "raw", raw, "3M")
    _qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", "-b", raw, "-F", "raw", t)
    # oVirt's names: relative, through .. out of the volume's folder
    _qemu_img("create", "-f", "qcow2", "-b", "../tmpl/T", "-F", "qcow2", a, "4M")
    _qemu_img("create", "-f", "qcow2", "-b", "A", "-F", "qcow2", b)
    with open(b, "r+b") as handle:  # some data, so actual sizes differ
        handle.seek(1 << 20)
        handle.write(b"x" * 65536)
    # checkpoints' bitmaps: recording (auto) and disabled, two granularities
    _qemu_img("bitmap", "--add", b, "cp1")
    _qemu_img("bitmap", "--add", "-g", "128K", "--disable", b, "cp2")
    _qemu_img("bitmap", "--add", a, "cp1")
    unrecorded = str(folder / "unrecorded")
    _qemu_img("create", "-f", "qcow2", "-b", a, "-F", "qcow2", unrecorded)
    with open(unrecorded, "r+b") as handle:  # no recorded backing format: qemu-img probes
        head = handle.read(4096)
        handle.seek(head.index(bytes.fromhex("e2792aca")))
        handle.write(bytes.fromhex("0bad0bad"))  # an unknown extension, which QEMU skips
    data_file = str(folder / "with-data-file")
    _qemu_img("create", "-f", "qcow2", "-o", f"data_file={folder}/data.raw", data_file, "1M")
    lazy = str(folder / "lazy")  # the dirty bit may be set: still plain
    _qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", "-b", b, "-F", "qcow2", lazy)
    return [(b, "qcow2", True), (str(tmp_path / "link" / "B"), "qcow2", True), (lazy, "qcow2", True),
            (raw, "raw", True), (t, "qcow2", True), (unrecorded, "qcow2", False),
            (data_file, "qcow2", False), (b, None, False), (raw, "qcow2", False)]


def test_chains_read_from_headers_equal_qemu_img_info(tmp_path):
    """The header reader answers exactly as ``qemu-img info`` does, and
    leaves to qemu-img what it cannot judge (a probed format, a data file,
    an undeclared or wrong format)."""
    from vdsm_blockops.core.errors import OperationFailed
    from vdsm_blockops.engine.images import _chain_from_headers, read_chain

    for top, fmt, native in _chains_to_read(tmp_path):
        headers = _chain_from_headers(top, fmt)
        assert (headers is not None) == native, top
        try:
            by_qemu_img = read_backing_chain(top, fmt)
        except OperationFailed:
            assert not native
            continue
        assert read_chain(top, fmt) == by_qemu_img
        if native:
            assert headers == by_qemu_img, top
    chain = read_chain(str(tmp_path / "imgs" / "vol" / "B"), "qcow2")
    assert [[(b.name, b.granularity, b.flags) for b in i.bitmaps] for i in chain[:2]] == \
        [[("cp1", 65536, ("auto",)), ("cp2", 131072, ())], [("cp1", 65536, ("auto",))]]


def _with_bitmaps(*layers):
    from vdsm_blockops.core.headers import Bitmap
    from vdsm_blockops.engine.images import ImageInfo

    return [ImageInfo(f"/i/{n}", "qcow2", 1, 1, None, None, None,
                      tuple(Bitmap(name, 65536, flags) for name, flags in bitmaps))
            for n, bitmaps in enumerate(layers)]


def test_checkpoint_rules():
    """libvirt's rules for a checkpoint a backup can start from: its bitmap
    in the active layer, an unbroken run down the chain, every copy
    recording and none inconsistent."""
    from vdsm_blockops.engine.verification import checkpoint_problem

    auto, off, stale = ("auto",), (), ("in-use", "auto")
    good = _with_bitmaps([("cp1", auto)], [("cp1", auto)], [])
    assert checkpoint_problem("cp1", good, running=False) is None
    # a running VM's active layer is QEMU's: libvirt's word counts there
    assert checkpoint_problem("cp1", _with_bitmaps([("cp1", stale)], [("cp1", auto)]), True) is None
    assert checkpoint_problem("cp1", _with_bitmaps([], [("cp1", auto)]), True) is None
    assert "active layer" in checkpoint_problem("cp1", _with_bitmaps([], [("cp1", auto)]), False)
    assert "missing in /i/1" in checkpoint_problem(
        "cp1", _with_bitmaps([("cp1", auto)], [], [("cp1", auto)]), False)
    assert "disabled" in checkpoint_problem("cp1", _with_bitmaps([("cp1", auto)], [("cp1", off)]), False)
    assert "inconsistent" in checkpoint_problem("cp1", _with_bitmaps([("cp1", stale)]), False)
    assert "inconsistent" in checkpoint_problem("cp1", _with_bitmaps([("cp1", auto)], [("cp1", stale)]), True)
    assert "libvirt finds" in checkpoint_problem("cp1", _with_bitmaps([], [("cp1", auto)]), True,
                                                 usable_in_qemu=False)


def test_bitmaps_disabled_for_qemu_img_record_again_when_it_fails(tmp_path):
    """A cold commit or pull disables the target's recording bitmaps while
    qemu-img writes into it; they record again whether it succeeds or not
    (a failed commit's writes are qemu-img's, under data still covered)."""
    import pytest

    from vdsm_blockops.engine.images import read_chain
    from vdsm_blockops.ops.offline import _not_recording

    image = str(tmp_path / "base.qcow2")
    _qemu_img("create", "-f", "qcow2", image, "1M")
    _qemu_img("bitmap", "--add", image, "cp1")

    def recording() -> bool:
        return read_chain(image, "qcow2")[0].bitmaps[0].usable

    with pytest.raises(RuntimeError):
        with _not_recording(read_chain(image, "qcow2")[0]):
            assert not recording()
            raise RuntimeError("qemu-img commit failed")
    assert recording()


def test_a_relative_name_that_reads_as_a_protocol_gets_a_dot_slash(tmp_path):
    """``snap-10:00.qcow2`` is a valid file name; QEMU reads a bare
    ``snap-10:00.qcow2`` as protocol ``snap-10``."""
    import subprocess

    from vdsm_blockops.engine.images import backing_name_for, read_chain, set_backing

    base = tmp_path / "snap-10:00.qcow2"
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "./snap-10:00.qcow2",
                    "-F", "qcow2", str(top)], check=True)
    info = read_chain(str(top), "qcow2")[0]
    name = backing_name_for(info, str(base), str(top))
    assert name == "./snap-10:00.qcow2"
    assert backing_name_for(info, str(tmp_path / "plain.qcow2"), str(top)) == "plain.qcow2"
    set_backing(str(top), name, "qcow2")
    assert [i.path for i in read_chain(str(top), "qcow2")] == [str(top), str(base)]
    subprocess.run(["qemu-img", "info", "--backing-chain", str(top)], check=True,
                   capture_output=True)  # QEMU opens it as a file


def test_the_tools_own_copies_keep_to_the_bandwidth(tmp_path):
    """--bandwidth holds for file copies too: 6 MiB of data at 3 MiB/s
    take two seconds at least, holes cost nothing."""
    import os
    import time

    from vdsm_blockops.engine.copying import Pace, copy_image_file

    src = tmp_path / "src"
    with open(src, "wb") as handle:
        handle.write(os.urandom(6 * 1024 * 1024))
        handle.seek(200 * 1024 * 1024)  # a big hole after the data
        handle.write(b"end")
    started = time.monotonic()
    copy_image_file(str(src), str(tmp_path / "dst"), pace=Pace(3))
    assert time.monotonic() - started >= 1.9
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()
