"""The registry of invalidated images, as stored: its entries' keys in
today's form, earlier versions' entries taken over or kept as they were
(``identity.recorded_key``), and the lookup the hook and the tool ask.
The file itself is read and written by ``state.StateDir``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..core.identity import ImageKey, clean_path, file_exists, image_key, known_key_form, recorded_key


def registry_key(key: ImageKey) -> str:
    return ":".join(str(part) for part in key.to_json())


def entry_path(name: str, entry: dict[str, Any]) -> str:
    return str(entry.get("path") or name)


def _current_key(name: str, entry: dict[str, Any]) -> ImageKey | None:
    """The key an entry names, in today's form; None while that cannot be
    known (an earlier version's entry whose path names nothing now, or
    another file: ``identity.recorded_key``)."""
    return recorded_key(entry.get("id"), entry_path(name, entry))


def live_entries(data: dict[str, Any],
                 gone: Sequence[ImageKey] = ()) -> dict[str, dict[str, Any]]:
    """The registry, keyed in today's form, without the entries whose file
    is provably gone: in ``gone`` (deleted by the tool), or no longer on its
    own file system (asked by handle there: a retired file renamed or
    hard-linked elsewhere still exists; a file system not mounted now proves
    nothing). An entry that cannot be read in today's form (an earlier
    version's whose file is not where it was, or a later version's) is kept
    byte for byte: never dropped unread. Node state does not grow with the
    node's history."""
    kept: dict[str, dict[str, Any]] = {}
    for name, entry in data.items():
        key = _current_key(name, entry) if isinstance(entry, dict) else None
        if key is None:
            kept[name] = entry
            continue
        if key in gone or file_exists(key) is False:
            continue
        kept[registry_key(key)] = {**entry, "path": entry_path(name, entry), "id": key.to_json()}
    return kept


class InvalidImages:
    """The registry as a lookup by identity: an entry matches the image
    it was made for, named by any path (an alias, a new name after a
    rename, a hard link) -- and never a later file that got its number or
    its path. An entry whose key is of no form this version knows (a later
    version's) cannot be matched by identity: it matches its own path, so
    the guard fails closed on it rather than ignoring it."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self._by_key: dict[ImageKey, dict[str, Any]] = {}
        self._by_path: dict[str, dict[str, Any]] = {}
        for name, entry in data.items():
            if not isinstance(entry, dict):
                continue
            path = entry_path(name, entry)
            key = _current_key(name, entry)
            if key is not None:
                self._by_key[key] = {**entry, "path": path}
            elif not known_key_form(entry.get("id")):
                self._by_path[clean_path(path)] = {**entry, "path": path}

    def __bool__(self) -> bool:
        return bool(self._by_key or self._by_path)

    def why(self, path: str) -> dict[str, Any] | None:
        if not self:
            return None
        return self._by_key.get(image_key(path)) or self._by_path.get(clean_path(path))
