# -*- coding: utf-8 -*-
# Copyright: (c) 2026, vdsm-blockops developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared by the vdsm.blockops modules: import the library, connect, map
its errors onto fail_json. The modules stay thin shells."""

from __future__ import annotations

import traceback

try:
    from vdsm_blockops.core import errors as _errors
    from vdsm_blockops.core.config import load_config, require_local_uri
    HAS_LIBRARY = True
    IMPORT_ERROR = None
except ImportError:  # pragma: no cover - reported through fail_json
    HAS_LIBRARY = False
    IMPORT_ERROR = traceback.format_exc()

COMMON_ARGS = dict(
    uri=dict(type="str", default=None),
    config=dict(type="path", default=None),
)


def require_library(module):
    if not HAS_LIBRARY:
        module.fail_json(msg="the vdsm-blockops Python package is not installed on this node "
                             "for the interpreter Ansible uses", exception=IMPORT_ERROR)


def context(module):
    from vdsm_blockops.engine.context import Context
    from vdsm_blockops.virt import open_connection

    config = load_config(module.params.get("config"))
    uri = module.params.get("uri") or config.connect
    require_local_uri(uri)  # the module runs on the node whose files it touches
    return Context(conn=open_connection(uri), config=config)


def run(module, action):
    """Call ``action()``; a library error becomes fail_json with its one line."""
    try:
        return action()
    except _errors.BlockOpsError as exc:
        module.fail_json(msg=str(exc), error={"code": exc.code, "exit_code": exc.exit_code},
                         **({"details": exc.details} if exc.details else {}))
    except Exception as exc:  # one error contract here too: a reason, not a crash
        module.fail_json(msg=f"{type(exc).__name__}: {exc}",
                         error={"code": "operation-failed", "exit_code": 1},
                         exception=traceback.format_exc())


def exit_with_report(module, report, changed):
    """exit_json with the library's report, and the chains as a diff."""
    result = dict(report, changed=changed)
    if module._diff and "chain_before" in report:
        result["diff"] = chain_diff(report["chain_before"], report["chain_after"])
    module.exit_json(**result)


def chain_diff(before, after):
    return {"before": "\n".join(reversed(before)) + "\n",
            "after": "\n".join(reversed(after)) + "\n",
            "before_header": "chain (base first)", "after_header": "chain (base first)"}
