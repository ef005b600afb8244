"""Engagement through control's real HTTP stack on every backend it must hold for: SQLite and
PostgreSQL, each embedded (the `playback_events` table) and at scale (Redis Streams).

PostgreSQL (127.0.0.1, or VOD_TEST_PG_URL) gets its own database `<db>_engagement` so suites
that drop every table in `test` meanwhile don't interfere; Redis (db 14, or VOD_TEST_REDIS_URL)
is flushed by each test. Either one missing fails loudly rather than skipping."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from control.app import make_app
from control.auth import create_key
from control.engagement import (
    ENGAGEMENT_KEY,
    GROUP,
    MAX_BATCH,
    STREAM,
    counters,
    ensure_group,
    run_aggregator,
)
from tests.pgdb import own_pg_database
from vodcore.config import Settings
from vodcore.db.engagement_schema import playback_events, video_comments
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import metadata, videos
from vodcore.server import start_server

REDIS_URL = os.environ.get("VOD_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
V1 = "vid_aaaaaaaaaaaaaaaa"
V2 = "vid_bbbbbbbbbbbbbbbb"
BLOCKED = "vid_cccccccccccccccc"
T0 = 1_714_564_800.0


@dataclass
class World:
    api: str
    engine: AsyncEngine
    redis: aioredis.Redis | None
    creator: str
    creator2: str
    operator: str
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def appended(self) -> int:
        if self.redis is not None:
            return int(await self.redis.xlen(STREAM))
        async with self.engine.connect() as conn:
            n = await conn.execute(select(func.count()).select_from(playback_events))
            return int(n.scalar_one())

    def aggregator(self, **kw: Any) -> None:
        redis_url = REDIS_URL if self.redis is not None else None
        kw.setdefault("settle_seconds", 0.3)
        self.tasks.append(
            asyncio.create_task(run_aggregator(self.engine, redis_url, self.stop, **kw))
        )

    async def converge(self, video_id: str, views: int, likes: int = 0) -> None:
        deadline = time.monotonic() + 15
        got = (-1, -1)
        while time.monotonic() < deadline:
            async with self.engine.connect() as conn:
                got = await counters(conn, video_id)
            if got == (views, likes):
                await asyncio.sleep(0.8)  # and it stays there (nothing counts twice later)
                async with self.engine.connect() as conn:
                    assert await counters(conn, video_id) == (views, likes)
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{video_id}: counters {got}, wanted {(views, likes)}")


# tests that start their own aggregators instead of the app's
WITHOUT_BACKGROUND = {"test_a_crashed_consumers_pending_events_are_claimed"}
BACKENDS = [("sqlite", False), ("postgresql", False), ("sqlite", True), ("postgresql", True)]


@pytest.fixture(params=BACKENDS, ids=[f"{db}{'-redis' if r else ''}" for db, r in BACKENDS])
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    db, use_redis = request.param
    background = request.node.originalname not in WITHOUT_BACKGROUND
    url = (
        f"sqlite+aiosqlite:///{tmp_path / 'vod.db'}"
        if db == "sqlite"
        else await own_pg_database("engagement")
    )
    engine = make_engine(url)
    if db == "postgresql":
        async with engine.begin() as conn:
            await conn.run_sync(metadata.drop_all)
    await create_schema(engine)
    async with engine.begin() as conn:
        keys = [await create_key(conn, role, 0.0) for role in ("creator", "creator", "operator")]
        for vid, state in ((V1, "READY"), (V2, "READY"), (BLOCKED, "BLOCKED")):
            await conn.execute(
                videos.insert().values(
                    id=vid, title="t", description="", visibility="public", state=state,
                    created_at=0.0, updated_at=0.0,
                )
            )  # fmt: skip
    r: aioredis.Redis | None = None
    if use_redis:
        r = aioredis.Redis.from_url(REDIS_URL)
        await r.ping()  # no Redis: fail loudly
        await r.flushdb()
    settings = Settings(
        data_dir=tmp_path / "data", database_url=url, redis_url=REDIS_URL if use_redis else None
    )
    app = make_app(settings)
    eng = app[ENGAGEMENT_KEY]  # the app's own, tuned for the test
    eng.settle_seconds, eng.claim_idle_ms, eng.autostart = 0.3, 300, background
    runner: web.AppRunner = await start_server(app, "127.0.0.1", 0, access_log=False)
    w = World(f"http://127.0.0.1:{runner.addresses[0][1]}", engine, r, *keys)
    try:
        yield w
    finally:
        w.stop.set()
        await asyncio.gather(*w.tasks)
        await runner.cleanup()
        if r is not None:
            await r.flushdb()
            await r.aclose()
        await engine.dispose()


def session(video: str, sid: str, seconds: float, step: float = 2.5) -> list[dict[str, Any]]:
    """A session that plays `seconds` from position 0, reporting a heartbeat every `step`."""
    evs: list[dict[str, Any]] = []
    t = 0.0
    while True:
        evs.append(
            {
                "eventId": f"{sid}-{len(evs)}",
                "videoId": video,
                "sessionId": sid,
                "eventType": "start" if t == 0 else "heartbeat",
                "positionSeconds": t,
                "occurredAt": T0 + t,
            }
        )
        if t >= seconds:
            return evs
        t = min(seconds, t + step)


async def post(http: aiohttp.ClientSession, w: World, body: Any) -> tuple[int, Any]:
    kw: dict[str, Any] = {"data": body} if isinstance(body, bytes | str) else {"json": body}
    async with http.post(f"{w.api}/v1/playback-events", **kw) as resp:
        return resp.status, await resp.json()


async def test_views_count_once_per_session_past_the_minimum(world: World) -> None:
    world.aggregator()  # a second control process sharing the work
    long_a = session(V1, "a", 12)
    short = session(V1, "b", 9.5)
    long_c = session(V1, "c", 30, step=10)
    batch = {"events": long_a[:3] + short + long_c}
    async with aiohttp.ClientSession() as http:
        assert await post(http, world, batch) == (202, {"accepted": len(batch["events"])})
        assert await post(http, world, batch) == (202, {"accepted": len(batch["events"])})
        await world.converge(V1, 1)  # c only: a is still under 10 s, b never gets there
        for e in long_a[3:]:  # the rest of a, one event at a time (the single-event shape)
            assert (await post(http, world, e))[0] == 202
        await world.converge(V1, 2)
        assert (await post(http, world, {"events": long_a + long_c}))[0] == 202  # retried
        # V2: one session across two requests in reverse order; an unknown video is dropped
        v2 = session(V2, "d", 11)
        assert (await post(http, world, {"events": v2[3:]}))[0] == 202
        assert (await post(http, world, {"events": v2[:3]}))[0] == 202
        ghost = session("vid_zzzzzzzzzzzzzzzz", "g", 20)
        assert (await post(http, world, {"events": ghost}))[0] == 202
        await world.converge(V2, 1)
        await world.converge(V1, 2)
        async with world.engine.connect() as conn:
            assert await counters(conn, "vid_zzzzzzzzzzzzzzzz") == (0, 0)
    if world.redis is None:  # the log holds each eventId once
        unique = len({e["eventId"] for e in long_a + short + long_c + v2 + ghost})
        assert await world.appended() == unique


async def test_likes_are_one_per_key_and_idempotent(world: World) -> None:
    like = f"{world.api}/v1/videos/{V1}/like"
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.put(like, headers=world.auth(world.creator)) as r:
                assert r.status == 200
                assert await r.json() == {"videoId": V1, "liked": True, "likeCount": 1}
        async with http.put(like, headers=world.auth(world.creator2)) as r:
            assert (await r.json())["likeCount"] == 2
        for _ in range(2):
            async with http.delete(like, headers=world.auth(world.creator)) as r:
                assert r.status == 200
                assert await r.json() == {"videoId": V1, "liked": False, "likeCount": 1}
        async with world.engine.connect() as conn:
            assert await counters(conn, V1) == (0, 1)
        async with http.put(like) as r:
            assert r.status == 401
        for vid, code in (("vid_zzzzzzzzzzzzzzzz", 404), ("nope", 404), (BLOCKED, 451)):
            async with http.put(
                f"{world.api}/v1/videos/{vid}/like", headers=world.auth(world.creator)
            ) as r:
                assert r.status == code
                assert "error" in await r.json()
        # likes and views live side by side
        assert (await post(http, world, {"events": session(V1, "s", 10)}))[0] == 202
        await world.converge(V1, 1, likes=1)


async def test_comments_crud_permissions_and_cursor(world: World) -> None:
    base = f"{world.api}/v1/videos/{V1}/comments"
    texts = ["first", "  ünïcödé 🎬 世界  ", "third", "x" * 5000]
    made = []
    async with aiohttp.ClientSession() as http:
        for i, t in enumerate(texts):
            key = world.creator if i % 2 == 0 else world.creator2
            async with http.post(base, json={"text": t}, headers=world.auth(key)) as r:
                assert r.status == 201, await r.text()
                c = await r.json()
                assert c["text"] == t.strip() and c["videoId"] == V1
                made.append(c)
        seen, cursor = [], None
        while True:
            params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
            async with http.get(base, params=params) as r:
                assert r.status == 200
                page = await r.json()
            seen += page["comments"]
            cursor = page["nextCursor"]
            if cursor is None:
                break
        assert [c["commentId"] for c in seen] == [c["commentId"] for c in reversed(made)]
        assert seen[2]["text"] == "ünïcödé 🎬 世界"
        for bad in ({"cursor": "garbage!"}, {"cursor": "YzEuMA"}, {"limit": "0"}, {"limit": "x"}):
            async with http.get(base, params=bad) as r:
                assert r.status == 400 and "error" in await r.json()
        for body, code in (
            ({"text": ""}, 422),
            ({"text": "y" * 5001}, 422),
            ({"text": 5}, 422),
            ({"text": "ok", "extra": 1}, 422),
            (b"{nope", 400),
        ):
            kw: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with http.post(base, headers=world.auth(world.creator), **kw) as r:
                assert r.status == code, await r.text()
        async with http.post(base, json={"text": "anon"}) as r:
            assert r.status == 401
        first, second = made[0]["commentId"], made[1]["commentId"]
        async with http.delete(f"{base}/{first}", headers=world.auth(world.creator2)) as r:
            assert r.status == 403
        async with http.delete(f"{base}/{first}", headers=world.auth(world.creator)) as r:
            assert r.status == 204
        async with http.delete(f"{base}/{first}", headers=world.auth(world.creator)) as r:
            assert r.status == 404
        async with http.delete(f"{base}/{second}", headers=world.auth(world.operator)) as r:
            assert r.status == 204
        async with http.delete(f"{base}/cmt_nope", headers=world.auth(world.operator)) as r:
            assert r.status == 404
        other = f"{world.api}/v1/videos/{V2}/comments/{made[2]['commentId']}"
        async with http.delete(other, headers=world.auth(world.operator)) as r:
            assert r.status == 404  # a comment is deleted through its own video
        async with http.get(base) as r:
            assert [c["commentId"] for c in (await r.json())["comments"]] == [
                made[3]["commentId"],
                made[2]["commentId"],
            ]
        async with http.get(f"{world.api}/v1/videos/vid_zzzzzzzzzzzzzzzz/comments") as r:
            assert r.status == 404
    async with world.engine.connect() as conn:
        n = await conn.execute(select(func.count()).select_from(video_comments))
        assert n.scalar_one() == 2


async def test_bad_playback_events_are_4xx_and_append_nothing(world: World) -> None:
    good = session(V1, "a", 20)
    huge = {
        "events": [{**good[0], "eventId": f"e{i}", "sessionId": "s" * 128} for i in range(4000)]
    }
    cases: list[tuple[Any, int]] = [
        (b"{not json", 400),
        (b"", 400),
        ("[]", 422),
        ({"events": [*good, {**good[0], "eventId": "z", "positionSeconds": "3"}]}, 422),
        ({"events": [{**e, "eventType": 3} for e in good]}, 422),
        ({"events": [*good[:-1], {**good[-1], "surprise": True}]}, 422),
        ({"events": good, "more": 1}, 422),
        ({"events": [{**good[0], "eventId": f"e{i}"} for i in range(MAX_BATCH + 1)]}, 413),
        (huge, 413),
        (b"x" * (3 * 1024 * 1024), 413),
        ({**good[0], "positionSeconds": -1}, 422),
        ({**good[0], "occurredAt": "not a time"}, 422),
    ]
    async with aiohttp.ClientSession() as http:
        for body, code in cases:
            status, doc = await post(http, world, body)
            assert status == code, (str(body)[:80], doc)
            assert set(doc["error"]) >= {"code", "message"}
        async with http.get(f"{world.api}/v1/playback-events") as r:
            assert r.status == 405
    assert await world.appended() == 0
    async with world.engine.connect() as conn:
        assert await counters(conn, V1) == (0, 0)


REDIS_BACKENDS = [b for b in BACKENDS if b[1]]


# consumer groups are the Redis path (the table path has an offset): Redis backends only
@pytest.mark.parametrize(
    "world", REDIS_BACKENDS, indirect=True, ids=[f"{db}-redis" for db, _ in REDIS_BACKENDS]
)
async def test_a_crashed_consumers_pending_events_are_claimed(world: World) -> None:
    assert world.redis is not None
    async with aiohttp.ClientSession() as http:
        assert (await post(http, world, {"events": session(V1, "a", 15)}))[0] == 202
        assert (await post(http, world, {"events": session(V1, "b", 15)}))[0] == 202
    await ensure_group(world.redis)
    got = await world.redis.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=1000)
    assert len(got[0][1]) == 14  # the dead consumer read everything and never acknowledged
    world.aggregator(claim_idle_ms=200, claim_every_seconds=0.1)
    world.aggregator(claim_idle_ms=200, claim_every_seconds=0.1)
    await world.converge(V1, 2)
    assert (await world.redis.xpending(STREAM, GROUP))["pending"] == 0
