"""The metadata cache in the real control app (SQLite), with and without real Redis (a private DB
leased from `backends`; Redis missing fails loudly, no skip): a hot playback
path reads nothing from the database, PATCH and moderation invalidate at once in the process
that made the change and within the local TTL in another one sharing Redis, unknown ids are
remembered briefly."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from sqlalchemy import event, select, update
from sqlalchemy.engine import Engine

from control import metacache
from control.app import make_app
from control.auth import create_key, hash_key
from control.ids import new_id
from control.metacache import METACACHE_KEY, MetaCache
from control.videos import PlaybackFastPath
from tests.backends import Backends
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import api_keys, videos
from vodcore.server import FAST_PATH_KEY, start_server, write_access_line

pytestmark = [pytest.mark.timeout(60), pytest.mark.own_backends]


@dataclass
class Node:
    """One control process (an app with its own metadata cache) on a real socket."""

    url: str
    runner: web.AppRunner

    @property
    def meta(self) -> MetaCache:
        return self.runner.app[METACACHE_KEY]

    @property
    def port(self) -> int:
        return int(self.runner.addresses[0][1])

    @property
    def fast(self) -> PlaybackFastPath:
        fast = self.runner.app[FAST_PATH_KEY]
        assert isinstance(fast, PlaybackFastPath)
        return fast


@dataclass
class World:
    settings: Settings
    operator: str
    alice: str
    owner_id: str
    session: aiohttp.ClientSession
    nodes: list[Node] = field(default_factory=list)

    async def call(
        self, method: str, path: str, body: Any = None, key: str | None = None, node: int = 0
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kw: dict[str, Any] = {"json": body} if body is not None else {}
        url = self.nodes[node].url + path
        async with self.session.request(method, url, headers=headers, **kw) as r:
            return r.status, await r.json()

    async def sql(self, stmt: Any) -> None:
        db = make_engine(self.settings.db_url)
        try:
            async with db.begin() as conn:
                await conn.execute(stmt)
        finally:
            await db.dispose()

    async def add_video(self, vid: str | None = None, state: str = "READY") -> str:
        vid = vid or new_id("vid")
        await self.sql(
            videos.insert().values(
                id=vid, owner_key_id=self.owner_id, title="first", description="",
                visibility="public", state=state, current_version=1, duration_seconds=4.0,
                created_at=1.0, updated_at=1.0,
            )
        )  # fmt: skip
        return vid

    async def add_video_as(self, visibility: str, state: str = "READY") -> str:
        vid = await self.add_video(state=state)
        await self.sql(update(videos).where(videos.c.id == vid).values(visibility=visibility))
        return vid


async def raw_get(
    port: int, target: str, fields: str = "", *, method: str = "GET", version: str = "1.1"
) -> tuple[int, dict[str, str], bytes, bytes]:
    """One request on a fresh connection: (status, fields, head bytes, body bytes)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(
            f"{method} {target} HTTP/{version}\r\nHost: 127.0.0.1:{port}\r\n{fields}\r\n".encode()
        )
        head = await r.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields_in = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                fields_in[k.strip().lower()] = v.strip()
        n = int(fields_in.get("content-length", "0"))
        body = b"" if method == "HEAD" else await r.readexactly(n)
        return int(lines[0].split(" ")[1]), fields_in, head, body
    finally:
        w.close()


