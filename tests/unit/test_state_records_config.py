import multiprocessing
import os

import pytest

from vdsm_blockops.core.config import Config, load_config
from vdsm_blockops.core.errors import BadRequest, Conflict, StateError
from vdsm_blockops.core.identity import image_key
from vdsm_blockops.engine.records import OperationRecord, Phase, RecordStore, parse_records, render_records
from vdsm_blockops.engine.state import StateDir


def test_registry_roundtrip(tmp_path):
    state = StateDir(str(tmp_path / "s"))
    assert state.invalidated() == {}
    (tmp_path / "C").write_bytes(b"c")
    (tmp_path / "D").write_bytes(b"d")
    state.invalidate([f"{tmp_path}/C", f"{tmp_path}//D", f"{tmp_path}/missing"],
                     domain="vm", disk="vda", operation="merge x")
    assert {e["path"] for e in state.invalidated().values()} == {f"{tmp_path}/C", f"{tmp_path}/D"}
    state.forget([image_key(f"{tmp_path}/C")])
    assert {e["path"] for e in state.invalidated().values()} == {f"{tmp_path}/D"}


def _hold(path, ready, release):
    state = StateDir(path)
    with state.disk_lock("u", "vda", "merge of vm vda"):
        ready.set()
        release.wait(10)


def test_disk_lock_conflicts_across_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(tmp_path), ready, release))
    proc.start()
    try:
        assert ready.wait(10)
        with pytest.raises(Conflict, match="merge of vm vda"):
            with StateDir(str(tmp_path)).disk_lock("u", "vda", "other"):
                pass
        with StateDir(str(tmp_path)).disk_lock("u", "vdb", "other"):
            pass  # another disk is free
    finally:
        release.set()
        proc.join()
    with StateDir(str(tmp_path)).disk_lock("u", "vda", "again"):
        pass


class FakeMetadataDomain:
    name = "vm"
    uuid = "u-1"

    def __init__(self):
        self.xml = None

    def get_metadata(self, namespace):
        return self.xml

    def set_metadata(self, xml, key, namespace, config=True):
        self.xml = xml


def test_records_roundtrip_and_transitions():
    dom = FakeMetadataDomain()
    store = RecordStore(dom)
    record = OperationRecord(operation="merge", disk="vda", request={"a": 1}, plan={"b": 2})
    store.begin(record)
    assert store.load()["vda"].phase is Phase.PLANNED
    with pytest.raises(Conflict, match="unfinished merge"):
        store.begin(OperationRecord(operation="merge", disk="vda", request={}, plan={}))
    store.advance(record, Phase.STARTED)
    with pytest.raises(StateError):  # a bookkeeping bug is a failure (exit 1), not a refusal
        store.advance(record, Phase.PLANNED)
    assert parse_records(dom.xml)["vda"].phase is Phase.STARTED
    store.finish(record)
    assert dom.xml is None and store.load() == {}


def test_render_records_escapes_json():
    record = OperationRecord(operation="merge", disk="vda", request={"x": "<&>"}, plan={})
    assert parse_records(render_records({"vda": record}))["vda"].request == {"x": "<&>"}


