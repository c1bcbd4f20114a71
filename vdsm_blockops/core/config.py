"""Node configuration: ``/etc/vdsm-blockops/config.yaml`` (optional).

Keys (all optional)::

    state_dir: /var/lib/vdsm-blockops     # registry, locks, recovery queue
    connect: qemu:///system
    storage_roots: [/var/lib/libvirt/images, /srv/vm]   # relocate targets
    poll_interval_s: 0.5
    pivot_retries: 10
    dest_writeback_s: 60   # migrate --delete-source waits this for the destination's disk
    # block volumes (qcow2 or raw on a device, e.g. an LV): how to grow one
    # before a job writes past its end, and how much room to leave for the
    # guest's writes during a job (also the step of each extension)
    volume_extend_command: [lvextend, -L, "{size_bytes}b", "{path}"]
    volume_create_command: [lvcreate, -n, "{name}", -L, "{size_bytes}b", vg0]
    volume_remove_command: [lvremove, -f, "{path}"]   # a roll-back's, of volumes it created
    volume_margin_mib: 1024
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

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
    volume_extend_command: tuple[str, ...] = ()
    volume_create_command: tuple[str, ...] = ()
    volume_remove_command: tuple[str, ...] = ()
    volume_margin_mib: int = 1024
    # migrate --delete-source: how long a destination needs to write what
    # was uploaded to it onto its disk (its vm.dirty_expire_centisecs plus
    # dirty_writeback_centisecs, 35 s by default, with margin)
    dest_writeback_s: float = 60.0


def load_config(path: str | None = None) -> Config:
    """Read the config file; a missing default file means defaults."""
    explicit = path or os.environ.get(ENV_PATH)
    path = explicit or DEFAULT_PATH
    if not os.path.exists(path):
        if explicit:
            raise BadRequest(f"config file {path} does not exist")
        return Config()
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    data = parse_simple(text)
    if data is None:
        import yaml  # 10-13 ms of start-up: only for files outside the simple form

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise BadRequest(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest(f"config file {path} must hold a mapping")
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BadRequest(f"config file {path}: unknown keys {', '.join(unknown)}")
    checked: dict[str, Any] = {key: _check(path, key, value) for key, value in data.items()}
    return Config(**checked)


def guard_state_dir(path: str | None = None) -> tuple[str, list[str]]:
    """The state folder the hook guards with, and what it could not read.

    The guard needs that folder and nothing else, so the config is read
    leniently here: an unknown key (a typo, a newer version's key) or a
    malformed command is a warning, never a reason to stop guarding. Only
    a config file that exists and cannot be opened raises (OSError): then
    the guard cannot know which registry to read."""
    explicit = path or os.environ.get(ENV_PATH)
    path = explicit or DEFAULT_PATH
    try:
        return load_config(path).state_dir, []
    except BadRequest as exc:
        warning = str(exc)
    if not os.path.exists(path):
        return Config.state_dir, [warning]
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    found = re.search(r"""^state_dir: *['"]?(/[^'"#\s]*)""", text, re.MULTILINE)
    return (found[1] if found else Config.state_dir), [warning]


# The simple form most config files have: one ``key: value`` per line,
# values that are paths, URIs, plain numbers or a flow list of paths. Every
# scalar admitted here means the same in YAML 1.1 (no yes/no, no octal, no
# quotes, no comments after values); anything else goes to PyYAML.
_KEY_LINE = re.compile(r"([a-z_]+):(?: +(.*?))? *")
_PATH = r"(?:/[A-Za-z0-9_./+-]*|[a-z][a-z0-9+]*://[A-Za-z0-9_./:@+?=&-]*)"
_ITEM = r"/[A-Za-z0-9_./+-]*"  # in a flow list ':' may end a scalar: paths only
_LIST = re.compile(rf"\[ *((?:{_ITEM}(?: *, *{_ITEM})*)?) *\]")


def parse_simple(text: str) -> dict[str, Any] | None:
    """The mapping of a config file in the simple form, or None when the
    file needs a YAML parser (the result then equals ``yaml.safe_load``'s)."""
    data: dict[str, Any] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = _KEY_LINE.fullmatch(line)
        if match is None or match[1] in data:
            return None
        value = match[2] or ""
        if not value:
            data[match[1]] = None
        elif re.fullmatch(r"0|[1-9][0-9]*", value):
            data[match[1]] = int(value)
        elif re.fullmatch(r"(?:0|[1-9][0-9]*)\.[0-9]+", value):
            data[match[1]] = float(value)
        elif re.fullmatch(_PATH, value):
            data[match[1]] = value
        elif (listed := _LIST.fullmatch(value)) is not None:
            data[match[1]] = [item.strip() for item in listed[1].split(",")] if listed[1] else []
        else:
            return None
    return data


def _check(path: str, key: str, value: object) -> object:
    """Type- and range-check one key; the message names key, value and
    what was expected."""
    def bad(expected: str) -> BadRequest:
        return BadRequest(f"config file {path}: {key} is {value!r}; expected {expected}")

    if key in ("state_dir", "connect"):
        if not isinstance(value, str) or not value.strip():
            raise bad("a non-empty string")
        if key == "state_dir" and not os.path.isabs(value):
            raise bad("an absolute path")
        return value
    if key == "storage_roots":
        # A bare string would be iterated letter by letter ('/', 's', ...):
        # and '/' would allow every destination.
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and os.path.isabs(v)
                                                  for v in value):
            raise bad("a list of absolute paths")
        if any(os.path.normpath(v) == "/" for v in value):
            raise bad("folders other than / (a root of / allows every destination)")
        return tuple(os.path.normpath(v) for v in value)
    if key == "dest_writeback_s":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 3600:
            raise bad("a number of seconds between 0 and 3600")
        return float(value)
    if key == "poll_interval_s":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.01 <= value <= 60:
            raise bad("a number of seconds between 0.01 and 60")
        return float(value)
    if key in ("volume_extend_command", "volume_create_command", "volume_remove_command"):
        if value is None:
            return ()
        needs = {"volume_extend_command": ("{path}", "{size_bytes}"),
                 "volume_create_command": ("{name}", "{size_bytes}"),
                 "volume_remove_command": ("{path}",)}[key]
        # a bare number in the list (an option's value) is a word too
        words = [str(v) if isinstance(v, int) and not isinstance(v, bool) else v
                 for v in value] if isinstance(value, list) else []
        if not words or not all(isinstance(v, str) and v for v in words) or \
                not all(any(n in v for v in words) for n in needs):
            raise bad(f"a command as a list of words naming {' and '.join(needs)}")
        return tuple(words)
    if key == "volume_margin_mib":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 20:
            raise bad("a whole number of MiB between 0 and 1048576")
        return value
    if key == "pivot_retries":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
            raise bad("a whole number between 0 and 1000")
        return value
    return value


