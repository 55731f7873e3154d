"""The bridge's own ECP sequence numbers, never reused across a restart.

A station drops an ECP request whose sequence number equals the last one it saw
from us (it takes it for a retransmission) and only ACKs it: a restarted
responder that began again where it began before would have its first answers
thrown away. So the counter is kept in a small file, reserved in blocks (one
write per ``BLOCK`` numbers): after a restart counting resumes past every number
that may have been used. Without a file, a random start makes a repeat unlikely.

    seq = SequenceCounter(Path("/var/lib/xfer/vdp/sw1.seq"))
    n = seq.next()          # 0..65535
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from xfer.errors import UsageError

BLOCK = 256


class SequenceCounter:
    """16-bit ECP sequence numbers; persisted in blocks when ``path`` is given.

    >>> c = SequenceCounter(None, start=65535)
    >>> c.next(), c.next()
    (65535, 0)
    """

    def __init__(self, path: Path | None, start: int | None = None) -> None:
        self.path = path
        stored = self._read() if path is not None else None
        if stored is not None:
            self._counter = stored
        else:
            self._counter = secrets.randbelow(1 << 16) if start is None else start
        self._reserved = self._counter
        self.last: int | None = None

    def _read(self) -> int | None:
        assert self.path is not None
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UsageError(f"cannot read the VDP sequence file {self.path}: {exc.strerror}") from None
        # A damaged file is not fatal: a random start is what we would do without one.
        return int(text) if text.isdigit() and len(text) < 20 else None

    def _reserve(self) -> None:
        self._reserved = self._counter + BLOCK
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(f"{self._reserved}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise UsageError(f"cannot write the VDP sequence file {self.path}: {exc.strerror}") from None

    def next(self) -> int:
        """The next sequence number (wraps at 16 bits)."""
        if self._counter >= self._reserved:
            self._reserve()
        value = self._counter & 0xFFFF
        self._counter += 1
        self.last = value
        return value
