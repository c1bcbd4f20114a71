"""A Sphinx extension: ``cli.rst``'s reference is made from the CLI's own
parser when the site is built -- the source the manual page and the shell
completions are made from, so the three never disagree."""

from __future__ import annotations

import argparse
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive


def _verb_parsers() -> list[tuple[str, str, argparse.ArgumentParser]]:
    from vdsm_blockops.shells.parser import VERBS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [(v.name, v.help, sub.choices[v.name]) for v in VERBS if v.name in sub.choices]


class CliReference(Directive):
    """``.. cli-reference::``: the global usage, then per verb its summary
    and its ``--help`` as the command prints it."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from vdsm_blockops.shells.parser import build_parser

        out: list[nodes.Node] = [nodes.literal_block(text=build_parser().format_help())]
        for name, summary, parser in _verb_parsers():
            section = nodes.section(ids=[f"verb-{name}"], names=[f"verb {name}"])
            section += nodes.title(text=name)
            section += nodes.paragraph(text=summary[:1].upper() + summary[1:] + ".")
            section += nodes.literal_block(text=parser.format_help())
            out.append(section)
        return out


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("cli-reference", CliReference)
    return {"parallel_read_safe": True}
