"""`python -m bench.loadgen`: an HTTP/1.1 load generator on raw asyncio streams, for `python -m bench.web`.

Closed loop (`--clients N`): N keep-alive connections, each sending its next request as soon as the previous one
is answered, like wrk. Open loop (`--rate R`): requests start on a fixed schedule whatever the answers, each on an
idle connection (a new one when none is idle), so a slow server cannot slow the offered load down. Both run for
`--warmup` and then `--seconds` (only the latter is kept: connections are open and warm when it starts), then print
one JSON line: per request its start (s since the run began), latency (s) and status (0
for a connection error). A raw client rather than an HTTP library: at a thousand connections the generator must
not be what limits the rate on a two-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

#: Why requests failed (status 0), by exception type: reported with the samples.
ERRORS: Counter[str] = Counter()
#: The request body: the example model's input.
BODY = b'{"text": "great product, would buy again"}'


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


def request_bytes(host: str, port: int, path: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY


async def connect(host: str, port: int) -> Connection:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    return Connection(reader, writer)


async def closed_loop(host: str, port: int, path: str, clients: int, seconds: float) -> list[tuple[float, float, int]]:
    raw = request_bytes(host, port, path)
    t0 = time.perf_counter()
    deadline = t0 + seconds
    samples: list[tuple[float, float, int]] = []

    async def client() -> None:
        conn: Connection | None = None
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                if conn is None:
                    conn = await connect(host, port)
                status = await conn.request(raw)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                ERRORS[type(exc).__name__] += 1
                status = 0
                if conn is not None:
                    conn.close()
                conn = None
            samples.append((start - t0, time.perf_counter() - start, status))
        if conn is not None:
            conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return samples


async def open_loop(host: str, port: int, path: str, rate: float, seconds: float,
                    max_connections: int) -> list[tuple[float, float, int]]:
    raw = request_bytes(host, port, path)
    idle: list[Connection] = []
    open_count = 0
    samples: list[tuple[float, float, int]] = []
    pending: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()

    async def one(scheduled: float) -> None:
        nonlocal open_count
        status = 0
        for attempt in range(2):
            reused = bool(idle) and not attempt  # a retry opens a new connection: older idle ones may be closed too
            conn = idle.pop() if reused else None
            try:
                if conn is None:
                    open_count += 1
                    conn = await connect(host, port)
                status = await conn.request(raw)
                idle.append(conn)
                break
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                if conn is not None:
                    conn.close()
                open_count -= 1
                if not reused:
                    ERRORS[type(exc).__name__] += 1
                    break
                # The server closed a keep-alive connection that sat idle (uvicorn: after 5 s): not an error of
                # this request, which is sent again on another connection, as a browser would.
        samples.append((scheduled - t0, time.perf_counter() - scheduled, status))

    k = 0
    while (scheduled := t0 + k / rate) < t0 + seconds:
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if idle or open_count < max_connections:
            task = asyncio.create_task(one(scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        else:
            samples.append((scheduled - t0, 0.0, -1))  # the generator's own limit: counted, never hidden
        k += 1
    await asyncio.gather(*pending)
    for conn in idle:
        conn.close()
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--path", default="/predict")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.0, help="closed loop: seconds run first, not reported")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--clients", type=int, help="closed loop with this many connections")
    mode.add_argument("--rate", type=float, help="open loop at this many requests per second")
    parser.add_argument("--max-connections", type=int, default=4096, help="open loop's connection limit")
    args = parser.parse_args(argv)
    if args.clients:
        samples = asyncio.run(closed_loop(args.host, args.port, args.path, args.clients, args.warmup + args.seconds))
        # Kept: what completed after the warm-up (start times shifted to it, so they may be negative).
        samples = [(t - args.warmup, lat, st) for t, lat, st in samples if t + lat >= args.warmup]
    else:
        samples = asyncio.run(open_loop(args.host, args.port, args.path, args.rate, args.seconds,
                                        args.max_connections))
    out: dict[str, Any] = {"samples": samples, "errors": dict(ERRORS)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