def test_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("state_dir: /x\nstorage_roots: [/a/, /b]\n")
    assert load_config(str(path)) == Config(state_dir="/x", storage_roots=("/a", "/b"))
    path.write_text("bogus: 1\n")
    with pytest.raises(BadRequest, match="bogus"):
        load_config(str(path))
    with pytest.raises(BadRequest, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("text,named", [
    ("storage_roots: /srv/vm\n", "storage_roots"),
    ("storage_roots: [/]\n", "storage_roots"),
    ("storage_roots: [relative]\n", "storage_roots"),
    ("pivot_retries: ten\n", "pivot_retries"),
    ("pivot_retries: -1\n", "pivot_retries"),
    ("pivot_retries: true\n", "pivot_retries"),
    ("poll_interval_s: 0\n", "poll_interval_s"),
    ("state_dir: 5\n", "state_dir"),
    ("state_dir: relative/dir\n", "state_dir"),
    ("connect: ''\n", "connect"),
    ("volume_extend_command: lvextend\n", "volume_extend_command"),
    ('volume_extend_command: [lvextend, "{path}"]\n', "volume_extend_command"),
    ('volume_create_command: [lvcreate, "{size_bytes}"]\n', "volume_create_command"),
    ("volume_remove_command: [lvremove, -f]\n", "volume_remove_command"),
    ("volume_margin_mib: -1\n", "volume_margin_mib"),
])
def test_config_keys_are_type_and_range_checked(tmp_path, text, named):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(BadRequest, match=f"{named} is .*; expected"):
        load_config(str(path))


def test_config_good_values(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("storage_roots: [/srv/vm/, /var/lib/libvirt/images]\npivot_retries: 3\n"
                    "poll_interval_s: 1\nstate_dir: /tmp/s\n")
    config = load_config(str(path))
    assert config.storage_roots == ("/srv/vm", "/var/lib/libvirt/images")
    assert config.pivot_retries == 3 and config.poll_interval_s == 1.0
    path.write_text('volume_extend_command: [lvextend, -L, "{size_bytes}b", "{path}"]\n'
                    'volume_remove_command: [lvremove, -f, "{path}"]\n'
                    "volume_margin_mib: 0\n")
    config = load_config(str(path))
    assert config.volume_extend_command == ("lvextend", "-L", "{size_bytes}b", "{path}")
    assert config.volume_margin_mib == 0 and config.volume_create_command == ()
    assert config.volume_remove_command == ("lvremove", "-f", "{path}")


SIMPLE_OR_NOT = [
    "", "\n\n# comment only\n",
    "state_dir: /var/lib/x\nconnect: qemu:///system\n",
    "connect: qemu+ssh://root@host:22/system?keyfile=/k&no_verify=1\n",
    "storage_roots: [/srv/vm/, /var/lib/libvirt/images]\npivot_retries: 3\npoll_interval_s: 0.25\n",
    "storage_roots: []\nconnect:\n", "storage_roots:   \n", "pivot_retries: 0\n",
    "state_dir: /a/b  \r\nconnect: qemu:///session\r\n",
    # outside the simple form: PyYAML decides
    "pivot_retries: 010\n", "pivot_retries: 1_0\n", "pivot_retries: 1e3\n", "poll_interval_s: .5\n",
    "state_dir: yes\n", "state_dir: ~\n", "state_dir: null\n", "state_dir: '/quoted'\n",
    "state_dir: /x # trailing comment\n", "state_dir: /x\nstate_dir: /y\n", "---\nstate_dir: /x\n",
    "storage_roots:\n  - /a\n  - /b\n", "  # indented comment\nstate_dir: /x\n", "state_dir:/x\n",
    "storage_roots: [qemu:///system]\n", "storage_roots: {a: 1}\n", "state_dir:\t/x\n",
    "connect: &anchor qemu:///system\n", "state_dir: /x\n...\n", "state_dir: /x: y\n",
]


@pytest.mark.parametrize("text", SIMPLE_OR_NOT)
def test_the_simple_config_form_reads_as_yaml_does(text):
    """The parser that spares most commands the PyYAML import agrees with
    PyYAML wherever it answers, and answers for the usual files."""
    import yaml

    from vdsm_blockops.core.config import parse_simple

    simple = parse_simple(text)
    if simple is not None:
        assert simple == (yaml.safe_load(text) or {})
    usual = SIMPLE_OR_NOT.index(text) < SIMPLE_OR_NOT.index("pivot_retries: 010\n")
    assert (simple is not None) == usual


def _stored(dom, *bodies):
    """Records as another version of the tool may have written them."""
    import json as _json
    from xml.sax.saxutils import escape

    dom.xml = "<operations>" + "".join(
        f"<operation disk='{disk}' id='x{n}'>{escape(_json.dumps(body) if not isinstance(body, str) else body)}</operation>"
        for n, (disk, body) in enumerate(bodies)) + "</operations>"


def test_records_of_other_versions_are_kept_never_dropped():
    dom = FakeMetadataDomain()
    newer_field = {"operation": "merge", "disk": "vda", "request": {}, "plan": {},
                   "phase": "started", "id": "r1", "future_field": {"k": [1, 2]}}
    unknown_phase = {"operation": "relocate", "disk": "vdb", "request": {}, "plan": {},
                     "phase": "half-pivoted", "id": "r2"}
    missing_plan = {"operation": "merge", "disk": "vdc", "request": {}, "id": "r3"}
    newer_format = {"operation": "merge", "disk": "vdd", "request": {}, "plan": {},
                    "format": 99, "id": "r4"}
    _stored(dom, ("vda", newer_field), ("vdb", unknown_phase), ("vdc", missing_plan),
            ("vdd", newer_format), ("vde", "{not json"))
    store = RecordStore(dom)
    records = store.load()
    assert sorted(records) == ["vda", "vdb", "vdc", "vdd", "vde"]
    assert not records["vda"].unreadable and records["vda"].extra == {"future_field": {"k": [1, 2]}}
    for disk, why in (("vdb", "unknown phase"), ("vdc", "no plan"), ("vdd", "newer"),
                      ("vde", "not a JSON object")):
        assert why in records[disk].unreadable, records[disk].unreadable
        with pytest.raises(Conflict, match="cannot read"):  # the disk stays blocked
            store.begin(OperationRecord(operation="merge", disk=disk, request={}, plan={}))
    # Another disk's record is written: every record survives, byte for byte
    # where this version cannot read it, the unknown field carried along.
    before = {d: r.raw for d, r in records.items() if r.unreadable}
    mine = OperationRecord(operation="merge", disk="vdf", request={}, plan={})
    store.begin(mine)
    store.advance(records["vda"], Phase.COMPLETED)
    store.finish(mine)
    again = store.load()
    assert sorted(again) == ["vda", "vdb", "vdc", "vdd", "vde"]
    assert {d: r.raw for d, r in again.items() if r.unreadable} == before
    assert again["vda"].extra == {"future_field": {"k": [1, 2]}}
    assert again["vda"].phase is Phase.COMPLETED


def test_history_is_in_the_order_operations_started(tmp_path):
    from vdsm_blockops.engine import history

    state = StateDir(str(tmp_path / "state"))
    long = history.entry(source="cli", operation="merge", domain="a", disk="vda",
                         started=1000.0, exit_code=0, outcome="ok")
    short = history.entry(source="cli", operation="merge", domain="b", disk="vda",
                          started=1005.0, exit_code=0, outcome="ok")
    history.append(state, short)  # written when it ended: before the long one
    history.append(state, long)
    assert [e["domain"] for e in history.read(state)] == ["a", "b"]


def test_units_uninstall_enable_without_systemd_removes_the_units(tmp_path, monkeypatch):
    from vdsm_blockops.core.config import Config
    from vdsm_blockops.engine import units

    units.install(Config(state_dir=str(tmp_path / "state")), None, unit_dir=str(tmp_path))
    monkeypatch.setattr(units, "_systemd_running", lambda: False)
    report = units.uninstall(str(tmp_path), disable=True)
    assert len(report.units) == 3 and not [n for n in os.listdir(tmp_path) if "recover" in n]
    assert "nothing to disable" in report.note
