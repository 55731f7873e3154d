"""What an operator meets around the commands: --version, -v/-q, JSON errors under --json,
syntax errors that say where, dates in ``bundle show``, progress only on a terminal."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest

import xfer as xfer_pkg
from tests.test_cli import _good, _write, xfer
from xfer.cli import common


def test_version() -> None:
    out = xfer("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"xfer {xfer_pkg.__version__}"


def test_with_json_a_failure_is_json_on_stderr() -> None:
    out = xfer("bundle", "show", "/nonexistent.xfer", "--json")
    assert out.returncode == 1 and out.stdout == ""
    assert json.loads(out.stderr) == {"error": "bundle file /nonexistent.xfer not found", "exit": 1}
    plain = xfer("bundle", "show", "/nonexistent.xfer")
    assert plain.returncode == 1 and plain.stderr == "xfer: bundle file /nonexistent.xfer not found\n"


def test_with_json_a_usage_error_is_json_too() -> None:
    out = xfer("bundle", "show", "--no-such-flag", "--json")
    assert out.returncode == 2 and json.loads(out.stderr) == {"error": "No such option: --no-such-flag",
                                                              "exit": 2}
    assert xfer("bundle", "show", "--no-such-flag").returncode == 2


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "topology.yaml"
    f.write_text("servers:\n  hv1: gw\nlinks: x: y\n")
    out = xfer("topology", "check", str(f))
    assert out.returncode == 2
    assert out.stderr == f"xfer: topology {f}:3:9: mapping values are not allowed here\n"


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('[device]\nid = "fw"\ntype = \n')
    out = xfer("agent", "serve", "--config", str(f))
    assert out.returncode == 2 and out.stderr == f"xfer: agent config {f}:3:8: invalid value\n"


def test_bundle_show_dates_and_no_none(tmp_path: Path) -> None:
    path = _write(tmp_path, _good())
    text = xfer("bundle", "show", path).stdout
    created = next(line for line in text.splitlines() if "created:" in line)
    assert "T" in created and "+00:00" in created and "None" not in text
    shown = json.loads(xfer("bundle", "show", path, "--json").stdout)
    assert shown["created_at"].endswith("+00:00") and isinstance(shown["created"], float)
    assert "null" not in json.dumps(shown)


def test_verbosity_moves_the_log_level() -> None:
    try:
        for verbosity, cli, daemon in ((-1, logging.ERROR, logging.WARNING),
                                       (0, logging.WARNING, logging.INFO),
                                       (1, logging.INFO, logging.DEBUG),
                                       (2, logging.DEBUG, logging.DEBUG)):
            common.run.verbosity = verbosity
            assert (common.log_level(logging.WARNING), common.log_level(logging.INFO)) == (cli, daemon)
    finally:
        common.run.verbosity = 0


def test_progress_is_silent_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with common.progress("work", total=2) as advance:
        advance()
        advance()
    assert stream.getvalue() == ""


def test_every_command_that_prints_has_json() -> None:
    import typer.main

    from xfer.cli import app

    # Daemons and --ebpf write logs or program text, not results.
    exempt = {"agent serve", "manager serve", "dhcp serve"}
    missing = []

    def walk(command: object, path: list[str]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])
        params = [p.name for p in getattr(command, "params", [])]
        if not hasattr(command, "commands") and " ".join(path) not in exempt and "as_json" not in params:
            missing.append(" ".join(path))

    walk(typer.main.get_command(app), [])
    assert not missing, f"commands without --json: {missing}"


def test_progress_shows_on_a_terminal() -> None:
    import os
    import subprocess

    code = ("import time\nfrom xfer.cli.common import progress\n"
            "with progress('bench work', total=2) as advance:\n"
            "    advance(); time.sleep(0.5); advance()\n")
    master, slave = os.openpty()
    try:
        proc = subprocess.run([sys.executable, "-c", code], stderr=slave, stdout=subprocess.PIPE,
                              timeout=60, check=True)
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:   # EIO: the child's end is closed and everything was read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert proc.stdout == b"" and b"bench work" in seen