async def _world(
    tmp_path: Path,
    redis_url: str | None,
    nodes: int = 1,
    customize: Callable[[web.Application], None] | None = None,
    access_log: bool = False,
    **overrides: Any,
) -> World:
    # rate limits off unless asked for: these tests hammer one video
    settings = Settings(
        data_dir=tmp_path / "data", redis_url=redis_url,
        **{"rate_limit_key_per_second": 0, "rate_limit_ip_per_second": 0, **overrides},
    )  # fmt: skip
    settings.data_dir.mkdir()
    db = make_engine(settings.db_url)
    await create_schema(db)
    async with db.begin() as conn:
        operator = await create_key(conn, "operator", 0.0)
        alice = await create_key(conn, "creator", 0.0)
        owner = (
            await conn.execute(select(api_keys.c.id).where(api_keys.c.key_hash == hash_key(alice)))
        ).scalar_one()
    await db.dispose()
    w = World(settings, operator, alice, owner, aiohttp.ClientSession())
    for _ in range(nodes):  # several control processes: one database, one Redis
        app = make_app(settings)
        if customize is not None:
            customize(app)
        runner = await start_server(app, "127.0.0.1", 0, access_log=access_log)
        w.nodes.append(Node(f"http://127.0.0.1:{runner.addresses[0][1]}", runner))
    return w


async def _flush(url: str) -> None:
    client = aioredis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


@pytest.fixture
def redis_url(backends: Backends) -> Iterator[str]:
    """A private, flushed Redis DB for this test (no skip if Redis is missing)."""
    with backends.redis_db() as url:
        yield url


@contextlib.asynccontextmanager
async def _serving(tmp_path: Path, redis_url: str | None, nodes: int = 1) -> AsyncIterator[World]:
    w = await _world(tmp_path, redis_url, nodes=nodes)
    try:
        yield w
    finally:
        await w.session.close()
        for n in w.nodes:
            await n.runner.cleanup()


@pytest.fixture(params=["memory", "redis"])
async def world(
    request: pytest.FixtureRequest, tmp_path: Path, backends: Backends
) -> AsyncIterator[World]:
    with contextlib.ExitStack() as leases:
        url = leases.enter_context(backends.redis_db()) if request.param == "redis" else None
        async with _serving(tmp_path, url) as w:
            yield w


@pytest.fixture
async def pair(tmp_path: Path, redis_url: str) -> AsyncIterator[World]:
    async with _serving(tmp_path, redis_url, nodes=2) as w:
        yield w


@pytest.fixture
def queries() -> Iterator[list[tuple[str, Any]]]:
    """Every SQL statement any engine of this process runs while the test does."""
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        seen.append((statement, params))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def about(seen: list[tuple[str, Any]], vid: str) -> list[str]:
    """The statements that read or wrote this video (background loops read other things)."""
    return [s for s, p in seen if vid in str(p) or "video_cutoffs" in s]


async def test_a_hot_playback_path_reads_no_database(
    world: World, queries: list[tuple[str, Any]]
) -> None:
    w = world
    vid = await w.add_video()
    w.nodes[0].meta.local.ttl = 60.0  # however slow this machine: "hot" for the whole test
    queries.clear()
    code, first = await w.call("GET", f"/v1/videos/{vid}/playback")
    assert code == 200 and first["state"] == "READY"
    assert len(about(queries, vid)) == 1  # one read: the row with its cutoff, joined
    queries.clear()
    results = await asyncio.gather(
        *(w.call("GET", f"/v1/videos/{vid}/playback") for _ in range(200))
    )
    assert {c for c, _ in results} == {200}
    assert about(queries, vid) == []
    assert all(d["manifestUrl"].endswith("/1/master.m3u8") for _, d in results)
    # concurrent misses of one id share one read (single flight)
    w.nodes[0].meta.forget_local(vid)
    queries.clear()
    if w.settings.redis_url:
        await _flush(w.settings.redis_url)
    results = await asyncio.gather(
        *(w.call("GET", f"/v1/videos/{vid}/playback") for _ in range(50))
    )
    assert {c for c, _ in results} == {200}
    assert len(about(queries, vid)) == 1


