"""The ``vdsm-blockops`` command: parse, one library call, render, exit.

Exit codes: 0 done; 1 failed; 2 bad request refused before anything
changed; 3 timed out; 4 conflict. With ``--json`` stdout holds exactly one
JSON object, on success and on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

from . import __version__, errors
from .config import load_config, require_local_uri

log = logging.getLogger("vdsm_blockops")
MIB = 1024 * 1024


EXIT_CODES = """exit codes:
  0  done
  1  the operation failed (libvirt/QEMU error, failed verification)
  2  bad request, refused before anything changed
  3  timed out (the job was aborted, the chain left consistent)
  4  conflict: another job or operation holds the disk

With --json stdout holds exactly one JSON object, on success and on failure."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]  # argparse would print usage and exit 2
        # One program name per error line: main() prefixes "vdsm-blockops:".
        verb = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        raise errors.BadRequest(f"{verb}: {message}" if verb else message)


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument("--connect", metavar="URI", default=default(None),
                        help="libvirt URI (default: config, else qemu:///system)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print exactly one JSON object on stdout")
    parser.add_argument("--config", metavar="PATH", default=default(None),
                        help="config file (default /etc/vdsm-blockops/config.yaml)")
    parser.add_argument("-v", "--verbose", action="count", default=default(0))
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False),
                        help="print nothing on success (errors still go to stderr)")
    parser.add_argument("--debug", action="store_true", default=default(False),
                        help="print tracebacks of unexpected errors on stderr")


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bandwidth", type=int, metavar="MIB_PER_S", default=0,
                        help="throttle the job (MiB/s, 0 = unlimited)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="abort the job after this long (exit 3)")
    parser.add_argument("--no-wait", action="store_true",
                        help="start the job and return; follow up with jobs/recover")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vdsm-blockops", epilog=EXIT_CODES,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Live block operations on libvirt/QEMU VMs: snapshot merge, "
                                 "disk relocation, block-job control, verification.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_common(parser, suppress=False)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True

    def verb(name: str, help_text: str, func: Callable, local: bool = True) -> argparse.ArgumentParser:
        """``local``: the verb reads, copies or deletes image files, so it
        may only drive the libvirt of this node."""
        sub = verbs.add_parser(name, help=help_text, description=help_text, epilog=EXIT_CODES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(sub, suppress=True)
        sub.set_defaults(func=func, local=local)
        return sub

    p = verb("chain", "show each disk's backing chain", cmd_chain)
    p.add_argument("domain")
    p.add_argument("disk", nargs="?")

    p = verb("jobs", "list active block jobs on the node or one domain", cmd_jobs, local=False)
    p.add_argument("domain", nargs="?")

    p = verb("merge", "collapse a segment of a disk's chain (snapshot live merge)", cmd_merge)
    p.add_argument("domain")
    p.add_argument("disk", help="target name (vda) or 'all'")
    p.add_argument("--base", help="image kept as the backing (path or vda[N]); none: flatten")
    p.add_argument("--top", help="highest image of the segment (default: the active image)")
    p.add_argument("--strategy", default="auto", choices=["auto", "pull", "commit"],
                   help="how to merge (default auto: fewest bytes copied, never into a shared layer)")
    p.add_argument("--keep-relative", action="store_const", const=True, default=None,
                   help="keep relative backing names (default: when the chain already uses them)")
    p.add_argument("--delete-retired", action="store_true",
                   help="unlink retired layers after verification when nothing uses them")
    _add_job_options(p)

    p = verb("relocate", "move a disk's data elsewhere while the VM runs, then pivot", cmd_relocate)
    p.add_argument("domain")
    p.add_argument("disk", help="target name (vda) or 'all' (then DEST is a folder)")
    p.add_argument("dest", help="path of the new active image")
    p.add_argument("--mode", default="chain", choices=["chain", "full", "shallow"],
                   help="what moves (default chain: every layer, keeping the snapshots)")
    p.add_argument("--method", default="mirror", choices=["mirror", "snapshot-stream"],
                   help="how the active layer moves (default mirror)")
    p.add_argument("--format", default="qcow2", choices=["qcow2", "raw"],
                   help="DEST's format (default qcow2; raw only with --mode full)")
    p.add_argument("--reuse-external", action="store_true", help="DEST (and its layers) exist already")
    p.add_argument("--sync-writes", action="store_true",
                   help="guest writes go to both sides, so the copy always converges")
    p.add_argument("--no-pivot", action="store_true",
                   help="stay on the source; DEST is a consistent copy as of the finish")
    p.add_argument("--delete-source", action="store_true",
                   help="after pivot and verification unlink source files nothing uses")
    _add_job_options(p)

    p = verb("snapshot", "disk-only external snapshot: a new overlay on the active image", cmd_snapshot)
    p.add_argument("domain")
    p.add_argument("disk")
    p.add_argument("overlay", help="path of the new qcow2 overlay")
    p.add_argument("--reuse-external", action="store_true", help="OVERLAY exists already")

    p = verb("abort", "abort a block job (or pivot a ready one)", cmd_abort)
    p.add_argument("domain")
    p.add_argument("disk")
    p.add_argument("--pivot", action="store_true", help="pivot onto the mirror (must be ready)")

    p = verb("speed", "change a running block job's bandwidth", cmd_speed, local=False)
    p.add_argument("domain")
    p.add_argument("disk")
    p.add_argument("bandwidth", type=int, metavar="MIB_PER_S")

    p = verb("recover", "finish or roll back operations a crash interrupted", cmd_recover)
    p.add_argument("domain", nargs="?")
    p.add_argument("--queued", action="store_true",
                   help="recover the domains the libvirt hook queued")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="how long to wait on a job that is still running")

    p = verb("hook", "install or uninstall the libvirt hook that guards VMs", cmd_hook, local=False)
    p.add_argument("action", choices=["install", "uninstall"])
    p.add_argument("--hooks-dir", default=None, help="default /etc/libvirt/hooks/qemu.d")
    p.add_argument("--reload", action="store_true", help="SIGHUP libvirtd so it sees the change")

    p = verb("units", "install or uninstall the systemd units that run 'recover --queued'",
             cmd_units, local=False)
    p.add_argument("action", choices=["install", "uninstall"])
    p.add_argument("--unit-dir", default=None, help="default /etc/systemd/system")
    p.add_argument("--enable", action="store_true",
                   help="also enable (install) or disable (uninstall) them with systemctl")

    p = verb("verify", "check a domain's chains against the images' metadata", cmd_verify)
    p.add_argument("domain")
    p.add_argument("disk", nargs="?")

    p = verb("completion", "print a shell completion script", cmd_completion, local=False)
    p.add_argument("shell", choices=["bash", "zsh", "tcsh"])

    verb("manpage", "print the manual page (roff)", cmd_manpage, local=False)
    return parser


