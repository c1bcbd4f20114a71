"""Move a running VM and its disks to another node through the Python API,
with progress, and cancellation from another thread: with
``--cancel-after SECONDS`` a timer thread cancels the move, which is then
rolled back (the VM runs on here, on its own chain).

    python migrate.py DOMAIN DEST_URI --dest-dir DIR [--migrate-uri URI]
                      [--bandwidth MIB_S] [--cancel-after SECONDS] [--uri URI] [--config FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

from vdsm_blockops.api import BlockOpsError, CancelToken, Interrupted, JobInfo, Node


def show_progress(disk: str, info: JobInfo) -> None:
    if info.percent is not None:  # a move reports its phases as disk "all"
        print(f"{disk}: {info.job_type} {info.percent:.0f}%", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("domain")
    parser.add_argument("dest_uri")
    parser.add_argument("--dest-dir", required=True)
    parser.add_argument("--migrate-uri")
    parser.add_argument("--bandwidth", type=int, default=0, help="MiB/s, 0: no limit")
    parser.add_argument("--cancel-after", type=float, help="cancel the move after SECONDS")
    parser.add_argument("--uri")
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    cancel = CancelToken()
    if args.cancel_after is not None:  # any thread may cancel: here, a timer's
        threading.Timer(args.cancel_after, cancel.cancel).start()
    with Node(args.uri, config=args.config, source="example") as node:
        try:
            report = node.migrate(args.domain, args.dest_uri, dest_dir=args.dest_dir,
                                  migrate_uri=args.migrate_uri, bandwidth=args.bandwidth,
                                  progress=show_progress, cancel=cancel)
        except Interrupted as stopped:
            print(json.dumps({"moved": False, "cancelled": cancel.cancelled,
                              "settled": stopped.settled, "record": stopped.record,
                              "message": str(stopped)}))
            return stopped.exit_code
        except BlockOpsError as error:
            print(f"the move failed ({error.code}): {error}", file=sys.stderr)
            return error.exit_code
    print(json.dumps({"moved": True, "dest_host": report.dest_host,
                      "chain_after": report.chain_after, "verified": report.verified}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
