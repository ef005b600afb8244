"""A synthetic origin for the cache benchmarks, run as its own process.

    .venv/bin/python bench/upstream.py --port 9000 [--delay-ms 200] [--max-age 3600]

Objects (the body is a fixed pattern; the ETag and Last-Modified depend only on the path, so
every tier sees one stable representation per key):

    /obj/1m/{name}          1 MiB
    /obj/1k/{name}          1 KiB
    /obj/{bytes}b/{name}    any size, e.g. /obj/65536b/x
    /v/vid/1/seg-{n}.m4s    --seg-bytes (default 64 KiB): the media path family the shield serves

Every object carries `Cache-Control: public, max-age=--max-age`. `--delay-ms` is slept before the
headers (time to first byte), on every object request.

Bookkeeping for the benches, so they can assert "exactly one origin fetch per tier":
    GET /_count            {"total": n, "paths": {path: n}, "max_inflight": {path: n}}
    GET /_count?path=P     {"path": P, "count": n, "max_inflight": n}
    GET /_times?path=P     {"path": P, "t": [wall-clock arrival time, …]}
    GET /_reset            clears the counters
    GET /healthz           200 (vodstack tiers health-check their upstreams; not counted)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
from collections import Counter, defaultdict
from email.utils import formatdate

import uvloop
from aiohttp import web

LAST_MODIFIED = formatdate(1_700_000_000, usegmt=True)
SIZES = {"1m": 1024 * 1024, "1k": 1024}


class Stats:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.inflight: Counter[str] = Counter()
        self.max_inflight: Counter[str] = Counter()
        self.times: defaultdict[str, list[float]] = defaultdict(list)

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def make_app(delay_s: float, max_age: int, seg_bytes: int) -> web.Application:
    stats = Stats()
    bodies: dict[int, bytes] = {}

    def body(size: int) -> bytes:
        if size not in bodies:
            bodies[size] = (b"vodstack-bench-0123456789abcdef\n" * (size // 32 + 1))[:size]
        return bodies[size]

    def size_of(path: str) -> int | None:
        parts = path.split("/")
        if len(parts) == 4 and parts[1] == "obj":
            if parts[2] in SIZES:
                return SIZES[parts[2]]
            if parts[2].endswith("b") and parts[2][:-1].isdigit():
                return int(parts[2][:-1])
        if path.startswith("/v/vid/") and path.endswith(".m4s"):
            return seg_bytes
        return None

    async def obj(request: web.Request) -> web.StreamResponse:
        path = request.path
        size = size_of(path)
        if size is None:
            raise web.HTTPNotFound()
        stats.counts[path] += 1
        stats.times[path].append(time.time())
        stats.inflight[path] += 1
        stats.max_inflight[path] = max(stats.max_inflight[path], stats.inflight[path])
        try:
            if delay_s:
                await asyncio.sleep(delay_s)
            etag = '"' + hashlib.blake2b(path.encode(), digest_size=8).hexdigest() + '"'
            headers = {
                "Cache-Control": f"public, max-age={max_age}",
                "ETag": etag,
                "Last-Modified": LAST_MODIFIED,
                "Content-Type": "application/octet-stream",
            }
            if request.headers.get("If-None-Match") == etag:
                return web.Response(status=304, headers=headers)
            data = b"" if request.method == "HEAD" else body(size)
            resp = web.Response(body=data, headers=headers)
            if request.method == "HEAD":
                resp.content_length = size
            return resp
        finally:
            stats.inflight[path] -= 1

    async def count(request: web.Request) -> web.Response:
        path = request.query.get("path")
        if path is not None:
            return web.json_response(
                {
                    "path": path,
                    "count": stats.counts[path],
                    "max_inflight": stats.max_inflight[path],
                }
            )
        return web.json_response(
            {
                "total": sum(stats.counts.values()),
                "paths": dict(stats.counts),
                "max_inflight": dict(stats.max_inflight),
            }
        )

    async def times(request: web.Request) -> web.Response:
        path = request.query.get("path", "")
        return web.json_response({"path": path, "t": stats.times.get(path, [])})

    async def reset(_request: web.Request) -> web.Response:
        stats.reset()
        return web.json_response({"ok": True})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)  # our tiers' active health checks; not counted
    app.router.add_get("/_count", count)
    app.router.add_get("/_times", times)
    app.router.add_get("/_reset", reset)
    app.router.add_get("/{tail:.*}", obj)  # GET and HEAD
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0, help="time to first byte")
    p.add_argument("--max-age", type=int, default=3600)
    p.add_argument("--seg-bytes", type=int, default=64 * 1024)
    a = p.parse_args()
    web.run_app(
        make_app(a.delay_ms / 1000, a.max_age, a.seg_bytes),
        host="127.0.0.1",
        port=a.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
