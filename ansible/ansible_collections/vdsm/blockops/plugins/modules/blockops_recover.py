#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, vdsm-blockops developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: blockops_recover
short_description: Settle the unfinished operations of a node (or of one VM)
description:
  - Finishes or rolls back every operation an interruption left unfinished - a merge,
    relocation or snapshot whose command was killed (an async timeout, an SSH drop), a move
    to another node - as C(vdsm-blockops recover) does, from the records on the node. Run it
    before acting again (the roles do), so that running a play again after any interruption
    settles what the last run left.
  - A job still running is followed until it ends, or until I(timeout) - then a warning, and
    the job runs on; an operation whose owner still runs is left to it (a warning). The module
    fails when a record cannot be settled or read by this version of the library.
version_added: "0.2.0"
author: vdsm-blockops developers (@vdsm-blockops)
extends_documentation_fragment:
  - vdsm.blockops.blockops
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Reports the records that would be settled; settles nothing.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  domain:
    description: Name or UUID of one domain; every domain of the node when omitted.
    type: str
  timeout:
    description: Seconds to wait for a job that still runs (then the module fails and the job
      runs on; run it again later).
    type: float
"""

EXAMPLES = r"""
- name: Settle what an interrupted run left on the node
  vdsm.blockops.blockops_recover:

- name: Settle one VM, waiting at most ten minutes for its job
  vdsm.blockops.blockops_recover:
    domain: web01
    timeout: 600
"""

RETURN = r"""
records:
  description: What became of each unfinished record (in check mode - what is unfinished).
  returned: success
  type: list
  elements: dict
  sample:
    - {domain: web01, disk: vda, operation: merge, record: 3f2a9c1b7d04, phase: started,
       result: finished}
settled:
  description: How many records were finished or rolled back (0 in check mode).
  returned: success
  type: int
  sample: 1
"""


from ansible.module_utils.basic import AnsibleModule
from ansible_collections.vdsm.blockops.plugins.module_utils.blockops import (
    COMMON_ARGS, open_node, require_library, run)


def main():
    module = AnsibleModule(
        argument_spec=dict(domain=dict(type="str"), timeout=dict(type="float"), **COMMON_ARGS),
        supports_check_mode=True,
    )
    require_library(module)

    p = module.params
    node = run(module, lambda: open_node(module))
    if module.check_mode:
        jobs = run(module, lambda: node.jobs(p["domain"]).to_json())
        pending = [{k: op[k] for k in ("domain", "disk", "operation", "record", "phase")}
                   for op in jobs["operations"]]
        module.exit_json(changed=bool(pending), records=pending, settled=0)
    report = run(module, lambda: node.recover(p["domain"], timeout=p["timeout"]).to_json())
    records = report.get("records", [])
    settled = sum(1 for r in records if r.get("result") in ("finished", "rolled-back"))
    # An operation whose owner still runs (busy) or whose job runs on past
    # the timeout (waiting) is not left behind: it is under way.
    stuck = [r for r in records if r.get("result") in ("failed", "unreadable")]
    for r in records:
        if r.get("result") in ("busy", "waiting"):
            module.warn(f"{r['domain']} {r['disk']}: {r['operation']} {r['record']} is "
                        f"{r['result']}: {r.get('message') or 'still under way'}")
    if stuck:
        module.fail_json(msg="; ".join(f"{r['domain']} {r['disk']}: {r.get('message') or r['result']}"
                                       for r in stuck), records=records, settled=settled)
    module.exit_json(changed=settled > 0, records=records, settled=settled)


if __name__ == "__main__":
    main()