# ----------------------------------------------------------------- verbs
def cmd_chain(args, env) -> dict:
    from .inspect import describe_chains

    report = describe_chains(env.conn.domain(args.domain), args.disk)
    report.update(ok=True, operation="chain")
    return report


def cmd_jobs(args, env) -> dict:
    from .inspect import list_jobs

    return {"ok": True, "operation": "jobs", "jobs": list_jobs(env.conn, args.domain)}


def cmd_merge(args, env) -> dict:
    from .merge import MergeRequest, merge

    req = MergeRequest(
        domain=args.domain, disk=args.disk, base=args.base, top=args.top,
        strategy=args.strategy, bandwidth_mib_s=args.bandwidth, timeout_s=args.timeout,
        wait=not args.no_wait, dry_run=args.dry_run, keep_relative=args.keep_relative,
        delete_retired=args.delete_retired,
    )
    return merge(env.context(progress=not args.no_wait and not args.dry_run), req)


def cmd_relocate(args, env) -> dict:
    from .relocate import RelocateRequest, relocate

    req = RelocateRequest(
        domain=args.domain, disk=args.disk, dest=args.dest, mode=args.mode, method=args.method,
        format=args.format, reuse_external=args.reuse_external, sync_writes=args.sync_writes,
        pivot=not args.no_pivot, delete_source=args.delete_source,
        bandwidth_mib_s=args.bandwidth, timeout_s=args.timeout, wait=not args.no_wait,
        dry_run=args.dry_run,
    )
    return relocate(env.context(progress=not args.no_wait and not args.dry_run), req)


