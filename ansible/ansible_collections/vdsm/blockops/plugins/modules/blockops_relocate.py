#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, vdsm-blockops developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: blockops_relocate
short_description: Move a VM's disk to another place, running or shut off
description:
  - Copies a disk's data to I(dest) while the VM runs and pivots the VM onto
    it. C(chain) mode moves every layer into I(dest)'s folder and keeps the
    snapshots; C(full) makes one standalone image; C(shallow) moves only the
    active layer.
  - Idempotent - a disk already at I(dest) is left alone, and with I(pivot=false) so is the copy an
    earlier run made at I(dest) while it is unchanged; check mode returns the plan; diff mode
    shows the chains.
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
    description: Target name such as C(vda), or C(all) (then I(dest) is a folder).
    type: str
    required: true
  dest:
    description: Path of the new active image (a folder with I(disk=all)).
    type: path
    required: true
  mode:
    description: What moves.
    type: str
    choices: [chain, full, shallow]
    default: chain
  method:
    description:
      - C(mirror) (blockCopy); C(flatten) (full mode only, the VM running) flattens the
        read-only layers into I(dest) by qemu-img at file speed, then mirrors only the
        active layer onto I(dest); C(snapshot-stream) (full mode only).
      - C(auto) picks C(flatten) for a full copy when the read-only layers hold most data,
        else C(mirror).
    type: str
    choices: [auto, mirror, flatten, snapshot-stream]
    default: auto
  format:
    description: Format of I(dest); C(raw) only with I(mode=full).
    type: str
    choices: [qcow2, raw]
    default: qcow2
  reuse_external:
    description: I(dest) (and its layers) were pre-created.
    type: bool
    default: false
  sync_writes:
    description: Guest writes go to both sides so the copy always converges.
    type: bool
    default: false
  pivot:
    description: Pivot onto I(dest); false leaves the VM on the source and I(dest) a consistent copy.
    type: bool
    default: true
  delete_source:
    description: After pivot and verification unlink source files no chain uses.
    type: bool
    default: false
  bandwidth:
    description: Throttle in MiB/s (0 = unlimited).
    type: int
    default: 0
  timeout:
    description: Abort the copy after this many seconds.
    type: float
"""

EXAMPLES = r"""
- name: Move web01's disk with its snapshots to the fast pool
  vdsm.blockops.blockops_relocate:
    domain: web01
    disk: vda
    dest: /srv/fast/web01/vda.qcow2

- name: Standalone raw copy, VM stays where it is
  vdsm.blockops.blockops_relocate:
    domain: web01
    disk: vda
    dest: /backup/web01-vda.raw
    mode: full
    format: raw
    pivot: false
"""

RETURN = r"""
chain_before:
  description: Paths of the chain before, active image first.
  returned: success
  type: list
  elements: str
  sample: [/srv/vm/web01-s2.qcow2, /srv/vm/web01-s1.qcow2, /srv/vm/web01.qcow2]
chain_after:
  description: Paths of the chain the VM runs on afterwards, active image first.
  returned: success
  type: list
  elements: str
  sample: [/srv/vm/web01-s2.qcow2, /srv/vm/web01.qcow2]
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
relocated:
  description:
    - Whether the disk runs on I(dest) now, verified (relocated now, or by an earlier run) -
      what a play decides success by. False in check mode and with I(pivot=false).
  returned: success
  type: bool
  sample: true
copied:
  description:
    - With I(pivot=false) - whether I(dest) holds the verified copy of the disk, made now or by an
      earlier run (then unchanged since, known by its identity) - what a play decides success by.
      False in check mode and with a pivot.
  returned: success
  type: bool
  sample: true
would_relocate:
  description: In check mode - whether the relocation would be made (the plan is possible).
  returned: success
  type: bool
  sample: false
results:
  description: One report per disk when I(disk=all).
  returned: when disk is all
  type: list
  elements: dict
bytes_to_copy: {description: 'Bytes the operation copies (allocated data, holes excluded).', returned: success,
  type: int, sample: 1073741824}
copy_chain:
  description: The chain at the destination, active image first.
  returned: success
  type: list
  elements: str
  sample: [/srv/fast/web01/vda.qcow2]
deleted:
  description: Files deleted with I(delete_retired) or I(delete_source).
  returned: success
  type: list
  elements: str
  sample: [/srv/vm/web01-s1.qcow2]
dest: {description: The new active image (or folder for disk=all)., returned: success, type: str, sample: /srv/fast/web01/vda.qcow2}
disk: {description: 'The disk''s target name, or C(all).', returned: success, type: str, sample: vda}
domain: {description: The domain operated on., returned: success, type: str, sample: web01}
dry_run: {description: Whether only the plan was made (check mode)., returned: success, type: bool, sample: false}
duration_s: {description: 'Seconds the whole operation took, planning included.', returned: success, type: float,
  sample: 4.2}
