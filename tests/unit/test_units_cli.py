"""Operations surface: systemd units as installed, the recovery queue,
the CLI's error contract and local-only rule."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from vdsm_blockops.core import errors
from vdsm_blockops.core.config import Config, require_local_uri
from vdsm_blockops.engine import units
from vdsm_blockops.engine.context import Context
from vdsm_blockops.ops.recover import recover_queued


def test_units_are_written_for_this_installation_and_verify(tmp_path):
    config_path = tmp_path / "my config.yaml"
    config_path.write_text(f"state_dir: {tmp_path}/state\n")
    config = Config(state_dir=f"{tmp_path}/state")
    report = units.install(config, str(config_path), str(tmp_path / "units"))
    assert len(report.units) == 3 and not report.enabled
    service = (tmp_path / "units" / "vdsm-blockops-recover.service").read_text()
    assert sys.executable in service and "TimeoutStartSec=" in service
    assert f'"{config_path}"' in service  # quoted: the name has a space
    path_unit = (tmp_path / "units" / "vdsm-blockops-recover.path").read_text()
    assert f"DirectoryNotEmpty={tmp_path}/state/queue" in path_unit
    assert "WantedBy=paths.target" in path_unit
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (Debian package systemd)"
    proc = subprocess.run([analyze, "verify", "--man=no", *report.units],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(units.uninstall(str(tmp_path / "units")).units) == 3
    with pytest.raises(errors.BadRequest):
        units.uninstall(str(tmp_path / "units"))


class _Conn:
    def domain(self, name):
        if name == "gone":
            raise errors.UnknownDomain("no such domain")
        raise errors.OperationFailed(f"{name}: cannot read its chain")


def test_a_queue_entry_that_keeps_failing_moves_to_failed(tmp_path):
    state = tmp_path / "state"
    (state / "queue").mkdir(parents=True)
    for name in ("bad", "gone"):
        (state / "queue" / name).write_text("1\n")
    ctx = Context(conn=_Conn(), config=Config(state_dir=str(state)))
    report = recover_queued(ctx)
    assert not report.ok and "bad" in report.error["message"]
    assert os.listdir(state / "queue") == []          # the path unit stops firing
    assert os.listdir(state / "failed") == ["bad"]    # with the reason, for the timer to retry
    assert "cannot read its chain" in (state / "failed" / "bad").read_text()
    assert not recover_queued(ctx).ok and os.listdir(state / "failed") == ["bad"]


@pytest.mark.parametrize("uri", ["qemu+ssh://other/system", "qemu+tcp://10.0.0.9/system",
                                 "qemu://node7.example/system"])
def test_remote_uris_are_refused(uri):
    with pytest.raises(errors.BadRequest, match="another host"):
        require_local_uri(uri)


@pytest.mark.parametrize("uri", ["qemu:///system", "qemu+unix:///system", "test:///default",
                                 "qemu+ssh://localhost/system"])
def test_local_uris_pass(uri):
    require_local_uri(uri)


def cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "VDSM_BLOCKOPS_CONFIG"}
    return subprocess.run([sys.executable, "-m", "vdsm_blockops", *args], capture_output=True,
                          text=True, env=env)


def test_every_failure_is_one_json_object_and_no_traceback():
    proc = cli("hook", "install", "--hooks-dir", "/dev/null/x", "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    body = json.loads(proc.stdout)
    assert body["ok"] is False and "/dev/null/x" in body["error"]["message"]
    proc = cli("merge", "vm", "vda", "--connect", "qemu+ssh://other/system", "--json")
    assert proc.returncode == 2 and "Ansible" in json.loads(proc.stdout)["error"]["message"]
    proc = cli("merge", "vm", "vda", "--strategy", "fast")
    error = proc.stderr.splitlines()[-1]  # under the usage, one error line, one program name
    assert proc.returncode == 2 and error.count("vdsm-blockops") == 1
    assert "invalid choice" in error


def test_quiet_help_completion_and_manpage():
    assert "exit codes:" in cli("merge", "--help").stdout
    assert "_shtab_vdsm_blockops" in cli("completion", "bash").stdout
    assert cli("manpage").stdout.startswith(".TH")
    proc = cli("units", "uninstall", "--unit-dir", "/nonexistent-units", "--quiet")
    assert proc.returncode == 2 and proc.stdout == ""


def test_virsh_names_are_hidden_aliases():
    from vdsm_blockops.shells.parser import build_parser, parse_args

    args = parse_args(["relocate", "vm", "vda", "/x/d.qcow2", "--finish", "--synchronous-writes",
                       "--shallow", "--async"])
    assert (args.no_pivot, args.sync_writes, args.mode, args.no_wait) == (True, True, "shallow", True)
    args = parse_args(["merge", "vm", "vda", "--delete", "--wait"])
    assert args.delete_retired and not args.no_wait
    text = build_parser().format_help() + "".join(
        sub.format_help() for action in build_parser()._subparsers._group_actions
        for sub in action.choices.values())
    for hidden in ("--finish", "--synchronous-writes", "--shallow", "--async", "--delete ", "--wait"):
        assert hidden not in text, hidden


def test_every_option_and_positional_has_help():
    import argparse

    from vdsm_blockops.shells.parser import build_parser

    missing = []
    for action in build_parser()._subparsers._group_actions:
        for verb, sub in action.choices.items():
            missing += [f"{verb} {a.dest}" for a in sub._actions if a.help is None]
    assert missing == []
    assert argparse.SUPPRESS  # hidden aliases carry SUPPRESS, which is a help too


def test_a_parse_error_shows_the_usage_then_the_error():
    proc = subprocess.run([sys.executable, "-m", "vdsm_blockops", "merge", "vm"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    usage, error = proc.stderr.split("vdsm-blockops: error: ")
    assert usage.startswith("usage: vdsm-blockops merge ") and "domain disk" in usage
    assert "required: disk" in error