async def test_patch_and_moderation_invalidate_at_once(world: World) -> None:
    w = world
    vid = await w.add_video()
    assert (await w.call("GET", f"/v1/videos/{vid}"))[1]["title"] == "first"
    assert (await w.call("GET", f"/v1/videos/{vid}/playback"))[0] == 200  # both cached
    code, _ = await w.call("PATCH", f"/v1/videos/{vid}", {"title": "second"}, w.alice)
    assert code == 200
    assert (await w.call("GET", f"/v1/videos/{vid}"))[1]["title"] == "second"

    code, doc = await w.call("POST", f"/v1/videos/{vid}/block", {"reason": "x"}, w.operator)
    assert code == 200, doc
    code, doc = await w.call("GET", f"/v1/videos/{vid}/playback")
    assert code == 451 and doc["error"]["state"] == "BLOCKED"
    assert (await w.call("GET", f"/v1/videos/{vid}"))[0] == 451
    code, _ = await w.call("POST", f"/v1/videos/{vid}/unblock", None, w.operator)
    assert code == 200
    code, doc = await w.call("GET", f"/v1/videos/{vid}/playback")
    assert code == 200
    # the cutoff the block set came with the re-read row: tokens are issued after it
    assert doc["manifestUrl"]
    code, _ = await w.call("DELETE", f"/v1/videos/{vid}", {"reason": "x"}, w.operator)
    assert code == 200
    assert (await w.call("GET", f"/v1/videos/{vid}/playback"))[0] == 410
    code, _ = await w.call("POST", f"/v1/videos/{vid}/restore", None, w.operator)
    assert code == 200
    assert (await w.call("GET", f"/v1/videos/{vid}/playback"))[0] == 200


async def test_an_unknown_id_is_remembered_briefly(world: World) -> None:
    w = world
    vid = new_id("vid")
    assert (await w.call("GET", f"/v1/videos/{vid}/playback"))[0] == 404
    await w.add_video(vid)  # e.g. created by another control process
    created = time.monotonic()
    assert (await w.call("GET", f"/v1/videos/{vid}/playback"))[0] == 404  # remembered
    bound = (metacache.REDIS_NEGATIVE_TTL + metacache.LOCAL_TTL if w.settings.redis_url
             else metacache.NEGATIVE_TTL)  # fmt: skip
    while (await w.call("GET", f"/v1/videos/{vid}/playback"))[0] == 404:
        assert time.monotonic() - created < bound + 0.5
        await asyncio.sleep(0.05)


async def test_a_video_being_processed_is_not_cached(world: World) -> None:
    """The transcoder (another process) publishes: playable at once, no TTL to wait."""
    w = world
    vid = await w.add_video(state="PROCESSING")
    code, doc = await w.call("GET", f"/v1/videos/{vid}/playback")
    assert code == 409 and doc["error"]["state"] == "PROCESSING"
    await w.sql(update(videos).where(videos.c.id == vid).values(state="READY", current_version=2))
    code, doc = await w.call("GET", f"/v1/videos/{vid}/playback")
    assert code == 200 and "/2/master.m3u8" in doc["manifestUrl"]


