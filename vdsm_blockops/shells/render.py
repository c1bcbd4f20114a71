"""Reports as plain, readable text (the CLI without ``--json``)."""

from __future__ import annotations

from functools import singledispatch

from ..api import (
    AbortReport,
    ChainReport,
    DiskFailure,
    HistoryReport,
    InstallReport,
    JobsReport,
    MergeReport,
    MigrateReport,
    MultiReport,
    RecoverReport,
    RelocateReport,
    Report,
    SnapshotReport,
    SpeedReport,
    Strategy,
    TextReport,
    VerifyReport,
    printable,
)

MIB = 1024 * 1024


def size(value: int | None) -> str:
    if value is None:
        return "-"
    if value >= 1024 * MIB:
        return f"{value / 1024 / MIB:.1f} GiB"
    if value >= MIB:
        return f"{value / MIB:.1f} MiB"
    return f"{value / 1024:.0f} KiB"


def _chain(paths: list[str]) -> str:
    return " <- ".join(reversed(paths))


@singledispatch
def lines(report: Report) -> list[str]:
    return [f"{key}: {value}" for key, value in report.to_json().items() if key != "ok"]


def render(report: Report) -> str:
    """The report as text lines; names in them escaped (``printable``): a
    newline or an ESC in an image's name neither forges a line nor drives
    the terminal. A script or a page (TextReport) is printed as it is."""
    if isinstance(report, TextReport):
        return report.text.rstrip("\n")
    return "\n".join(printable(line) for line in lines(report))


@lines.register
def _(report: ChainReport) -> list[str]:
    out = [f"domain {report.domain} ({'running' if report.active else 'shut off'})"]
    for disk in report.disks:
        state = "metadata agrees" if disk.metadata_agrees else "METADATA DISAGREES"
        origin = "" if disk.chain_from == "libvirt" else \
            ", from the images' metadata (no vda[N] indexes: name layers by path)"
        out.append(f"  {disk.disk} ({disk.device}): {len(disk.chain)} layer(s), {state}{origin}")
        for pos, layer in enumerate(disk.chain):
            idx = f"[{layer.index}]" if layer.index is not None else "[-]"
            role = " (active)" if pos == 0 else ""
            out.append(f"    {idx:>5} {layer.path}  {layer.format or '?'}  "
                       f"{size(layer.allocation)}{role}")
            if layer.volume:
                v = layer.volume
                out.append(f"          block volume: {size(v['size'])}, used to {size(v['end'])}, "
                           f"{size(v['free'])} free")
            for bitmap in layer.bitmaps:
                flags = ",".join(bitmap["flags"]) or "disabled"
                grain = f"{size(bitmap['granularity'])} granularity, " if bitmap["granularity"] else ""
                out.append(f"          bitmap {bitmap['name']} ({grain}{flags})")
        if disk.mirror:
            m = disk.mirror
            out.append(f"    mirror ({m['job']}) -> {m['path']} ready={'yes' if m['ready'] else 'no'}")
        out += [f"    problem: {p}" for p in disk.problems]
    return out


@lines.register
def _(report: JobsReport) -> list[str]:
    out = [] if report.jobs else ["no active block jobs"]
    for job in report.jobs:
        pct = "?" if job.percent is None else f"{job.percent:.1f}%"
        bw = "unlimited" if not job.bandwidth_mib_s else f"{job.bandwidth_mib_s:g} MiB/s"
        out.append(f"{job.domain} {job.disk}: {job.type} {pct} ({job.cur}/{job.end}), "
                   f"bandwidth {bw}, ready={'yes' if job.ready else 'no'}")
    for op in report.operations:
        owner = (f"pid {op.pid}" if op.running else
                 "started with --no-wait: its job runs on; 'recover' finishes it once done"
                 if op.detached else f"pid {op.pid} gone: run 'recover'")
        out.append(f"{op.domain} {op.disk}: {op.operation} ({op.method or '-'}) {op.record}, "
                   f"phase {op.phase}, {'live' if op.online else 'shut off'}, {owner}")
    return out


@lines.register
def _(report: RecoverReport) -> list[str]:
    if not report.records:
        return ["nothing to recover"]
    return [f"{r.domain} {r.disk}: {r.operation} {r.record} (phase {r.phase}) {r.result}"
            f"{': ' + r.message if r.message else ''}" for r in report.records]


@lines.register
def _(report: VerifyReport) -> list[str]:
    head = [f"{report.domain}: verified, no problems"] if report.ok else []
    return head + [f"problem: {p}" for p in report.problems] + \
        [f"warning: {c}" for c in report.broken_checkpoints if c not in report.problems]


@lines.register
def _(report: MultiReport) -> list[str]:
    return [render(sub) for sub in report.results]


