"""The public API of vdsm-blockops: what management software written in
Python may rely on (semantic versioning: ``docs/versioning.rst``).

Open a :class:`Node` (one libvirt connection), call its verbs -- the CLI's
verbs, with keyword arguments named as the CLI's options -- and get a frozen
typed report back (``report.to_json()`` is the ``--json`` output), or an
exception of one tree whose classes say the exit code: :class:`BadRequest`
(2: refused, nothing changed), :class:`JobTimeout` (3), :class:`Conflict`
(4), any other :class:`BlockOpsError` (1: failed)::

    from vdsm_blockops.api import BadRequest, Node

    with Node("qemu:///system") as node:
        report = node.merge("vm1", "vda", base="vda[2]")
        print(report.to_json()["chain_after"])

Every name in ``__all__`` is public. Everything else in the package
(``core``, ``engine``, ``ops``, ``virt``, ``shells`` and the underscored
modules here) is private: it changes without notice. The shells -- the
CLI, the Ansible modules, the hook -- use only this module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .. import __version__

if TYPE_CHECKING:
    from ..core.choices import ImageFormat, Method, Mode, Strategy
    from ..core.errors import (
        Aborted,
        BadRequest,
        BlockOpsError,
        Conflict,
        ConnectionLost,
        Interrupted,
        JobFailed,
        JobTimeout,
        OperationFailed,
        StateError,
        UnknownDisk,
        UnknownDomain,
        UnknownImage,
        UnsafeRequest,
        VerificationFailed,
        VolumeNotExtended,
    )
    from ..core.migrate_plan import MigrateReport
    from ..core.model import JobInfo
    from ..core.reports import (
        ChainReport,
        DiskFailure,
        DiskView,
        HistoryReport,
        InstallReport,
        JobRow,
        JobsReport,
        LayerView,
        MergeReport,
        MultiReport,
        OperationRow,
        RelocateReport,
        Report,
        Retired,
        SnapshotReport,
        SpeedReport,
        TextReport,
        VerifyReport,
        View,
    )
    from ..core.settled import AbortReport, RecordOutcome, RecoverReport
    from ..core.text import printable
    from ._admin import (
        disable_guard,
        enable_guard,
        guard,
        inside_folder,
        install_hook,
        install_units,
        log_to_syslog,
        uninstall_hook,
        uninstall_units,
    )
    from ._calls import CancelToken
    from ._node import Node, Progress

# Each public name is loaded from its home on first use (PEP 562): a
# shell that needs the choices of an option does not pay for the whole
# package (measured: ~80 ms for everything, most of it dataclass set-up).
_HOMES = {name: home for home, names in {
    "..core.errors": (
        'Aborted', 'BadRequest', 'BlockOpsError', 'Conflict', 'ConnectionLost', 'Interrupted',
        'JobFailed', 'JobTimeout', 'OperationFailed', 'StateError', 'UnknownDisk',
        'UnknownDomain', 'UnknownImage', 'UnsafeRequest', 'VerificationFailed',
        'VolumeNotExtended'
    ),
    "..core.migrate_plan": (
        'MigrateReport',
    ),
    "..core.choices": (
        'ImageFormat', 'Method', 'Mode', 'Strategy',
    ),
    "..core.model": (
        'JobInfo',
    ),
    "..core.reports": (
        'ChainReport', 'DiskFailure', 'DiskView', 'HistoryReport', 'InstallReport', 'JobRow',
        'JobsReport', 'LayerView', 'MergeReport', 'MultiReport', 'OperationRow',
        'RelocateReport', 'Report', 'Retired', 'SnapshotReport', 'SpeedReport', 'TextReport',
        'VerifyReport', 'View'
    ),
    "..core.settled": (
        'AbortReport', 'RecordOutcome', 'RecoverReport'
    ),
    "..core.text": (
        'printable',
    ),
    "._admin": (
        'disable_guard', 'enable_guard', 'guard', 'inside_folder', 'install_hook',
        'install_units', 'log_to_syslog', 'uninstall_hook', 'uninstall_units'
    ),
    "._node": (
        'CancelToken', 'Node', 'Progress'
    ),
}.items() for name in names}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "__version__", "Node", "CancelToken", "Progress", "JobInfo",
    # node-wide helpers (no connection)
    "guard", "disable_guard", "enable_guard", "install_hook", "uninstall_hook",
    "install_units", "uninstall_units", "inside_folder", "log_to_syslog", "printable",
    # results
    "Report", "View", "MergeReport", "RelocateReport", "SnapshotReport", "MigrateReport",
    "MultiReport", "DiskFailure", "ChainReport", "DiskView", "LayerView", "VerifyReport",
    "JobsReport", "JobRow", "OperationRow", "AbortReport", "SpeedReport", "RecoverReport",
    "RecordOutcome", "Retired", "HistoryReport", "InstallReport", "TextReport",
    # choices of the options
    "Strategy", "Mode", "Method", "ImageFormat",
    # errors
    "BlockOpsError", "BadRequest", "UnknownDomain", "UnknownDisk", "UnknownImage",
    "UnsafeRequest", "OperationFailed", "Interrupted", "Aborted", "JobFailed",
    "VerificationFailed", "VolumeNotExtended", "StateError", "ConnectionLost", "JobTimeout",
    "Conflict",
]
