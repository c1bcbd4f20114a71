"""Text that reaches a terminal, a log line or the history: a name from
an image header or a domain is bytes an operator (or an attacker) chose --
a newline would forge a line, an ESC would drive the terminal."""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, and the surrogates surrogateescape made of bytes
# that are no UTF-8 (each stands for one byte of the name).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\udc80-\udcff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code - 0xDC00 if code >= 0xDC80 else code:02x}"


def printable(text: str) -> str:
    """``text`` with every control character and undecodable byte written
    as ``\\xNN``: one line, nothing a terminal acts on."""
    return _UNPRINTABLE.sub(_escape, text)

