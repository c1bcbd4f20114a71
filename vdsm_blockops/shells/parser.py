"""The command line's grammar: every verb, its arguments and help, one
parser (or, for speed, one verb's). The two verbs that print the parser
itself (completion, manpage) live here too."""

from __future__ import annotations

import argparse
import contextlib
import enum
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from .. import __version__
from ..api import BadRequest, BlockOpsError, ImageFormat, Method, Mode, Strategy

if TYPE_CHECKING:
    from ..api import Report, TextReport
from . import commands
from .argbase import EXIT_CODES, Formatter, Parser, add_common, seconds


def choices(kind: type[enum.Enum], exclude: tuple[str, ...] = ()) -> list[str]:
    return [str(member.value) for member in kind if member.value not in exclude]


def _alias(parser: argparse.ArgumentParser, option: str, dest: str) -> None:
    """A hidden second name of a flag (virsh's name for it)."""
    parser.add_argument(option, dest=dest, action="store_true", help=argparse.SUPPRESS)


def _add_vdsm_override(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-vdsm-managed", action="store_true",
                        help="act on a VM whose definition carries VDSM's metadata (refused by "
                             "default: the oVirt engine's view would go stale)")


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bandwidth", type=int, metavar="MIB_PER_S", default=0,
                        help="throttle every copy of the operation (MiB/s, 0 = unlimited); a "
                             "live mirror is paced by QEMU over the whole disk, holes included")
    parser.add_argument("--timeout", type=seconds, metavar="SECONDS",
                        help="abort the job after this long (exit 3)")
    parser.add_argument("--no-wait", action="store_true",
                        help="start the job and return; follow up with jobs/recover")
    # virsh's names, accepted and not shown: --async, and --wait (waiting is
    # the default here: it changes nothing)
    _alias(parser, "--async", "no_wait")
    parser.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    _add_vdsm_override(parser)


DOMAIN_HELP = "the domain's name or UUID"


def _chain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("disk", nargs="?", help="one disk's target name (vda); default: every disk")


def _verify_args(p: argparse.ArgumentParser) -> None:
    _chain_args(p)
    p.add_argument("--checkpoints", action="store_true",
                   help="fail on a broken checkpoint too (default: report it as a warning)")


def _jobs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", nargs="?", help="one domain (default: every domain of the node)")


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("disk", help="target name (vda) or 'all'")
    p.add_argument("--base", help="image kept as the backing (path or vda[N]); none: flatten")
    p.add_argument("--top", help="highest image of the segment (default: the active image)")
    p.add_argument("--strategy", default="auto", choices=choices(Strategy, exclude=("noop",)),
                   help="how to merge (default auto: fewest bytes copied, never into a shared layer)")
    p.add_argument("--keep-relative", action="store_const", const=True, default=None,
                   help="keep relative backing names (default: when the chain already uses them)")
    p.add_argument("--delete-retired", action="store_true",
                   help="unlink retired layers after verification when nothing uses them")
    _alias(p, "--delete", "delete_retired")  # virsh blockcommit --delete
    _add_job_options(p)


def _relocate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("disk", help="target name (vda) or 'all' (then DEST is a folder)")
    p.add_argument("dest", help="path of the new active image")
    p.add_argument("--mode", default="chain", choices=choices(Mode),
                   help="what moves (default chain: every layer, keeping the snapshots)")
    p.add_argument("--method", default="auto", choices=choices(Method, exclude=("copy", "convert")),
                   help="how the data moves (default auto: flatten for --mode full when the "
                        "read-only layers hold most data, else mirror)")
    p.add_argument("--format", default="qcow2", choices=choices(ImageFormat),
                   help="DEST's format (default qcow2; raw only with --mode full)")
    p.add_argument("--reuse-external", action="store_true", help="DEST (and its layers) exist already")
    p.add_argument("--sync-writes", action="store_true",
                   help="guest writes go to both sides, so the copy always converges")
    p.add_argument("--no-pivot", action="store_true",
                   help="stay on the source; DEST is a consistent copy as of the finish")
    # virsh blockcopy's names, accepted and not shown
    _alias(p, "--synchronous-writes", "sync_writes")
    _alias(p, "--finish", "no_pivot")
    # virsh blockcopy --shallow: only the active layer moves
    p.add_argument("--shallow", action="store_const", dest="mode", const="shallow",
                   help=argparse.SUPPRESS)
    p.add_argument("--delete-source", action="store_true",
                   help="after pivot and verification unlink source files nothing uses")
    _add_job_options(p)