def cmd_snapshot(args, env) -> dict:
    from .relocate import snapshot

    return snapshot(env.context(), args.domain, args.disk, args.overlay, args.reuse_external)


def cmd_abort(args, env) -> dict:
    from .records import RecordStore

    domain = env.conn.domain(args.domain)
    domain.spec().disk(args.disk)
    if domain.block_job_info(args.disk) is None:
        raise errors.BadRequest(f"disk {args.disk} of {domain.name} has no block job")
    domain.abort_job(args.disk, pivot=args.pivot)
    report = {"ok": True, "operation": "abort", "domain": domain.name, "disk": args.disk,
              "pivot": args.pivot}
    # A job of ours (started with --no-wait): settle its record now, so that
    # retired layers get registered and verify passes.
    if args.disk in RecordStore(domain).load():
        from .recover import recover

        report["recover"] = recover(env.context(), domain.name)["records"]
    report["chain_after"] = domain.spec().disk(args.disk).paths
    return report


def cmd_speed(args, env) -> dict:
    from .ops import check_bandwidth

    bandwidth = check_bandwidth(args.bandwidth)
    domain = env.conn.domain(args.domain)
    domain.spec().disk(args.disk)
    if domain.block_job_info(args.disk) is None:
        raise errors.BadRequest(f"disk {args.disk} of {domain.name} has no block job")
    domain.set_speed(args.disk, bandwidth)
    return {"ok": True, "operation": "speed", "domain": domain.name, "disk": args.disk,
            "bandwidth_mib_s": bandwidth}


def cmd_recover(args, env) -> dict:
    from .recover import recover, recover_queued

    if args.queued:
        return recover_queued(env.context(), timeout_s=args.timeout)
    return recover(env.context(), args.domain, timeout_s=args.timeout)


def cmd_hook(args, env) -> dict:
    from . import hookctl

    hooks_dir = args.hooks_dir or hookctl.HOOKS_DIR
    if args.action == "install":
        return hookctl.install(hooks_dir, config_path=args.config, reload=args.reload)
    return hookctl.uninstall(hooks_dir, reload=args.reload)


def cmd_units(args, env) -> dict:
    from . import units

    unit_dir = args.unit_dir or units.UNIT_DIR
    if args.action == "install":
        return units.install(env.config, args.config, unit_dir, enable=args.enable)
    return units.uninstall(unit_dir, disable=args.enable)


def cmd_verify(args, env) -> dict:
    from .inspect import verify_domain
    from .records import parse_records, METADATA_NS

    domain = env.conn.domain(args.domain)
    problems = verify_domain(domain, args.disk, env.context().state)
    for disk, record in parse_records(domain.get_metadata(METADATA_NS)).items():
        if args.disk in (None, "all", disk):
            problems.append(f"{disk}: unfinished {record.operation} (record {record.id}, "
                            f"phase {record.phase.value})")
    report = {"ok": not problems, "operation": "verify", "domain": domain.name,
              "disk": args.disk or "all", "verified": not problems, "problems": problems}
    if problems:
        report["error"] = {"code": "verification-failed",
                           "message": f"{len(problems)} problem(s) found"}
    return report


def cmd_completion(args, env) -> dict:
    import shtab

    return {"ok": True, "operation": "completion",
            "text": shtab.complete(build_parser(), shell=args.shell)}


def cmd_manpage(args, env) -> dict:
    from argparse_manpage.manpage import Manpage

    return {"ok": True, "operation": "manpage", "text": str(Manpage(build_parser()))}


# ------------------------------------------------------------- rendering
def _size(value: int | None) -> str:
    if value is None:
        return "-"
    if value >= 1024 * MIB:
        return f"{value / 1024 / MIB:.1f} GiB"
    if value >= MIB:
        return f"{value / MIB:.1f} MiB"
    return f"{value / 1024:.0f} KiB"


