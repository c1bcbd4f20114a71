# -*- coding: utf-8 -*-
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
requirements: [vdsm-blockops, libvirt-python]
"""
