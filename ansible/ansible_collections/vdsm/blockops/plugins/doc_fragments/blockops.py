# -*- coding: utf-8 -*-
# Copyright: (c) 2026, vdsm-blockops developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Options every vdsm.blockops module takes.


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  uri:
    description: libvirt URI (default from the node's config, else C(qemu:///system)).
    type: str
  config:
    description: Path of the node's vdsm-blockops config file.
    type: path
  allow_vdsm_managed:
    description:
      - Act on a VM whose definition carries VDSM's metadata. Refused by default, since the
        oVirt engine's view of the chain would go stale and both would set block thresholds.
    type: bool
    default: false
requirements: [vdsm-blockops, libvirt-python]
"""

    # The attributes of the modules that change chains (check mode plans,
    # diff mode shows the chains before and after).
    CHANGING = r"""
attributes:
  check_mode:
    support: full
    details: Returns the plan; nothing changes.
  diff_mode:
    support: full
    details: Returns the chains before and after as a diff.
  platform:
    platforms: posix
"""
