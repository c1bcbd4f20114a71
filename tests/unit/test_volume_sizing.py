"""The pure parts of block-volume sizing and extension (the integration
tests run them on loop devices)."""

import json

import pytest

from vdsm_blockops.core.errors import BadRequest, VolumeNotExtended
from vdsm_blockops.engine import volumes
from vdsm_blockops.engine.images import ImageInfo


def image(path, fmt="qcow2"):
    return ImageInfo(path=path, format=fmt, virtual_size=1 << 30, actual_size=0,
                     backing_name=None, backing_path=None, backing_format=None)


def test_measured_layers_form_one_tree_cut_below_them():
    node = volumes._node([image("/i/C"), image("/i/B"), image("/i/A", "raw")])
    assert node == {"driver": "qcow2", "file": {"driver": "file", "filename": "/i/C"},
                    "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/i/B"},
                                "backing": {"driver": "raw", "file": {"driver": "file",
                                                                      "filename": "/i/A"}}}}
    assert volumes._node([image("/i/C")])["backing"] is None  # the layers below stay out


def test_measure_adds_bitmaps_and_caps_at_a_fully_allocated_image():
    answers = iter([json.dumps({"required": 5 << 30, "bitmaps": 4096}),
                    json.dumps({"required": 1, "fully-allocated": (1 << 30) + 65536})])
    assert volumes.measure([image("/i/C")], 1 << 30, run=lambda argv: next(answers)) == \
        (1 << 30) + 65536 + 4096
    assert volumes.measure([], 1 << 30, run=lambda argv: pytest.fail("nothing to measure")) == 0


def test_a_short_volume_without_an_extend_command_is_refused():
    room = volumes.Room(path="/dev/vg/B", size=8 << 20, end=1 << 20, needed=30 << 20)
    with pytest.raises(BadRequest, match=r"/dev/vg/B is a block volume of 8388608 bytes.*"
                                         r"31457280 bytes.*lvextend -L 31457280b /dev/vg/B"):
        volumes.refuse_if_short(room, ())
    volumes.refuse_if_short(room, ("lvextend", "{path}", "{size_bytes}"))
    volumes.refuse_if_short(volumes.Room("/dev/vg/B", 40 << 20, 0, 30 << 20), ())
    volumes.refuse_if_short(None, ())


def test_extend_runs_the_command_and_reads_the_size_back(tmp_path):
    volume = tmp_path / "vol"
    volume.write_bytes(b"\0" * 4096)
    seen = []

    def grow(argv):
        seen.append(argv)
        with open(argv[2], "r+b") as handle:
            handle.truncate(int(argv[1]))
        return ""

    assert volumes.extend(str(volume), 8192, ("tool", "{size_bytes}", "{path}"), run=grow) == 8192
    assert seen == [["tool", "8192", str(volume)]]
    with pytest.raises(VolumeNotExtended, match="4096 bytes after tool asked for 65536"):
        volumes.extend(str(volume), 65536, ("tool", "4096", "{path}"), run=grow)


def test_node_commands_get_their_placeholders_filled_in_each_word():
    assert volumes.node_command(("lvcreate", "-n", "{name}", "-L", "{size_bytes}b", "vg0"),
                                name="vda-B.qcow2", size_bytes=1 << 30) == \
        ["lvcreate", "-n", "vda-B.qcow2", "-L", "1073741824b", "vg0"]


class PausingDomain:
    """Just what a VolumeGuard asks of a domain; paused on a write error
    until resumed (QEMU's werror=enospc with no guest OS here to cause it)."""

    def __init__(self):
        self.paused = True
        self.thresholds = []

    def set_block_threshold(self, dev, offset):
        self.thresholds.append((dev, offset))

    def paused_on_io_error(self):
        return self.paused

    def resume(self):
        self.paused = False


def test_the_guard_extends_and_resumes_a_vm_paused_on_enospc(tmp_path, monkeypatch):
    volume = tmp_path / "vol"
    volume.write_bytes(b"\0" * (8 << 20))
    grown = []

    def grow(path, size, command, run=None):
        grown.append(size)
        with open(path, "r+b") as handle:
            handle.truncate(size)
        return size

    monkeypatch.setattr(volumes, "extend", grow)
    domain = PausingDomain()
    guard = volumes.VolumeGuard(domain, lambda: "vda[2]", str(volume), ("tool",), step=4 << 20)
    guard.arm()
    assert domain.thresholds == [("vda[2]", 4 << 20)]  # a step below the end
    guard.tick()
    assert grown == [12 << 20] and not domain.paused and guard.extensions == 1
    assert domain.thresholds[-1] == ("vda[2]", 8 << 20)  # re-armed
    guard.tick()  # running: nothing to do
    assert grown == [12 << 20]
    guard.disarm()
    assert domain.thresholds[-1] == ("vda[2]", 0)