async def test_two_processes_share_redis_and_see_an_invalidation(
    pair: World, queries: list[tuple[str, Any]]
) -> None:
    w = pair
    a, b = w.nodes
    vid = await w.add_video()
    queries.clear()
    assert (await w.call("GET", f"/v1/videos/{vid}/playback", node=0))[0] == 200
    assert len(about(queries, vid)) == 1
    assert (await w.call("GET", f"/v1/videos/{vid}/playback", node=1))[0] == 200
    assert len(about(queries, vid)) == 1  # b found it in Redis
    assert b.meta.stats["redis"] == 1 and b.meta.stats["db"] == 0

    assert w.settings.redis_url is not None
    client = aioredis.from_url(w.settings.redis_url)
    try:
        assert 0 < await client.pttl(f"vod:meta:{vid}") <= metacache.REDIS_TTL * 1000
        code, _ = await w.call("PATCH", f"/v1/videos/{vid}", {"title": "second"}, w.alice, node=0)
        assert code == 200
        assert await client.get(f"vod:meta:{vid}") == metacache.TOMBSTONE
        assert (await w.call("GET", f"/v1/videos/{vid}", node=0))[1]["title"] == "second"
        # b answers from its own memory for at most the local TTL, then reads the change
        changed = time.monotonic()
        while (await w.call("GET", f"/v1/videos/{vid}", node=1))[1]["title"] != "second":
            assert time.monotonic() - changed < metacache.LOCAL_TTL + 0.5
            await asyncio.sleep(0.05)

        # a block through b reaches a within the local TTL too
        assert (await w.call("GET", f"/v1/videos/{vid}/playback", node=0))[0] == 200
        code, _ = await w.call("POST", f"/v1/videos/{vid}/block", {"reason": "x"}, w.operator, 1)
        assert code == 200
        assert (await w.call("GET", f"/v1/videos/{vid}/playback", node=1))[0] == 451
        blocked = time.monotonic()
        while (await w.call("GET", f"/v1/videos/{vid}/playback", node=0))[0] != 451:
            assert time.monotonic() - blocked < metacache.LOCAL_TTL + 0.5
            await asyncio.sleep(0.05)
        # the tombstone keeps fills out; once it is gone, a negative entry with its short TTL
        await client.delete(f"vod:meta:{vid}")
        a.meta.forget_local(vid)
        assert (await w.call("GET", f"/v1/videos/{vid}/playback", node=0))[0] == 451
        assert 0 < await client.pttl(f"vod:meta:{vid}") <= metacache.REDIS_NEGATIVE_TTL * 1000
    finally:
        await client.aclose()


async def test_a_redis_outage_falls_through_to_the_database(tmp_path: Path) -> None:
    w = await _world(tmp_path, "redis://127.0.0.1:1/0")
    try:
        vid = await w.add_video()
        for _ in range(3):
            assert (await w.call("GET", f"/v1/videos/{vid}/playback"))[0] == 200
        code, _ = await w.call("PATCH", f"/v1/videos/{vid}", {"title": "second"}, w.alice)
        assert code == 200
        assert (await w.call("GET", f"/v1/videos/{vid}"))[1]["title"] == "second"
    finally:
        await w.session.close()
        for n in w.nodes:
            await n.runner.cleanup()


# --- the playback fast path (control.videos.PlaybackFastPath) -----------------------------------


async def test_the_fast_path_answers_a_hot_playback_as_the_full_path_would(world: World) -> None:
    w = world
    node = w.nodes[0]
    node.meta.local.ttl = 60.0  # hot for the whole test
    vid = await w.add_video()
    target = f"/v1/videos/{vid}/playback"
    status, _, _, _ = await raw_get(node.port, target)
    assert status == 200 and node.fast.served == 0  # a miss: the full path reads through
    for _attempt in range(5):
        # a field outside the allow-list sends a request down the full path
        full = await raw_get(node.port, target, "X-Trace: 1\r\n")
        served, local = node.fast.served, node.meta.stats["local"]
        fast = await raw_get(node.port, target, "Accept: */*\r\nUser-Agent: t\r\n")
        assert node.fast.served == served + 1 and node.meta.stats["local"] == local + 1
        if full[1]["date"] == fast[1]["date"]:  # the same second: the same token and Date
            break
    assert full[0] == fast[0] == 200
    assert full[2] == fast[2]  # status line and fields, in the same order
    # the body, but for the playback session each answer gets (same length, its own id)
    full_doc, fast_doc = orjson.loads(full[3]), orjson.loads(fast[3])
    assert len(full[3]) == len(fast[3]) and full_doc["sessionId"] != fast_doc["sessionId"]
    assert {**full_doc, "sessionId": ""} == {**fast_doc, "sessionId": ""}
    assert full[3].replace(full_doc["sessionId"].encode(), b"") == fast[3].replace(
        fast_doc["sessionId"].encode(), b""
    )
    doc = orjson.loads(fast[3])
    assert doc["videoId"] == vid and doc["manifestUrl"].endswith("/1/master.m3u8")
    assert fast[1]["cache-control"] == "private, no-store"
    # counted like any answer
    async with w.session.get(f"{node.url}/metrics") as r:
        text = await r.text()
    assert 'vod_fastpath_answers_total{tier="control"}' in text


