"""--delete-source deletes the source layers only once the destination's
copies can no longer be lost to a crash there: after the writeback wait,
and only if the domain there ran on as the same process meanwhile."""

from __future__ import annotations

import os
import time

import pytest

from vdsm_blockops.core.budget import Budget
from vdsm_blockops.core.config import Config
from vdsm_blockops.engine.context import Context
from vdsm_blockops.engine.migrations import MigrationRecord, MigrationStore, MovePhase
from vdsm_blockops.engine.state import StateDir
from vdsm_blockops.ops.retire import delete_when_durable


class Remote:
    """The domain on the destination: its id and CPU time (looked up afresh
    by calling the class)."""

    def __init__(self, dom_id=7, cpu=1000):
        self.dom_id, self.cpu, self.active = dom_id, cpu, True

    def isActive(self):
        return self.active

    def ID(self):
        return self.dom_id

    def info(self):
        self.cpu += 10  # it runs on
        return [1, 0, 0, 1, self.cpu]


@pytest.fixture
def setting(tmp_path, monkeypatch):
    state = tmp_path / "state"
    os.makedirs(state)
    layers = []
    for name in ("A.qcow2", "B.qcow2"):
        path = tmp_path / name
        path.write_bytes(b"layer")
        layers.append(str(path))

    users = {}  # path -> the chains on this node that use it (none unless a test says)
    monkeypatch.setattr("vdsm_blockops.ops.retire.chain_users",
                        lambda conn, paths, exclude, cache_dir=None: {p: users.get(p, [])
                                                                      for p in paths})
    make_users = users

    def make(writeback_s, timeout_s=None):
        ctx = Context(conn=None, config=Config(state_dir=str(state), dest_writeback_s=writeback_s),
                      budget=Budget.starting_now(timeout_s))
        store = MigrationStore(StateDir(str(state)))
        record = MigrationRecord(domain="web01", uuid="u1", dest_uri="qemu+tls://b/system",
                                 request={}, plan={}, phase=MovePhase.MOVED,
                                 copied_at=time.time())
        store.save(record)
        return ctx, store, record
    make.users = make_users
    return make, layers


def test_the_layers_go_after_the_wait_when_the_destination_ran_on(setting):
    make, layers = setting
    ctx, store, record = make(writeback_s=0.3)
    started = time.monotonic()
    deleted, kept, stay = delete_when_durable(ctx, Remote, record, store, layers)
    assert time.monotonic() - started >= 0.25  # it waited for the writeback
    assert deleted == layers and kept == [] and not stay
    assert not any(os.path.exists(p) for p in layers)


@pytest.mark.parametrize("change", ["restarted", "stopped", "cpu-back"])
def test_a_destination_that_restarted_meanwhile_keeps_the_layers(setting, change):
    make, layers = setting
    ctx, store, record = make(writeback_s=0.2)
    remote = Remote()
    record.phase = MovePhase.MOVED

    def sleep_and_change(*args, **kwargs):
        time.sleep(0.25)
        if change == "restarted":
            remote.dom_id = 8
        elif change == "stopped":
            remote.active = False
        else:
            remote.cpu = 5
    ctx.budget.sleep = sleep_and_change  # what happened on the destination during the wait
    deleted, kept, stay = delete_when_durable(ctx, lambda: remote, record, store, layers)
    assert deleted is None and not stay
    assert [k["path"] for k in kept] == layers and "restart or crash" in kept[0]["why"]
    assert all(os.path.exists(p) for p in layers)


def test_a_wait_past_the_timeout_leaves_the_deletion_to_recover(setting):
    make, layers = setting
    ctx, store, record = make(writeback_s=30, timeout_s=5)
    deleted, kept, stay = delete_when_durable(ctx, Remote, record, store, layers)
    assert deleted is None and stay and "recover web01" in kept[0]["why"]
    assert all(os.path.exists(p) for p in layers)
    again = store.load("u1")
    assert again.phase is MovePhase.DELETING and again.dest_run[0] == 7
    assert again.delete_after == pytest.approx(record.copied_at + 30)


def test_a_layer_a_domain_here_uses_since_it_was_retired_is_kept(setting):
    """The wait leaves room for a domain defined on a retired layer: asked
    again before the deletion, that layer stays."""
    make, layers = setting
    ctx, store, record = make(writeback_s=0.1)
    make.users[layers[0]] = ["vm2 vda (persistent)"]
    deleted, kept, stay = delete_when_durable(ctx, Remote, record, store, layers)
    assert deleted == layers[1:] and not stay
    assert kept == [{"path": layers[0], "why": "kept: used since by vm2 vda (persistent)"}]
    assert os.path.exists(layers[0]) and not os.path.exists(layers[1])
