"""An open-loop HTTP/1.1 load generator: requests at a fixed rate whatever the server does, each
request's latency counted from the moment it was *due*, not from when a connection was free to
send it (no coordinated omission: a server stall shows up as the latency of every request that
was due during it, as it would for players arriving on their own).

    .venv/bin/python bench/openloop.py URL --rate 5000 --seconds 10 [--warmup 2] [--conns 32]

Prints one JSON object: requests due and answered, non-200s, the rate achieved, and latency
percentiles (ms). Hand-written because wrk2 (wrk's constant-rate fork) is not packaged for this
machine and wrk, hey and h2load all time a request from its send, so they hide the queueing a
stall causes; a Python client costs ~20 us of CPU per request, about a tenth of a core at
5,000 req/s, and its own delays are counted against the server (the figures err high).

How it works: request i is due at t0 + i/rate. A timer every millisecond moves the requests that
have come due to a FIFO; an idle keep-alive connection (one request outstanding at a time, like
a player) takes the oldest. Answers are parsed as far as the status and Content-Length. Requests
due in the warm-up are sent but not counted; at the end the requests still unanswered after a
grace period count as errors.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import sys
import time
from array import array
from urllib.parse import urlsplit


class Stats:
    def __init__(self, count_from: float) -> None:
        self.count_from = count_from
        self.lat = array("d")
        self.answered = 0
        self.non_200 = 0
        self.conn_errors = 0

    def record(self, due: float, status: int, now: float) -> None:
        if due < self.count_from:
            return
        self.answered += 1
        if status != 200:
            self.non_200 += 1
        self.lat.append(now - due)


class Client(asyncio.Protocol):
    """One keep-alive connection, one request in flight at a time."""

    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.due: float | None = None
        self.need = -1  # bytes of the current answer (head + body) once the head is in
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.gen.idle(self)

    def send(self, due: float) -> None:
        assert self.transport is not None
        self.due = due
        self.transport.write(self.gen.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                raise RuntimeError("an answer without Content-Length")
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop > 0 else len(head)])
            self.status = int(head[9:12])
            self.need = end + 4 + length
        if len(self.buf) >= self.need:
            assert self.due is not None
            now = time.perf_counter()
            self.gen.stats.record(self.due, self.status, now)
            del self.buf[: self.need]
            self.need, self.due = -1, None
            self.gen.idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class Generator:
    def __init__(self, url: str, rate: float, seconds: float, warmup: float, conns: int) -> None:
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.request = f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\n\r\n".encode()
        self.rate, self.seconds, self.warmup, self.conns = rate, seconds, warmup, conns
        self.waiting: collections.deque[float] = collections.deque()  # due times, oldest first
        self.free: list[Client] = []
        self.open: set[Client] = set()
        self.stats = Stats(0.0)
        self.closing = False

    def idle(self, c: Client) -> None:
        self.open.add(c)
        if self.waiting and not self.closing:
            c.send(self.waiting.popleft())
        else:
            self.free.append(c)

    def lost(self, c: Client) -> None:
        self.open.discard(c)
        if c in self.free:
            self.free.remove(c)
        if c.due is not None:
            self.stats.conn_errors += 1
        if not self.closing:  # a server that hangs up is an error, the load goes on
            asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: Client(self), self.host, self.port)
        except OSError:
            self.stats.conn_errors += 1

    async def run(self) -> dict[str, object]:
        await asyncio.gather(*(self.connect() for _ in range(self.conns)))
        if not self.open:
            raise SystemExit(f"openloop: could not connect to {self.host}:{self.port}")
        t0 = time.perf_counter()
        self.stats = Stats(t0 + self.warmup)
        end = t0 + self.warmup + self.seconds
        total = int((self.warmup + self.seconds) * self.rate)
        step = 1.0 / self.rate
        i = 0
        max_backlog = 0
        while i < total:
            now = time.perf_counter()
            while i < total and t0 + i * step <= now:
                self.waiting.append(t0 + i * step)
                i += 1
            while self.waiting and self.free:
                self.free.pop().send(self.waiting.popleft())
            max_backlog = max(max_backlog, len(self.waiting))
            await asyncio.sleep(0.001)
        due_counted = total - int(self.warmup * self.rate)
        grace = time.perf_counter() + 5.0
        while (self.waiting or len(self.free) < len(self.open)) and time.perf_counter() < grace:
            while self.waiting and self.free:
                self.free.pop().send(self.waiting.popleft())
            await asyncio.sleep(0.005)
        self.closing = True
        for c in list(self.open):
            if c.transport is not None:
                c.transport.close()
        s = self.stats
        lat = sorted(s.lat)

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 3) if lat else -1

        return {
            "rate_goal": self.rate,
            "seconds": self.seconds,
            "due": due_counted,
            "answered": s.answered,
            "unanswered": due_counted - s.answered,
            "non_200": s.non_200,
            "conn_errors": s.conn_errors,
            "rate_achieved": round(s.answered / max(1e-9, end - (t0 + self.warmup)), 1),
            "max_backlog": max_backlog,
            "p50_ms": pct(50),
            "p90_ms": pct(90),
            "p99_ms": pct(99),
            "p999_ms": pct(99.9),
            "max_ms": round(lat[-1] * 1000, 3) if lat else -1,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("--rate", type=float, required=True, help="requests per second")
    ap.add_argument("--seconds", type=float, default=10, help="counted seconds")
    ap.add_argument("--warmup", type=float, default=2, help="seconds sent but not counted")
    ap.add_argument("--conns", type=int, default=32)
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    gc.disable()  # the client's own pauses would be counted against the server
    out = asyncio.run(Generator(a.url, a.rate, a.seconds, a.warmup, a.conns).run())
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
