"""The libvirt adapter: the only package that imports ``libvirt``.

It owns the process-wide event loop thread, the connection (keepalive,
close callback, reconnect), the BLOCK_JOB_2 event fan-out, a narrow
``Domain`` wrapper whose verbs are named after the job, and the one place
where ``libvirtError`` becomes an error of our own tree.
"""

from .connection import Connection, RunningChain, open_connection
from .domain import Domain
from .errors import libvirt_errors, translate

__all__ = ["Connection", "Domain", "RunningChain", "libvirt_errors", "open_connection", "translate"]