@lines.register
def _(report: DiskFailure) -> list[str]:
    return [f"{report.disk}: failed ({report.error.get('code')}): {report.error.get('message')}"]


def _deletions(deleted: list[str] | None, kept: list[dict[str, str]] | None) -> list[str]:
    out = [f"  deleted: {', '.join(deleted)}"] if deleted else []
    return out + [f"  kept: {k['path']} ({k['why']})" for k in kept or []]


@lines.register
def _(report: RelocateReport) -> list[str]:
    verb = "would relocate" if report.dry_run else "relocated"
    out = [f"{report.domain} {report.disk}: {verb} ({report.mode.value} mode, "
           f"{report.method.value}), {size(report.bytes_to_copy)} to copy",
           f"  before: {_chain(report.chain_before)}",
           f"  after:  {_chain(report.chain_after)}"]
    if not report.pivot:
        out.append(f"  not pivoted: the VM stays on its source; copy at {report.dest}")
    out += _deletions(report.deleted, report.kept)
    if report.verified and report.phases_s:
        out.append(f"  copied in {report.phases_s['copy']:.2f} s, verified in "
                   f"{report.phases_s['verification']:.2f} s ({report.duration_s or 0:.2f} s "
                   "in all)")
    elif report.verified:
        out.append(f"  done and verified in {report.duration_s or 0:.2f} s")
    return out


@lines.register
def _(report: MigrateReport) -> list[str]:
    verb = "would move" if report.dry_run else "moved"
    out = [f"{report.domain}: {verb} to {report.dest_host} ({report.dest_uri}), "
           f"{size(report.bytes_to_copy)} of read-only layers to copy"]
    for disk, after in report.chain_after.items():
        out += [f"  {disk} here:  {_chain(report.chain_before[disk])}",
                f"  {disk} there: {_chain(after)}"]
    if report.checkpoints:
        out.append(f"  checkpoints kept: {', '.join(report.checkpoints)}")
    if report.deleted:
        out.append(f"  deleted here: {', '.join(report.deleted)}")
    if report.verified:
        out.append(f"  verified on {report.dest_host} in {report.duration_s or 0:.2f} s")
    return out


@lines.register
def _(report: SnapshotReport) -> list[str]:
    return [f"{report.domain} {report.disk}: new overlay {report.overlay}",
            f"  chain: {_chain(report.chain_after)}"]


@lines.register
def _(report: MergeReport) -> list[str]:
    verb = "would merge" if report.dry_run else "merged" if report.finished else "started merge"
    if report.strategy is Strategy.NOOP:
        out = [f"{report.domain} {report.disk}: nothing to merge (segment is one layer)"]
    else:
        out = [f"{report.domain} {report.disk}: {verb} by {report.strategy.value} "
               f"({report.libvirt_call}), {size(report.bytes_to_copy)} to copy"]
    after = "after:  " if report.finished or report.dry_run else "when done: "
    out += [f"  before: {_chain(report.chain_before)}", f"  {after}{_chain(report.chain_after)}"]
    if report.keep_relative:
        out.append("  relative backing names kept (the chain uses them)")
    for r in report.retired:
        state = "still a valid point in time" if r.valid else "INVALID, never use again"
        out.append(f"  retired: {r.path} ({state})")
    out += _deletions(report.deleted, report.kept)
    if not report.dry_run and not report.finished:
        out.append("  job started; follow it with 'vdsm-blockops jobs'")
    elif report.verified:
        out.append(f"  done and verified in {report.duration_s or 0:.2f} s")
    return out


@lines.register
def _(report: AbortReport) -> list[str]:
    out = [f"{report.domain} {report.disk}: {'pivoted' if report.pivot else 'aborted'}",
           f"  chain: {_chain(report.chain_after)}"]
    return out + [f"  record {r.record}: {r.result}" for r in report.recover or []]


@lines.register
def _(report: SpeedReport) -> list[str]:
    bandwidth = f"{report.bandwidth_mib_s} MiB/s" if report.bandwidth_mib_s else "unlimited"
    return [f"{report.domain} {report.disk}: bandwidth {bandwidth}"]


@lines.register
def _(report: InstallReport) -> list[str]:
    out = [f"{report.operation}: {report.path or ', '.join(report.units or [])}"]
    return out + ([report.note] if report.note else [])


@lines.register
def _(report: HistoryReport) -> list[str]:
    if not report.entries:
        return ["no operations in the history"]
    return [" ".join(str(e.get(k) if e.get(k) is not None else "-")
                     for k in ("start", "end", "source", "operation", "domain", "disk", "method",
                               "outcome", "exit_code")) + (f"  {e['message']}" if e.get("message") else "")
            for e in report.entries]


@lines.register
def _(report: TextReport) -> list[str]:
    return [report.text.rstrip("\n")]
