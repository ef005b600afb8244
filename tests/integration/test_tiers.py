"""Edge → shield → origin over real loopback sockets, with a JWKS app standing in for control;
the origin serves the object store `--backend` names (the filesystem or S3).

Nothing of ours is mocked: the test only wraps the origin app in a middleware that counts (and,
when asked, delays) the media requests it receives, which is how collapse is observed.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import pytest
import yarl
from aiohttp import web
from prometheus_client import REGISTRY

from edge.app import ENGINE_KEY as EDGE_ENGINE
from edge.app import KEYS_KEY
from edge.app import make_app as make_edge
from origin.app import make_app as make_origin
from origin.policy import SHORT
from shield.app import make_app as make_shield
from tests.backends import Backend
from vodcore.config import Settings
from vodcore.store import ObjectStore
from vodcore.store.factory import close_store, make_store
from vodcore.tokens import SigningKeys

pytestmark = pytest.mark.timeout(30)

VID = "vid_ab12"
OBJECTS = {
    "1/master.m3u8": b"#EXTM3U\n#EXT-X-VERSION:7\nv0/index.m3u8\n",
    "1/seg-0-00001.m4s": os.urandom(100_000),
    "1/seg-0-00002.m4s": os.urandom(50_000),
    "1/seg-0-00003.m4s": os.urandom(30_000),
    "1/seg-0-00004.m4s": os.urandom(30_000),
    "1/poster.jpg": os.urandom(5_000),
    "current.json": b'{"version": 1}',
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def start(app: web.Application, runners: list[web.AppRunner]) -> str:
    runner = web.AppRunner(app)
    await runner.setup()
    runners.append(runner)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return f"http://127.0.0.1:{port}"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class Stack:
    settings: Settings
    store: ObjectStore
    keys: SigningKeys
    session: aiohttp.ClientSession
    runners: list[web.AppRunner]
    origin_url: str = ""
    shield_url: str = ""
    edge_url: str = ""
    control_url: str = ""
    origin_hits: collections.Counter[str] = field(default_factory=collections.Counter)
    jwks_hits: list[float] = field(default_factory=list)
    origin_delay: float = 0.0
    edge_app: web.Application | None = None

    def token(self, vid: str = VID, *, now: int | None = None, ttl: int = 600) -> str:
        return self.keys.mint(vid, int(time.time()) if now is None else now, ttl)

    def url(self, file: str, *, vid: str = VID, token: str | None = None) -> str:
        tok = self.token(vid) if token is None else token
        return f"{self.edge_url}/v/{vid}/{tok}/{file}"

    def origin_count(self, file: str, vid: str = VID) -> int:
        return self.origin_hits[f"/v/{vid}/{file}"]

    async def get(self, url: str, **kw: object) -> tuple[aiohttp.ClientResponse, bytes]:
        async with self.session.get(yarl.URL(url, encoded=True), **kw) as resp:  # type: ignore[arg-type]
            return resp, await resp.read()


@pytest.fixture
async def stack(tmp_path: Path, backend: Backend) -> AsyncIterator[Stack]:
    settings = backend.settings(
        tmp_path,
        cache_bytes={"edge": 4 * 1024 * 1024, "shield": 4 * 1024 * 1024},
        upstream_timeout_seconds=5.0,
    )
    store = make_store(settings)
    for name, data in OBJECTS.items():
        await store.put_bytes(f"media/{VID}/{name}", data)
    (tmp_path / "secret.txt").write_bytes(b"TOP-SECRET-OUTSIDE-STORE")
    keys = SigningKeys(tmp_path / "keys").load_or_create()
    session = aiohttp.ClientSession(auto_decompress=False)
    st = Stack(settings, store, keys, session, [])

    @web.middleware
    async def count_and_delay(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.raw_path.startswith("/v/"):
            st.origin_hits[request.raw_path] += 1
            if st.origin_delay:
                await asyncio.sleep(st.origin_delay)
        return await handler(request)

    origin = make_origin(settings)
    origin.middlewares.append(count_and_delay)
    st.origin_url = await start(origin, st.runners)

    async def jwks(_request: web.Request) -> web.Response:
        st.jwks_hits.append(time.monotonic())
        return web.json_response(keys.jwks())

    control = web.Application()
    control.router.add_get("/v1/keys/jwks.json", jwks)
    st.control_url = await start(control, st.runners)

    st.shield_url = await start(make_shield(settings, [st.origin_url]), st.runners)
    st.edge_app = make_edge(settings, [st.shield_url], control_url=st.control_url)
    st.edge_url = await start(st.edge_app, st.runners)
    try:
        yield st
    finally:
        await session.close()
        for r in reversed(st.runners):
            await r.cleanup()
        await close_store(store)


async def assert_json_error(resp: aiohttp.ClientResponse, body: bytes, status: int) -> None:
    assert resp.status == status, body
    assert resp.content_type == "application/json"
    import orjson

    doc = orjson.loads(body)
    assert set(doc["error"]) >= {"code", "message"}


# --- the happy path and X-Cache ------------------------------------------------------------------


async def test_miss_then_hit(stack: Stack) -> None:
    url = stack.url("1/seg-0-00001.m4s")
    resp, body = await stack.get(url)
    assert resp.status == 200
    assert body == OBJECTS["1/seg-0-00001.m4s"]
    assert resp.headers["X-Cache"] == "edge=MISS, shield=MISS"
    assert resp.headers["Content-Type"] == "video/iso.segment"
    assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert resp.headers["Surrogate-Key"] == VID
    assert "ETag" in resp.headers

    # Another viewer with another token shares the cached object.
    resp2, body2 = await stack.get(stack.url("1/seg-0-00001.m4s", token=stack.token(ttl=900)))
    assert resp2.status == 200
    assert body2 == body
    assert resp2.headers["X-Cache"] == "edge=HIT"
    assert int(resp2.headers["Age"]) >= 0
    assert resp2.headers["ETag"] == resp.headers["ETag"]
    assert stack.origin_count("1/seg-0-00001.m4s") == 1


async def test_shield_hit_when_edge_misses(stack: Stack) -> None:
    path = f"/v/{VID}/1/poster.jpg"
    resp, _ = await stack.get(stack.shield_url + path)
    assert resp.headers["X-Cache"] == "shield=MISS"
    resp, body = await stack.get(stack.url("1/poster.jpg"))
    assert resp.headers["X-Cache"] == "edge=MISS, shield=HIT"
    assert body == OBJECTS["1/poster.jpg"]
    assert stack.origin_count("1/poster.jpg") == 1


async def test_head_on_miss_and_hit(stack: Stack) -> None:
    async with stack.session.head(stack.url("1/seg-0-00002.m4s")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(OBJECTS["1/seg-0-00002.m4s"]))
        assert resp.headers["X-Cache"].startswith("edge=MISS")
    resp2, body = await stack.get(stack.url("1/seg-0-00002.m4s"))
    assert resp2.headers["X-Cache"] == "edge=HIT"
    assert body == OBJECTS["1/seg-0-00002.m4s"]


async def test_collapsed_forwarding(stack: Stack) -> None:
    stack.origin_delay = 0.2
    url = stack.url("1/seg-0-00003.m4s")
    before = collapsed_count()
    results = await asyncio.gather(*(stack.get(url) for _ in range(20)))
    for resp, body in results:
        assert resp.status == 200
        assert body == OBJECTS["1/seg-0-00003.m4s"]
    assert stack.origin_count("1/seg-0-00003.m4s") == 1
    labels = [r.headers["X-Cache"] for r, _ in results]
    assert labels.count("edge=MISS, shield=MISS") == 1
    assert labels.count("edge=HIT") == 19
    assert collapsed_count() - before == 19


def collapsed_count() -> float:
    value = REGISTRY.get_sample_value(
        "vod_cache_requests_total", {"tier": "edge", "result": "collapsed"}
    )
    return value or 0.0


async def test_collapsed_fill_failure_gives_every_waiter_a_502(stack: Stack) -> None:
    edge = make_edge(stack.settings, [closed_port_url()], control_url=stack.control_url)
    url = await start(edge, stack.runners)
    tok = stack.token()
    results = await asyncio.gather(
        *(stack.get(f"{url}/v/{VID}/{tok}/1/master.m3u8") for _ in range(5))
    )
    for resp, body in results:
        await assert_json_error(resp, body, 502)


# --- Range and conditionals ----------------------------------------------------------------------


async def test_range_on_miss_and_on_hit(stack: Stack) -> None:
    data = OBJECTS["1/seg-0-00004.m4s"]
    url = stack.url("1/seg-0-00004.m4s")
    for expect in ("edge=MISS, shield=MISS", "edge=HIT"):
        resp, body = await stack.get(url, headers={"Range": "bytes=10-19"})
        assert resp.status == 206
        assert body == data[10:20]
        assert resp.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
        assert resp.headers["X-Cache"] == expect
    resp, body = await stack.get(url, headers={"Range": "bytes=-5"})
    assert (resp.status, body) == (206, data[-5:])
    assert stack.origin_count("1/seg-0-00004.m4s") == 1


async def test_range_not_satisfiable(stack: Stack) -> None:
    data = OBJECTS["1/poster.jpg"]
    for _ in range(2):  # on a miss, then on a hit
        resp, body = await stack.get(
            stack.url("1/poster.jpg"), headers={"Range": f"bytes={len(data)}-"}
        )
        await assert_json_error(resp, body, 416)
        assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
    resp, body = await stack.get(
        stack.origin_url + f"/v/{VID}/1/poster.jpg", headers={"Range": "bytes=99999-"}
    )
    await assert_json_error(resp, body, 416)
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"


async def test_if_none_match_gives_304(stack: Stack) -> None:
    url = stack.url("1/master.m3u8")
    resp, _ = await stack.get(url)
    etag = resp.headers["ETag"]
    resp, body = await stack.get(url, headers={"If-None-Match": etag})
    assert resp.status == 304
    assert body == b""
    assert resp.headers["ETag"] == etag
    assert resp.headers["X-Cache"] == "edge=HIT"
    # The origin answers validators itself too.
    origin = stack.origin_url + f"/v/{VID}/1/master.m3u8"
    resp, _ = await stack.get(origin, headers={"If-None-Match": f'W/{etag}, "other"'})
    assert resp.status == 304
    lm = resp.headers["Last-Modified"]
    resp, _ = await stack.get(origin, headers={"If-Modified-Since": lm})
    assert resp.status == 304


async def test_origin_headers_and_if_range(stack: Stack) -> None:
    data = OBJECTS["1/seg-0-00001.m4s"]
    url = stack.origin_url + f"/v/{VID}/1/seg-0-00001.m4s"
    resp, body = await stack.get(url)
    assert resp.status == 200 and body == data
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert "X-Cache" not in resp.headers
    etag = resp.headers["ETag"]
    resp, body = await stack.get(url, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert (resp.status, body) == (206, data[:10])
    resp, body = await stack.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert (resp.status, body) == (200, data)
    resp, _ = await stack.get(stack.origin_url + f"/v/{VID}/current.json")
    assert resp.headers["Cache-Control"] == SHORT
    assert resp.headers["Content-Type"].startswith("application/octet-stream")


# --- tokens --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["garbage", "expired", "wrong_video", "tampered", "empty_kid"])
async def test_bad_tokens_are_403(stack: Stack, kind: str) -> None:
    now = int(time.time())
    token = {
        "garbage": "not-a-token",
        "expired": stack.token(now=now - 7200, ttl=60),
        "wrong_video": stack.token("vid_other"),
        "tampered": stack.token()[:-4] + "AAAA",
        "empty_kid": "eyJhbGciOiJFZERTQSJ9.eyJ2aWQiOiJ2aWRfYWIxMiJ9.c2ln",
    }[kind]
    for _ in range(2):  # a refusal is never cached
        resp, body = await stack.get(stack.url("1/master.m3u8", token=token))
        await assert_json_error(resp, body, 403)
    assert stack.origin_count("1/master.m3u8") == 0


async def test_new_kid_triggers_jwks_refresh(stack: Stack) -> None:
    resp, _ = await stack.get(stack.url("1/master.m3u8"))
    assert resp.status == 200
    assert len(stack.jwks_hits) == 1
    stack.keys.rotate()
    assert stack.edge_app is not None
    ring = stack.edge_app[KEYS_KEY]
    ring.min_interval = 0.0  # the 5 s rate limit would otherwise hold the refresh back
    resp, _ = await stack.get(stack.url("1/master.m3u8"))
    assert resp.status == 200
    assert len(stack.jwks_hits) == 2


async def test_unknown_kid_refresh_is_rate_limited(stack: Stack) -> None:
    await stack.get(stack.url("1/master.m3u8"))
    other = SigningKeys(stack.settings.data_dir / "other-keys").load_or_create()
    forged = other.mint(VID, int(time.time()), 600)
    for _ in range(5):
        resp, body = await stack.get(stack.url("1/master.m3u8", token=forged))
        await assert_json_error(resp, body, 403)
    assert len(stack.jwks_hits) == 1  # within 5 s of the first fetch: no refetch


async def test_control_unreachable_without_keys_is_503(stack: Stack) -> None:
    edge = make_edge(stack.settings, [stack.shield_url], control_url=closed_port_url())
    url = await start(edge, stack.runners)
    resp, body = await stack.get(f"{url}/v/{VID}/{stack.token()}/1/master.m3u8")
    await assert_json_error(resp, body, 503)


async def test_tokens_off_is_a_plain_proxy(stack: Stack) -> None:
    edge = make_edge(stack.settings, [stack.shield_url], tokens=False)
    url = await start(edge, stack.runners)
    resp, body = await stack.get(f"{url}/v/{VID}/1/seg-0-00002.m4s")
    assert resp.status == 200 and body == OBJECTS["1/seg-0-00002.m4s"]
    assert resp.headers["X-Cache"] == "edge=MISS, shield=MISS"
    resp, _ = await stack.get(f"{url}/v/{VID}/1/seg-0-00002.m4s")
    assert resp.headers["X-Cache"] == "edge=HIT"
    resp, body = await stack.get(f"{url}/v/{VID}/1/..%2f..%2fsecret.txt")
    await assert_json_error(resp, body, 400)


# --- hostile paths, errors, failures -------------------------------------------------------------

TRAVERSALS = [
    "1/..%2f..%2f..%2fsecret.txt",
    "1/%2e%2e/%2e%2e/%2e%2e/secret.txt",
    "1/%2E%2e/%2e%2E/secret.txt",
    "1/..%5c..%5csecret.txt",
    "1/seg%00.m4s",
    "1/../../../secret.txt",
]


@pytest.mark.parametrize("rest", TRAVERSALS)
async def test_traversal_refused_on_every_tier(stack: Stack, rest: str) -> None:
    urls = [
        stack.url(rest),
        f"{stack.shield_url}/v/{VID}/{rest}",
        f"{stack.origin_url}/v/{VID}/{rest}",
    ]
    for url in urls:
        resp, body = await stack.get(url)
        assert b"TOP-SECRET" not in body
        await assert_json_error(resp, body, 400)


async def test_unknown_object_is_404_through_edge(stack: Stack) -> None:
    for _ in range(2):
        resp, body = await stack.get(stack.url("1/seg-9-99999.m4s"))
        await assert_json_error(resp, body, 404)
    resp, body = await stack.get(f"{stack.edge_url}/nope")
    await assert_json_error(resp, body, 404)


async def test_origin_down_is_502_at_shield(stack: Stack) -> None:
    shield = make_shield(stack.settings, [closed_port_url()])
    url = await start(shield, stack.runners)
    resp, body = await stack.get(f"{url}/v/{VID}/1/master.m3u8")
    await assert_json_error(resp, body, 502)


async def test_failover_to_second_upstream(stack: Stack) -> None:
    shield = make_shield(stack.settings, [closed_port_url(), stack.origin_url])
    url = await start(shield, stack.runners)
    resp, body = await stack.get(f"{url}/v/{VID}/1/master.m3u8")
    assert resp.status == 200 and body == OBJECTS["1/master.m3u8"]


async def test_slow_origin_is_504(stack: Stack) -> None:
    stack.origin_delay = 1.0
    shield = make_shield(replace(stack.settings, upstream_timeout_seconds=0.2), [stack.origin_url])
    url = await start(shield, stack.runners)
    resp, body = await stack.get(f"{url}/v/{VID}/1/master.m3u8")
    await assert_json_error(resp, body, 504)


async def test_memory_bound_respected(stack: Stack) -> None:
    budget = 64 * 1024
    settings = replace(stack.settings, cache_bytes={"edge": budget, "shield": budget})
    edge_app = make_edge(settings, [stack.shield_url], control_url=stack.control_url)
    url = await start(edge_app, stack.runners)
    names = []
    for i in range(10):
        name = f"2/chunk-{i}.m4s"
        await stack.store.put_bytes(f"media/{VID}/{name}", bytes([i]) * 20_000)
        names.append(name)
    tok = stack.token()
    engine = edge_app[EDGE_ENGINE]
    for name in names:
        resp, body = await stack.get(f"{url}/v/{VID}/{tok}/{name}")
        assert resp.status == 200 and len(body) == 20_000
        assert engine.storage.bytes_used <= budget
    assert 0 < len(engine.storage) < len(names)
    # Ten objects fetched once each are a scan to W-TinyLFU: what it holds stays, and an
    # object never requested again does not push out one that is popular.
    stored = set(engine.storage.keys())
    held = [n for n in names if f"/v/{VID}/{n}" in stored]
    assert held
    resp, _ = await stack.get(f"{url}/v/{VID}/{tok}/{held[0]}")
    assert resp.headers["X-Cache"] == "edge=HIT"
    evicted = [n for n in names if n not in held]
    resp, _ = await stack.get(f"{url}/v/{VID}/{tok}/{evicted[0]}")
    assert resp.headers["X-Cache"].startswith("edge=MISS")


async def test_object_larger_than_max_streams_through(stack: Stack) -> None:
    settings = replace(stack.settings, max_object_bytes=10_000)
    edge_app = make_edge(settings, [stack.shield_url], control_url=stack.control_url)
    url = await start(edge_app, stack.runners)
    data = OBJECTS["1/seg-0-00001.m4s"]
    tok = stack.token()
    for _ in range(2):
        resp, body = await stack.get(f"{url}/v/{VID}/{tok}/1/seg-0-00001.m4s")
        assert resp.status == 200 and body == data
        assert resp.headers["X-Cache"].startswith("edge=MISS")
    resp, body = await stack.get(
        f"{url}/v/{VID}/{tok}/1/seg-0-00001.m4s", headers={"Range": "bytes=100-199"}
    )
    assert (resp.status, body) == (206, data[100:200])
    assert len(edge_app[EDGE_ENGINE].storage) == 0