LOCAL_HOSTS = {"", "localhost", "localhost.localdomain", "127.0.0.1", "::1"}


def names_a_host(uri: str) -> bool:
    """Whether the libvirt URI ``uri`` names a host (``qemu:///system``
    names none: the local daemon)."""
    return not re.fullmatch(r"[a-z0-9+]+:///[^?#]*", uri)


def require_local_uri(uri: str) -> None:
    """Verbs that read, copy or delete image files act on this node only: a
    libvirt URI naming another host would run jobs there while files are
    handled here. Refused (exit 2) before anything happens."""
    if not names_a_host(uri):  # the usual case
        return
    from urllib.parse import urlsplit

    try:
        host = (urlsplit(uri).hostname or "").lower()
    except ValueError as exc:
        raise BadRequest(f"cannot parse the libvirt URI {uri!r}: {exc}") from None
    if host in LOCAL_HOSTS or host.startswith("127.") or host == os.uname().nodename.lower():
        return
    import socket  # only for URIs naming a host: getfqdn may ask the resolver

    if host == socket.getfqdn().lower():
        return
    raise BadRequest(
        f"{uri} names another host ({host}); this verb reads and writes image files, so it "
        "acts only on the node it runs on. Run it there, or use the Ansible modules, which "
        "run on each node")
