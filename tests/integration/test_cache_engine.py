"""The cache engine as a generic RFC 9111 caching reverse proxy (`vod edge --tokens off`), over
real loopback sockets against a scriptable upstream: streaming collapsed fills, revalidation,
stale-while-revalidate / stale-if-error, no-cache, Vary, invalidation, HEAD, Range on a miss,
truncated bodies, and upstream failover."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from edge.app import make_app as edge_app
from vodcore.config import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Upstream:
    """A scriptable origin: tests put handlers in `routes` and read `hits` / `seen`."""

    routes: dict[str, Handler] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path_qs] += 1
        self.seen.append((request.method, dict(request.headers)))
        handler = self.routes.get(request.path)
        if handler is None:
            return web.json_response({"error": {"code": "not_found"}}, status=404)
        return await handler(request)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")


async def _start_upstream() -> Upstream:
    up = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", up.handle)
    up.server = TestServer(app, host="127.0.0.1")
    await up.server.start_server()
    return up


@dataclass
class Edge:
    url: str
    server: TestServer
    client: aiohttp.ClientSession

    async def get(self, path: str, **kw: object) -> tuple[int, dict[str, str], bytes]:
        async with self.client.get(self.url + path, **kw) as r:  # type: ignore[arg-type]
            return r.status, dict(r.headers), await r.read()


async def _start_edge(
    tmp_path: Path, upstreams: list[str], fallback: list[str] | None = None, **settings: object
) -> Edge:
    s = dataclasses.replace(Settings(data_dir=tmp_path, upstream_timeout_seconds=3), **settings)  # type: ignore[arg-type]
    server = TestServer(edge_app(s, upstreams, tokens=False, fallback=fallback), host="127.0.0.1")
    await server.start_server()
    client = aiohttp.ClientSession(auto_decompress=False)
    return Edge(str(server.make_url("")).rstrip("/"), server, client)


@pytest.fixture
async def edge(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Edge]:
    e = await _start_edge(tmp_path, [upstream.url])
    yield e
    await e.client.close()
    await e.server.close()


def fixed(body: bytes, cache_control: str = "public, max-age=60", **headers: str) -> Handler:
    async def h(request: web.Request) -> web.StreamResponse:
        hdrs = {"Cache-Control": cache_control, "ETag": '"v1"', **headers}
        return web.Response(body=body, headers=hdrs)

    return h


def truncating(length: int, sent: int, calls: list[int]) -> Handler:
    """Declares `length` bytes, sends `sent`, then dies mid-body; counts its calls."""

    async def h(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60"})
        resp.content_length = length
        await resp.prepare(request)
        await resp.write(b"a" * sent)
        assert request.transport is not None
        request.transport.close()  # die mid-body
        return resp

    return h


def two_halves(body: bytes, gate: asyncio.Event, cache_control: str = "max-age=60") -> Handler:
    """Sends the first half, then waits for `gate` before the second half."""

    async def h(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": cache_control, "ETag": '"s"'})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        await gate.wait()
        await resp.write(body[len(body) // 2 :])
        await resp.write_eof()
        return resp

    return h


# --- streaming collapsed forwarding --------------------------------------------------------


async def test_waiters_get_bytes_before_the_fill_completes(edge: Edge, upstream: Upstream) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    gate = asyncio.Event()
    upstream.routes["/seg"] = two_halves(body, gate)
    readers = [await edge.client.get(edge.url + "/seg") for _ in range(5)]
    try:
        # Every reader has the head and the first half while upstream still holds the rest.
        for r in readers:
            assert r.status == 200 and r.content_length == len(body)
            first = await asyncio.wait_for(r.content.readexactly(len(body) // 2), 5)
            assert first == body[: len(body) // 2]
        assert upstream.hits["/seg"] == 1
        gate.set()
        for r in readers:
            assert await r.content.read() == body[len(body) // 2 :]
    finally:
        for r in readers:
            r.release()
    caches = sorted(r.headers["X-Cache"] for r in readers)
    assert caches.count("edge=MISS") == 1 and caches.count("edge=HIT") == 4
    status, headers, got = await edge.get("/seg")
    assert (status, headers["X-Cache"], got) == (200, "edge=HIT", body)
    assert upstream.hits["/seg"] == 1


async def test_range_on_a_miss_is_answered_while_the_fill_runs(
    edge: Edge, upstream: Upstream
) -> None:
    body = bytes(range(256)) * 1024
    gate = asyncio.Event()
    upstream.routes["/seg"] = two_halves(body, gate)
    status, headers, got = await asyncio.wait_for(
        edge.get("/seg", headers={"Range": "bytes=100-199"}), 5
    )
    assert status == 206 and got == body[100:200]
    assert headers["Content-Range"] == f"bytes 100-199/{len(body)}"
    assert not gate.is_set()  # answered before upstream finished
    gate.set()


async def test_stampede_of_200_costs_one_upstream_fetch(edge: Edge, upstream: Upstream) -> None:
    body = b"x" * 200_000

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.2)
        return web.Response(body=body, headers={"Cache-Control": "max-age=60"})

    upstream.routes["/cold"] = slow
    results = await asyncio.gather(*(edge.get("/cold") for _ in range(200)))
    assert all(s == 200 and b == body for s, _h, b in results)
    assert upstream.hits["/cold"] == 1


async def test_truncated_upstream_body_is_never_stored_or_passed_as_whole(
    edge: Edge, upstream: Upstream
) -> None:
    calls: list[int] = []
    upstream.routes["/t"] = truncating(100_000, 40_000, calls)
    for _ in range(2):
        with pytest.raises(aiohttp.ClientPayloadError):
            async with edge.client.get(edge.url + "/t") as r:
                await r.read()
    assert len(calls) == 2  # the first attempt stored nothing


# --- revalidation and staleness ------------------------------------------------------------


async def test_expired_entry_is_revalidated_with_304_and_headers_updated(
    edge: Edge, upstream: Upstream
) -> None:
    state = {"n": 0}

    async def h(request: web.Request) -> web.StreamResponse:
        state["n"] += 1
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(
                status=304, headers={"ETag": '"v1"', "Cache-Control": "max-age=60", "X-Rev": "2"}
            )
        return web.Response(
            body=b"payload", headers={"ETag": '"v1"', "Cache-Control": "max-age=1", "X-Rev": "1"}
        )

    upstream.routes["/r"] = h
    assert (await edge.get("/r"))[1]["X-Cache"] == "edge=MISS"
    await asyncio.sleep(2.1)
    status, headers, body = await edge.get("/r")
    assert (status, body, headers["X-Cache"]) == (200, b"payload", "edge=REVALIDATED")
    assert headers["X-Rev"] == "2"  # stored headers updated from the 304 (RFC 9111 §4.3.4)
    status, headers, _ = await edge.get("/r")
    assert headers["X-Cache"] == "edge=HIT" and headers["X-Rev"] == "2"
    assert state["n"] == 2


async def test_revalidation_of_a_hot_expired_object_is_collapsed(
    edge: Edge, upstream: Upstream
) -> None:
    async def h(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.1)
        return web.Response(body=b"hot", headers={"ETag": '"h"', "Cache-Control": "max-age=1"})

    upstream.routes["/hot"] = h
    await edge.get("/hot")
    await asyncio.sleep(1.2)
    results = await asyncio.gather(*(edge.get("/hot") for _ in range(50)))
    assert all(b == b"hot" for _s, _h, b in results)
    assert upstream.hits["/hot"] == 2  # one fill, one revalidation for 50 requests


async def test_stale_while_revalidate_serves_at_once_and_refreshes_in_background(
    edge: Edge, upstream: Upstream
) -> None:
    version = {"v": b"one", "cc": "max-age=1, stale-while-revalidate=30"}

    async def h(request: web.Request) -> web.StreamResponse:
        return web.Response(body=version["v"], headers={"Cache-Control": version["cc"]})

    upstream.routes["/swr"] = h
    await edge.get("/swr")
    # (the refreshed copy gets a real lifetime: with max-age=1 the upstream's 1 s Date
    # resolution alone can make a new response look stale, RFC 9111 §4.2.3 apparent_age)
    version["v"], version["cc"] = b"two", "max-age=60"
    await asyncio.sleep(1.2)
    _status, headers, body = await edge.get("/swr")
    assert (body, headers["X-Cache"]) == (b"one", "edge=STALE")
    for _ in range(50):
        if upstream.hits["/swr"] == 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)
    _status, headers, body = await edge.get("/swr")
    assert (body, headers["X-Cache"]) == (b"two", "edge=HIT")


@pytest.mark.parametrize(
    ("cache_control", "served_stale"),
    [
        ("max-age=1, stale-if-error=60", True),
        ("max-age=1", False),
        ("max-age=1, stale-if-error=60, must-revalidate", False),
    ],
)
async def test_stale_if_error(
    edge: Edge, upstream: Upstream, cache_control: str, served_stale: bool
) -> None:
    broken = {"on": False}

    async def h(request: web.Request) -> web.StreamResponse:
        if broken["on"]:
            return web.json_response({"error": "down"}, status=500)
        return web.Response(body=b"good", headers={"Cache-Control": cache_control})

    upstream.routes["/e"] = h
    await edge.get("/e")
    broken["on"] = True
    await asyncio.sleep(1.2)
    status, headers, body = await edge.get("/e")
    if served_stale:
        assert (status, body, headers["X-Cache"]) == (200, b"good", "edge=STALE")
    else:
        assert status == 500


async def test_stale_if_error_when_the_origin_is_gone(tmp_path: Path) -> None:
    up = await _start_upstream()
    up.routes["/e"] = fixed(b"kept", "max-age=1, stale-if-error=600")
    e = await _start_edge(tmp_path, [up.url])
    try:
        assert (await e.get("/e"))[2] == b"kept"
        assert up.server is not None
        await up.server.close()  # the origin stops
        await asyncio.sleep(1.2)
        status, headers, body = await e.get("/e")
        assert (status, body, headers["X-Cache"]) == (200, b"kept", "edge=STALE")
    finally:
        await e.client.close()
        await e.server.close()


async def test_no_cache_is_stored_but_revalidated_on_every_use(
    edge: Edge, upstream: Upstream
) -> None:
    async def h(request: web.Request) -> web.StreamResponse:
        if request.headers.get("If-None-Match") == '"n"':
            return web.Response(status=304, headers={"ETag": '"n"'})
        return web.Response(body=b"nc", headers={"ETag": '"n"', "Cache-Control": "no-cache"})

    upstream.routes["/nc"] = h
    await edge.get("/nc")
    for _ in range(3):
        _status, headers, body = await edge.get("/nc")
        assert (body, headers["X-Cache"]) == (b"nc", "edge=REVALIDATED")
    assert upstream.hits["/nc"] == 4


# --- what is stored, and for whom ------------------------------------------------------------


async def test_vary_keeps_variants_apart(edge: Edge, upstream: Upstream) -> None:
    async def h(request: web.Request) -> web.StreamResponse:
        lang = request.headers.get("Accept-Language", "none")
        return web.Response(
            body=f"hello-{lang}".encode(),
            headers={"Cache-Control": "max-age=60", "Vary": "Accept-Language"},
        )

    upstream.routes["/v"] = h
    for lang in ("en", "fr", "en", "fr"):
        _status, _h, body = await edge.get("/v", headers={"Accept-Language": lang})
        assert body == f"hello-{lang}".encode()
    assert upstream.hits["/v"] == 2
    # concurrent first requests for two variants never get each other's bytes
    upstream.routes["/v2"] = h
    got = await asyncio.gather(
        *(edge.get("/v2", headers={"Accept-Language": lang}) for lang in ["de", "it"] * 10)
    )
    for (_s, _h, body), lang in zip(got, ["de", "it"] * 10, strict=True):
        assert body == f"hello-{lang}".encode()


async def test_vary_star_is_not_stored(edge: Edge, upstream: Upstream) -> None:
    upstream.routes["/s"] = fixed(b"s", "max-age=60", Vary="*")
    await edge.get("/s")
    await edge.get("/s")
    assert upstream.hits["/s"] == 2


@pytest.mark.parametrize("cache_control", ["private, max-age=60", "no-store, max-age=60", ""])
async def test_not_stored(edge: Edge, upstream: Upstream, cache_control: str) -> None:
    upstream.routes["/p"] = fixed(b"p", cache_control)
    await edge.get("/p")
    status, headers, _ = await edge.get("/p")
    assert status == 200 and headers["X-Cache"].startswith("edge=MISS")
    assert upstream.hits["/p"] == 2


async def test_requests_with_credentials_pass_through(edge: Edge, upstream: Upstream) -> None:
    upstream.routes["/c"] = fixed(b"c")
    await edge.get("/c")  # stored
    await edge.get("/c", headers={"Cookie": "session=1"})
    await edge.get("/c", headers={"Authorization": "Bearer x"})
    assert upstream.hits["/c"] == 3
    cookie_seen = [h for m, h in upstream.seen if "Cookie" in h]
    assert cookie_seen and cookie_seen[0]["Cookie"] == "session=1"


async def test_unsafe_method_invalidates(edge: Edge, upstream: Upstream) -> None:
    async def post(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            assert await request.read() == b"update"
            return web.json_response({"ok": True})
        return web.Response(body=b"doc", headers={"Cache-Control": "max-age=60"})

    upstream.routes["/doc"] = post
    await edge.get("/doc")
    assert (await edge.get("/doc"))[1]["X-Cache"] == "edge=HIT"
    async with edge.client.post(edge.url + "/doc", data=b"update") as r:
        assert r.status == 200
    assert (await edge.get("/doc"))[1]["X-Cache"] == "edge=MISS"


async def test_head_fills_and_answers_headers_only(edge: Edge, upstream: Upstream) -> None:
    upstream.routes["/h"] = fixed(b"0123456789")
    async with edge.client.head(edge.url + "/h") as r:
        assert r.status == 200 and r.headers["Content-Length"] == "10"
        assert await r.read() == b""
    _status, headers, body = await edge.get("/h")
    assert (body, headers["X-Cache"]) == (b"0123456789", "edge=HIT")
    assert upstream.hits["/h"] == 1


@pytest.mark.parametrize("rng", ["bytes=9-1", "bytes=0-1,3-4", "garbage", "bytes=x-y"])
async def test_invalid_ranges_get_the_whole_object(
    edge: Edge, upstream: Upstream, rng: str
) -> None:
    upstream.routes["/r"] = fixed(b"0123456789")
    await edge.get("/r")
    status, _h, body = await edge.get("/r", headers={"Range": rng})
    assert (status, body) == (200, b"0123456789")


async def test_conditionals_from_cache(edge: Edge, upstream: Upstream) -> None:
    lm = formatdate(1_700_000_000, usegmt=True)
    upstream.routes["/c"] = fixed(b"cond", **{"Last-Modified": lm})
    await edge.get("/c")
    assert (await edge.get("/c", headers={"If-None-Match": '"v1"'}))[0] == 304
    assert (await edge.get("/c", headers={"If-Modified-Since": lm}))[0] == 304
    assert (await edge.get("/c", headers={"If-None-Match": '"other"'}))[0] == 200
    status, headers, _ = await edge.get("/c", headers={"Range": "bytes=50-"})
    assert status == 416 and headers["Content-Range"] == "bytes */4"


async def test_upstream_errors_pass_through_as_they_are(edge: Edge, upstream: Upstream) -> None:
    status, _headers, body = await edge.get("/nothing-here")
    assert status == 404 and b"not_found" in body


# --- upstream selection --------------------------------------------------------------------


async def test_a_dead_shield_is_invisible_to_players(tmp_path: Path) -> None:
    a, b = await _start_upstream(), await _start_upstream()
    for up in (a, b):
        for i in range(40):
            up.routes[f"/o{i}"] = fixed(f"o{i}".encode())
    e = await _start_edge(tmp_path, [a.url, b.url])
    try:
        first = await asyncio.gather(*(e.get(f"/o{i}") for i in range(40)))
        assert all(s == 200 for s, _h, _b in first)
        # rendezvous hashing spreads keys over both shields
        assert sum(a.hits.values()) > 0 and sum(b.hits.values()) > 0
        assert a.server is not None
        await a.server.close()  # one shield dies
        for i in range(40, 80):
            b.routes[f"/o{i}"] = fixed(f"o{i}".encode())
        after = await asyncio.gather(*(e.get(f"/o{i}") for i in range(40, 80)))
        assert [s for s, _h, _b in after] == [200] * 40
    finally:
        await e.client.close()
        await e.server.close()
        assert b.server is not None
        await b.server.close()


async def test_all_shields_down_falls_back_to_origin(tmp_path: Path) -> None:
    origin = await _start_upstream()
    origin.routes["/x"] = fixed(b"from-origin")
    e = await _start_edge(tmp_path, ["http://127.0.0.1:9"], fallback=[origin.url])
    try:
        status, _h, body = await e.get("/x")
        assert (status, body) == (200, b"from-origin")
    finally:
        await e.client.close()
        await e.server.close()
        assert origin.server is not None
        await origin.server.close()


# --- the disk tier ---------------------------------------------------------------------------


async def test_disk_tier_survives_a_restart_and_serves_ranges(
    tmp_path: Path, upstream: Upstream
) -> None:
    body = bytes(range(256)) * 2048  # 512 KiB
    upstream.routes["/seg"] = fixed(body, "public, max-age=3600")
    # a tiny memory tier so the object is served from disk after the restart
    opts = {"cache_bytes": {"edge": 1024}, "disk_cache_bytes": {"edge": 64 * 1024**2}}
    first = await _start_edge(tmp_path, [upstream.url], **opts)
    try:
        assert (await first.get("/seg"))[2] == body
    finally:
        await first.client.close()
        await first.server.close()
    assert list((tmp_path / "cache" / "edge").rglob("*.body"))
    second = await _start_edge(tmp_path, [upstream.url], **opts)
    try:
        status, headers, got = await second.get("/seg")
        assert (status, headers["X-Cache"], got) == (200, "edge=HIT", body)
        status, headers, got = await second.get("/seg", headers={"Range": "bytes=1000-1999"})
        assert (status, got) == (206, body[1000:2000])
        assert upstream.hits["/seg"] == 1
    finally:
        await second.client.close()
        await second.server.close()


async def test_truncation_two_tiers_deep_is_never_stored_anywhere(
    tmp_path: Path, upstream: Upstream
) -> None:
    """origin truncates → the inner tier cuts its client → the outer tier cuts the player."""
    calls: list[int] = []
    upstream.routes["/deep"] = truncating(300_000, 100_000, calls)
    inner = await _start_edge(tmp_path / "inner", [upstream.url])
    outer = await _start_edge(tmp_path / "outer", [inner.url])
    try:
        for _ in range(2):
            with pytest.raises(aiohttp.ClientPayloadError):
                async with outer.client.get(outer.url + "/deep") as r:
                    await r.read()
        assert len(calls) == 2  # nothing was stored at either tier
    finally:
        for e in (outer, inner):
            await e.client.close()
            await e.server.close()


async def test_a_fill_resumes_from_another_upstream_when_one_dies_mid_body(
    tmp_path: Path,
) -> None:
    body = bytes(range(256)) * 1024  # 256 KiB
    ranges: list[tuple[str, int]] = []  # (upstream, first byte) of each ranged request
    truncated: list[str] = []

    def make(name: str) -> Handler:
        async def h(request: web.Request) -> web.StreamResponse:
            headers = {"Cache-Control": "max-age=60", "ETag": '"same"'}
            rng = request.headers.get("Range")
            if rng:
                assert request.headers.get("If-Range") == '"same"'
                start = int(rng.removeprefix("bytes=").rstrip("-"))
                ranges.append((name, start))
                headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
                return web.Response(status=206, body=body[start:], headers=headers)
            if not truncated:
                truncated.append(name)
                resp = web.StreamResponse(headers=headers)
                resp.content_length = len(body)
                await resp.prepare(request)
                await resp.write(body[:100_000])
                assert request.transport is not None
                request.transport.close()  # this upstream dies mid-body
                return resp
            return web.Response(body=body, headers=headers)

        return h

    a, b = await _start_upstream(), await _start_upstream()
    a.routes["/seg"], b.routes["/seg"] = make("a"), make("b")
    e = await _start_edge(tmp_path, [a.url, b.url])
    try:
        status, headers, got = await e.get("/seg")
        assert status == 200 and got == body  # the player never noticed
        assert len(truncated) == 1 and len(ranges) == 1
        assert ranges[0][0] != truncated[0] and ranges[0][1] >= 1  # the other one, mid-way
        status, headers, got = await e.get("/seg")
        assert (headers["X-Cache"], got) == ("edge=HIT", body)  # stored whole
    finally:
        await e.client.close()
        await e.server.close()
        for up in (a, b):
            assert up.server is not None
            await up.server.close()
