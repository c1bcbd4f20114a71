# -*- coding: utf-8 -*-
# Copyright: (c) 2026, vdsm-blockops developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared by the vdsm.blockops modules: import the library, connect, map
its errors onto fail_json. The modules stay thin shells."""

from __future__ import annotations

import logging
import traceback

try:
    from vdsm_blockops import api as _api
    HAS_LIBRARY = True
    IMPORT_ERROR = None
except ImportError:  # pragma: no cover - reported through fail_json
    HAS_LIBRARY = False
    IMPORT_ERROR = traceback.format_exc()

COMMON_ARGS = dict(
    uri=dict(type="str", default=None),
    config=dict(type="path", default=None),
    allow_vdsm_managed=dict(type="bool", default=False),
)


def require_library(module):
    if not HAS_LIBRARY:
        from ansible.module_utils.basic import missing_required_lib

        # names the interpreter Ansible runs the module with, and this host
        module.fail_json(msg=missing_required_lib("vdsm-blockops"), exception=IMPORT_ERROR)


class _WarnHandler(logging.Handler):
    """The library's warnings (bitmaps that stay, layers kept...) reach the
    play through module.warn."""

    def __init__(self, module):
        super().__init__(logging.WARNING)
        self.module = module

    def emit(self, record):
        self.module.warn(record.getMessage())


def _log_like_the_cli(module):
    """INFO and up to the system log, as the CLI logs (tag
    vdsm-blockops-ansible); warnings to module.warn too."""
    root = logging.getLogger("vdsm_blockops")
    root.setLevel(logging.INFO)
    root.addHandler(_WarnHandler(module))
    _api.log_to_syslog(root, "vdsm-blockops-ansible")


def open_node(module):
    """The library's node (vdsm_blockops.api, its public API only): the
    module runs on the node whose files it touches, so a URI naming
    another host is refused; its operations go to the node's history."""
    _log_like_the_cli(module)
    node = _api.Node(module.params.get("uri"), config=module.params.get("config"),
                     allow_vdsm_managed=bool(module.params.get("allow_vdsm_managed")),
                     source="ansible")
    node.require_local()
    return node


def in_module_words(module, message):
    """The library speaks the CLI's words (--reuse-external); a play sets
    the module's options (reuse_external): name those."""
    for name in module.argument_spec:
        message = message.replace("--" + name.replace("_", "-"), name)
    return message


def run(module, action):
    """Call ``action()``; a library error becomes fail_json with its one line."""
    try:
        return action()
    except _api.BlockOpsError as exc:
        module.fail_json(msg=in_module_words(module, str(exc)),
                         error={"code": exc.code, "exit_code": exc.exit_code},
                         **({"details": exc.details} if exc.details else {}))
    except Exception as exc:  # one error contract here too: a reason, not a crash
        module.fail_json(msg=f"{type(exc).__name__}: {exc}",
                         error={"code": "operation-failed", "exit_code": 1},
                         exception=traceback.format_exc())


def exit_with_report(module, report, changed):
    """exit_json with the library's report, and the chains as a diff."""
    result = dict(report, changed=changed)
    chains = _chains(report)
    if module._diff and chains is not None:
        result["diff"] = chain_diff(*chains)
    module.exit_json(**result)


def _chains(report):
    """(before, after) of a report: a disk's chains, or for disk=all (a
    report per disk) every disk's, by name; None when it has none."""
    if "results" in report:
        per_disk = [r for r in report["results"] if "chain_before" in r]
        if not per_disk:
            return None
        return ({r["disk"]: r["chain_before"] for r in per_disk},
                {r["disk"]: r["chain_after"] for r in per_disk})
    if "chain_before" in report:
        return report["chain_before"], report["chain_after"]
    return None


def chain_diff(before, after):
    return {"before": _chain_text(before), "after": _chain_text(after),
            "before_header": "chain (base first)", "after_header": "chain (base first)"}


def _chain_text(chain):
    if isinstance(chain, dict):  # per disk
        return "".join(f"{disk}:\n" + "".join(f"  {path}\n" for path in reversed(paths))
                       for disk, paths in sorted(chain.items()))
    return "\n".join(reversed(chain)) + "\n"


def chains_now(node, domain, disk):
    """chain_before and chain_after of an operation found already done: the
    chain the disk runs on (for every disk with disk=all), and verified."""
    chains = node.chains(domain, disk)
    chain = chains if disk == "all" else chains[disk]
    return {"chain_before": chain, "chain_after": chain, "verified": True}