def render_text(result: dict) -> str:
    op = result.get("operation")
    lines: list[str] = []
    if op == "chain":
        lines.append(f"domain {result['domain']} ({'running' if result['active'] else 'shut off'})")
        for disk in result["disks"]:
            state = "metadata agrees" if disk["metadata_agrees"] else "METADATA DISAGREES"
            origin = "" if disk.get("chain_from", "libvirt") == "libvirt" else \
                ", from the images' metadata (no vda[N] indexes: name layers by path)"
            lines.append(f"  {disk['disk']} ({disk['device']}): {len(disk['chain'])} layer(s), "
                         f"{state}{origin}")
            for pos, layer in enumerate(disk["chain"]):
                idx = f"[{layer['index']}]" if layer["index"] is not None else "[-]"
                role = " (active)" if pos == 0 else ""
                lines.append(f"    {idx:>5} {layer['path']}  {layer['format'] or '?'}  "
                             f"{_size(layer['allocation'])}{role}")
            if disk["mirror"]:
                m = disk["mirror"]
                lines.append(f"    mirror ({m['job']}) -> {m['path']} ready={'yes' if m['ready'] else 'no'}")
            lines += [f"    problem: {p}" for p in disk["problems"]]
    elif op == "jobs":
        if not result["jobs"]:
            lines.append("no active block jobs")
        for job in result["jobs"]:
            pct = "?" if job["percent"] is None else f"{job['percent']:.1f}%"
            bw = "unlimited" if not job["bandwidth_mib_s"] else f"{job['bandwidth_mib_s']:g} MiB/s"
            lines.append(f"{job['domain']} {job['disk']}: {job['type']} {pct} "
                         f"({job['cur']}/{job['end']}), bandwidth {bw}, ready={'yes' if job['ready'] else 'no'}")
    elif op == "recover":
        if not result["records"]:
            lines.append("nothing to recover")
        for rec in result["records"]:
            why = f": {rec['message']}" if rec.get("message") else ""
            lines.append(f"{rec['domain']} {rec['disk']}: {rec['operation']} {rec['record']} "
                         f"(phase {rec['phase']}) {rec['result']}{why}")
    elif op == "verify":
        if result["ok"]:
            lines.append(f"{result['domain']}: verified, no problems")
        lines += [f"problem: {p}" for p in result["problems"]]
    elif op in ("completion", "manpage"):
        lines.append(result["text"].rstrip("\n"))
    elif "results" in result:
        for sub in result["results"]:
            lines.append(render_text(sub))
    elif op == "relocate":
        verb = "would relocate" if result.get("dry_run") else "relocated"
        lines.append(f"{result['domain']} {result['disk']}: {verb} ({result['mode']} mode, "
                     f"{result['method']}), {_size(result['bytes_to_copy'])} to copy")
        lines.append(f"  before: {' <- '.join(reversed(result['chain_before']))}")
        lines.append(f"  after:  {' <- '.join(reversed(result['chain_after']))}")
        if not result["pivot"]:
            lines.append(f"  not pivoted: the VM stays on its source; copy at {result['dest']}")
        if result.get("deleted"):
            lines.append(f"  deleted: {', '.join(result['deleted'])}")
        if result.get("verified"):
            lines.append(f"  verified in {result.get('duration_s', 0):.2f} s")
    elif op == "snapshot":
        lines.append(f"{result['domain']} {result['disk']}: new overlay {result['overlay']}")
        lines.append(f"  chain: {' <- '.join(reversed(result['chain_after']))}")
    elif op == "merge":
        verb = "would merge" if result.get("dry_run") else "merged"
        if result["strategy"] == "noop":
            lines.append(f"{result['domain']} {result['disk']}: nothing to merge (segment is one layer)")
        else:
            lines.append(f"{result['domain']} {result['disk']}: {verb} by {result['strategy']} "
                         f"({result['libvirt_call']}), {_size(result['bytes_to_copy'])} to copy")
        lines.append(f"  before: {' <- '.join(reversed(result['chain_before']))}")
        lines.append(f"  after:  {' <- '.join(reversed(result['chain_after']))}")
        for r in result["retired"]:
            lines.append(f"  retired: {r['path']} ({'still a valid point in time' if r['valid'] else 'INVALID, never use again'})")
        if result.get("deleted"):
            lines.append(f"  deleted: {', '.join(result['deleted'])}")
        if not result.get("dry_run") and not result.get("finished"):
            lines.append("  job started; follow it with 'vdsm-blockops jobs'")
        elif result.get("verified"):
            lines.append(f"  verified in {result.get('duration_s', 0):.2f} s")
    else:
        for key, value in result.items():
            if key != "ok":
                lines.append(f"{key}: {value}")
    return "\n".join(lines)