def _migrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("dest_uri", metavar="DEST_URI",
                   help="the destination node's libvirt URI (qemu+tls://node2/system)")
    p.add_argument("--dest-dir", required=True, metavar="DIR",
                   help="where the images go, as the destination sees it (each chain keeps "
                        "its layout under it)")
    p.add_argument("--source-root", metavar="DIR",
                   help="lay the layers out under --dest-dir as they lie under "
                        "DIR here (the node's image folder), so that VMs moved to one "
                        "--dest-dir share their templates there (default: the folder the VM's "
                        "layers share)")
    p.add_argument("--proof", choices=("full", "sample"), default="full",
                   help="how each copy is proven on the destination: full (read back whole "
                        "and its SHA-256 compared with what was sent: every byte) or sample "
                        "(its size, its header and 16 random 1 MiB pieces compared with this "
                        "node's file: NOT every byte -- for transports that authenticate every "
                        "byte themselves, TLS or SSH)")
    p.add_argument("--migrate-uri", metavar="URI",
                   help="where the destination's QEMU listens for the migration data "
                        "(tcp://ADDRESS; default: the destination's host name)")
    p.add_argument("--bandwidth", type=int, metavar="MIB_PER_S", default=0,
                   help="throttle the copies and the migration (MiB/s, 0 = unlimited)")
    p.add_argument("--timeout", type=seconds, metavar="SECONDS",
                   help="stop and roll back if the move has not finished by then (exit 3)")
    p.add_argument("--delete-source", action="store_true",
                   help="after verification on the destination unlink the source layers "
                        "nothing else uses (default: keep them, retired)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    # virsh migrate's names, accepted and not shown: the move is always
    # live, peer to peer and persistent on the destination
    for flag in ("--live", "--p2p", "--persistent", "--undefinesource", "--copy-storage-inc"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--migrateuri", dest="migrate_uri", help=argparse.SUPPRESS)
    _add_vdsm_override(p)


def _snapshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("disk", help="the disk's target name (vda)")
    p.add_argument("overlay", help="path of the new qcow2 overlay")
    p.add_argument("--reuse-external", action="store_true", help="OVERLAY exists already")
    _add_vdsm_override(p)


def _abort_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("disk", help="the disk's target name (vda; 'all' for a move to another node)")
    p.add_argument("--pivot", action="store_true", help="pivot onto the mirror (must be ready)")
    _add_vdsm_override(p)


def _speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("disk", help="the disk's target name (vda)")
    p.add_argument("bandwidth", type=int, metavar="MIB_PER_S", help="the new limit (0: none)")
    _add_vdsm_override(p)


def _recover_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", nargs="?", help="one domain (default: every domain with a record)")
    p.add_argument("--queued", action="store_true",
                   help="recover the domains the libvirt hook queued")
    p.add_argument("--timeout", type=seconds, metavar="SECONDS",
                   help="how long to wait on a job that is still running")


def _hook_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["install", "uninstall", "disable", "enable"],
                   help="install or uninstall the guard; disable it (starts go unchecked: "
                        "needs --reason, written to the history) or enable it again")
    p.add_argument("--reason", help="why the guard is disabled (hook disable)")
    p.add_argument("--hooks-dir", default=None, help="default /etc/libvirt/hooks/qemu.d")
    p.add_argument("--reload", action="store_true", help="SIGHUP libvirtd so it sees the change")


def _units_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["install", "uninstall"], help="install or uninstall")
    p.add_argument("--unit-dir", default=None, help="default /etc/systemd/system")
    p.add_argument("--enable", action="store_true",
                   help="also enable (install) or disable (uninstall) them with systemctl")


def _completion_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", choices=["bash", "zsh", "tcsh"], help="the shell to complete in")


class Verb(NamedTuple):
    name: str
    help: str
    command: Callable[..., Report]
    arguments: Callable[[argparse.ArgumentParser], None] | None
    # The verb reads, copies or deletes image files, so it may only drive
    # the libvirt of this node.
    local: bool = True


# The two verbs that print the parser itself (shells/manual.py).
def _cmd_completion(args: argparse.Namespace, env: commands.Env) -> TextReport:
    from ..api import TextReport
    from .manual import completion

    return TextReport(operation="completion", text=completion(build_parser(), args.shell))


def _names_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["domains", "disks"], help="what to list")
    p.add_argument("words", nargs=argparse.REMAINDER,
                   help="disks: the command line so far (its domain is the word after the verb)")


def _cmd_names(args: argparse.Namespace, env: commands.Env) -> TextReport:
    """Names for the shell's completion, one per line: asked of libvirt by
    the tool itself (the shell runs no virsh), one call each. ``disks``:
    of the domain the command line so far names (read by that verb's own
    parser, so an option's value is never taken for it)."""
    from ..api import TextReport

    if args.kind == "domains":
        return TextReport(operation="names", text="\n".join(env.node.domains()))
    names = {verb.name for verb in VERBS}
    at = next((i for i, word in enumerate(args.words) if word in names), None)
    domain = None
    if at is not None:
        with contextlib.suppress(BlockOpsError, SystemExit):  # "-": not typed yet
            so_far = build_parser(only=args.words[at]).parse_known_args(
                args.words[at:] + ["-"] * 3)[0]
            domain = getattr(so_far, "domain", None)
    return TextReport(operation="names", text="\n".join(commands.disk_names(env, domain)))


