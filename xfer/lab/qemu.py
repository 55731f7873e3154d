"""Real QEMU processes for the hypervisor tests and benchmark: tiny guests, no disk, TCG.

Each guest gets two QMP monitors on unix sockets in a private temporary
directory: ``qmp`` for the code under test (hook, driver) and ``witness`` for the
test or benchmark that watches from the side (QEMU serves one client per monitor).
``QemuPair`` removes both processes and the directory in ``close()``, even when a
test fails.

    with QemuPair() as pair:          # source running, destination `-incoming defer`
        uri = pair.uri()              # tcp:127.0.0.1:<free port>
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from xfer.errors import HypervisorError

QEMU = "qemu-system-x86_64"


def qemu_binary() -> str | None:
    """Path of qemu-system-x86_64, or None when it is not installed."""
    return shutil.which(QEMU)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(path: str) -> bool:
    # NOTE: QEMU creates the socket file (bind) a moment before it listens; until
    # then a client gets ECONNREFUSED, so existence of the file is not enough.
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


@dataclass
class QemuGuest:
    """One QEMU process; ``qmp`` and ``witness`` are its QMP socket paths."""

    name: str
    qmp: str
    witness: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        """What QEMU wrote on stderr (a failed incoming migration says why there)."""
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace").strip()
        return ""

    def stop(self) -> None:
        """Terminate (then kill) the process; idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_guest(workdir: Path, name: str, incoming: bool | str = False, memory_mb: int = 64,
                accel: str = "tcg", extra: Sequence[str] = (), netns: str | None = None) -> QemuGuest:
    """Start a TCG guest (disk-less unless ``extra`` gives it a kernel, NICs...).

    ``incoming``: True for `-incoming defer`, or a URI to listen on; ``netns``: run QEMU
    inside that namespace (its taps are created there).
    """
    binary = qemu_binary()
    if binary is None:
        raise HypervisorError(f"{QEMU} is not installed (Debian package qemu-system-x86)")
    qmp, witness = str(workdir / f"{name}.qmp"), str(workdir / f"{name}.witness")
    argv = [binary, "-machine", "pc", "-accel", accel, "-m", str(memory_mb), "-nodefaults",
            "-display", "none", "-name", name,
            "-qmp", f"unix:{qmp},server=on,wait=off", "-qmp", f"unix:{witness},server=on,wait=off",
            *extra]
    if incoming:
        argv += ["-incoming", "defer" if incoming is True else str(incoming)]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]   # ip execs QEMU: the pid stays QEMU's
    # stderr to a file, not a pipe: nobody drains a pipe and a full one blocks QEMU.
    log = workdir / f"{name}.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    guest = QemuGuest(name, qmp, witness, proc, log)
    deadline = time.monotonic() + 10
    while not (_listening(qmp) and _listening(witness)):
        if proc.poll() is not None or time.monotonic() > deadline:
            guest.stop()
            raise HypervisorError(f"{name}: QEMU did not start: "
                                  f"{guest.log_text() or 'no QMP socket after 10 s'}")
        time.sleep(0.01)
    return guest


class QemuPair:
    """A running source guest and a `-incoming defer` destination in a temp directory."""

    def __init__(self, memory_mb: int = 64) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="xfer-qemu-"))
        self.guests: list[QemuGuest] = []
        self.memory_mb = memory_mb
        self._count = 0
        try:
            self.src = self._add(start_guest(self.dir, "src", memory_mb=memory_mb))
            self.dst = self._add(start_guest(self.dir, "dst", incoming=True, memory_mb=memory_mb))
        except BaseException:
            self.close()
            raise

    def _add(self, guest: QemuGuest) -> QemuGuest:
        self.guests.append(guest)
        return guest

    def uri(self) -> str:
        return f"tcp:127.0.0.1:{free_port()}"

    def swap(self) -> None:
        """After a completed migration: the destination becomes the source, a fresh
        `-incoming defer` guest the destination (QEMU takes one incoming migration per
        process), and the old source, now in ``postmigrate``, is stopped."""
        old = self.src
        self.src = self.dst
        self.guests.remove(old)
        old.stop()
        self._count += 1
        self.dst = self._add(start_guest(self.dir, f"dst{self._count}", incoming=True,
                                         memory_mb=self.memory_mb))

    def close(self) -> None:
        for guest in self.guests:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                guest.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> QemuPair:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
