"""The parser's ground: its formatter and error handling, the options every
verb takes, and the checked --timeout type (``parser.py`` builds the verbs
on it)."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, NoReturn

from ..api import BadRequest

EXIT_CODES = """exit codes:
  0  done
  1  the operation failed (libvirt/QEMU error, failed verification)
  2  bad request, refused before anything changed
  3  timed out: the operation was rolled back (recover: it stopped waiting)
  4  conflict: another job or operation holds the disk

With --json stdout holds exactly one JSON object, on success and on failure."""


class Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse makes a formatter for every argument it adds and asks
    shutil (an import of bz2, lzma, fnmatch: ~3 ms) for the terminal's
    width; asked here as shutil would, without the import."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        if kwargs.get("width") is None:
            columns = os.environ.get("COLUMNS", "")
            if not columns.isdigit():
                try:
                    columns = str(os.get_terminal_size(1).columns)
                except OSError:  # not a terminal
                    columns = "80"
            kwargs["width"] = int(columns) - 2  # as argparse does
        super().__init__(prog, **kwargs)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print usage and exit 2
        # One program name per error line: main() prefixes "vdsm-blockops:".
        verb = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        error = BadRequest(f"{verb}: {message}" if verb else message)
        error.usage = self.format_usage()  # shown above the error, as argparse does
        raise error


def add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument("--connect", metavar="URI", default=default(None),
                        help="libvirt URI (default: config, else qemu:///system)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print exactly one JSON object on stdout")
    parser.add_argument("--config", metavar="PATH", default=default(None),
                        help="config file (default /etc/vdsm-blockops/config.yaml)")
    parser.add_argument("-v", "--verbose", action="count", default=default(0),
                        help="log what happens on stderr (-vv: and the details)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False),
                        help="print nothing on success (errors still go to stderr)")
    parser.add_argument("--debug", action="store_true", default=default(False),
                        help="print tracebacks of unexpected errors on stderr")


def seconds(text: str) -> float:
    """A --timeout: a finite number of seconds above 0 ("nan", "inf" and
    negatives are refused, exit 2, before anything runs)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a timeout is a finite number of seconds above 0, "
                                         f"not {text!r}")
    return value
