#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, vdsm-blockops developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: blockops_migrate
short_description: Move a running VM and its local disks to another node, keeping the chains
description:
  - Copies every read-only layer of every disk to I(dest_dir) on the destination node through
    its libvirt (proven by reading each copy back there), creates the active layers on them and
    migrates the VM live with only the active layers mirrored. Snapshot chains and checkpoints
    are kept; the source layers are retired once the destination verified.
  - Runs on the source node. A move a failure left unfinished is settled first (as
    C(vdsm-blockops recover) would), so the task can simply be run again; a VM that no longer
    runs on this node but on I(dest_uri) is reported unchanged.
version_added: "0.2.0"
author: vdsm-blockops developers (@vdsm-blockops)
extends_documentation_fragment:
  - vdsm.blockops.blockops
  - vdsm.blockops.blockops.changing
  - ansible.builtin.action_common_attributes
options:
  domain:
    description: Name or UUID of the running domain.
    type: str
    required: true
  dest_uri:
    description: The destination node's libvirt URI, such as C(qemu+tls://node2/system).
    type: str
    required: true
  dest_dir:
    description: Where the images go, as the destination node sees it.
    type: path
    required: true
  source_root:
    description:
      - Lay the layers out under I(dest_dir) as they lie under this folder on the source node
        (its image folder), so that VMs moved to one I(dest_dir) share their templates there -
        a template is copied once per destination and reused by the next moves.
      - Default - the folder the VM's layers share.
    type: path
  proof:
    description:
      - How each copy is proven on the destination. C(full) reads it back whole and compares its
        SHA-256 with what was sent (every byte). C(sample) compares its size, its header and 16
        random 1 MiB pieces with the source file - it does NOT prove every byte, use it only when
        the transport authenticates every byte itself (TLS, SSH).
    type: str
    choices: [full, sample]
    default: full
  migrate_uri:
    description: Where the destination's QEMU listens for the migration data (C(tcp://ADDRESS)).
    type: str
  bandwidth:
    description: Throttle the copies and the migration, MiB/s (0 = unlimited).
    type: int
    default: 0
  timeout:
    description: Stop and roll back when the move has not finished after this many seconds.
    type: float
  delete_source:
    description: Unlink the source layers nothing else uses once the destination verified.
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Move web01 to node2, chain and checkpoints kept
  vdsm.blockops.blockops_migrate:
    domain: web01
    dest_uri: qemu+tls://node2.example.com/system
    dest_dir: /var/lib/libvirt/images
"""

RETURN = r"""
chain_before:
  description: Each disk's chain on this node, active image first.
  returned: success
  type: dict
  sample: {vda: [/var/lib/libvirt/images/web01-s1.qcow2, /var/lib/libvirt/images/web01.qcow2]}
chain_after:
  description: Each disk's chain on the destination node, active image first.
  returned: success
  type: dict
  sample: {vda: [/var/lib/libvirt/images/web01-s1.qcow2, /var/lib/libvirt/images/web01.qcow2]}
copied:
  description:
    - The read-only layers, each with its source, its path there, its bytes, the SHA-256 of what
      was sent, whether it was found there already (C(reused) - a template) and how its copy was
      proven (C(proof) - C(full) or C(sample), none when reused).
  returned: success
  type: list
  elements: dict
  sample: [{source: /var/lib/libvirt/images/tmpl/base.qcow2, dest: /var/lib/libvirt/images/tmpl/base.qcow2,
            bytes: 1073741824, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08,
            reused: false, proof: full}]
checkpoints:
  description: The checkpoints kept on the destination, parents first.
  returned: success
  type: list
  elements: str
dest_host:
  description: The destination node's host name.
  returned: success
  type: str
moved:
  description: Whether the VM runs on the destination now (moved now, or by an earlier run).
  returned: success
  type: bool
  sample: true
would_move:
  description:
    - In check mode - whether the move would be made (the plan is possible, or an unfinished
      move would be settled first, which check mode only reports).
  returned: success
  type: bool
  sample: false
"""


from ansible.module_utils.basic import AnsibleModule
from ansible_collections.vdsm.blockops.plugins.module_utils.blockops import (
    COMMON_ARGS, open_node, require_library, run)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            domain=dict(type="str", required=True),
            dest_uri=dict(type="str", required=True),
            dest_dir=dict(type="path", required=True),
            source_root=dict(type="path"),
            proof=dict(type="str", choices=["full", "sample"], default="full"),
            migrate_uri=dict(type="str"),
            bandwidth=dict(type="int", default=0),
            timeout=dict(type="float"),
            delete_source=dict(type="bool", default=False),
            **COMMON_ARGS,
        ),
        supports_check_mode=True,
    )
    require_library(module)

    p = module.params
    node = run(module, lambda: open_node(module))
    if module.check_mode:  # say what settling would do; change nothing
        pending = run(module, lambda: node.unfinished_move(p["domain"]))
        if pending:
            module.exit_json(changed=True, msg=f"check mode: {pending}", moved=False,
                             would_move=True)
    else:
        done = run(module, lambda: node.settle_move(p["domain"], p["dest_uri"],
                                                    dest_dir=p["dest_dir"], timeout=p["timeout"]))
        if done:
            module.exit_json(changed=done.startswith("finished"), msg=done, moved=True)
    report = run(module, lambda: node.migrate(
        p["domain"], p["dest_uri"], dest_dir=p["dest_dir"], migrate_uri=p["migrate_uri"],
        bandwidth=p["bandwidth"], timeout=p["timeout"], dry_run=module.check_mode,
        delete_source=p["delete_source"], source_root=p["source_root"],
        proof=p["proof"]).to_json())
    module.exit_json(**dict(report, changed=True, moved=not module.check_mode,
                            would_move=module.check_mode))


if __name__ == "__main__":
    main()
