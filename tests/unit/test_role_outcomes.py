"""The roles decide "moved" from the module's own positive word, never from
missing keys: the outcome expressions of evacuate and drain, rendered by
Ansible's own templating with the results async_status hands them."""

import ast
import os

import pytest
import yaml

ROLES = os.path.join(os.path.dirname(__file__), "..", "..", "ansible", "ansible_collections",
                     "vdsm", "blockops", "roles")


def outcome(role, variable, results, check_mode=False):
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar

    with open(os.path.join(ROLES, role, "tasks", "batch.yml")) as handle:
        tasks = yaml.safe_load(handle)
    (noting,) = [t for t in tasks if variable in t.get("ansible.builtin.set_fact", {})]
    expression = noting["ansible.builtin.set_fact"][variable]
    prefix = variable.split("_")[0]
    variables = {variable: [], f"{prefix}_finished": {"results": results},
                 "ansible_check_mode": check_mode}
    try:  # ansible-core 2.19 renders only text marked as a template
        from ansible.template import trust_as_template

        expression = trust_as_template(expression)
    except ImportError:
        pass
    rendered = Templar(loader=DataLoader(), variables=variables).template(expression)
    # set_fact turns the rendered text into data as this does
    return ast.literal_eval(rendered) if isinstance(rendered, str) else rendered


def job(**result):
    item = {"domain": "web01", "disk": "vda", "dest": "/new/web01/vda/vda.qcow2"}
    return {"job": {"item": item}, "finished": 1, **result}


NOT_MOVED = {
    "async timeout": job(msg="Timeout exceeded", failed=True),
    "crash under async_wrapper": job(failed=True, stderr="Traceback ...", msg="MODULE FAILURE"),
    "lost job": job(failed=True, msg="could not find job", finished=0),
    "refused arguments": job(failed=True, msg="argument 'timeout' is of type str"),
    "finished without its word": job(changed=True),
}


@pytest.mark.parametrize("result", list(NOT_MOVED.values()), ids=list(NOT_MOVED))
def test_evacuate_reports_a_failure_of_any_kind_as_not_moved(result):
    (noted,) = outcome("evacuate", "evacuate_results", [result])
    assert noted["moved"] is False and noted["reason"]


def test_evacuate_and_drain_report_moved_only_on_the_modules_word():
    (noted,) = outcome("evacuate", "evacuate_results", [job(changed=True, relocated=True)])
    assert noted["moved"] is True
    (noted,) = outcome("evacuate", "evacuate_results", [job(would_relocate=True)], check_mode=True)
    assert noted["moved"] is True  # the check-mode prediction
    (noted,) = outcome("evacuate", "evacuate_results", [job(would_relocate=True)])
    assert noted["moved"] is False  # a prediction is no move outside check mode
    (noted,) = outcome("drain", "drain_results", [job(moved=True)])
    assert noted["moved"] is True
    (noted,) = outcome("drain", "drain_results", [job(msg="Timeout exceeded", failed=True)])
    assert noted["moved"] is False


def test_a_disk_all_report_has_a_diff_of_every_disk():
    """Diff mode for disk=all (a report per disk) shows each disk's chains;
    it showed nothing."""
    import sys

    sys.path.insert(0, os.path.join(ROLES, "..", "..", "..", ".."))
    try:
        from ansible_collections.vdsm.blockops.plugins.module_utils.blockops import (
            _chains,
            chain_diff,
        )
    finally:
        sys.path.pop(0)
    report = {"disk": "all", "results": [
        {"disk": "vdb", "chain_before": ["/a/vdb-top", "/a/vdb-base"], "chain_after": ["/b/vdb"]},
        {"disk": "vda", "chain_before": ["/a/vda"], "chain_after": ["/b/vda"]}]}
    diff = chain_diff(*_chains(report))
    assert diff["before"] == "vda:\n  /a/vda\nvdb:\n  /a/vdb-base\n  /a/vdb-top\n"
    assert diff["after"] == "vda:\n  /b/vda\nvdb:\n  /b/vdb\n"
    assert chain_diff(*_chains({"chain_before": ["/t", "/b"], "chain_after": ["/t"]}))[
        "before"] == "/b\n/t\n"
    assert _chains({"disk": "all", "results": []}) is None


def _drain_waves():
    import sys

    sys.path.insert(0, os.path.join(ROLES, "..", "..", "..", ".."))
    try:
        from ansible_collections.vdsm.blockops.plugins.filter.drain_waves import drain_waves
    finally:
        sys.path.pop(0)
    return drain_waves


@pytest.mark.parametrize("seed", range(20))
def test_drain_waves_hold_the_limit_per_node_and_per_destination_across_nodes(seed):
    """Nodes drained side by side (serial above 1): in every wave each node
    starts at most N moves and each destination takes at most N from all
    of them; every VM moves once. (Each node began at its own destination
    and took N per wave: a destination took up to N per node.)"""
    import random

    drain_waves = _drain_waves()
    rng = random.Random(seed)
    limit = rng.randint(1, 3)
    dests = [f"qemu+tls://d{i}/system" for i in range(rng.randint(1, 3))]
    vms = {f"node{n}": [f"n{n}-vm{i}" for i in range(rng.randint(0, 7))]
           for n in range(rng.randint(1, 4))}
    plan = drain_waves(vms, dests, limit)
    assert set(plan) == set(vms) and len({len(w) for w in plan.values()}) <= 1
    moved = [m["domain"] for waves in plan.values() for wave in waves for m in wave]
    assert sorted(moved) == sorted(v for node in vms.values() for v in node)
    for step in range(max((len(w) for w in plan.values()), default=0)):
        wave = [m for waves in plan.values() for m in waves[step]]
        assert wave, "an empty wave"
        assert all(len(waves[step]) <= limit for waves in plan.values())
        assert all(sum(m["dest"] == d for m in wave) <= limit for d in dests)


def test_drain_waves_refuse_a_limit_of_zero_and_no_destination():
    from ansible.errors import AnsibleFilterError

    drain_waves = _drain_waves()
    with pytest.raises(AnsibleFilterError, match="1 or more"):
        drain_waves({"n": ["a"]}, ["d"], 0)
    with pytest.raises(AnsibleFilterError, match="no destination"):
        drain_waves({"n": ["a"]}, [], 1)
