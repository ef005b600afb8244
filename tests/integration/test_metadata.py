"""Video metadata, visibility, a creator's own listing and rate limits, over real sockets
against the real control app (issue 6, items 3 and 6).

Metadata and listing run on SQLite and on PostgreSQL (a throwaway database on 127.0.0.1, so
concurrent test runs cannot collide; PostgreSQL missing fails loudly). Rate limits run with the
memory backend and with real Redis at redis://127.0.0.1:6379/15 (flushed here; Redis missing
fails loudly, no skip).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from sqlalchemy import select

from control.app import make_app
from control.auth import create_key, hash_key
from control.ids import new_id
from control.ratelimit import RateLimitConfig, install
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import api_keys, events, videos
from vodcore.server import start_server

# SQLite and PostgreSQL, memory and Redis, in every run whatever --backend says.
pytestmark = [pytest.mark.timeout(60), pytest.mark.own_backends]

PG_ADMIN = os.environ.get("VOD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("VOD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@dataclass
class World:
    url: str
    settings: Settings
    operator: str
    alice: str  # a creator
    bob: str  # another creator
    ids: dict[str, str]  # key -> key id
    session: aiohttp.ClientSession
    runners: list[web.AppRunner] = field(default_factory=list)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        key: str | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kw: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        if body is None and raw is None:
            kw = {}
        async with self.session.request(method, self.url + path, headers=headers, **kw) as r:
            assert r.content_type == "application/json", await r.text()
            return r.status, await r.json(), dict(r.headers)

    async def rows(self, table: Any) -> list[Any]:
        db = make_engine(self.settings.db_url)
        try:
            async with db.connect() as conn:
                return list((await conn.execute(select(table))).all())
        finally:
            await db.dispose()

    async def add_video(
        self, owner: str, *, visibility: str = "public", state: str = "READY", at: float = 1.0
    ) -> str:
        vid = new_id("vid")
        db = make_engine(self.settings.db_url)
        try:
            async with db.begin() as conn:
                await conn.execute(
                    videos.insert().values(
                        id=vid, owner_key_id=self.ids[owner], title=f"t {vid}", description="",
                        visibility=visibility, state=state, current_version=1, created_at=at,
                        updated_at=at,
                    )
                )  # fmt: skip
        finally:
            await db.dispose()
        return vid


@contextlib.asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    name = "vodtest_meta_" + secrets.token_hex(4)
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(PG_ADMIN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def _world(tmp_path: Path, database_url: str | None, **limits: Any) -> World:
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    settings.data_dir.mkdir()
    db = make_engine(settings.db_url)
    await create_schema(db)
    async with db.begin() as conn:
        keys = [await create_key(conn, role, 0.0) for role in ("operator", "creator", "creator")]
        rows = (await conn.execute(select(api_keys.c.id, api_keys.c.key_hash))).all()
    await db.dispose()
    by_hash = {r.key_hash: r.id for r in rows}
    app = make_app(settings)
    if limits:
        install(app, RateLimitConfig(**limits))
    runner = await start_server(app, "127.0.0.1", 0, access_log=False)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    operator, alice, bob = keys
    return World(url, settings, operator, alice, bob, {k: by_hash[hash_key(k)] for k in keys},
                 aiohttp.ClientSession(), [runner])  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    async with contextlib.AsyncExitStack() as stack:
        url = None
        if request.param == "postgresql":
            url = await stack.enter_async_context(pg_database())
        w = await _world(tmp_path, url)
        try:
            yield w
        finally:
            await w.session.close()
            for r in w.runners:
                await r.cleanup()


# --- PATCH /v1/videos/{id} -----------------------------------------------------------------------


async def test_owner_edits_metadata_and_the_change_is_one_event(world: World) -> None:
    w = world
    vid = await w.add_video(w.alice)
    title = "Cafe\u0301 \U0001f3ac \u0645\u0631\u062d\u0628\u0627 \u65e5\u672c\u8a9e \u00e9"
    code, doc, headers = await w.call(
        "PATCH", f"/v1/videos/{vid}", {"title": title, "visibility": "unlisted"}, w.alice
    )
    assert code == 200, doc
    assert doc["title"] == title and doc["visibility"] == "unlisted" and doc["videoId"] == vid
    assert headers["Cache-Control"] == "no-store"
    code, doc, _ = await w.call("GET", f"/v1/videos/{vid}")
    assert code == 200 and doc["title"] == title  # stored exactly, no normalisation
    (row,) = [r for r in await w.rows(videos) if r.id == vid]
    assert row.title == title and row.visibility == "unlisted" and row.updated_at > 1.0

    # the same values again: nothing changes, no event; then only the description changes
    code, _doc, _ = await w.call("PATCH", f"/v1/videos/{vid}", {"title": title}, w.alice)
    assert code == 200
    code, doc, _ = await w.call("PATCH", f"/v1/videos/{vid}", {"description": "d\n2"}, w.operator)
    assert code == 200 and doc["description"] == "d\n2"
    logged = [(e.kind, e.payload) for e in await w.rows(events) if e.video_id == vid]
    assert [x for x in logged if x[0] == "video.updated"] == [
        ("video.updated", {"title": title, "visibility": "unlisted"}),
        ("video.updated", {"description": "d\n2"}),
    ]
    # public → unlisted restricts it: older tokens are cut off through the purge log (issue 11)
    purged = [p["action"] for k, p in logged if k == "purge.created"]
    assert purged == ["restrict"]


async def test_patch_needs_the_owner_or_an_operator(world: World) -> None:
    w = world
    public = await w.add_video(w.alice)
    private = await w.add_video(w.alice, visibility="private")
    body = {"title": "mine now"}
    code, doc, headers = await w.call("PATCH", f"/v1/videos/{public}", body)
    assert code == 401 and doc["error"]["code"] == "unauthenticated"
    assert "Bearer" in headers["WWW-Authenticate"]
    code, doc, _ = await w.call("PATCH", f"/v1/videos/{public}", body, "vod_not_a_key")
    assert code == 401
    code, doc, _ = await w.call("PATCH", f"/v1/videos/{public}", body, w.bob)
    assert code == 403 and doc["error"]["code"] == "forbidden"
    code, doc, _ = await w.call("PATCH", f"/v1/videos/{private}", body, w.bob)
    assert code == 404 and doc["error"]["code"] == "not_found"  # existence not revealed
    code, doc, _ = await w.call("PATCH", f"/v1/videos/{private}", body, w.operator)
    assert code == 200 and doc["title"] == "mine now"
    assert [r.title for r in await w.rows(videos) if r.id == public] == [f"t {public}"]


async def test_bad_patches_are_clear_4xx(world: World) -> None:
    w = world
    vid = await w.add_video(w.alice)
    for body, code_, field_ in [
        ({"title": "ok", "colour": "red"}, 422, "colour"),
        ({"state": "READY"}, 422, "state"),
        ({"title": 7}, 422, "title"),
        ({"title": None}, 422, "title"),
        ({"title": ""}, 422, "title"),
        ({"title": " \t "}, 422, "title"),
        ({"title": "x" * 301}, 422, "title"),
        ({"description": "x" * 5001}, 422, "description"),
        ({"visibility": "friends"}, 422, "visibility"),
        ({}, 422, None),
        ([1, 2], 422, None),
    ]:
        code, doc, _ = await w.call("PATCH", f"/v1/videos/{vid}", body, w.alice)
        assert code == code_, (body, doc)
        assert doc["error"]["code"] == "validation_failed"
        assert doc["error"].get("field") == field_
    for raw in [b"", b"{", b'{"title": "\\ud800"}', b"\xff\xfe", b'{"title":"a\\u0000b"}']:
        code, doc, _ = await w.call("PATCH", f"/v1/videos/{vid}", key=w.alice, raw=raw)
        assert code in (400, 422), (raw, doc)
    code, doc, _ = await w.call("PATCH", "/v1/videos/vid_2222222222222222", {"title": "a"}, w.alice)
    assert code == 404
    code, doc, _ = await w.call("PATCH", "/v1/videos/..%2f..", {"title": "a"}, w.alice)
    assert code == 404
    blocked = await w.add_video(w.alice, state="BLOCKED")
    code, doc, _ = await w.call("PATCH", f"/v1/videos/{blocked}", {"title": "a"}, w.alice)
    assert code == 451
    deleted = await w.add_video(w.alice, state="DELETED")
    code, doc, _ = await w.call("PATCH", f"/v1/videos/{deleted}", {"title": "a"}, w.operator)
    assert code == 410
    assert not [e for e in await w.rows(events) if e.kind == "video.updated"]


# --- visibility and playback ---------------------------------------------------------------------


async def test_private_videos_do_not_exist_for_strangers(world: World) -> None:
    w = world
    vid = await w.add_video(w.alice, visibility="private")
    for key in (None, w.bob, "vod_not_a_key"):
        for path in (f"/v1/videos/{vid}", f"/v1/videos/{vid}/playback"):
            code, doc, _ = await w.call("GET", path, key=key)
            assert code == 404 and doc["error"] == {"code": "not_found", "message": "no such video"}
    for key in (w.alice, w.operator):
        code, doc, _ = await w.call("GET", f"/v1/videos/{vid}", key=key)
        assert code == 200 and doc["visibility"] == "private"
        code, doc, headers = await w.call("GET", f"/v1/videos/{vid}/playback", key=key)
        assert code == 200 and f"/v/{vid}/" in doc["manifestUrl"]
        assert headers["Cache-Control"] == "private, no-store"


async def test_unlisted_videos_show_to_anyone_but_play_for_the_owner_only(world: World) -> None:
    w = world
    vid = await w.add_video(w.alice, visibility="unlisted")
    code, doc, _ = await w.call("GET", f"/v1/videos/{vid}")
    assert code == 200 and doc["visibility"] == "unlisted"
    code, doc, _ = await w.call("GET", f"/v1/videos/{vid}/playback")
    assert code == 401 and doc["error"]["code"] == "unauthenticated"
    code, doc, _ = await w.call("GET", f"/v1/videos/{vid}/playback", key=w.bob)
    assert code == 403 and doc["error"]["code"] == "forbidden"
    for key in (w.alice, w.operator):
        code, doc, _ = await w.call("GET", f"/v1/videos/{vid}/playback", key=key)
        assert code == 200, doc


async def test_public_videos_play_without_a_key_and_visibility_changes_apply_at_once(
    world: World,
) -> None:
    w = world
    vid = await w.add_video(w.alice)
    for key in (None, "vod_not_a_key", w.bob):  # a public video never looks at the key
        code, doc, _ = await w.call("GET", f"/v1/videos/{vid}/playback", key=key)
        assert code == 200, doc
    code, doc, _ = await w.call("PATCH", f"/v1/videos/{vid}", {"visibility": "private"}, w.alice)
    assert code == 200
    assert (await w.call("GET", f"/v1/videos/{vid}/playback"))[0] == 404
    code, doc, _ = await w.call("PATCH", f"/v1/videos/{vid}", {"visibility": "public"}, w.alice)
    assert code == 200
    assert (await w.call("GET", f"/v1/videos/{vid}/playback"))[0] == 200
    # not READY yet: the owner gets the state, a stranger of a private one still a 404
    busy = await w.add_video(w.alice, visibility="private", state="PROCESSING")
    code, doc, _ = await w.call("GET", f"/v1/videos/{busy}/playback", key=w.alice)
    assert code == 409 and doc["error"]["state"] == "PROCESSING"
    assert (await w.call("GET", f"/v1/videos/{busy}/playback", key=w.bob))[0] == 404


# --- GET /v1/me/videos ---------------------------------------------------------------------------


async def test_my_videos_newest_first_in_pages(world: World) -> None:
    w = world
    # 25 of alice's (five share one created_at: the id breaks the tie), 3 of bob's, one deleted
    mine = [await w.add_video(w.alice, at=100.0 + i * 0.001) for i in range(20)]
    mine += [await w.add_video(w.alice, at=50.0, visibility="private") for _ in range(5)]
    await w.add_video(w.alice, at=500.0, state="DELETED")
    blocked = await w.add_video(w.alice, at=1.5, state="BLOCKED")
    mine.append(blocked)
    bobs = [await w.add_video(w.bob, at=200.0 + i) for i in range(3)]
    expected = sorted(
        mine,
        key=lambda v: (
            {**{m: 100.0 + i * 0.001 for i, m in enumerate(mine[:20])}, blocked: 1.5}.get(v, 50.0),
            v,
        ),
        reverse=True,
    )

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        q = "?limit=10" + (f"&cursor={cursor}" if cursor else "")
        code, doc, headers = await w.call("GET", f"/v1/me/videos{q}", key=w.alice)
        assert code == 200, doc
        assert headers["Cache-Control"] == "private, no-store"
        seen += [v["videoId"] for v in doc["results"]]
        pages += 1
        cursor = doc["nextCursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == expected
    code, doc, _ = await w.call("GET", "/v1/me/videos", key=w.bob)
    assert [v["videoId"] for v in doc["results"]] == bobs[::-1] and doc["nextCursor"] is None
    assert set(doc["results"][0]) >= {"videoId", "title", "visibility", "state", "createdAt"}
    code, doc, _ = await w.call("GET", "/v1/me/videos", key=w.operator)
    assert code == 200 and doc == {"results": [], "nextCursor": None}
    code, doc, _ = await w.call("GET", "/v1/me/videos?limit=100", key=w.alice)
    assert len(doc["results"]) == 26 and doc["nextCursor"] is None
    code, doc, _ = await w.call("GET", "/v1/me/videos?limit=26", key=w.alice)
    assert len(doc["results"]) == 26 and doc["nextCursor"] is None  # exactly a page: no next


async def test_my_videos_refuses_bad_input(world: World) -> None:
    w = world
    code, doc, _ = await w.call("GET", "/v1/me/videos")
    assert code == 401
    for q in ["limit=0", "limit=101", "limit=abc", "limit=", "cursor=nope", "cursor=", "cursor=%00",
              "cursor=WzEsIngiXQ", "limit=5&cursor=" + "A" * 300]:  # fmt: skip
        code, doc, _ = await w.call("GET", f"/v1/me/videos?{q}", key=w.alice)
        assert code == 400, (q, doc)
        assert doc["error"]["code"] == "bad_request"


# --- rate limits ---------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def limited(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    redis_url = None
    if request.param == "redis":
        client = aioredis.from_url(REDIS_URL)
        try:
            await client.flushdb()  # db 15 is the tests' own; no skip if Redis is missing
        finally:
            await client.aclose()
        redis_url = REDIS_URL
    # slow refill so the test's own pace cannot refill a bucket
    w = await _world(
        tmp_path, None, redis_url=redis_url, key_per_second=0.5, key_burst=3,
        ip_per_second=0.5, ip_burst=9,
    )  # fmt: skip
    try:
        yield w
    finally:
        await w.session.close()
        for r in w.runners:
            await r.cleanup()


async def test_rate_limits_per_key_and_per_ip(limited: World) -> None:
    w = limited
    vid = await w.add_video(w.alice)
    for _ in range(3):
        assert (await w.call("GET", f"/v1/videos/{vid}", key=w.alice))[0] == 200
    code, doc, headers = await w.call("GET", f"/v1/videos/{vid}", key=w.alice)
    assert code == 429
    assert doc["error"]["code"] == "rate_limited"
    assert 0 < doc["error"]["retryAfterSeconds"] <= 2.0
    assert headers["Retry-After"] == "2"  # whole seconds, rounded up
    assert headers["Content-Type"].startswith("application/json")
    # another key has its own bucket; the client IP's bucket (9) counts every request
    for _ in range(3):
        assert (await w.call("GET", f"/v1/videos/{vid}", key=w.bob))[0] == 200
    # a bad key is limited like a good one, before any database read
    statuses = [(await w.call("GET", "/v1/me/videos", key="vod_bad"))[0] for _ in range(2)]
    assert statuses == [401, 401]
    code, doc, headers = await w.call("GET", f"/v1/videos/{vid}")  # no key: the IP bucket
    assert code == 429 and int(headers["Retry-After"]) >= 1
    # exempt: health and metrics, and what edges call on control
    for path in ("/healthz", "/metrics", "/v1/keys/jwks.json", "/v1/cutoffs"):
        for _ in range(3):
            async with w.session.get(w.url + path) as r:
                assert r.status != 429, path


async def test_redis_buckets_are_shared_and_expire(tmp_path: Path) -> None:
    client = aioredis.from_url(REDIS_URL)
    await client.flushdb()
    worlds = []
    try:
        for n in range(2):  # two control processes sharing one Redis
            (tmp_path / str(n)).mkdir()
            worlds.append(await _world(
                tmp_path / str(n), None, redis_url=REDIS_URL, key_per_second=0.5, key_burst=4,
                ip_per_second=100.0, ip_burst=1000,
            ))  # fmt: skip
        a, b = worlds
        vid_b = await b.add_video(b.alice)
        # one key string on both (a knows no such video: 404, still charged)
        codes = []
        for i in range(6):
            target = a if i % 2 else b
            async with target.session.get(
                f"{target.url}/v1/videos/{vid_b}", headers={"Authorization": "Bearer vod_shared"}
            ) as resp:
                codes.append(resp.status)
        # a public video ignores the key, but the key's bucket is still charged: 4 then 429
        assert codes.count(429) == 2 and 429 not in codes[:4]
        names = [k.decode() async for k in client.scan_iter("vod:rl:*")]
        assert sorted(n.split(":")[2] for n in names) == ["ip", "key"]
        for name in names:  # expiry: once full again (+1 s): key 4/0.5 = 8 s, IP 1000/100 = 10 s
            ttl = await client.pttl(name)
            assert 0 < ttl <= (9000 if ":key:" in name else 11000), (name, ttl)
        assert all("vod_shared" not in n for n in names)
    finally:
        for w in worlds:
            await w.session.close()
            for runner in w.runners:
                await runner.cleanup()
        await client.flushdb()
        await client.aclose()


async def test_a_redis_outage_lets_requests_through(tmp_path: Path) -> None:
    w = await _world(
        tmp_path, None, redis_url="redis://127.0.0.1:1/0", key_per_second=0.5, key_burst=1
    )
    try:
        vid = await w.add_video(w.alice)
        for _ in range(3):
            assert (await w.call("GET", f"/v1/videos/{vid}", key=w.alice))[0] == 200
    finally:
        await w.session.close()
        for r in w.runners:
            await r.cleanup()
