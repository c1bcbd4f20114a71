"""Who else on the node uses an image -- from one bulk look at the node.

A commit must never write, and a deletion never remove, a layer another
chain uses (another domain, running or only defined; identity rules). The
look costs the same whatever the number of domains, nearly:

* running domains: one ``getAllDomainStats`` call lists every image of
  every chain (BACKING flag);
* persistent definitions (of every defined domain, running or not):
  libvirt only names their active images, so each chain is completed from
  the images' headers (read in Python, microseconds a layer) -- for a
  running domain only where its definition names another active image than
  the one it runs on. Their disk sources come from a cache in the state
  folder keyed by the definition file's identity and time (libvirt
  rewrites that file, under a new inode, on every define): a definition is
  asked of libvirt again only when it changed, or where the file is
  unknown (then always).

Within one process the look is reused (plan, then deletion after the job)
while nothing changed: no domain lifecycle event (define, undefine, start,
stop) nor block job event arrived on the connection, and every
header-walked image still has the inode and time it had. (A job of the
operation's own ends with an event: deleting after it takes a fresh look.)
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.errors import UnknownDomain
from ..core.headers import is_protocol, read_backing
from ..core.identity import ImageKey, clean_path, image_key, key_of_stat
from .state import write_json_atomic

if TYPE_CHECKING:
    from ..virt import Connection, Domain

log = logging.getLogger(__name__)

CACHE_NAME = "definitions.json"


@dataclass(frozen=True)
class ChainUser:
    uuid: str
    domain: str
    disk: str
    definition: str  # live | persistent

    def __str__(self) -> str:
        return f"domain {self.domain} ({self.definition} {self.disk})"


def header_chain(path: str, fmt: str | None) -> tuple[list[str], bool]:
    """The chain from ``path`` down as the images' headers say -- erring on
    the side of more users: a backing whose format is not recorded is still
    followed when it is qcow2. Also whether the walk reached a natural end
    (an image without backing) rather than a missing or odd file."""
    chain = [clean_path(path)]
    while fmt in ("qcow2", None) and len(chain) < 1000:
        try:
            backing, fmt = read_backing(chain[-1])
        except (OSError, ValueError):  # missing, not an image, a damaged header
            return chain, False
        if backing is None or is_protocol(backing):
            return chain, True
        if backing in chain:
            return chain, False
        chain.append(backing)
    return chain, fmt not in ("qcow2", None)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _stamp(st: os.stat_result | None) -> tuple[int, int] | None:
    """What changes whenever a file is rewritten or replaced: its inode and
    ctime (which, unlike mtime, no one can set back)."""
    return (st.st_ino, st.st_ctime_ns) if st is not None else None


class NodeUsers:
    """Every (image, user) pair on the node at one moment."""

    def __init__(self, conn: Connection, uses: list[tuple[ImageKey, ChainUser]],
                 walked: dict[str, tuple[int, int] | None]) -> None:
        self.conn_generation = (conn.generation, conn.node_changes)
        self.uses = uses
        self.walked = walked  # header-walked images and their (inode, mtime)

    def still_true(self, conn: Connection) -> bool:
        if (conn.generation, conn.node_changes) != self.conn_generation:
            return False
        return all(_stamp(_stat(path)) == stamp for path, stamp in self.walked.items())

    def of(self, paths: list[str], exclude: tuple[str, str]) -> dict[str, list[str]]:
        """Which other chains use each of ``paths``; keyed by the names asked."""
        wanted = {image_key(p): p for p in paths}
        found: dict[str, set[str]] = {}
        for key, user in self.uses:
            if key in wanted and (user.uuid, user.disk) != exclude:
                found.setdefault(wanted[key], set()).add(str(user))
        return {p: sorted(u) for p, u in found.items()}


def look_at_node(conn: Connection, cache_dir: str | None) -> NodeUsers:
    uses: list[tuple[ImageKey, ChainUser]] = []
    walked: dict[str, tuple[int, int] | None] = {}
    live_active: dict[tuple[str, str], ImageKey] = {}
    for chain in conn.running_chains():
        live_active[(chain.uuid, chain.target)] = image_key(chain.paths[0])
        for path in chain.paths:
            uses.append((image_key(path), ChainUser(chain.uuid, chain.name, chain.target, "live")))
    # Persistent definitions: of the domains that do not run, and of the
    # running ones -- whose definition may name another chain (until a
    # pivot is written back): counted where it does.
    cache = NodeCache(conn, cache_dir)
    for uuid, name, disks in cache.definitions(conn.persistent_domains(running=True)
                                               + conn.persistent_domains(running=False)):
        for target, path, fmt in disks:
            if live_active.get((uuid, target)) == image_key(path):
                continue
            for image, st in cache.chain(path, fmt):
                walked[image] = _stamp(st)
                key = key_of_stat(st, image) if st is not None else image_key(image)
                uses.append((key, ChainUser(uuid, name, target, "persistent")))
    cache.save()
    return NodeUsers(conn, uses, walked)


# Per connection object (weakly: an id() could be reused by a new
# connection whose counters match a dead one's).
_LOOKS: weakref.WeakKeyDictionary[Connection, NodeUsers] = weakref.WeakKeyDictionary()


def chain_users(conn: Connection, paths: list[str], exclude: tuple[str, str],
                cache_dir: str | None = None) -> dict[str, list[str]]:
    """Which other chains on the node (live or defined) use each path.

    ``exclude`` is (domain uuid, disk target): the chain being operated on.
    Images are matched by identity, so a chain that names a layer through
    a symlinked folder, a bind mount or ``..`` is still its user.
    """
    if not paths:
        return {}
    look = _LOOKS.get(conn)
    if look is None or not look.still_true(conn):
        look = _LOOKS[conn] = look_at_node(conn, cache_dir)
    return look.of(paths, exclude)


class NodeCache:
    """Persistent definitions' disk sources and the chains below them, kept
    in the state folder between commands (see the module's docstring).

    A definition is read from libvirt again when its file's inode, time or
    size changed (or the file is unknown); a chain is walked again when any
    of its images changed (inode or ctime), or when the walk had not ended
    naturally (a missing backing file may appear)."""

    def __init__(self, conn: Connection, cache_dir: str | None) -> None:
        self.conn = conn
        self.path = os.path.join(cache_dir, CACHE_NAME) if cache_dir else None
        self.cached = self._load()
        self.fresh: dict[str, Any] = {"definitions": {}, "chains": {}}

    def _load(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def definitions(self, domains: list[Domain]) -> list[tuple[str, str, list[tuple[str, str, str | None]]]]:
        """(uuid, name, [(target, active image, format)]) per domain."""
        cached = self.cached.get("definitions", {})
        answer = []
        for domain in domains:
            definition = self.conn.definition_file(domain.name)
            stamp = None
            if definition is not None:
                try:
                    st = os.stat(definition)
                    stamp = [st.st_ino, st.st_mtime_ns, st.st_size]
                except OSError:
                    stamp = None
            entry = cached.get(domain.uuid)
            if stamp is None or not entry or entry.get("stamp") != stamp \
                    or entry.get("name") != domain.name:
                # Stamp first, then read: a define in between leaves a stamp
                # older than the content, so the next look reads again.
                try:
                    spec = domain.spec(inactive=True)
                except UnknownDomain:  # undefined meanwhile (moved away): no user now
                    continue
                disks = [[d.target, d.chain[0].path, d.chain[0].format]
                         for d in spec.disks if d.chain and d.chain[0].is_local and d.chain[0].path]
                entry = {"name": domain.name, "stamp": stamp, "disks": disks}
            if stamp is not None:
                self.fresh["definitions"][domain.uuid] = entry
            answer.append((domain.uuid, domain.name,
                           [(str(t), str(p), f) for t, p, f in entry["disks"]]))
        return answer

    def chain(self, path: str, fmt: str | None) -> list[tuple[str, os.stat_result | None]]:
        """Each image of the chain from ``path`` down, with its stat."""
        key = f"{fmt}:{path}"
        entry = self.cached.get("chains", {}).get(key)
        if entry:
            stats = [(image, _stat(image)) for image, _, _ in entry]
            if all(_stamp(st) == (ino, ctime) for (_, st), (_, ino, ctime) in zip(stats, entry)):
                self.fresh["chains"][key] = entry
                return stats
        images, ended = header_chain(path, fmt)
        stats = [(image, _stat(image)) for image in images]
        stamps = [_stamp(st) for _, st in stats]
        if ended and all(stamps):
            self.fresh["chains"][key] = [[image, *stamp] for (image, _), stamp
                                         in zip(stats, stamps) if stamp]
        return stats

    def save(self) -> None:
        if self.path is None or self.fresh == self.cached:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_json_atomic(self.path, self.fresh, durable=False)  # rebuilt if lost
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc)
