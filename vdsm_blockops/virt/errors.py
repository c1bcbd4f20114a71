"""The one place where ``libvirtError`` becomes an error of our own tree."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import libvirt

from ..core import errors


def translate(exc: libvirt.libvirtError, doing: str) -> errors.BlockOpsError:
    """Map a libvirtError onto our tree; ``doing`` says what we tried."""
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    text = f"{doing}: {message}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return errors.UnknownDomain(text)
    if code == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE and "not ready for pivot" in message:
        return errors.PivotNotReady(text)
    if "already in active block job" in message or (
        code == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE
    ):
        return errors.Conflict(text)
    if code == libvirt.VIR_ERR_INVALID_ARG and "not found in domain" in message:
        return errors.UnknownDisk(text)
    if "in chain for" in message or "could not find image" in message:
        return errors.UnknownImage(text)
    if code == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in message:
        return errors.BadRequest(text)
    if code == libvirt.VIR_ERR_OVERFLOW:
        return errors.BadRequest(text)
    if (
        exc.get_error_domain() == libvirt.VIR_FROM_RPC
        or code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN)
    ):
        return errors.ConnectionLost(text)
    return errors.OperationFailed(text)


@contextlib.contextmanager
def libvirt_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as exc:
        raise translate(exc, doing) from exc


