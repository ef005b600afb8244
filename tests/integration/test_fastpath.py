"""The fast path for fresh in-memory hits, over raw loopback sockets so the exact bytes and the
connection's state are visible: it must answer what the full path would, and leave every other
request (ranges, conditionals, pipelining, split requests, bodies, Connection: close, stale
entries, Vary) to aiohttp, on the same connection, in order."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from edge.app import make_app as edge_app
from shield.app import fast_media_key
from tests.integration.test_cache_engine import Upstream, fixed
from vodcore.config import Settings
from vodcore.fastpath import sniff
from vodcore.server import FAST_PATH_KEY, start_server
from vodcore.tokens import SigningKeys


@dataclasses.dataclass
class FastEdge:
    port: int
    app: web.Application

    @property
    def served(self) -> int:
        return self.app[FAST_PATH_KEY].served


@pytest.fixture
async def edge(tmp_path: Path, upstream: Upstream) -> AsyncIterator[FastEdge]:
    settings = Settings(data_dir=tmp_path, upstream_timeout_seconds=3)
    app = edge_app(settings, [upstream.url], tokens=False)
    runner = await start_server(app, "127.0.0.1", 0, access_log=False)
    port = runner.addresses[0][1]
    yield FastEdge(port, app)
    await runner.cleanup()


async def read_response(
    reader: asyncio.StreamReader, *, head: bool = False
) -> tuple[int, dict[str, str], bytes]:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    dates = 0
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            dates += k.lower() == "date"
            headers[k.lower()] = v.strip()
    assert dates <= 1, raw
    body = b""
    if "content-length" in headers and status not in (204, 304) and not head:
        n = int(headers["content-length"])
        body = await asyncio.wait_for(reader.readexactly(n), 5) if n else b""
    return status, headers, body


def get(path: str, *extra: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: t", *extra, "", ""]
    return "\r\n".join(lines).encode()


async def connect(edge: FastEdge) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", edge.port)


async def warm(edge: FastEdge, path: str) -> None:
    r, w = await connect(edge)
    w.write(get(path))
    status, headers, _ = await read_response(r)
    assert status == 200 and headers["x-cache"].startswith("edge=MISS")
    w.close()


async def test_a_fresh_hit_is_answered_as_the_full_path_would(
    edge: FastEdge, upstream: Upstream
) -> None:
    upstream.routes["/a"] = fixed(b"A" * 1000, **{"X-Extra": "kept"})
    await warm(edge, "/a")
    r, w = await connect(edge)
    for i in range(3):  # keep-alive: several fast answers on one connection
        w.write(get("/a", "User-Agent: t", "Accept: */*"))
        status, headers, body = await read_response(r)
        assert (status, body) == (200, b"A" * 1000)
        assert headers["x-cache"] == "edge=HIT" and headers["x-extra"] == "kept"
        assert headers["etag"] == '"v1"' and headers["accept-ranges"] == "bytes"
        assert "age" in headers and "date" in headers
        assert edge.served == i + 1
    w.write(get("/a", method="HEAD"))
    status, headers, body = await read_response(r, head=True)
    assert status == 200 and headers["content-length"] == "1000" and body == b""
    w.write(get("/a"))
    assert (await read_response(r))[2] == b"A" * 1000  # still in step after a HEAD
    assert edge.served == 5 and upstream.hits["/a"] == 1
    w.close()


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ("Range: bytes=0-9", 206),
        ('If-None-Match: "v1"', 304),
        ("Cookie: a=1", 200),
        ("Cache-Control: no-cache", 200),
    ],
)
async def test_anything_else_takes_the_full_path(
    edge: FastEdge, upstream: Upstream, extra: str, status: int
) -> None:
    upstream.routes["/b"] = fixed(b"0123456789abcdef")
    await warm(edge, "/b")
    r, w = await connect(edge)
    w.write(get("/b", extra))
    got, _headers, body = await read_response(r)
    assert got == status
    if status == 206:
        assert body == b"0123456789"
    assert edge.served == 0
    w.close()


async def test_pipelined_and_split_requests_stay_in_order(
    edge: FastEdge, upstream: Upstream
) -> None:
    upstream.routes["/p"] = fixed(b"p" * 100)
    upstream.routes["/q"] = fixed(b"q" * 50)
    await warm(edge, "/p")
    await warm(edge, "/q")
    r, w = await connect(edge)
    w.write(get("/p") + get("/q"))  # pipelined: the full path answers both, in order
    assert (await read_response(r))[2] == b"p" * 100
    assert (await read_response(r))[2] == b"q" * 50
    raw = get("/q")
    w.write(raw[:10])  # a request head in two pieces
    await w.drain()
    await asyncio.sleep(0.05)
    w.write(raw[10:])
    assert (await read_response(r))[2] == b"q" * 50
    w.write(get("/p"))  # whole again: fast
    assert (await read_response(r))[2] == b"p" * 100
    assert edge.served == 1
    w.close()


async def test_a_request_with_a_body_turns_the_fast_path_off_for_that_connection(
    edge: FastEdge, upstream: Upstream
) -> None:
    async def h(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            return web.Response(text=f"got {len(await request.read())}")
        return web.Response(body=b"doc", headers={"Cache-Control": "max-age=60"})

    upstream.routes["/doc"] = h
    await warm(edge, "/doc")
    r, w = await connect(edge)
    w.write(b"POST /doc HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
    status, _h, body = await read_response(r)
    assert (status, body) == (200, b"got 5")
    w.write(get("/doc"))
    status, _headers, body = await read_response(r)
    assert (status, body) == (200, b"doc")
    assert edge.served == 0
    w.close()


async def test_connection_close_is_honoured(edge: FastEdge, upstream: Upstream) -> None:
    upstream.routes["/c"] = fixed(b"c")
    await warm(edge, "/c")
    r, w = await connect(edge)
    w.write(get("/c", "Connection: close"))
    assert (await read_response(r))[2] == b"c"
    assert await asyncio.wait_for(r.read(), 5) == b""  # the server closed it
    w.close()


async def test_stale_and_varied_objects_take_the_full_path(
    edge: FastEdge, upstream: Upstream
) -> None:
    upstream.routes["/s"] = fixed(b"s", "max-age=1")
    upstream.routes["/v"] = fixed(b"v", "max-age=60", Vary="Accept-Language")
    await warm(edge, "/s")
    await warm(edge, "/v")
    await asyncio.sleep(2.1)
    r, w = await connect(edge)
    w.write(get("/s"))
    status, headers, _ = await read_response(r)
    assert status == 200 and headers["x-cache"] != "edge=HIT"  # revalidated or refetched
    w.write(get("/v"))
    status, headers, body = await read_response(r)
    assert (status, body) == (200, b"v")
    assert edge.served == 0
    w.close()


@pytest.mark.parametrize(
    ("data", "target"),
    [
        (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", "/a"),
        (b"HEAD /a?q=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n", "/a?q=1"),
        (b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n", None),  # 1.0: keep-alive rules differ
        (b"GET /a HTTP/1.1\r\nHost: x\r\n", None),  # incomplete
        (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n\r\n", None),  # pipelined
        (b"GET /a HTTP/1.1\r\nRange: bytes=0-1\r\n\r\n", None),
        (b"GET /a HTTP/1.1\r\nHost : x\r\n\r\n", None),  # malformed: aiohttp answers 400
        (b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n", None),
        (b"POST /a HTTP/1.1\r\nHost: x\r\n\r\n", None),
        (b"GET a HTTP/1.1\r\nHost: x\r\n\r\n", None),
        (b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n", None),
    ],
)
def test_sniff(data: bytes, target: str | None) -> None:
    got = sniff(data)
    assert (got.target if got else None) == target


@pytest.mark.parametrize(
    ("target", "key"),
    [
        ("/v/vid_a/1/seg-1.m4s", "/v/vid_a/1/seg-1.m4s"),
        ("/v/vid_a/1/seg-1.m4s?x=1", "/v/vid_a/1/seg-1.m4s"),
        ("/v/vid_a/1/../x", None),
        ("/v/vid_a/1/%2e%2e/x", None),
        ("/v/vid_a/1/.hidden", None),
        ("/v/vid_a", None),
        ("/other/a/b/c", None),
    ],
)
def test_shield_fast_keys(target: str, key: str | None) -> None:
    assert fast_media_key(target) == key


async def test_token_checked_edge_serves_known_tokens_fast_and_refuses_the_rest(
    tmp_path: Path, upstream: Upstream
) -> None:
    keys = SigningKeys(tmp_path / "keys").load_or_create()

    async def jwks(request: web.Request) -> web.StreamResponse:
        return web.json_response(keys.jwks())

    upstream.routes["/v1/keys/jwks.json"] = jwks
    upstream.routes["/v/vid_a/1/seg.m4s"] = fixed(b"S" * 500, "public, max-age=3600")
    settings = Settings(data_dir=tmp_path / "edge", upstream_timeout_seconds=3)
    app = edge_app(settings, [upstream.url], tokens=True, control_url=upstream.url)
    runner = await start_server(app, "127.0.0.1", 0, access_log=False)
    fast = app[FAST_PATH_KEY]
    try:
        port = runner.addresses[0][1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        now = int(time.time())
        good = keys.mint("vid_a", now, 3600)
        w.write(get(f"/v/vid_a/{good}/1/seg.m4s"))  # first use: full path verifies, caches
        status, headers, body = await read_response(r)
        assert (status, body) == (200, b"S" * 500) and fast.served == 0
        for _ in range(3):  # verified before: the fast path answers, no signature check
            w.write(get(f"/v/vid_a/{good}/1/seg.m4s"))
            status, headers, body = await read_response(r)
            assert (status, headers["x-cache"], body) == (200, "edge=HIT", b"S" * 500)
        assert fast.served == 3
        for bad in (
            keys.mint("vid_b", now, 3600),  # another video's token
            keys.mint("vid_a", now - 7200, 60),  # expired
            good[:-6] + "AAAAAA",  # tampered signature
        ):
            w.write(get(f"/v/vid_a/{bad}/1/seg.m4s"))
            status, headers, body = await read_response(r)
            assert status == 403 and b"bad_token" in body
        assert fast.served == 3
        w.close()
    finally:
        await runner.cleanup()
