"""A real 802.1Qbg station (lldpad + vdptool) facing ``xfer vdp serve`` across a veth.

Run as /work/shared/VDP.md measured it: lldpad's state file lives in /dev/shm, so each
instance gets its own tmpfs there (``ip netns exec`` gives it its own mount
namespace); ``-p`` skips the pid file; VDP is usable only after an LLDP exchange,
which re-setting an EVB value triggers at once; vdptool's exit status says nothing,
its output does. Everything started here is a process of ``hosts`` and goes with
``hosts.close()`` (the test's finalizer), namespaces included.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from xfer.lab.hosts import Hosts, have

needs_lldpad = pytest.mark.skipif(not (have("lldpad") and have("vdptool") and have("lldptool")),
                                  reason="lldpad/vdptool not installed (Debian lldpad; scripts/setup)")

STATION_PORT, SWITCH_PORT = "s0", "p1"
SERVER = "hv7"
TYPE_ID, TYPE_VERSION = 1193046, 3
WARMUP_UUID = "00000000-0000-4000-8000-0000000000ff"


def _station_conf(port: str) -> str:
    return (f'nearest_customer_bridge : {{\n  {port} : {{\n    adminStatus = 3;\n'
            f'    tlvid0080c20d : {{ enableTx = true; evbmode = "station"; evbrrreq = true; '
            f'evbrrcap = false; evbgpid = false; ecpretries = 3; ecprte = 14; vdprwd = 20; '
            f'vdprka = 20; }};\n  }};\n}};\n')


@dataclass
class Answer:
    """What vdptool printed: the mode the station reports after the bridge's answer."""

    output: str

    @property
    def answered(self) -> bool:
        return "Response from VDP" in self.output

    @property
    def mode(self) -> str | None:
        for line in self.output.splitlines():
            key, _, value = line.strip().partition(" = ")
            if key == "mode":
                return value
        return None


class Station:
    """lldpad in station role on ``s0`` of namespace ``ns``."""

    def __init__(self, hosts: Hosts, ns: str, workdir: Path) -> None:
        self.hosts, self.ns = hosts, ns
        conf = workdir / f"lldpad-{ns}.conf"
        conf.write_text(_station_conf(STATION_PORT))
        self.log = workdir / f"lldpad-{ns}.log"
        with open(self.log, "wb") as out:
            self.proc = hosts.spawn(ns, ["sh", "-c", "mount -t tmpfs xfer-vdp /dev/shm && "
                                         f"exec stdbuf -oL lldpad -p -t -f {conf}"],
                                    stdout=out, stderr=subprocess.STDOUT)

    def vdptool(self, *args: str, timeout: float = 20) -> str:
        out = self.hosts.run(self.ns, ["vdptool", "-i", STATION_PORT, *args], timeout=timeout)
        return out.stdout + out.stderr

    def request(self, uuid: str, mac: str, mode: str = "assoc", hints: str | None = None) -> Answer:
        """One VDP request, waiting for the bridge's answer (``-W``)."""
        args = ["-T", "-W", "-V", mode, "-c", f"mode={mode}", "-c", "mgrid2=blade5",
                "-c", f"typeid={TYPE_ID}", "-c", f"typeidver={TYPE_VERSION}", "-c", f"uuid={uuid}",
                "-c", f"filter=0-{mac}"]
        if hints:
            args += ["-c", f"hints={hints}"]
        return Answer(self.vdptool(*args))

    def associated(self, uuid: str) -> bool:
        """True while the station still holds the VSI as associated (it drops unanswered ones)."""
        listing = self.vdptool("-t", "-V", "assoc")
        blocks = listing.split("VSI ")
        return any(f"uuid = {uuid}" in b and "mode = assoc" in b for b in blocks)

    def wait_usable(self, timeout: float = 90.0) -> None:
        """Poll until VDP works on the port (a responder must be running on the other end)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"lldpad exited: {self.log.read_text()[-500:]}")
            nudged = self.hosts.run(self.ns, ["lldptool", "-T", "-i", STATION_PORT, "-g", "ncb",
                                              "-V", "evb", "-c", "vdprka=20"], timeout=10)
            if nudged.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"lldpad never answered lldptool: {nudged.stderr}")
            time.sleep(0.3)
        while True:
            answer = self.request(WARMUP_UUID, "02:00:00:00:00:ff")
            if answer.answered and answer.mode == "assoc":
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"VDP never became usable: {answer.output.strip()}")
            time.sleep(0.5)


@dataclass
class UdpManager:
    """A stand-in manager on 127.0.0.1 that answers each datagram as the real one does."""

    ok: bool = True
    received: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            msg = json.loads(data)
            self.received.append(msg)
            answer = {"ok": True, "vm": msg.get("vm"), "state": "stored"} if self.ok else \
                {"ok": False, "error": f"VM {msg.get('vm')} is not in the topology", "type": "UsageError"}
            self.sock.sendto(json.dumps(answer).encode(), addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class Responder:
    """``xfer vdp serve`` as a process (the real command), stdout and stderr in files."""

    def __init__(self, hosts: Hosts, switch_ns: str, workdir: Path, *target: str,
                 inventory: Path | None = None, name: str = "vdp", server: str = SERVER,
                 port: str = SWITCH_PORT, run_in: str | None = None) -> None:
        """``run_in``: the namespace the process runs in (where it reaches the manager)."""
        import sys

        self.out, self.err = workdir / f"{name}.out", workdir / f"{name}.err"
        argv = [sys.executable, "-m", "xfer.cli", "vdp", "serve", "--netns", switch_ns,
                "--ports", port, "--server", server, "--json", *target]
        if inventory is not None:
            argv += ["--inventory", str(inventory)]
        if run_in is not None:
            argv = ["ip", "netns", "exec", run_in, *argv]     # exec()s: the pid stays the responder's
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, start_new_session=True)
        hosts.procs.append(self.proc)
        deadline = time.monotonic() + 20
        while '"serving"' not in self.err.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"xfer vdp serve did not start: {self.err.read_text()}")
            time.sleep(0.1)

    def messages(self) -> list[dict[str, Any]]:
        """The --json lines: each message as sent."""
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def logs(self, kind: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.err.read_text().splitlines() if line.startswith("{")]
        return [r for r in lines if kind is None or r.get("vdp") == kind]

    def stop(self) -> dict[str, Any]:
        """SIGTERM, then the counters it logged on the way out."""
        self.proc.terminate()
        assert self.proc.wait(10) == 0, self.err.read_text()
        (stopped,) = self.logs("stopped")
        return stopped
