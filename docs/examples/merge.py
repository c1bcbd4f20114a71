"""Snapshot live merge through the Python API: collapse the layers of a
running VM's disk above BASE into one, BASE staying its backing file;
print the progress and the chain after, verified.

    python merge.py DOMAIN DISK --base BASE [--uri URI] [--config FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

from vdsm_blockops.api import BlockOpsError, JobInfo, MergeReport, Node


def show_progress(disk: str, info: JobInfo) -> None:
    if info.percent is not None:
        print(f"{disk}: {info.job_type} {info.percent:.0f}%", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("domain")
    parser.add_argument("disk")
    parser.add_argument("--base", help="the image that stays (none: flatten)")
    parser.add_argument("--uri")
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    with Node(args.uri, config=args.config, source="example") as node:
        try:
            report = node.merge(args.domain, args.disk, base=args.base, progress=show_progress)
        except BlockOpsError as error:  # the class says the exit code
            print(f"merge failed ({error.code}): {error}", file=sys.stderr)
            return error.exit_code
        assert isinstance(report, MergeReport)  # one disk: a MergeReport
        check = node.verify(args.domain, args.disk)
    print(json.dumps({"strategy": report.strategy.value, "chain_after": report.chain_after,
                      "verified": report.verified and check.ok}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
