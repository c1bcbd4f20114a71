#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, vdsm-blockops developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: blockops_snapshot
short_description: Disk-only external snapshot of a VM's disk, running or shut off
description:
  - Puts a new qcow2 overlay on top of the disk's active image; the old
    active image becomes a point in time. Idempotent, so when I(overlay) is
    already the active image, nothing changes.
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
    description: Target name such as C(vda).
    type: str
    required: true
  overlay:
    description: Path of the new overlay.
    type: path
    required: true
  reuse_external:
    description: I(overlay) was pre-created with the right backing metadata.
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Snapshot before the upgrade
  vdsm.blockops.blockops_snapshot:
    domain: web01
    disk: vda
    overlay: /var/lib/libvirt/images/web01-pre-upgrade.qcow2
"""

RETURN = r"""
chain_after:
  description: Paths of the chain afterwards, active image first.
  returned: success
  type: list
  elements: str
  sample: [/srv/vm/web01-s2.qcow2, /srv/vm/web01.qcow2]
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
chain_before:
  description: Paths of the chain before, active image first.
  returned: success
  type: list
  elements: str
  sample: [/srv/vm/web01.qcow2]
disk: {description: 'The disk''s target name, or C(all).', returned: success, type: str, sample: vda}
domain: {description: The domain operated on., returned: success, type: str, sample: web01}
duration_s: {description: 'Seconds the whole operation took, planning included.', returned: success, type: float,
  sample: 4.2}
ok: {description: Always true on success (the library's report)., returned: success, type: bool, sample: true}
online: {description: Whether the domain was running (a libvirt job) or shut off (qemu-img)., returned: success,
  type: bool, sample: true}
operation: {description: The operation the report is about., returned: success, type: str, sample: snapshot}
overlay: {description: The new active image., returned: success, type: str, sample: /srv/vm/web01-s1.qcow2}
retired:
  description: Images that left the chain, each with whether it is still a valid point in time.
  returned: success
  type: list
  elements: dict
  sample:
  - {path: /srv/vm/web01-s1.qcow2, valid: false}
verified: {description: Whether the result was checked against libvirt and the images., returned: success,
  type: bool, sample: true}
"""


from ansible.module_utils.basic import AnsibleModule
from ansible_collections.vdsm.blockops.plugins.module_utils.blockops import (
    COMMON_ARGS, chains_now, exit_with_report, open_node, require_library, run)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            domain=dict(type="str", required=True),
            disk=dict(type="str", required=True),
            overlay=dict(type="path", required=True),
            reuse_external=dict(type="bool", default=False),
            **COMMON_ARGS,
        ),
        supports_check_mode=True,
    )
    require_library(module)

    p = module.params
    node = run(module, lambda: open_node(module))
    done = run(module, lambda: node.already_done("snapshot", p["domain"], p["disk"],
                                                 overlay=p["overlay"]))
    if done is not None:
        now = run(module, lambda: chains_now(node, p["domain"], p["disk"]))
        exit_with_report(module, dict(now, ok=True, operation="snapshot", domain=p["domain"],
                                      disk=p["disk"], overlay=p["overlay"], msg=done),
                         changed=False)
    report = run(module, lambda: node.snapshot(p["domain"], p["disk"], p["overlay"],
                                               reuse_external=p["reuse_external"],
                                               dry_run=module.check_mode).to_json())
    exit_with_report(module, report, changed=True)


if __name__ == "__main__":
    main()