def _cmd_manpage(args: argparse.Namespace, env: commands.Env) -> TextReport:
    from ..api import TextReport
    from .manual import manual_page

    return TextReport(operation="manpage", text=manual_page(build_parser()))


VERBS = [
    Verb("chain", "show each disk's backing chain", commands.cmd_chain, _chain_args),
    Verb("jobs", "list active block jobs on the node or one domain", commands.cmd_jobs, _jobs_args,
         local=False),
    Verb("merge", "collapse a segment of a disk's chain (snapshot live merge)", commands.cmd_merge,
         _merge_args),
    Verb("relocate", "move a disk's data elsewhere while the VM runs, then pivot",
         commands.cmd_relocate, _relocate_args),
    Verb("migrate", "move a running VM and its disks to another node, keeping the "
         "snapshot chains and checkpoints", commands.cmd_migrate, _migrate_args),
    Verb("snapshot", "disk-only external snapshot: a new overlay on the active image",
         commands.cmd_snapshot, _snapshot_args),
    Verb("abort", "abort a block job (or pivot a ready one), or stop a move to another node",
         commands.cmd_abort, _abort_args),
    Verb("speed", "change a running block job's bandwidth", commands.cmd_speed, _speed_args,
         local=False),
    Verb("recover", "finish or roll back operations a crash interrupted", commands.cmd_recover,
         _recover_args),
    Verb("hook", "install or uninstall the libvirt hook that guards VMs", commands.cmd_hook,
         _hook_args, local=False),
    Verb("units", "install or uninstall the systemd units that run 'recover --queued'",
         commands.cmd_units, _units_args, local=False),
    Verb("verify", "check a domain's chains against the images' metadata", commands.cmd_verify,
         _verify_args),
    Verb("history", "show what ran on this node (every domain, or one), in the order it "
                    "started, with start and end",
         commands.cmd_history, _jobs_args, local=False),
    Verb("completion", "print a shell completion script", _cmd_completion,
         _completion_args, local=False),
    Verb("manpage", "print the manual page (roff)", _cmd_manpage, None, local=False),
    Verb("names", "print domain or disk names, one per line (for shell completion)",
         _cmd_names, _names_args, local=False),
]

# Positional arguments whose values the shells complete through 'names'
# (the functions are defined in ``manual.COMPLETION_PREAMBLE``).
COMPLETE = {"domain": "domains", "disk": "disks"}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``only`` one verb's arguments filled in
    (the others listed by name): each argument costs argparse a formatter,
    and a command needs only its own."""
    parser = Parser(prog="vdsm-blockops", epilog=EXIT_CODES,
                     formatter_class=Formatter,
                     description="Live block operations on libvirt/QEMU VMs: snapshot merge, "
                                 "disk relocation, block-job control, verification.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_common(parser, suppress=False)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    verbs.required = True
    for verb in VERBS:
        sub = verbs.add_parser(verb.name, help=verb.help, description=verb.help, epilog=EXIT_CODES,
                               formatter_class=Formatter)
        if only is None or verb.name == only:
            add_common(sub, suppress=True)
            if verb.arguments is not None:
                verb.arguments(sub)
            sub.set_defaults(func=verb.command, local=verb.local)
            for action in sub._actions:
                if action.dest in COMPLETE and not action.option_strings:
                    kind = COMPLETE[action.dest]
                    action.complete = {  # type: ignore[attr-defined]
                        "bash": f"_vdsm_blockops_{kind}", "zsh": f"_vdsm_blockops_{kind}"}
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse with the named verb's arguments only; when the guess was wrong
    (a global option's value that looks like a verb), with all of them."""
    names = {verb.name for verb in VERBS}
    guess = next((word for word in argv if word in names), None)
    if guess is not None and not {"-h", "--help"} & set(argv):
        try:
            args = build_parser(only=guess).parse_args(argv)
            if args.verb == guess:
                return args
        except BadRequest:
            pass
    return build_parser().parse_args(argv)


def shipped_text(kind: str) -> str:
    """A shipped file's text: the same on every machine (argparse wraps
    usage lines to the terminal's width: made at 80 columns)."""
    from .manual import completion, manual_page

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    try:
        parser = build_parser()
        return manual_page(parser) if kind == "manpage" else completion(parser, kind)
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