# ----------------------------------------------------------------- main
class Env:
    """What a verb needs, opened lazily (hook/help need no libvirt)."""

    def __init__(self, args) -> None:
        self.args = args
        self.config = load_config(args.config)
        self._conn = None
        self.json = args.json

    @property
    def uri(self) -> str:
        return self.args.connect or self.config.connect

    @property
    def conn(self):
        if self._conn is None:
            from .virt import open_connection

            self._conn = open_connection(self.uri)
        return self._conn

    def context(self, progress: bool = False):
        from .ops import Context
        from .progress import make_progress

        self._progress = make_progress(progress and not self.json)
        return Context(conn=self.conn, config=self.config, observer=self._progress)

    def close(self) -> None:
        progress = getattr(self, "_progress", None)
        if progress is not None:
            progress.close()
        if self._conn is not None:
            self._conn.close()


class _ConsoleFormatter(logging.Formatter):
    """Tracebacks go to the log (syslog); on the terminal only with --debug."""

    def __init__(self, debug: bool) -> None:
        super().__init__("%(levelname)s %(message)s")
        self.debug = debug

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        return super().formatException(ei) if self.debug else ""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).rstrip("\n")


def _setup_logging(verbose: int, debug: bool) -> None:
    root = logging.getLogger("vdsm_blockops")
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose > 1 or debug else
                     logging.INFO if verbose else logging.WARNING)
    console.setFormatter(_ConsoleFormatter(debug))
    if not debug:
        console.addFilter(lambda record: not getattr(record, "log_only", False))
    root.addHandler(console)
    if os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler

        try:
            syslog = SysLogHandler(address="/dev/log")
            syslog.setLevel(logging.INFO)
            syslog.setFormatter(logging.Formatter("vdsm-blockops[%(process)d]: %(message)s"))
            root.addHandler(syslog)
        except OSError:
            pass


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, sort_keys=True, default=str) + "\n")
    else:
        text = render_text(result)
        if text:
            print(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv
    env = None
    try:
        args = build_parser().parse_args(argv)
        as_json = args.json
        _setup_logging(args.verbose, args.debug)
        env = Env(args)
        if args.local:
            require_local_uri(env.uri)
        result = args.func(args, env)
        if as_json or not args.quiet or not result.get("ok", True):
            _emit(result, as_json)
        if not result.get("ok", True):
            return 1
        return 0
    except errors.BlockOpsError as exc:
        if as_json:
            _emit({"ok": False, "error": exc.to_json()}, True)
        else:
            print(f"vdsm-blockops: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vdsm-blockops: interrupted; the job (if any) goes on: see 'jobs' and 'recover'",
              file=sys.stderr)
        return 130
    except Exception as exc:  # one error contract: exit 1 and one JSON object, whatever broke
        # The traceback goes to the log; on stderr only with --debug.
        log.error("unexpected error: %s", exc, exc_info=True, extra={"log_only": True})
        error = errors.OperationFailed(f"{type(exc).__name__}: {exc}")
        if as_json:
            _emit({"ok": False, "error": error.to_json()}, True)
        else:
            print(f"vdsm-blockops: error: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        if env is not None:
            env.close()


if __name__ == "__main__":
    sys.exit(main())