async def test_the_fast_path_leaves_everything_else_to_aiohttp(world: World) -> None:
    w = world
    node = w.nodes[0]
    public = await w.add_video()
    unlisted = await w.add_video_as("unlisted")
    private = await w.add_video_as("private")
    processing = await w.add_video(state="PROCESSING")
    unknown = new_id("vid")
    for vid in (public, unlisted, private, processing, unknown):  # in the cache, if cached
        await raw_get(node.port, f"/v1/videos/{vid}/playback")
    node.meta.local.ttl = 60.0
    await raw_get(node.port, f"/v1/videos/{public}/playback")
    served = node.fast.served
    key = f"Authorization: Bearer {w.alice}\r\n"
    cases = [
        (f"/v1/videos/{unlisted}/playback", "", "GET", "1.1", 401),  # a key is needed
        (f"/v1/videos/{unlisted}/playback", key, "GET", "1.1", 200),
        (f"/v1/videos/{private}/playback", "", "GET", "1.1", 404),
        (f"/v1/videos/{processing}/playback", "", "GET", "1.1", 409),
        (f"/v1/videos/{unknown}/playback", "", "GET", "1.1", 404),  # a negative entry
        (f"/v1/videos/{public}/playback", key, "GET", "1.1", 200),  # a key: its own bucket
        (f"/v1/videos/{public}/playback", "", "HEAD", "1.1", 200),
        (f"/v1/videos/{public}/playback?x=1", "", "GET", "1.1", 200),
        (f"/v1/videos/{public}/playback", "", "GET", "1.0", 200),
        (f"/v1/videos/{public}/playback", "Connection: close\r\n", "GET", "1.1", 200),
        (f"/v1/videos/{public}", "", "GET", "1.1", 200),
        (f"/v1/videos/{public.upper()}/playback", "", "GET", "1.1", 404),
    ]
    for target, fields, method, version, want in cases:
        status, _, _, _ = await raw_get(node.port, target, fields, method=method, version=version)
        assert status == want, (target, fields, method, version)
    assert node.fast.served == served
    # a takedown is seen at once: the cached row is dropped, the full path answers
    code, _ = await w.call("POST", f"/v1/videos/{public}/block", {"reason": "x"}, w.operator)
    assert code == 200
    assert (await raw_get(node.port, f"/v1/videos/{public}/playback"))[0] == 451
    assert node.fast.served == served


async def test_the_fast_path_takes_from_the_client_ip_bucket(tmp_path: Path) -> None:
    w = await _world(tmp_path, None, rate_limit_ip_per_second=0.01, rate_limit_ip_burst=4)
    try:
        node = w.nodes[0]
        node.meta.local.ttl = 60.0
        vid = await w.add_video()
        statuses = [(await raw_get(node.port, f"/v1/videos/{vid}/playback"))[0] for _ in range(4)]
        assert statuses == [200] * 4 and node.fast.served == 3  # the first was a miss
        status, fields, _, body = await raw_get(node.port, f"/v1/videos/{vid}/playback")
        assert status == 429 and int(fields["retry-after"]) >= 1
        assert orjson.loads(body)["error"]["code"] == "rate_limited"
        assert node.fast.served == 3
    finally:
        await w.session.close()
        for n in w.nodes:
            await n.runner.cleanup()


def _extra_middleware(app: web.Application) -> None:
    @web.middleware
    async def tag(request: web.Request, handler: Any) -> web.StreamResponse:
        resp: web.StreamResponse = await handler(request)
        resp.headers["X-Tag"] = "1"
        return resp

    app.middlewares.append(tag)


