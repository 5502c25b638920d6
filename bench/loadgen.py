"""A lean HTTP/1.1 keep-alive load generator for the HTTP figures.

httpx costs ~1-2 ms of CPU per request, which on a 2-core machine starves the
node being measured. This client pre-encodes every request and parses only the
status line and Content-Length, so nearly all CPU goes to the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

Request = tuple[str, str, dict[str, str], bytes | None]


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[bytes] = field(default_factory=list)
    seconds: float = 0.0


def encode(host: str, req: Request) -> bytes:
    method, path, headers, body = req
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
               ) -> tuple[int, bytes]:
    writer.write(data)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length) if length else b""
    return status, body


async def run(url: str, requests: Sequence[Request], concurrency: int) -> Outcome:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    encoded = [encode(f"{host}:{port}", r) for r in requests]
    out = Outcome()
    it = iter(encoded)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port, limit=2**24)
        try:
            for data in it:
                t = time.perf_counter()
                status, body = await _one(reader, writer, data)
                out.latencies.append(time.perf_counter() - t)
                out.statuses[status] = out.statuses.get(status, 0) + 1
                if status >= 400 and len(out.errors) < 3:
                    out.errors.append(body)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    out.seconds = time.perf_counter() - t0
    return out
