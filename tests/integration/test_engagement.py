"""Engagement through control's real HTTP stack on every backend it must hold for: SQLite and
PostgreSQL, each embedded (the `playback_batches` table) and at scale (Redis Streams).

Each test gets a private PostgreSQL database and a private Redis DB from `backends`
(tests/backends.py: VOD_TEST_PG_URL, VOD_TEST_REDIS_URL), so other runs on the machine never
interfere; either service missing fails loudly rather than skipping. The app's own
aggregator prunes only when a test asks (`prune_every_seconds`), so the log can be counted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from control.app import make_app
from control.auth import create_key
from control.engagement import (
    AGGREGATOR_NAME,
    ENGAGEMENT_KEY,
    GROUP,
    MAX_BATCH,
    STREAM,
    GroupAppender,
    aggregate_table_once,
    counters,
    ensure_group,
    parse_events,
    prune_stream,
    prune_table,
    run_aggregator,
)
from tests.backends import Backends
from vodcore.config import Settings
from vodcore.db.consumers import consumer_offsets, get_offset
from vodcore.db.engagement_schema import encode_batch, playback_batches, video_comments
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.migrations import version_table
from vodcore.db.schema import videos
from vodcore.server import start_server

V1 = "vid_aaaaaaaaaaaaaaaa"
V2 = "vid_bbbbbbbbbbbbbbbb"
BLOCKED = "vid_cccccccccccccccc"
T0 = 1_714_564_800.0


@dataclass
class World:
    api: str
    engine: AsyncEngine
    redis: aioredis.Redis | None
    redis_url: str | None
    creator: str
    creator2: str
    operator: str
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def sid(self, video_id: str) -> str:
        """A playback session, as a player gets one: from the playback API."""
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{self.api}/v1/videos/{video_id}/playback") as r:
                assert r.status == 200, await r.text()
                return str((await r.json())["sessionId"])

    async def appended(self) -> int:
        """How many events the log holds (not pruned yet)."""
        if self.redis is not None:
            entries = await self.redis.xrange(STREAM)
            return sum(len(orjson.loads(fields[b"b"])) for _id, fields in entries)
        async with self.engine.connect() as conn:
            n = await conn.execute(select(func.sum(playback_batches.c.event_count)))
            return int(n.scalar_one() or 0)

    async def pruned(self) -> None:
        """Wait until the aggregators pruned the whole log."""
        deadline = time.monotonic() + 15
        while await self.appended():
            assert time.monotonic() < deadline, f"{await self.appended()} events not pruned"
            await asyncio.sleep(0.05)

    def aggregator(self, **kw: Any) -> None:
        redis_url = self.redis_url
        kw.setdefault("settle_seconds", 0.3)
        kw.setdefault("prune_every_seconds", 3600)
        self.tasks.append(
            asyncio.create_task(run_aggregator(self.engine, redis_url, self.stop, **kw))
        )

    async def stop_aggregators(self) -> None:
        """Stop the aggregators started by `aggregator` (as a control process stops)."""
        self.stop.set()
        await asyncio.gather(*self.tasks)
        self.tasks.clear()
        self.stop = asyncio.Event()

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
WITHOUT_BACKGROUND = {
    "test_a_crashed_consumers_pending_events_are_claimed",
    "test_pruning_keeps_what_is_not_applied_yet",
    "test_pruned_logs_keep_counts_across_a_restart",
    "test_a_hole_in_ids_is_waited_for_until_it_settles",
    "test_upgrade_moves_unapplied_per_event_rows_to_batches",
    "test_grouped_appends_are_each_all_or_nothing",
}
BACKENDS = [("sqlite", False), ("postgresql", False), ("sqlite", True), ("postgresql", True)]
pytestmark = pytest.mark.own_backends  # the four above in every run, whatever --backend says


@pytest.fixture(params=BACKENDS, ids=[f"{db}{'-redis' if r else ''}" for db, r in BACKENDS])
async def world(
    request: pytest.FixtureRequest, tmp_path: Path, backends: Backends
) -> AsyncIterator[World]:
    db, use_redis = request.param
    with contextlib.ExitStack() as leases:
        url = (
            f"sqlite+aiosqlite:///{tmp_path / 'vod.db'}"
            if db == "sqlite"
            else leases.enter_context(backends.postgres())
        )
        redis_url = leases.enter_context(backends.redis_db()) if use_redis else None
        background = request.node.originalname not in WITHOUT_BACKGROUND
        async with _world(tmp_path, url, redis_url, background) as w:
            yield w


@contextlib.asynccontextmanager
async def _world(
    tmp_path: Path, url: str, redis_url: str | None, background: bool
) -> AsyncIterator[World]:
    engine = make_engine(url)
    await create_schema(engine)
    async with engine.begin() as conn:
        keys = [await create_key(conn, role, 0.0) for role in ("creator", "creator", "operator")]
        for vid, state in ((V1, "READY"), (V2, "READY"), (BLOCKED, "BLOCKED")):
            await conn.execute(
                videos.insert().values(
                    id=vid, title="t", description="", visibility="public", state=state,
                    current_version=1, created_at=0.0, updated_at=0.0,
                )
            )  # fmt: skip
    r: aioredis.Redis | None = None
    if redis_url is not None:
        r = aioredis.Redis.from_url(redis_url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, redis_url=redis_url)
    app = make_app(settings)
    eng = app[ENGAGEMENT_KEY]  # the app's own, tuned for the test
    eng.settle_seconds, eng.claim_idle_ms, eng.autostart = 0.3, 300, background
    eng.prune_every_seconds = 3600
    runner: web.AppRunner = await start_server(app, "127.0.0.1", 0, access_log=False)
    w = World(f"http://127.0.0.1:{runner.addresses[0][1]}", engine, r, redis_url, *keys)
    try:
        yield w
    finally:
        w.stop.set()
        await asyncio.gather(*w.tasks)
        await runner.cleanup()
        if r is not None:
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


def stored(sid: str) -> bytes:
    """A 12 s session of V1 as ingest stores it (6 events)."""
    return encode_batch(parse_events({"events": session(V1, sid, 12)}))


async def post(http: aiohttp.ClientSession, w: World, body: Any) -> tuple[int, Any]:
    kw: dict[str, Any] = {"data": body} if isinstance(body, bytes | str) else {"json": body}
    async with http.post(f"{w.api}/v1/playback-events", **kw) as resp:
        return resp.status, await resp.json()


async def test_views_count_once_per_session_past_the_minimum(world: World) -> None:
    world.aggregator()  # a second control process sharing the work
    long_a = session(V1, await world.sid(V1), 12)
    short = session(V1, await world.sid(V1), 9.5)
    long_c = session(V1, await world.sid(V1), 30, step=10)
    batch = {"events": long_a[:3] + short + long_c}
    accepted = 0
    async with aiohttp.ClientSession() as http:
        assert await post(http, world, batch) == (
            202,
            {"accepted": len(batch["events"]), "rejected": 0},
        )
        assert await post(http, world, batch) == (
            202,
            {"accepted": len(batch["events"]), "rejected": 0},
        )
        accepted += 2 * len(batch["events"])
        await world.converge(V1, 1)  # c only: a is still under 10 s, b never gets there
        for e in long_a[3:]:  # the rest of a, one event at a time (the single-event shape)
            assert (await post(http, world, e))[0] == 202
            accepted += 1
        await world.converge(V1, 2)
        assert (await post(http, world, {"events": long_a + long_c}))[0] == 202  # retried
        # V2: one session across two requests in reverse order; an unknown video is dropped
        v2 = session(V2, await world.sid(V2), 11)
        assert (await post(http, world, {"events": v2[3:]}))[0] == 202
        assert (await post(http, world, {"events": v2[:3]}))[0] == 202
        # no session can be had for an unknown video: a made-up one is answered, not stored
        ghost = session("vid_zzzzzzzzzzzzzzzz", "g", 20)
        assert await post(http, world, {"events": ghost}) == (
            202,
            {"accepted": 0, "rejected": len(ghost)},
        )
        accepted += len(long_a + long_c + v2)
        await world.converge(V2, 1)
        await world.converge(V1, 2)
        async with world.engine.connect() as conn:
            assert await counters(conn, "vid_zzzzzzzzzzzzzzzz") == (0, 0)
    # the log holds every accepted event (a retried one again: applying is idempotent)
    assert await world.appended() == accepted


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
        assert (await post(http, world, {"events": session(V1, await world.sid(V1), 10)}))[0] == 202
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
    good = session(V1, await world.sid(V1), 20)
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
        assert (await post(http, world, {"events": session(V1, await world.sid(V1), 15)}))[0] == 202
        assert (await post(http, world, {"events": session(V1, await world.sid(V1), 15)}))[0] == 202
    await ensure_group(world.redis)
    got = await world.redis.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=1000)
    assert len(got[0][1]) == 2  # the dead consumer read both requests and never acknowledged
    world.aggregator(claim_idle_ms=200, claim_every_seconds=0.1)
    world.aggregator(claim_idle_ms=200, claim_every_seconds=0.1)
    await world.converge(V1, 2)
    assert (await world.redis.xpending(STREAM, GROUP))["pending"] == 0


async def test_pruned_logs_keep_counts_across_a_restart(world: World) -> None:
    world.aggregator(prune_every_seconds=0.1, claim_idle_ms=200, claim_every_seconds=0.1)
    a, b = session(V1, await world.sid(V1), 12), session(V1, await world.sid(V1), 12)
    async with aiohttp.ClientSession() as http:
        assert (await post(http, world, {"events": a + b[:2]}))[0] == 202
        await world.converge(V1, 1)  # a; b is at 2.5 s
        await world.pruned()
        await world.stop_aggregators()  # a control process restarts with an empty log
        world.aggregator(prune_every_seconds=0.1, claim_idle_ms=200, claim_every_seconds=0.1)
        async with world.engine.connect() as conn:
            assert await counters(conn, V1) == (1, 0)
        # a retried in full (applied and pruned before: must not count again), b's rest
        assert (await post(http, world, {"events": a + b[2:]}))[0] == 202
        await world.converge(V1, 2)
        await world.pruned()
        async with world.engine.connect() as conn:
            assert await counters(conn, V1) == (2, 0)


TABLE_BACKENDS = [b for b in BACKENDS if not b[1]]


@pytest.mark.parametrize(
    "world", BACKENDS, indirect=True, ids=[f"{db}{'-redis' if r else ''}" for db, r in BACKENDS]
)
async def test_pruning_keeps_what_is_not_applied_yet(world: World) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in ("a", "b"):
            sid = await world.sid(V1)
            assert (await post(http, world, {"events": session(V1, sid, 12)}))[0] == 202
    appended = await world.appended()
    assert appended == 12
    if world.redis is None:
        assert await prune_table(world.engine) == 0  # nothing applied: nothing goes
        assert await aggregate_table_once(world.engine, time.time(), batch=1) == 1  # a only
        assert await prune_table(world.engine, rows=1) == 1
        assert await world.appended() == 6  # b's row stays until it is applied
        assert await aggregate_table_once(world.engine, time.time()) == 1
        assert await prune_table(world.engine) == 1
    else:
        assert await prune_stream(world.redis) == 0  # no consumer group yet: keep everything
        await ensure_group(world.redis)
        assert await prune_stream(world.redis) == 0  # nothing delivered yet
        got = await world.redis.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=1)
        assert len(got[0][1]) == 1  # read and never acknowledged (a crashed consumer)
        assert await prune_stream(world.redis) == 0
        assert await world.appended() == appended
        world.aggregator(claim_idle_ms=200, claim_every_seconds=0.1, prune_every_seconds=0.1)
        await world.converge(V1, 2)  # b read by the aggregator, a claimed from "dead"
    await world.pruned()
    async with world.engine.connect() as conn:
        assert await counters(conn, V1) == (2, 0)


@pytest.mark.parametrize(
    "world", TABLE_BACKENDS, indirect=True, ids=[db for db, _ in TABLE_BACKENDS]
)
async def test_a_hole_in_ids_is_waited_for_until_it_settles(world: World) -> None:
    """PostgreSQL hands ids out at insert and shows rows at commit: a row after a hole may have
    a lower id still coming, so it waits (settle_seconds), while rows without a hole go at
    once."""
    now = time.time()

    async def row(row_id: int, sid: str, received_at: float) -> None:
        async with world.engine.begin() as conn:
            await conn.execute(
                playback_batches.insert().values(
                    id=row_id, received_at=received_at, event_count=6, body=stored(sid),
                )
            )  # fmt: skip

    async def offset() -> int:
        async with world.engine.connect() as conn:
            return await get_offset(conn, AGGREGATOR_NAME)

    async def step() -> int:
        return await aggregate_table_once(world.engine, now, settle_seconds=5)

    await row(1, "a", now)
    await row(3, "c", now)
    assert await step() == 1 and await offset() == 1  # 3 waits for 2
    assert await step() == 0 and await offset() == 1
    await row(2, "b", now)
    assert await step() == 2 and await offset() == 3
    await row(5, "e", now - 6)  # 4 never came (rolled back): 5 is old enough to go
    assert await step() == 1 and await offset() == 5
    async with world.engine.connect() as conn:
        assert await counters(conn, V1) == (4, 0)


@pytest.mark.parametrize(
    "world", TABLE_BACKENDS, indirect=True, ids=[db for db, _ in TABLE_BACKENDS]
)
async def test_upgrade_moves_unapplied_per_event_rows_to_batches(world: World) -> None:
    """A database of the per-event `playback_events` release (schema version 3): the events
    its aggregator had not applied yet are counted after the upgrade, the others not again."""
    legacy = Table(
        "playback_events", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("event_id", String(128), nullable=False, unique=True),
        Column("video_id", String(128), nullable=False),
        Column("session_id", String(128), nullable=False),
        Column("event_type", String(16), nullable=False),
        Column("position_seconds", Float, nullable=False),
        Column("occurred_at", Float, nullable=False),
        Column("received_at", Float, nullable=False),
    )  # fmt: skip
    # rows of the old release go straight into its table (sessions were not signed then)
    rows = [
        {
            "event_id": e["eventId"], "video_id": e["videoId"], "session_id": e["sessionId"],
            "event_type": e["eventType"], "position_seconds": e["positionSeconds"],
            "occurred_at": e["occurredAt"], "received_at": 0.0,
        }
        for e in session(V1, "applied", 12) + session(V1, "a", 12) + session(V2, "b", 12)
    ]  # fmt: skip
    async with world.engine.begin() as conn:
        await conn.run_sync(playback_batches.drop)
        await conn.run_sync(legacy.create)
        await conn.execute(legacy.insert(), rows)
        await conn.execute(
            consumer_offsets.insert().values(name="playback-views", offset=6, updated_at=0.0)
        )
        await conn.execute(update(version_table).values(version=3))
    await create_schema(world.engine)
    async with world.engine.connect() as conn:
        tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
        assert "playback_events" not in tables
        assert await get_offset(conn, "playback-views") == 0  # the old offset is gone
    assert await world.appended() == 12
    world.aggregator()
    await world.converge(V1, 1)
    await world.converge(V2, 1)


@pytest.mark.parametrize(
    "world", TABLE_BACKENDS, indirect=True, ids=[db for db, _ in TABLE_BACKENDS]
)
async def test_grouped_appends_are_each_all_or_nothing(world: World) -> None:
    """Requests in flight together share one INSERT; a request is answered only after its row
    committed, and one that failed left nothing (here a group with a broken row fails)."""
    appender = GroupAppender(world.engine)
    body = stored
    await asyncio.gather(*(appender.append(body(f"s{i}"), 6) for i in range(20)))
    assert await world.appended() == 120
    broken = appender.append(None, 6)  # type: ignore[arg-type]  # NOT NULL: the INSERT fails
    results = await asyncio.gather(
        *(appender.append(body(f"t{i}"), 6) for i in range(3)), broken, return_exceptions=True
    )
    assert isinstance(results[-1], Exception)
    ok = sum(r is None for r in results)
    assert await world.appended() == 120 + 6 * ok
    await appender.append(body("u"), 6)  # the writer carries on after a failure
    await appender.close()
    assert await world.appended() == 126 + 6 * ok
    world.aggregator()
    await world.converge(V1, 20 + ok + 1)  # s0..s19, the t that got in, u
