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
"""

EXAMPLES = r"""
- name: Gather the chains of every VM
  vdsm.blockops.blockops_info:
  register: blockops
"""

RETURN = r"""
domains:
  description: One entry per domain with its disks and their chains.
  returned: always
  type: list
  elements: dict
jobs:
  description: Active block jobs (domain, disk, type, cur, end, percent, bandwidth, ready).
  returned: always
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.vdsm.blockops.plugins.module_utils.blockops import (
    COMMON_ARGS, context, require_library, run)


def main():
    module = AnsibleModule(
        argument_spec=dict(domain=dict(type="str"), **COMMON_ARGS),
        supports_check_mode=True,
    )
    require_library(module)
    from vdsm_blockops.engine.node import describe_chains, list_jobs

    ctx = run(module, lambda: context(module))
    name = module.params["domain"]

    def gather():
        domains = [ctx.conn.domain(name)] if name else ctx.conn.domains()
        chains = [describe_chains(d).to_json() for d in domains]
        for chain in chains:  # one entry per domain, not a verb's answer
            del chain["ok"], chain["operation"]
        return chains, list_jobs(ctx.conn, name).to_json()["jobs"]

    domains, jobs = run(module, gather)
    module.exit_json(changed=False, domains=domains, jobs=jobs)


if __name__ == "__main__":
    main()
