"""The ``vdsm-blockops`` command: parse, one library call, render, exit.

Exit codes: 0 done; 1 failed; 2 bad request refused before anything
changed; 3 timed out; 4 conflict. With ``--json`` stdout holds exactly one
JSON object, on success and on failure.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, NoReturn

from ..core import errors
from ..core.budget import INTERRUPTED
from ..core.config import require_local_uri
from ..core.reports import Report
from . import commands
from .logs import add_syslog
from .parser import parse_args

log = logging.getLogger("vdsm_blockops")


class _ConsoleFormatter(logging.Formatter):
    """Tracebacks go to the log (syslog); on the terminal only with --debug."""

    def __init__(self, debug: bool) -> None:
        super().__init__("%(levelname)s %(message)s")
        self.debug = debug

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
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
    add_syslog(root, "vdsm-blockops")


def _emit(result: Report | dict[str, Any], as_json: bool) -> None:
    if as_json:
        body = result.to_json() if isinstance(result, Report) else result
        sys.stdout.write(json.dumps(body, sort_keys=True, default=str) + "\n")
    elif isinstance(result, Report):
        from .render import render

        text = render(result)
        if text:
            print(text)


def _fail(error: errors.BlockOpsError, as_json: bool, env: commands.Env | None = None,
          started: float = 0.0) -> int:
    _trail(env, started, error.exit_code, {"error": error.to_json()})
    if as_json:
        _emit({"ok": False, "error": error.to_json()}, True)
    else:
        if error.usage:
            sys.stderr.write(error.usage)
        from ..core.text import printable

        print(f"vdsm-blockops: error: {printable(str(error))}", file=sys.stderr)
    return error.exit_code


_STOPPED_BY = "Ctrl-C"  # or SIGTERM (systemd, kill, 'abort')


def _interrupted(env: commands.Env | None) -> errors.BlockOpsError:
    """What stopped the command, and what it names: by 'abort' from another
    process (its note: that process settles what this one started), else
    by Ctrl-C or SIGTERM (the work is handed over to 'recover')."""
    args = env.args if env is not None else None
    what = " ".join(str(getattr(args, k)) for k in ("verb", "domain", "disk")
                    if getattr(args, k, None)) or "the command"
    if env is not None:
        from ..engine import aborts
        from ..engine.state import StateDir

        note = aborts.find(StateDir(env.config.state_dir), owner_pid=os.getpid())
        if note is not None:
            return errors.Aborted(aborts.stopped_by_abort(note, what))
        what += _own_records(env)
    return errors.Interrupted(f"{what}: stopped by {_STOPPED_BY}. {INTERRUPTED}")


def _own_records(env: commands.Env) -> str:
    """' (record <id>, ...)' of the records this process wrote, if it can
    be told (the domain's metadata; nothing when libvirt does not answer)."""
    domain = getattr(env.args, "domain", None)
    if not domain or not env.connected:  # never connect in an interrupt
        return ""
    try:
        from ..engine.records import RecordStore

        ids = [r.id for r in RecordStore(env.conn.domain(domain)).load().values()
               if r.pid == os.getpid()]
    except Exception:  # the interrupt's own message must not fail
        return ""
    return f" (record {', '.join(ids)})" if ids else ""


def _stop_on_sigterm() -> None:
    """SIGTERM (systemd, kill) ends the command as Ctrl-C does."""
    import signal

    def stop(_signum: int, _frame: object) -> None:
        global _STOPPED_BY
        _STOPPED_BY = "SIGTERM"
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (main() called by a library user)
        pass


# The verbs that change a node: each run leaves a line in its history.
TRAILED = ("merge", "relocate", "migrate", "snapshot", "abort", "speed", "recover")


def _trail(env: commands.Env | None, started: float, exit_code: int,
           body: dict[str, Any]) -> None:
    if env is None or getattr(env.args, "dry_run", False):
        return
    args = env.args
    guard = args.verb == "hook" and args.action in ("disable", "enable")
    if args.verb not in TRAILED and not guard:
        return
    from ..engine.history import append, entry
    from ..engine.state import StateDir

    error = body.get("error") or {}
    append(StateDir(env.config.state_dir), entry(
        source="cli", operation=f"hook-{args.action}" if guard else args.verb,
        domain=getattr(args, "domain", None), disk=getattr(args, "disk", None), started=started,
        exit_code=exit_code, outcome=error.get("code") or ("ok" if exit_code == 0 else "failed"),
        body=body, message=error.get("message") or (args.reason if guard else None)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _stop_on_sigterm()
    as_json = "--json" in argv
    env = None
    started = time.time()
    try:
        args = parse_args(argv)
        as_json = args.json
        _setup_logging(args.verbose, args.debug)
        env = commands.Env(args)
        if args.local:
            require_local_uri(env.uri)
            env.require_this_node()
        report = args.func(args, env)
        _trail(env, started, report.exit_code, report.to_json())
        if as_json or not args.quiet or not report.ok:
            _emit(report, as_json)
        return int(report.exit_code)
    except errors.BlockOpsError as exc:
        return _fail(exc, as_json, env, started)
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: the command stops; what it started is handed
        # over as it stands -- a libvirt job runs on, its record tells
        # 'recover' what to finish or roll back. One error contract still:
        # exit 1 and, under --json, one JSON object.
        return _fail(_interrupted(env), as_json, env, started)
    except Exception as exc:  # one error contract: exit 1 and one JSON object, whatever broke
        # The traceback goes to the log; on stderr only with --debug.
        log.error("unexpected error: %s", exc, exc_info=True, extra={"log_only": True})
        return _fail(errors.OperationFailed(f"{type(exc).__name__}: {exc}"), as_json, env,
                     started)
    finally:
        if env is not None:
            env.close()


def run() -> NoReturn:
    """The console entry: main(), then exit without the interpreter's
    teardown of every module (~13 ms for libvirt, lxml and ours, measured).
    Nothing is left to tear down: the connection and its event thread are
    closed, worker pools joined, and the streams are flushed here."""
    code = main()
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a reader that went away: as Python itself would, fail
        code = code or 1
    os._exit(code)


if __name__ == "__main__":
    run()
