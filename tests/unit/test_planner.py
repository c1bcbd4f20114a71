import pytest

from vdsm_blockops.core.chain import Disk, Layer
from vdsm_blockops.core.errors import BadRequest, UnsafeRequest
from vdsm_blockops.core.planner import plan_merge

M = 1024 * 1024
CHAIN = ["/i/D", "/i/C", "/i/B", "/i/A"]  # A <- B <- C <- D


def disk(paths=CHAIN):
    return Disk(target="vda", device="disk", chain=tuple(Layer(p, "qcow2") for p in paths),
                chain_complete=True)


def plan(top=0, base=None, strategy="auto", alloc=None, users=None):
    alloc = alloc or {"/i/D": 1 * M, "/i/C": 10 * M, "/i/B": 10 * M, "/i/A": 100 * M}
    return plan_merge(disk(), top_pos=top, base_pos=base, strategy=strategy,
                      allocation=alloc, users=users)


def test_seed_example_pull_keeps_base():
    # merge vm vda --base A : A <- X, X = D by pull
    p = plan(base=3, strategy="pull")
    assert p.strategy == "pull" and p.result == "/i/D"
    assert p.chain_after == ["/i/D", "/i/A"]
    assert [(r.path, r.valid) for r in p.retired] == [("/i/C", True), ("/i/B", True)]
    assert p.bytes_to_copy == 20 * M and not p.two_phase


def test_commit_active_into_lowest_segment_layer():
    p = plan(base=3, strategy="commit")
    assert p.strategy == "commit" and p.result == "/i/B" and p.active and p.two_phase
    assert p.chain_after == ["/i/B", "/i/A"]
    assert [(r.path, r.valid) for r in p.retired] == [("/i/D", False), ("/i/C", False)]
    assert p.bytes_to_copy == 11 * M


def test_auto_picks_fewer_bytes():
    assert plan(base=3).strategy == "commit"  # 11 MiB < 20 MiB
    big_top = {"/i/D": 500 * M, "/i/C": 1 * M, "/i/B": 1 * M, "/i/A": 1 * M}
    assert plan(base=3, alloc=big_top).strategy == "pull"


def test_auto_tie_prefers_pull():
    same = {p: M for p in CHAIN}
    assert plan(base=2, alloc=same).strategy == "pull"


def test_flatten_without_base():
    p = plan(strategy="pull")
    assert p.chain_after == ["/i/D"] and p.base is None and p.bytes_to_copy == 120 * M
    c = plan(strategy="commit")
    assert c.chain_after == ["/i/A"] and c.result == "/i/A"


def test_internal_top_is_a_non_active_commit():
    p = plan(top=1, base=3)
    assert p.strategy == "commit" and not p.active and p.result == "/i/B"
    assert p.chain_after == ["/i/D", "/i/B", "/i/A"]
    assert p.libvirt_call == "blockCommit(vda, base=/i/B, top=/i/C)"


def test_pull_with_internal_top_is_refused():
    with pytest.raises(BadRequest, match="active image as TOP"):
        plan(top=1, base=3, strategy="pull")


@pytest.mark.parametrize("top, base", [(0, 1), (1, 2), (3, None)])
def test_single_layer_segment_is_noop(top, base):
    p = plan(top=top, base=base)
    assert p.strategy == "noop" and p.chain_after == CHAIN and p.retired == []


@pytest.mark.parametrize("top, base", [(1, 1), (2, 1), (5, None), (-1, None)])
def test_top_not_above_base(top, base):
    with pytest.raises(BadRequest):
        plan(top=top, base=base)


def test_never_commits_into_a_shared_layer():
    users = {"/i/B": ["domain other (live vda)"]}
    assert plan(base=3, users=users).strategy == "pull"
    with pytest.raises(UnsafeRequest, match="other"):
        plan(base=3, strategy="commit", users=users)
    with pytest.raises(UnsafeRequest, match="other"):
        plan(top=1, base=3, users=users)  # internal top: pull impossible too


def test_unknown_strategy():
    with pytest.raises(BadRequest, match="unknown strategy"):
        plan(strategy="stream")


def test_plan_json_is_serialisable():
    import json

    json.dumps(plan(base=3).to_json())


def test_long_chain_plans_quickly():
    paths = [f"/i/L{i}" for i in range(500)]
    d = disk(paths)
    p = plan_merge(d, top_pos=0, base_pos=499, allocation={p: M for p in paths})
    assert len(p.chain_after) == 2 and len(p.retired) == 498
