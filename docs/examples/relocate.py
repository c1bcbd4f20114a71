"""Live disk relocation through the Python API: copy a running VM's disk
(its whole chain by default) to DEST while the guest writes, then pivot;
print the chain it runs on after.

    python relocate.py DOMAIN DISK DEST [--mode chain|shallow|full] [--uri URI] [--config FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

from vdsm_blockops.api import BlockOpsError, JobInfo, Node, RelocateReport


def show_progress(disk: str, info: JobInfo) -> None:
    if info.percent is not None:
        print(f"{disk}: {info.job_type} {info.percent:.0f}%", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("domain")
    parser.add_argument("disk")
    parser.add_argument("dest", help="the new active image's path")
    parser.add_argument("--mode", default="chain", choices=["chain", "shallow", "full"])
    parser.add_argument("--uri")
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    with Node(args.uri, config=args.config, source="example") as node:
        try:
            report = node.relocate(args.domain, args.disk, args.dest, mode=args.mode,
                                   progress=show_progress)
        except BlockOpsError as error:
            print(f"relocation failed ({error.code}, {error.settled or 'left for recover'}): "
                  f"{error}", file=sys.stderr)
            return error.exit_code
    assert isinstance(report, RelocateReport)
    print(json.dumps({"chain_after": report.chain_after, "verified": report.verified,
                      "copied": report.bytes_to_copy}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
