"""Node configuration: ``/etc/vdsm-blockops/config.yaml`` (optional).

Keys (all optional)::

    state_dir: /var/lib/vdsm-blockops     # registry, locks, recovery queue
    connect: qemu:///system
    storage_roots: [/var/lib/libvirt/images, /srv/vm]   # relocate targets
    poll_interval_s: 0.5
    pivot_retries: 10
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import yaml

from .errors import BadRequest

DEFAULT_PATH = "/etc/vdsm-blockops/config.yaml"
ENV_PATH = "VDSM_BLOCKOPS_CONFIG"


@dataclass(frozen=True)
class Config:
    state_dir: str = "/var/lib/vdsm-blockops"
    connect: str = "qemu:///system"
    storage_roots: tuple[str, ...] = field(default_factory=tuple)
    poll_interval_s: float = 0.5
    pivot_retries: int = 10


def load_config(path: str | None = None) -> Config:
    """Read the config file; a missing default file means defaults."""
    explicit = path or os.environ.get(ENV_PATH)
    path = explicit or DEFAULT_PATH
    if not os.path.exists(path):
        if explicit:
            raise BadRequest(f"config file {path} does not exist")
        return Config()
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as exc:
            raise BadRequest(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest(f"config file {path} must hold a mapping")
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BadRequest(f"config file {path}: unknown keys {', '.join(unknown)}")
    if "storage_roots" in data:
        data["storage_roots"] = tuple(os.path.normpath(p) for p in data["storage_roots"] or ())
    return Config(**data)
