"""A throw-away etcd for tests and benchmarks: one member, its own data directory, free ports
on one address (loopback by default, or a lab namespace's), stopped (and restartable) by us.

    with EtcdProcess(Path(tmp)) as etcd:
        etcd.start()
        print(etcd.url)          # http://127.0.0.1:PORT
        etcd.restart()           # same data, same ports
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from xfer.lab.hosts import LabError, stop_process


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class EtcdProcess:
    """``etcd`` (Debian's etcd-server) on ``address``; ``prefix``: argv to run it with (a netns exec)."""

    def __init__(self, workdir: Path, address: str = "127.0.0.1", prefix: tuple[str, ...] = (),
                 client_port: int | None = None, peer_port: int | None = None) -> None:
        if shutil.which("etcd") is None:
            raise LabError("etcd is not installed (scripts/setup installs Debian's etcd-server)")
        self.workdir, self.address, self.prefix = workdir, address, prefix
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.client_port}"

    def __enter__(self) -> EtcdProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> EtcdProcess:
        """Start it and wait until it answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        peer = f"http://{self.address}:{self.peer_port}"
        argv = [*self.prefix, "etcd", "--name", "xfer-test", "--data-dir", str(self.workdir / "data"),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"xfer-test={peer}", "--log-outputs", "stderr"]
        with open(self.workdir / "etcd.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.healthy():
                return self
            time.sleep(0.1)
        self.stop()
        tail = (self.workdir / "etcd.log").read_text(errors="replace")[-2000:]
        raise LabError(f"etcd at {self.url} did not start:\n{tail}")

    def healthy(self) -> bool:
        if self.prefix:
            return self._healthy_in_prefix()
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def _healthy_in_prefix(self) -> bool:
        out = subprocess.run([*self.prefix, "etcdctl", "--endpoints", self.url, "endpoint", "health"],
                             capture_output=True, text=True, check=False, timeout=10,
                             env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
        return out.returncode == 0

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: etcd as a crash leaves it (its data directory stays)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> EtcdProcess:
        self.stop()
        return self.start()
