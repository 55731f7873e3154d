"""Minimal HTTP/1.1 framing shared by the message client and the lab's stand-in manager.

Only what one request and one answer over a fresh connection need: a start line,
headers, and a body framed by Content-Length, chunks, or the end of the stream.

    start, headers = await read_head(reader)     # ["HTTP/1.1", "200", "OK"], {...}
    body = await read_body(reader, headers)
"""

from __future__ import annotations

import asyncio

MAX_BODY = 4 * 1024 * 1024


async def read_head(reader: asyncio.StreamReader) -> tuple[list[str], dict[str, str]]:
    """The start line split in (at most) three and the headers with lower-case names."""
    start = (await reader.readline()).decode("latin-1").split(maxsplit=2)
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return start, headers


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str], request: bool = False) -> bytes:
    """The body after ``read_head``; a request without Content-Length has none."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while (size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16)) > 0:
            body += await reader.readexactly(size + 2)
            del body[-2:]
            if len(body) > MAX_BODY:
                raise ValueError("HTTP body too large")
        return bytes(body)
    if "content-length" in headers:
        length = int(headers["content-length"])
        if length > MAX_BODY:
            raise ValueError("HTTP body too large")
        return await reader.readexactly(length)
    return b"" if request else await reader.read(MAX_BODY)


def response(status: int, reason: str, body: bytes) -> bytes:
    """A complete answer that closes the connection."""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
