"""Stampede: N concurrent requests (default 200), each on its own new connection, for one cold
1 MiB object whose origin answers after 200 ms; latency to the last byte; origin fetches.

    .venv/bin/python bench/stampede.py [--clients 200] [--delay-ms 200] [--reps 3]

Targets, all in the same run: our edge (1 and 2 processes), nginx (`proxy_cache_lock on`; its
waiters poll for the entry every 500 ms) and Varnish (defaults: waiting list + streaming fill).
Every repetition uses a fresh object key per target. The ideal p50 is the origin's delay plus
the transfer. A collapsing cache makes exactly one origin fetch per process (two processes
with separate memory caches may make two). Goal (issue 3): p50 ≤ 0.5x nginx's p50.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import harness as h
import uvloop

GOAL = 0.5
SIZE = 1024 * 1024


@dataclass
class Run:
    lat_ms: list[float]  # to the last byte, per successful request
    ttfb_ms: list[float]
    failures: int
    origin_fetches: int
    origin_max_inflight: int
    x_cache: dict[str, int]


class _Get(asyncio.Protocol):
    """One GET on its own connection, answered by counting bytes: a client as thin as we can
    make it in Python, because it shares the 2 cores with the server under test (aiohttp's
    client parser and stream reader cost ~100 ms per 200 MiB here, for every target alike)."""

    def __init__(
        self, request: bytes, t0: float, done: asyncio.Future[tuple[float, float, str] | None]
    ):
        self.request, self.t0, self.done = request, t0, done
        self.head = b""
        self.ttfb = 0.0
        self.body = -1  # bytes of body seen; -1 while still in the head
        self.status = 0
        self.length = -1
        self.x_cache = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.body < 0:
            if not self.head:
                self.ttfb = time.perf_counter() - self.t0
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.head[:end].decode("latin-1").split("\r\n")
            self.status = int(lines[0].split(" ", 2)[1])
            for line in lines[1:]:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k == "content-length":
                    self.length = int(v)
                elif k == "x-cache":
                    self.x_cache = v.strip()
            self.body = len(self.head) - end - 4
            self.head = b"-"
        else:
            self.body += len(data)
        if self.body >= self.length >= 0:
            self._finish()

    def _finish(self) -> None:
        if self.done.done():
            return
        ok = self.status == 200 and self.body == SIZE
        self.done.set_result(
            (time.perf_counter() - self.t0, self.ttfb, self.x_cache) if ok else None
        )
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)  # closed before the whole body: a failure


async def one(url: str) -> tuple[float, float, str] | None:
    u = urlsplit(url)
    request = (f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[float, float, str] | None] = loop.create_future()
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(60):
            await loop.create_connection(
                lambda: _Get(request, t0, done), u.hostname or "127.0.0.1", u.port or 80
            )
            return await done
    except (OSError, TimeoutError):
        return None


async def stampede(url: str, clients: int) -> tuple[list[tuple[float, float, str] | None], float]:
    # every request opens its own connection, like 200 players
    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(url) for _ in range(clients)))
    return list(res), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--delay-ms", type=float, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()

    runs: dict[str, list[Run]] = {}
    with h.fleet_or_exit(keep=a.keep) as fleet:
        up = h.start_upstream(fleet, delay_ms=a.delay_ms)
        targets = [
            h.start_vod(fleet, "edge", up.url, procs=1, name="ours-1proc"),
            h.start_vod(fleet, "edge", up.url, procs=2, name="ours-2proc"),
            h.start_nginx(fleet, up.port, name="nginx", lock=True),
            h.start_varnish(fleet, up.port, name="varnish"),
        ]
        # Connection pools, code paths: one small warm-up fetch per target.
        for t in targets:
            for _ in range(4):
                h.get(t.url + f"/obj/1k/warmup-{uuid.uuid4().hex}")
        started = time.time()
        for rep in range(a.reps):
            for t in targets:
                path = f"/obj/1m/stampede-{t.name}-{rep}-{uuid.uuid4().hex[:8]}"
                res, wall = uvloop.run(stampede(t.url + path, a.clients))
                ok = [r for r in res if r is not None]
                xc: dict[str, int] = {}
                for r in ok:
                    xc[r[2]] = xc.get(r[2], 0) + 1
                c = h.get_json(up.url + "/_count?path=" + path)
                run = Run(
                    [r[0] * 1000 for r in ok],
                    [r[1] * 1000 for r in ok],
                    len(res) - len(ok),
                    c["count"],
                    c["max_inflight"],
                    xc,
                )
                runs.setdefault(t.name, []).append(run)
                print(
                    f"rep {rep + 1} {t.name:11} p50 {h.percentile(run.lat_ms, 50):7.0f} ms "
                    f"p99 {h.percentile(run.lat_ms, 99):7.0f} ms  ttfb p50 "
                    f"{h.percentile(run.ttfb_ms, 50):6.0f} ms  failures {run.failures}  "
                    f"origin fetches {run.origin_fetches}  wall {wall * 1000:.0f} ms  "
                    f"X-Cache {xc}",
                    flush=True,
                )
                time.sleep(1.0)  # let the connections of this burst close

    def med(name: str, fn: str, p: float) -> float:
        return h.median([h.percentile(getattr(r, fn), p) for r in runs[name]])

    h.banner(
        f"Stampede: {a.clients} clients, one cold 1 MiB object, origin TTFB "
        f"{a.delay_ms:g} ms, median of {a.reps} ({h.machine()}, "
        f"{time.strftime('%Y-%m-%d', time.localtime(started))})"
    )
    rows = []
    for name, rs in runs.items():
        rows.append(
            [
                name,
                f"{med(name, 'lat_ms', 50):.0f}",
                f"{med(name, 'lat_ms', 99):.0f}",
                f"{med(name, 'lat_ms', 100):.0f}",
                f"{med(name, 'ttfb_ms', 50):.0f}",
                " ".join(str(r.origin_fetches) for r in rs),
                " ".join(str(r.failures) for r in rs),
            ]
        )
    print(
        h.table(
            [
                "target",
                "p50 ms",
                "p99 ms",
                "max ms",
                "TTFB p50 ms",
                "origin fetches per rep",
                "failures per rep",
            ],
            rows,
        )
    )
    print()
    nginx50, varnish50 = med("nginx", "lat_ms", 50), med("varnish", "lat_ms", 50)
    rrows = []
    for ours in ("ours-1proc", "ours-2proc"):
        ratio50 = med(ours, "lat_ms", 50) / nginx50
        rrows.append(
            [
                ours,
                f"{ratio50:.2f}x",
                "met" if ratio50 <= GOAL else "NOT met",
                h.ratio(med(ours, "lat_ms", 50), varnish50),
                h.ratio(med(ours, "lat_ms", 99), med("nginx", "lat_ms", 99)),
            ]
        )
    print(h.table(["ours", "p50 / nginx", f"goal ≤{GOAL}x", "p50 / varnish", "p99 / nginx"], rrows))
    print(
        f"\nIdeal: {a.delay_ms:g} ms origin TTFB + the transfer of 1 MiB to {a.clients} "
        "clients. Latency is per request, from its own send to its last byte."
    )


if __name__ == "__main__":
    main()
