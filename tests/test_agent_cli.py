"""`xfer agent` and `xfer pki` at the edge: exit status 2 for usage, 1 for failures, one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xfer import pki


def xfer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xfer.cli", *args], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path)
    return tmp_path / "ca.pem"


@pytest.mark.parametrize(("args", "code", "text"), [
    (["push", "--agent", "https://127.0.0.1:9", "--vm", "10.0.1.2", "--to", "10.0.4.2:7443"], 2,
     "must look like https://HOST:PORT"),
    (["pull", "--agent", "http://127.0.0.1:9", "--vm", "10.0.1.2", "--from", "https://127.0.0.1:9"], 2,
     "must look like https://HOST:PORT"),
    (["forget", "--agent", "https://127.0.0.1:9", "--vm", "10.0.1.2", "--kinds", "nat"], 2,
     "unknown kind 'nat'"),
    (["status", "--agent", "https://127.0.0.1:9", "--cert", "/nonexistent.pem"], 1, "TLS file not found"),
])
def test_agent_verbs_fail_in_one_line(ca: Path, args: list[str], code: int, text: str) -> None:
    out = xfer("agent", *args, "--ca", str(ca))
    assert out.returncode == code, out.stderr
    assert text in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_unreachable_agent(ca: Path, tmp_path: Path) -> None:
    pki.issue(tmp_path, "op")
    out = xfer("agent", "status", "--agent", "https://127.0.0.1:9", "--ca", str(ca),
               "--cert", str(tmp_path / "op.pem"), "--key", str(tmp_path / "op.key"))
    assert out.returncode == 1 and "unreachable" in out.stderr


def test_agent_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[device]\nid = "fw"\ntype = "toaster"\nkinds = ["conntrack"]\n')
    out = xfer("agent", "serve", "--config", str(config))
    assert out.returncode == 2 and "device.type 'toaster'" in out.stderr


def test_pki_cli(tmp_path: Path) -> None:
    assert xfer("pki", "init", "--dir", str(tmp_path)).returncode == 0
    out = xfer("pki", "issue", "fw-src", "--dir", str(tmp_path), "--ip", "10.0.4.1")
    assert out.returncode == 0 and (tmp_path / "fw-src.pem").exists()
    again = xfer("pki", "init", "--dir", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_help_has_examples() -> None:
    for verb in ("serve", "status", "export", "import", "forget", "push", "pull"):
        out = xfer("agent", verb, "--help")
        assert out.returncode == 0 and "Example: xfer agent" in out.stdout, verb
