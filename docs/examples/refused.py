"""A refused request, caught by its type: ask for a merge whose BASE is no
image of the disk's chain. The API refuses it before anything changes
(:class:`~vdsm_blockops.api.BadRequest`, the CLI's exit 2) and says which
domain and disk it was about.

    python refused.py DOMAIN DISK BASE [--uri URI] [--config FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

from vdsm_blockops.api import BadRequest, Node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("domain")
    parser.add_argument("disk")
    parser.add_argument("base")
    parser.add_argument("--uri")
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    with Node(args.uri, config=args.config, source="example") as node:
        before = node.chains(args.domain, args.disk)
        try:
            node.merge(args.domain, args.disk, base=args.base)
        except BadRequest as refused:
            unchanged = node.chains(args.domain, args.disk) == before
            print(json.dumps({"refused": type(refused).__name__, "code": refused.code,
                              "exit_code": refused.exit_code, "domain": refused.domain,
                              "disk": refused.disk, "unchanged": unchanged,
                              "message": str(refused)}))
            return 0
    print("the merge was not refused", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
