#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, vdsm-blockops developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: blockops_info
short_description: Chains and block jobs of the VMs on a node
description:
  - Reports each disk's backing chain (active image first, with format,
    index, allocation and whether the images' metadata agree with libvirt)
    and the active block jobs, for one domain or every domain on the node.
version_added: "0.1.0"
author: vdsm-blockops developers (@vdsm-blockops)
extends_documentation_fragment:
  - vdsm.blockops.blockops
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Reads only; the same in check mode.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  domain:
    description: Name or UUID of one domain; all domains when omitted.
    type: str
  under:
    description:
      - A folder (a storage domain's mount, say). Adds I(under) to the result - every disk
        with any layer of its chain in that folder or below, decided by the folders'
        identities (a symlinked or bind-mounted alias of the folder counts as the folder).
    type: path
    version_added: "0.2.0"
"""

EXAMPLES = r"""
- name: Gather the chains of every VM
  vdsm.blockops.blockops_info:
  register: blockops

- name: Which disks have any layer on the old storage
  vdsm.blockops.blockops_info:
    under: /rhev/data-center/mnt/old-nfs
  register: on_old
"""

RETURN = r"""
domains:
  description: One entry per domain with its disks and their chains.
  returned: always
  type: list
  elements: dict
  sample:
    - domain: web01
      active: true
      disks:
        - disk: vda
          device: disk
          chain:
            - {path: /srv/vm/web01-s1.qcow2, format: qcow2, index: 2}
            - {path: /srv/vm/web01.qcow2, format: qcow2, index: 1}
jobs:
  description: Active block jobs.
  returned: always
  type: list
  elements: dict
  contains:
    domain: {description: The domain's name., type: str}
    disk: {description: The disk's target name., type: str}
    type: {description: "The job's type (pull, commit, active-commit, copy)", type: str}
    percent: {description: Progress in percent., type: float}
    ready: {description: Whether a copy or active commit can pivot., type: bool}
under:
  description: The disks with any layer under the folder I(under).
  returned: when I(under) is given
  type: list
  elements: dict
  contains:
    domain: {description: The domain's name., type: str}
    disk: {description: The disk's target name., type: str}
    layers: {description: "The paths of its layers under the folder, active first.", type: list, elements: str}
    active_under: {description: Whether the active layer is one of them., type: bool}
    chain_length: {description: How many layers its chain has., type: int}
    active: {description: The path of its active layer., type: str}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.vdsm.blockops.plugins.module_utils.blockops import (
    COMMON_ARGS, open_node, require_library, run)


def main():
    module = AnsibleModule(
        argument_spec=dict(domain=dict(type="str"), under=dict(type="path"), **COMMON_ARGS),
        supports_check_mode=True,
    )
    require_library(module)

    node = run(module, lambda: open_node(module))
    name = module.params["domain"]

    def gather():
        chains = [node.chain(d).to_json() for d in ([name] if name else node.domains())]
        for chain in chains:  # one entry per domain, not a verb's answer
            del chain["ok"], chain["operation"]
        return chains, node.jobs(name).to_json()["jobs"]

    domains, jobs = run(module, gather)
    result = dict(changed=False, domains=domains, jobs=jobs)
    if module.params["under"]:
        result["under"] = disks_under(domains, module.params["under"])
    module.exit_json(**result)


def disks_under(domains, folder):
    from vdsm_blockops.api import inside_folder

    found = []
    for dom in domains:
        for disk in dom["disks"]:
            paths = [layer["path"] for layer in disk.get("chain") or [] if layer.get("path")]
            layers = [path for path in paths if inside_folder(path, folder)]
            if disk.get("device") == "disk" and layers:
                found.append(dict(domain=dom["domain"], disk=disk["disk"], layers=layers,
                                  active_under=layers[0] == paths[0], active=paths[0],
                                  chain_length=len(paths)))
    return found


if __name__ == "__main__":
    main()
