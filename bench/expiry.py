"""Expired hot object under load: how many upstream fetches each expiry lets through.

    .venv/bin/python bench/expiry.py [--seconds 10] [--clients 50] [--max-age 1] [--delay-ms 100]

The origin serves `Cache-Control: public, max-age=1` and answers after --delay-ms, so requests
that arrive while a refresh is in flight show up as a herd. 50 keep-alive clients loop on one
1 KiB object per target for --seconds. The origin's arrival times are grouped into refresh
bursts (a gap longer than max-age/2 starts a new one); the goal (issue 3) is 1 fetch per
expiry for us. Targets, all in the same run:

- ours-1proc / ours-2proc: `vod edge --tokens off` (each process has its own cache, so two
  processes may each refresh once);
- nginx-lock: `proxy_cache_lock on` only (a miss on an expired entry is not locked: nginx's
  lock covers new entries, so expiries let the herd through);
- nginx-stale: nginx's most favourable sensible config for this case: `proxy_cache_lock on` +
  `proxy_cache_use_stale updating` + `proxy_cache_background_update on` (one subrequest
  refreshes, everyone else gets the stale copy);
- varnish: defaults (10 s grace: stale served while one background fetch runs).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from dataclasses import dataclass

import aiohttp
import harness as h
import uvloop


@dataclass
class Load:
    requests: int
    errors: int
    lat_ms: list[float]
    t_start: float  # wall clock
    t_end: float


async def load(url: str, clients: int, seconds: float) -> Load:
    conn = aiohttp.TCPConnector(limit=clients)
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client(s: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                async with s.get(url) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        continue
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
                continue
            lat.append((time.perf_counter() - t0) * 1000)

    t_start = time.time()
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
        await asyncio.gather(*(client(s) for _ in range(clients)))
    return Load(len(lat) + errors, errors, lat, t_start, time.time())


def bursts(times: list[float], gap: float) -> list[int]:
    """Sizes of the groups of arrival times separated by more than `gap` seconds."""
    out: list[int] = []
    last = None
    for t in sorted(times):
        if last is None or t - last > gap:
            out.append(0)
        out[-1] += 1
        last = t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--max-age", type=int, default=1)
    ap.add_argument("--delay-ms", type=float, default=100)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()

    rows = []
    with h.fleet_or_exit(keep=a.keep) as fleet:
        up = h.start_upstream(fleet, delay_ms=a.delay_ms, max_age=a.max_age)
        targets = [
            h.start_vod(fleet, "edge", up.url, procs=1, name="ours-1proc"),
            h.start_vod(fleet, "edge", up.url, procs=2, name="ours-2proc"),
            h.start_nginx(fleet, up.port, name="nginx-lock", lock=True),
            h.start_nginx(fleet, up.port, name="nginx-stale", lock=True, background_update=True),
            h.start_varnish(fleet, up.port, name="varnish"),
        ]
        started = time.time()
        for t in targets:
            path = f"/obj/1k/hot-{t.name}-{uuid.uuid4().hex[:8]}"
            h.get(t.url + path)  # the first fill is not an expiry
            time.sleep(0.2)
            first = len(h.get_json(up.url + "/_times?path=" + path)["t"])
            res = uvloop.run(load(t.url + path, a.clients, a.seconds))
            times = h.get_json(up.url + "/_times?path=" + path)["t"][first:]
            inflight = h.get_json(up.url + "/_count?path=" + path)["max_inflight"]
            b = bursts(times, a.max_age / 2)
            window = res.t_end - res.t_start
            row = [
                t.name,
                f"{res.requests / window:,.0f}",
                str(len(times)),
                f"{len(times) / window:.2f}",
                str(len(b)),
                f"{(sum(b) / len(b)) if b else 0:.2f}",
                str(max(b) if b else 0),
                str(inflight),
                f"{h.percentile(res.lat_ms, 50):.1f}",
                f"{h.percentile(res.lat_ms, 99):.1f}",
                f"{max(res.lat_ms):.0f}" if res.lat_ms else "-",
                str(res.errors),
            ]
            rows.append(row)
            print(" ".join(row), flush=True)

    h.banner(
        f"Expiry: max-age={a.max_age}, origin TTFB {a.delay_ms:g} ms, {a.clients} "
        f"keep-alive clients for {a.seconds:g} s per target ({h.machine()}, "
        f"{time.strftime('%Y-%m-%d', time.localtime(started))})"
    )
    print(
        h.table(
            [
                "target",
                "req/s",
                "origin fetches",
                "fetches/s",
                "refreshes",
                "fetches per refresh",
                "max per refresh",
                "max concurrent at origin",
                "p50 ms",
                "p99 ms",
                "max ms",
                "errors",
            ],
            rows,
        )
    )
    print(
        "\nGoal: 1 fetch per refresh (per process for ours-2proc: each has its own cache). "
        "A refresh = origin arrivals with no gap longer than max-age/2."
    )


if __name__ == "__main__":
    main()