finished: {description: Whether the operation ran to its end (false when only started or planned)., returned: success,
  type: bool, sample: true}
format: {description: The destination's format., returned: success, type: str, sample: qcow2}
kept:
  description: Files asked to be deleted and kept, each with why (still used, a block volume without volume_remove_command).
  returned: success
  type: list
  elements: dict
  sample:
  - {path: /dev/vg/web01-s1, why: a block volume}
method: {description: 'How the data moved - mirror, flatten or snapshot-stream with the VM running; copy
    (the tool''s own proven copies) or convert (qemu-img) with it shut off.', returned: success, type: str,
  sample: mirror}
mode: {description: 'chain, full or shallow.', returned: success, type: str, sample: chain}
ok: {description: Always true on success (the library's report)., returned: success, type: bool, sample: true}
online: {description: Whether the domain was running (a libvirt job) or shut off (qemu-img)., returned: success,
  type: bool, sample: true}
operation: {description: The operation the report is about., returned: success, type: str, sample: relocate}
persistent_definition_fixed: {description: Whether the tool pointed the persistent definition at dest
    itself (libvirt had not)., returned: success, type: bool, sample: false}
phases_s:
  description: Seconds each phase took - copy (the job up to the pivot, or the copies) and verification.
  returned: success
  type: dict
  sample: {copy: 3.1, verification: 0.2}
pivot: {description: Whether the VM was moved onto the copy., returned: success, type: bool, sample: true}
record: {description: The operation record's id (C(vdsm-blockops jobs) and C(history) show it)., returned: success,
  type: str, sample: 3f2a9c1b7d04}
retired:
  description: Images that left the chain, each with whether it is still a valid point in time.
  returned: success
  type: list
  elements: dict
  sample:
  - {path: /srv/vm/web01-s1.qcow2, valid: false}
"""


import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.vdsm.blockops.plugins.module_utils.blockops import (
    COMMON_ARGS, chains_now, exit_with_report, open_node, require_library, run)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            domain=dict(type="str", required=True),
            disk=dict(type="str", required=True),
            dest=dict(type="path", required=True),
            mode=dict(type="str", choices=["chain", "full", "shallow"], default="chain"),
            method=dict(type="str", choices=["auto", "mirror", "flatten", "snapshot-stream"],
                        default="auto"),
            format=dict(type="str", choices=["qcow2", "raw"], default="qcow2"),
            reuse_external=dict(type="bool", default=False),
            sync_writes=dict(type="bool", default=False),
            pivot=dict(type="bool", default=True),
            delete_source=dict(type="bool", default=False),
            bandwidth=dict(type="int", default=0),
            timeout=dict(type="float"),
            **COMMON_ARGS,
        ),
        supports_check_mode=True,
    )
    require_library(module)
    p = module.params
    # Checked by value: mode and both flags have defaults, so Ansible's
    # required_if and mutually_exclusive would never (or always) fire.
    if p["method"] in ("snapshot-stream", "flatten") and p["mode"] != "full":
        module.fail_json(msg=f"method={p['method']} needs mode=full")
    if p["delete_source"] and p["reuse_external"]:
        module.fail_json(msg="delete_source=true and reuse_external=true cannot be combined "
                             "(the prepared destination is not the source)")
    node = run(module, lambda: open_node(module))
    if module.check_mode and not os.path.isdir(p["dest"] if p["disk"] == "all"
                                               else os.path.dirname(p["dest"])):
        # An earlier task of the play (a folder to make) did not run in
        # check mode: predict, say what could not be checked.
        module.exit_json(changed=True, would_relocate=True, relocated=False, copied=False,
                         msg=f"check mode: the destination folder of {p['dest']} does not exist "
                             "yet; the rest of the plan is checked when it does")
    done = run(module, lambda: node.already_done("relocate", p["domain"], p["disk"],
                                                 dest=p["dest"], mode=p["mode"],
                                                 pivot=p["pivot"], format=p["format"]))
    if done:
        now = run(module, lambda: chains_now(node, p["domain"], p["disk"]))
        module.exit_json(changed=False, msg=done, relocated=p["pivot"], copied=not p["pivot"],
                         **now)
    report = run(module, lambda: node.relocate(
        p["domain"], p["disk"], p["dest"], mode=p["mode"], method=p["method"],
        format=p["format"], reuse_external=p["reuse_external"], sync_writes=p["sync_writes"],
        pivot=p["pivot"], delete_source=p["delete_source"], bandwidth=p["bandwidth"],
        timeout=p["timeout"], dry_run=module.check_mode).to_json())
    # the positive word a role decides by: the disk runs on DEST, verified
    verified = all(r.get("verified") for r in report.get("results") or [report])
    report["relocated"] = verified and p["pivot"] and not module.check_mode
    report["copied"] = verified and not p["pivot"] and not module.check_mode
    report["would_relocate"] = module.check_mode
    exit_with_report(module, report, changed=True)


if __name__ == "__main__":
    main()
