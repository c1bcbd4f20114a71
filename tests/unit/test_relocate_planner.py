"""The relocation planner: a pure function from the request and the
node's facts to a frozen plan."""

import dataclasses

import pytest

from vdsm_blockops.core.errors import BadRequest
from vdsm_blockops.core.model import ImageFormat, Method, Mode
from vdsm_blockops.core.relocate_plan import RelocateFacts, RelocateRequest, plan_relocation

CHAIN = ["/i/D", "/i/C", "/i/B", "/i/A"]
ALLOC = {"/i/D": 10, "/i/C": 20, "/i/B": 30, "/i/A": 400}


def facts(**changes):
    base = dict(disk="vda", chain=CHAIN, allocation=ALLOC, dest="/n/D", dest_is_folder=False,
                dest_is_device=False, online=True, persistent=True)
    return RelocateFacts(**{**base, **changes})


def plan(mode="chain", method="auto", fmt="qcow2", request=None, **fact_changes):
    req = request or RelocateRequest(domain="vm", disk="vda", dest="/n/D", mode=mode, method=method)
    return plan_relocation(req, Mode(mode), Method(method), ImageFormat(fmt), facts(**fact_changes))


def test_chain_mode_moves_every_layer_beside_dest():
    p = plan()
    assert p.copies == [("/i/C", "/n/C"), ("/i/B", "/n/B"), ("/i/A", "/n/A")]
    assert p.chain_after == ["/n/D", "/n/C", "/n/B", "/n/A"]
    assert p.method is Method.MIRROR and p.bytes_to_copy == 460
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.dest = "/elsewhere"  # nothing downstream changes a plan


def test_shallow_moves_the_active_layer_only():
    p = plan(mode="shallow")
    assert p.copies == [] and p.chain_after == ["/n/D", "/i/C", "/i/B", "/i/A"]
    assert p.bytes_to_copy == 10


def test_full_mode_flattens_when_the_read_only_layers_hold_the_data():
    assert plan(mode="full").method is Method.FLATTEN
    assert plan(mode="full", allocation={**ALLOC, "/i/D": 1000}).method is Method.MIRROR
    assert plan(mode="full", checkpoints=("cp1",)).method is Method.MIRROR
    assert plan(mode="full", online=False).method is Method.MIRROR
    no_wait = RelocateRequest(domain="vm", disk="vda", dest="/n/D", mode="full", wait=False)
    assert plan(mode="full", request=no_wait).method is Method.MIRROR
    with pytest.raises(BadRequest, match="checkpoint"):
        plan(mode="full", method="flatten", checkpoints=("cp1",))
    with pytest.raises(BadRequest, match="running VM"):
        plan(mode="full", method="flatten", online=False)


def test_onto_devices_only_the_mirror_copies():
    assert plan(mode="full", dest_is_device=True).method is Method.MIRROR
    with pytest.raises(BadRequest, match="--mode full or --mode shallow"):
        plan(dest_is_device=True)
    with pytest.raises(BadRequest, match="only --method mirror"):
        plan(mode="shallow", method="flatten", dest_is_device=True)


def test_a_folder_dest_gets_one_volume_per_layer():
    p = plan(dest="/dev/vg", dest_is_folder=True)
    assert p.dest == "/dev/vg/D" and p.chain_after == ["/dev/vg/D", "/dev/vg/C", "/dev/vg/B",
                                                        "/dev/vg/A"]
    assert p.copies[0] == ("/i/C", "/dev/vg/C")
    reuse = RelocateRequest(domain="vm", disk="vda", dest="/dev/vg", reuse_external=True)
    with pytest.raises(BadRequest, match="does not apply"):
        plan(request=reuse, dest="/dev/vg", dest_is_folder=True)


def test_layers_that_share_a_name_cannot_move_side_by_side():
    same = ["/i/x/D", "/i/y/D"]
    with pytest.raises(BadRequest, match="share"):
        plan(chain=same, allocation={p: 1 for p in same})
    with pytest.raises(BadRequest, match="share"):
        plan(chain=same, allocation={p: 1 for p in same}, dest="/dev/vg", dest_is_folder=True)
