"""Pure model of a domain's disks and their backing chains.

Parses libvirt domain XML (live or persistent) into immutable objects. No
libvirt import here: everything works on XML text, so it is unit-tested
against XML captured from a real libvirtd (``tests/data``).

A chain is kept active image first: ``[D, C, B, A]`` for ``A <- B <- C <- D``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from lxml import etree

from .errors import BadRequest, UnknownDisk, UnknownImage
from .identity import clean_path, image_key, is_block_device

# Domain XML comes from libvirt, and in the hook from stdin: never let it
# pull in entities, DTDs or anything from the network.
_SAFE_PARSER = etree.XMLParser(
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    dtd_validation=False,
    # Chains are nested <backingStore> elements: without huge_tree libxml2
    # stops at depth 256, i.e. at about 120 layers. Size is bounded by the
    # callers (the hook reads at most 4 MiB) and entities stay unexpanded.
    huge_tree=True,
    remove_blank_text=True,
)

METADATA_NS = "https://github.com/vdsm-blockops/ns/1"

_INDEX_REF = re.compile(r"^(?P<target>[a-z]+[a-z0-9]*)\[(?P<index>\d+)\]$")


_ATTR_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                               "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"})


def xml_attr(value: str) -> str:
    """``value`` as a double-quoted XML attribute (xml.sax.saxutils'
    quoteattr would import urllib.request, http and ssl: ~20 ms)."""
    return f'"{value.translate(_ATTR_ESCAPES)}"'


def source_kind(path: str) -> tuple[str, str]:
    """How disk XML names ``path``: (disk type, <source> attribute) --
    ("block", "dev") for a block device, ("file", "file") otherwise."""
    return ("block", "dev") if is_block_device(path) else ("file", "file")


def disk_xml(path: str, fmt: str) -> str:
    """The <disk> of a copy destination: a file, or a block device."""
    kind, attr = source_kind(path)
    return f"<disk type='{kind}'><driver type='{fmt}'/><source {attr}={xml_attr(path)}/></disk>"


def parse_xml(text: str | bytes) -> etree._Element:
    """Parse XML safely (no entities, no DTD, no network)."""
    if isinstance(text, str):
        text = text.encode()
    try:
        return etree.fromstring(text, _SAFE_PARSER)
    except etree.XMLSyntaxError as exc:
        raise BadRequest(f"cannot parse domain XML: {exc}") from exc


@dataclass(frozen=True)
class Layer:
    """One image of a chain."""

    path: str
    format: str | None
    source_type: str = "file"  # file | block | network | volume ...
    index: int | None = None  # libvirt's backingStore index (live XML only)
    # A storage-pool volume (<disk type='volume'>): its pool and name. Until
    # resolved (``DomainSpec.with_volumes``) ``path`` is the volume's name
    # and ``source_type`` 'volume'; resolved, the file or device it is.
    pool: str | None = None
    volume: str | None = None
    encrypted: bool = False  # <encryption> in its <source> (or the disk's, the old place)

    @property
    def is_local(self) -> bool:
        return self.source_type in ("file", "block") and bool(self.path)


@dataclass(frozen=True)
class Mirror:
    """The ``<mirror>`` of a disk that has a copy or active-commit job."""

    job: str  # 'copy' or 'active-commit'
    ready: str | None  # None (still copying), 'yes', 'abort', 'pivot'
    path: str
    format: str | None
    index: int | None = None  # ``vda[N]`` names the copy's target (a block threshold on it)

    @property
    def is_ready(self) -> bool:
        # Only ready='yes' allows a pivot. cur == end from blockJobInfo is
        # NOT readiness (a bug Nova once had).
        return self.ready == "yes"


@dataclass(frozen=True)
class Disk:
    target: str
    device: str
    chain: tuple[Layer, ...]
    bus: str | None = None
    alias: str | None = None
    readonly: bool = False
    transient: bool = False
    shareable: bool = False  # <shareable/>: other VMs write the same image
    mirror: Mirror | None = None
    # True when the XML spelled out the end of the chain (<backingStore/>).
    # The persistent definition usually only names the active image.
    chain_complete: bool = False
    # <source startupPolicy>: 'optional' (and 'requisite' on some starts)
    # lets libvirt drop a missing source instead of failing.
    startup_policy: str | None = None

    @property
    def active(self) -> Layer | None:
        return self.chain[0] if self.chain else None

    @property
    def paths(self) -> list[str]:
        return [layer.path for layer in self.chain]

    def position(self, ref: str) -> int:
        """Position in ``chain`` (0 = active) of an image reference.

        A reference is an absolute path in the chain (any name of one of
        its images: the match is by identity) or libvirt's index notation
        ``vda[3]``. Anything else is a bad request: empty or blank names,
        surrounding whitespace, control characters.
        """
        check_reference(ref, "image reference")
        match = _INDEX_REF.fullmatch(ref)
        if match:
            if match["target"] != self.target:
                raise UnknownImage(
                    f"image reference {ref!r} names disk {match['target']!r}, "
                    f"not {self.target!r}"
                )
            wanted = int(match["index"])
            for pos, layer in enumerate(self.chain):
                if layer.index == wanted:
                    return pos
            if all(layer.index is None for layer in self.chain):
                raise UnknownImage(
                    f"{ref}: libvirt's index notation exists only for a running domain; "
                    "name the image by its path")
            raise UnknownImage(
                f"no image with index {wanted} in the chain of {self.target} "
                f"(indexes: {', '.join(str(l.index) for l in self.chain)})"
            )
        if not os.path.isabs(ref):
            raise UnknownImage(
                f"image reference {ref!r} is neither an absolute path nor "
                f"{self.target}[N] index notation"
            )
        wanted_key = image_key(ref)
        for pos, layer in enumerate(self.chain):
            if layer.path and image_key(layer.path) == wanted_key:
                return pos
        raise UnknownImage(f"{ref} is not in the chain of {self.target}")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_reference(value: str, what: str) -> None:
    """Refuse names no one means: empty, blank, padded with whitespace,
    or holding control characters (a pasted ``vda[2]\\n``)."""
    if not isinstance(value, str) or not value.strip():
        raise UnknownImage(f"{what} is empty")
    if value != value.strip() or _CONTROL.search(value):
        raise UnknownImage(f"{what} {value!r} has surrounding whitespace or control characters")


@dataclass(frozen=True)
class DomainSpec:
    """What a domain XML says about the disks of one domain."""

    name: str
    uuid: str
    disks: tuple[Disk, ...]
    metadata: dict[str, str] = field(default_factory=dict)

    def disk(self, target: str) -> Disk:
        for disk in self.disks:
            if disk.target == target:
                return disk
        known = ", ".join(d.target for d in self.disks) or "none"
        raise UnknownDisk(
            f"domain {self.name} has no disk {target!r} (disks: {known})"
        )

    def with_volumes(self, resolve: Callable[[str, str], str | None]) -> DomainSpec:
        """This spec with every storage-pool volume named by the file or
        device it is (``resolve(pool, volume)``; None: cannot be told, and
        the layer stays a 'volume', which no operation takes)."""
        if not any(layer.source_type == "volume" for disk in self.disks for layer in disk.chain):
            return self  # the usual case: nothing to resolve, nothing rebuilt
        disks = []
        for disk in self.disks:
            chain = []
            for layer in disk.chain:
                if layer.source_type == "volume" and layer.pool:
                    found = resolve(layer.pool, layer.path)
                    if found:
                        layer = replace(layer, path=clean_path(found), volume=layer.path,
                                        source_type="block" if is_block_device(found) else "file")
                chain.append(layer)
            disks.append(replace(disk, chain=tuple(chain)))
        return replace(self, disks=tuple(disks))

    def has(self, target: str) -> bool:
        return any(d.target == target for d in self.disks)

    def select(self, target: str) -> list[Disk]:
        """``target`` or, for ``all``, every disk with an image chain."""
        if target == "all":
            return [d for d in self.disks if d.chain and d.device == "disk"]
        return [self.disk(target)]


def _source(elem: etree._Element) -> tuple[str, str]:
    """(source_type, path-like name) of a <disk>/<backingStore>/<mirror>."""
    source_type = elem.get("type", "file")
    src = elem.find("source")
    if src is None:
        return source_type, elem.get("file", "")
    for attr in ("file", "dev", "name", "volume"):
        name = src.get(attr)
        if name:
            # libvirt joins relative backing names without normalising
            # (``img1/../tmpl/T``): clean local paths once, here.
            return source_type, clean_path(name) if attr in ("file", "dev") else name
    return source_type, ""


def _encrypted(elem: etree._Element) -> bool:
    return elem.find("source/encryption") is not None


def _index(elem: etree._Element) -> int | None:
    # The active image's index sits on <source index=..>, backing images
    # carry it on <backingStore index=..>.
    raw = elem.get("index")
    if raw is None:
        src = elem.find("source")
        raw = src.get("index") if src is not None else None
    return int(raw) if raw is not None and raw.isdigit() else None


def _parse_disk(disk_elem: etree._Element) -> Disk:
    target_elem = disk_elem.find("target")
    target = (target_elem.get("dev") or "") if target_elem is not None else ""
    driver = disk_elem.find("driver")
    source_type, path = _source(disk_elem)
    layers: list[Layer] = []
    complete = False
    if path:
        src = disk_elem.find("source")
        idx = src.get("index") if src is not None else None
        layers.append(
            Layer(
                path=path,
                format=driver.get("type") if driver is not None else None,
                source_type=source_type,
                index=int(idx) if idx and idx.isdigit() else None,
                pool=src.get("pool") if src is not None and source_type == "volume" else None,
                encrypted=_encrypted(disk_elem) or disk_elem.find("encryption") is not None,
            )
        )
        node = disk_elem.find("backingStore")
        while node is not None:
            if len(node) == 0 and not node.attrib:
                complete = True  # <backingStore/>: end of chain
                break
            fmt = node.find("format")
            b_type, b_path = _source(node)
            layers.append(
                Layer(
                    path=b_path,
                    format=fmt.get("type") if fmt is not None else None,
                    source_type=b_type,
                    index=_index(node),
                    encrypted=_encrypted(node),
                )
            )
            node = node.find("backingStore")
    mirror = None
    mirror_elem = disk_elem.find("mirror")
    if mirror_elem is not None:
        m_type, m_path = _source(mirror_elem)
        fmt = mirror_elem.find("format")
        mirror = Mirror(
            job=mirror_elem.get("job", "copy"),
            ready=mirror_elem.get("ready"),
            path=m_path,
            format=fmt.get("type") if fmt is not None else mirror_elem.get("format"),
            index=_index(mirror_elem),
        )
    alias = disk_elem.find("alias")
    source_elem = disk_elem.find("source")
    return Disk(
        target=target,
        device=disk_elem.get("device", "disk"),
        bus=target_elem.get("bus") if target_elem is not None else None,
        chain=tuple(layers),
        alias=alias.get("name") if alias is not None else None,
        readonly=disk_elem.find("readonly") is not None,
        transient=disk_elem.find("transient") is not None,
        shareable=disk_elem.find("shareable") is not None,
        mirror=mirror,
        chain_complete=complete,
        startup_policy=source_elem.get("startupPolicy") if source_elem is not None else None,
    )


def parse_domain(xml: str | bytes | etree._Element) -> DomainSpec:
    root = xml if isinstance(xml, etree._Element) else parse_xml(xml)
    if root.tag != "domain":
        raise BadRequest(f"expected <domain> XML, got <{root.tag}>")
    metadata: dict[str, str] = {}
    meta = root.find("metadata")
    if meta is not None:
        for child in meta:
            if isinstance(child.tag, str) and child.tag.startswith("{"):
                ns = child.tag[1:].split("}", 1)[0]
                metadata[ns] = etree.tostring(child, encoding="unicode")
    return DomainSpec(
        name=root.findtext("name", ""),
        uuid=root.findtext("uuid", ""),
        disks=tuple(_parse_disk(d) for d in root.iterfind("devices/disk")),
        metadata=metadata,
    )
