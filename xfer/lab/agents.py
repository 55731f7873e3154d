"""Agents in the lab: a CA, a link between the firewalls, agent processes per namespace.

The firewalls' agents talk over their own link (``ag0``: 10.0.4.1 on the source
firewall, 10.0.4.2 on the destination), so agent traffic stays inside the lab and
never crosses the forwarding path the VM's connections use. Shared by the agent
kernel tests and ``xfer bench agents``.

    with Hosts("t") as hosts:
        agents = LabAgents(hosts, workdir)
        agents.link(fwsrc, fwdst)
        src = agents.start("fw-src", fwsrc, SRC_AGENT_IP, ["conntrack"])
        hosts.check(fwsrc, [*XFER, "agent", "status", *agents.client_args(src.url)])
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from xfer import pki
from xfer.lab.hosts import Hosts, LabError, stop_process

SRC_AGENT_IP, DST_AGENT_IP = "10.0.4.1", "10.0.4.2"
AGENT_PORT = 7443
XFER = [sys.executable, "-m", "xfer.cli"]
OPERATOR = "operator"


def device_toml(counters: Sequence[str] = (), trusted: str = "", untrusted: Sequence[str] = ()) -> str:
    """The ``[counters]``/``[dhcp]`` sections of an agent config (for ``LabAgents.start(extra=)``)."""
    text = ""
    if counters:
        text += f"\n[counters]\ninterfaces = {list(counters)!r}\n".replace("'", '"')
    if trusted:
        text += f"\n[dhcp]\ntrusted = \"{trusted}\"\nuntrusted = {list(untrusted)!r}\n".replace("'", '"')
    return text


def kind_available(module: str) -> bool:
    """Whether this build of xfer has a kind's device module (``xfer.counters.device``...)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing too
        return False


def unpin(namespaces: Sequence[str]) -> None:
    """Remove the BPF pins (counters, DHCP snooping) and counters' import locks of lab
    namespaces; both outlive the namespaces."""
    if not kind_available("xfer.ebpf.loader"):
        return
    from xfer.counters.device import remove_locks
    from xfer.ebpf.loader import PIN_ROOT

    for ns in namespaces:
        shutil.rmtree(PIN_ROOT / ns, ignore_errors=True)
        remove_locks(ns)


class AgentProcess:
    """One ``xfer agent serve`` process in a namespace; its log is a file."""

    # What serves: subclasses run other daemons that log the same "listening" event.
    command: tuple[str, ...] = ("agent", "serve")

    def __init__(self, hosts: Hosts, name: str, ns: str, config: Path, log: Path, url: str) -> None:
        self.hosts, self.name, self.ns, self.config, self.log, self.url = hosts, name, ns, config, log, url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> AgentProcess:
        """Spawn the agent and wait until its log says it listens.

        A process that exits fails at once; a live one gets ``timeout`` seconds, which a
        2-core machine running several suites at once needs (15 s was seen to run out).
        """
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = self.hosts.spawn(self.ns, [*XFER, *self.command, "--config", str(self.config)],
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if '"event":"listening"' in self.log_text(offset):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise LabError(f"{self.command[0]} {self.name} in {self.ns} did not start:\n{self.log_text(offset)}")

    def log_text(self, offset: int = 0) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL, no goodbye: what a crash or an OOM kill does."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class LabAgents:
    """A CA and certificates in ``workdir``, agent configs and processes; ``hosts`` owns them."""

    def __init__(self, hosts: Hosts, workdir: Path) -> None:
        self.hosts = hosts
        self.workdir = workdir
        self.pki = workdir / "pki"
        pki.init_ca(self.pki, "xfer lab CA")
        pki.issue(self.pki, OPERATOR)
        self.agents: list[AgentProcess] = []

    def link(self, ns_a: str, ns_b: str, ip_a: str = SRC_AGENT_IP, ip_b: str = DST_AGENT_IP) -> None:
        """The agents' own link between two namespaces (``ag0`` at both ends)."""
        self.hosts.veth(ns_a, "ag0", ns_b, "ag0", f"{ip_a}/24", f"{ip_b}/24")

    def start(self, name: str, ns: str, address: str, kinds: Sequence[str], *,
              netns_in_config: bool = True, metrics: str = "", extra: str = "") -> AgentProcess:
        """Issue ``name``'s certificate, write its config, start it.

        ``metrics`` is ADDRESS:PORT of the plain-HTTP metrics listener; ``extra`` is
        TOML appended to the file (whole sections: ``[counters]``...).
        """
        pki.issue(self.pki, name, ips=[address])
        config = self.workdir / f"{name}.toml"
        kind_list = ", ".join(f'"{k}"' for k in kinds)
        config.write_text(f"""
[device]
id = "{name}"
type = "firewall"
kinds = [{kind_list}]
{f'netns = "{ns}"' if netns_in_config else ''}

[listen]
address = "{address}"
port = {AGENT_PORT}
{f'metrics = "{metrics}"' if metrics else ''}

[tls]
cert = "pki/{name}.pem"
key = "pki/{name}.key"
ca = "pki/ca.pem"

[state]
dir = "state-{name}"
{extra}
""")
        url = f"https://{address}:{AGENT_PORT}"
        agent = AgentProcess(self.hosts, name, ns, config, self.workdir / f"{name}.log", url)
        self.agents.append(agent)
        return agent.start()

    def client_args(self, url: str, name: str = OPERATOR, ca: Path | None = None) -> list[str]:
        """``--agent URL --ca --cert --key`` for the CLI; ``name=""`` presents no certificate."""
        args = ["--agent", url, "--ca", str(ca or self.pki / "ca.pem")]
        if name:
            args += ["--cert", str(self.pki / f"{name}.pem"), "--key", str(self.pki / f"{name}.key")]
        return args
