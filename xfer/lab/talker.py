"""The lab's TCP server that speaks first and keeps speaking; it logs every line as JSON.

Run inside the server namespace as ``python -m xfer.lab.talker --port 7000``. For
each accepted connection it sends ``tick N`` every ``--interval`` seconds, from
the first moment on, and logs each line it sends and each answer it gets, one
JSON object a line on stdout::

    {"ts": 1733150000.123, "peer": "10.0.1.101", "conn": 1, "event": "sent", "n": 4}
    {"ts": 1733150000.125, "peer": "10.0.1.101", "conn": 1, "event": "ack", "n": 4}

``ts`` is ``time.time()``, the scale of QEMU's QMP event timestamps, so the lab
can tell which answers came after a migration's switchover. The guest answers
``ack tick N``; a conversation goes on when answers to ticks sent after the
switchover arrive on the *same* connection (``conn``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _log(**fields: Any) -> None:
    sys.stdout.write(json.dumps({"ts": round(time.time(), 6), **fields}) + "\n")
    sys.stdout.flush()


async def _conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int,
                        interval: float) -> None:
    peer = writer.get_extra_info("peername")[0]
    _log(peer=peer, conn=conn, event="accepted")

    async def speak() -> None:
        n = 0
        while True:
            writer.write(f"tick {n}\n".encode())
            _log(peer=peer, conn=conn, event="sent", n=n)
            n += 1
            await asyncio.sleep(interval)

    speaker = asyncio.create_task(speak())
    try:
        while line := await reader.readline():
            words = line.decode(errors="replace").split()
            if len(words) == 3 and words[:2] == ["ack", "tick"] and words[2].isdigit():
                _log(peer=peer, conn=conn, event="ack", n=int(words[2]))
            else:
                _log(peer=peer, conn=conn, event="other", text=" ".join(words)[:80])
    except OSError as exc:
        _log(peer=peer, conn=conn, event="error", error=str(exc))
    finally:
        speaker.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await speaker
        _log(peer=peer, conn=conn, event="closed")
        writer.close()


async def serve(port: int, interval: float) -> None:
    count = 0

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        await _conversation(reader, writer, count, interval)

    server = await asyncio.start_server(accepted, "0.0.0.0", port)
    _log(event="listening", port=port)
    async with server:
        await server.serve_forever()


@dataclass(frozen=True)
class Line:
    ts: float
    peer: str
    conn: int
    event: str
    n: int | None


def read_log(path: Path) -> Iterator[Line]:
    """The talker's log as records (a half-written last line is skipped)."""
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for raw in f:
            try:
                d = json.loads(raw)
            except ValueError:
                continue
            if "peer" in d:
                yield Line(d["ts"], d["peer"], d["conn"], d["event"], d.get("n"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7000)
    parser.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.interval))


if __name__ == "__main__":
    main()