def _prepare_hook(app: web.Application) -> None:
    async def hook(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Hook"] = "1"

    app.on_response_prepare.append(hook)


@pytest.mark.parametrize(
    ("customize", "redis", "field"),
    [
        (_extra_middleware, False, "x-tag"),
        (_prepare_hook, False, "x-hook"),
        (None, False, "vary"),  # CORS on: `Vary: Origin` on every /v1 answer
        (None, True, None),
    ],
    ids=["another-middleware", "response-prepare-hook", "cors", "rate-limits-in-redis"],
)
async def test_the_fast_path_stays_off_where_it_cannot_stand_in(
    tmp_path: Path,
    customize: Callable[[web.Application], None] | None,
    redis: bool,
    field: str | None,
    redis_url: str,
) -> None:
    overrides: dict[str, Any] = {}
    if redis:
        overrides = {"rate_limit_ip_per_second": 1000.0, "rate_limit_ip_burst": 1000.0}
    if field == "vary":
        overrides["cors_origins"] = ("https://app.example",)
    w = await _world(tmp_path, redis_url if redis else None, customize=customize, **overrides)
    try:
        node = w.nodes[0]
        node.meta.local.ttl = 60.0
        vid = await w.add_video()
        for _ in range(3):
            status, fields, _, _ = await raw_get(node.port, f"/v1/videos/{vid}/playback")
            assert status == 200
            if field is not None:  # what the middleware or hook adds is there
                assert fields[field] == ("Origin" if field == "vary" else "1")
        assert node.fast.served == 0
    finally:
        await w.session.close()
        for n in w.nodes:
            await n.runner.cleanup()


async def test_access_lines_of_fast_and_full_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = await _world(tmp_path, None, access_log=True)
    try:
        node = w.nodes[0]
        node.meta.local.ttl = 60.0
        vid = await w.add_video()
        target = f"/v1/videos/{vid}/playback"
        await raw_get(node.port, target)  # a miss: the full path
        await raw_get(node.port, target, "X-Trace: 1\r\n")  # the full path
        fast = await raw_get(node.port, target)
        assert node.fast.served == 1
        await asyncio.sleep(0.05)
        lines = [x for x in capsys.readouterr().out.splitlines() if target in x]
        assert len(lines) == 3
        line = re.compile(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d access: 127\.0\.0\.1 "
            rf'"GET {re.escape(target)} HTTP/1\.1" 200 (\d+) \d+\.\d{{6}} "-"'
        )
        matches = [line.fullmatch(x) for x in lines]
        assert all(matches), lines
        assert matches[2] is not None and int(matches[2][1]) == len(fast[3])  # body bytes
    finally:
        await w.session.close()
        for n in w.nodes:
            await n.runner.cleanup()


async def test_access_lines_of_one_loop_iteration_go_out_together(
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_access_line("10.0.0.1", "GET /a HTTP/1.1", 200, 1, 0.001)
    write_access_line("10.0.0.2", "GET /b HTTP/1.1", 404, 2, 0.002, "edge=HIT")
    assert capsys.readouterr().out == ""  # not yet: at the end of this iteration
    await asyncio.sleep(0)
    out = capsys.readouterr().out.splitlines()
    assert [x.split(" access: ", 1)[1] for x in out] == [
        '10.0.0.1 "GET /a HTTP/1.1" 200 1 0.001000 "-"',
        '10.0.0.2 "GET /b HTTP/1.1" 404 2 0.002000 "edge=HIT"',
    ]


async def test_a_video_read_all_the_time_is_re_read_ahead_and_never_waited_for(
    world: World,
) -> None:
    w = world
    node = w.nodes[0]
    node.meta.refresh_ahead = 0.8  # of the 1 s local TTL: generous for a slow machine
    vid = await w.add_video()
    target = f"/v1/videos/{vid}/playback"
    assert (await raw_get(node.port, target))[0] == 200  # a miss: the full path
    filled = node.meta.stats["redis"] + node.meta.stats["db"]
    n = 0
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # past two local TTLs
        assert (await raw_get(node.port, target))[0] == 200
        n += 1
        await asyncio.sleep(0.02)
    assert node.fast.served == n  # every one from memory: the row never ran out
    assert node.meta.stats["ahead"] >= 2
    assert node.meta.stats["redis"] + node.meta.stats["db"] >= filled + 2
