#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, vdsm-blockops developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: blockops_merge
short_description: Snapshot merge of a VM's disk, running or shut off
description:
  - Collapses the layers of a disk's backing chain strictly above I(base) up
    to and including I(top) into one image that backs onto I(base), while the
    VM runs (libvirt block pull or block commit, with pivot for an active
    commit). Guest-visible data never changes and I(base) is never written.
  - The C(auto) strategy copies the fewest allocated bytes and never commits
    into a layer another VM's chain uses.
  - Idempotent; check mode returns the plan; diff mode shows the chains.
version_added: "0.1.0"
author: vdsm-blockops developers (@vdsm-blockops)
extends_documentation_fragment:
  - vdsm.blockops.blockops
  - vdsm.blockops.blockops.changing
  - ansible.builtin.action_common_attributes
options:
  domain:
    description: Name or UUID of the domain (running, or defined and shut off).
    type: str
    required: true
  disk:
    description: Target name such as C(vda), or C(all).
    type: str
    required: true
  base:
    description: Image kept as the backing (absolute path or C(vda[N])). Omit to flatten.
    type: str
  top:
    description: Highest image of the segment (default the active image).
    type: str
  strategy:
    description: How to merge.
    type: str
    choices: [auto, pull, commit]
    default: auto
  bandwidth:
    description: Throttle in MiB/s (0 = unlimited).
    type: int
    default: 0
  timeout:
    description: Abort the job after this many seconds.
    type: float
  keep_relative:
    description:
      - Keep relative backing names (libvirt's RELATIVE flags).
      - Unset, names stay relative when the chain already uses relative names (oVirt layouts).
    type: bool
  delete_retired:
    description: Unlink retired layers after verification when nothing uses them.
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Delete the snapshots between the template and the active image
  vdsm.blockops.blockops_merge:
    domain: web01
    disk: vda
    base: /var/lib/libvirt/images/web01-base.qcow2

- name: Flatten every disk, at most 200 MiB/s each
  vdsm.blockops.blockops_merge:
    domain: web01
    disk: all
    bandwidth: 200
"""

RETURN = r"""
strategy:
  description: pull, commit or noop.
  returned: success
  type: str
chain_before:
  description: Paths of the chain before, active image first.
  returned: success
  type: list
  elements: str
  sample: [/srv/vm/web01-s2.qcow2, /srv/vm/web01-s1.qcow2, /srv/vm/web01.qcow2]
chain_after:
  description: Paths of the chain after (planned in check mode), active first.
  returned: success
  type: list
  elements: str
  sample: [/srv/vm/web01-s2.qcow2, /srv/vm/web01.qcow2]
retired:
  description: Layers that left the chain, with whether they stay valid.
  returned: success
  type: list
  elements: dict
  contains:
    path: {description: The layer's path., type: str}
    valid: {description: "Whether it still holds a consistent image (false after a commit out of it).", type: bool}
verified:
  description: Whether the result was checked against libvirt and the images.
  returned: success
  type: bool
volume:
  description:
    - For a target (merge), destination (relocate) or overlay (snapshot) that is a block device
      (qcow2 on an LV) - its size, where its data ends, the bytes the job may need, the size it
      was extended to and the extensions made during the job.
  returned: when the layer written into is a block device
  type: dict
  contains:
    size: {description: The volume's size in bytes before the job., type: int}
    needed: {description: The bytes the job may write into it., type: int}
    extended_to: {description: "Its size after the extension before the job, if any.", type: int}
    extensions_during_job: {description: How often it was extended while the job ran., type: int}
results:
  description: One report per disk when I(disk=all).
  returned: when disk is all
  type: list
  elements: dict
alternatives:
  description: The bytes each strategy would copy, as the planner weighed them.
  returned: success
  type: dict
  sample: {pull: 1048576, commit: 2097152}
base: {description: The image kept as the backing of the result (none when flattened)., returned: success,
  type: str, sample: /srv/vm/web01.qcow2}
bytes_to_copy: {description: 'Bytes the operation copies (allocated data, holes excluded).', returned: success,
  type: int, sample: 1073741824}
deleted:
  description: Files deleted with I(delete_retired) or I(delete_source).
  returned: success
  type: list
  elements: str
  sample: [/srv/vm/web01-s1.qcow2]
disk: {description: 'The disk''s target name, or C(all).', returned: success, type: str, sample: vda}
domain: {description: The domain operated on., returned: success, type: str, sample: web01}
dry_run: {description: Whether only the plan was made (check mode)., returned: success, type: bool, sample: false}
duration_s: {description: 'Seconds the whole operation took, planning included.', returned: success, type: float,
  sample: 4.2}
finished: {description: Whether the operation ran to its end (false when only started or planned)., returned: success,
  type: bool, sample: true}
keep_relative: {description: Whether relative backing names were kept., returned: success, type: bool,
  sample: false}
kept:
  description: Files asked to be deleted and kept, each with why (still used, a block volume without volume_remove_command).
  returned: success
  type: list
  elements: dict
  sample:
  - {path: /dev/vg/web01-s1, why: a block volume}
libvirt_call: {description: The libvirt call made (or C(qemu-img) with the domain shut off)., returned: success,
  type: str, sample: blockRebase}
ok: {description: Always true on success (the library's report)., returned: success, type: bool, sample: true}
online: {description: Whether the domain was running (a libvirt job) or shut off (qemu-img)., returned: success,
  type: bool, sample: true}
operation: {description: The operation the report is about., returned: success, type: str, sample: merge}
record: {description: The operation record's id (C(vdsm-blockops jobs) and C(history) show it)., returned: success,
  type: str, sample: 3f2a9c1b7d04}
result_image: {description: The image that holds the merged data., returned: success, type: str, sample: /srv/vm/web01-s2.qcow2}
top: {description: The highest image of the merged segment., returned: success, type: str, sample: /srv/vm/web01-s2.qcow2}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.vdsm.blockops.plugins.module_utils.blockops import (
    COMMON_ARGS, chains_now, exit_with_report, open_node, require_library, run)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            domain=dict(type="str", required=True),
            disk=dict(type="str", required=True),
            base=dict(type="str"),
            top=dict(type="str"),
            strategy=dict(type="str", choices=["auto", "pull", "commit"], default="auto"),
            bandwidth=dict(type="int", default=0),
            timeout=dict(type="float"),
            keep_relative=dict(type="bool"),
            delete_retired=dict(type="bool", default=False),
            **COMMON_ARGS,
        ),
        supports_check_mode=True,
    )
    require_library(module)
    p = module.params
    if p["disk"] == "all" and (p["base"] is not None or p["top"] is not None):
        module.fail_json(msg="base and top name images of one chain; they cannot go with disk=all")
    node = run(module, lambda: open_node(module))
    done = run(module, lambda: node.already_done("merge", p["domain"], p["disk"], base=p["base"],
                                                 top=p["top"]))
    if done:
        now = run(module, lambda: chains_now(node, p["domain"], p["disk"]))
        module.exit_json(changed=False, msg=done, **now)
    report = run(module, lambda: node.merge(
        p["domain"], p["disk"], base=p["base"], top=p["top"], strategy=p["strategy"],
        bandwidth=p["bandwidth"], timeout=p["timeout"], dry_run=module.check_mode,
        keep_relative=p["keep_relative"], delete_retired=p["delete_retired"]).to_json())
    reports = report.get("results", [report])
    changed = any(r.get("strategy") != "noop" for r in reports)
    exit_with_report(module, report, changed)


if __name__ == "__main__":
    main()
