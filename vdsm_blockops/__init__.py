"""vdsm-blockops: live block operations on running QEMU/KVM VMs via libvirt.

The pure parts (chain model, planner) import nothing from libvirt; the
adapter ``virt`` is the only module that does.
"""

__version__ = "0.3.0"
