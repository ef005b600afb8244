"""The metadata cache in the real control app (SQLite), with and without real Redis at
redis://127.0.0.1:6379/13 (flushed here; Redis missing fails loudly, no skip): a hot playback
path reads nothing from the database, PATCH and moderation invalidate at once in the process
that made the change and within the local TTL in another one sharing Redis, unknown ids are
remembered briefly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
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
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import api_keys, videos
from vodcore.server import start_server

pytestmark = pytest.mark.timeout(60)

REDIS_URL = "redis://127.0.0.1:6379/13"


@dataclass
class Node:
    """One control process (an app with its own metadata cache) on a real socket."""

    url: str
    runner: web.AppRunner

    @property
    def meta(self) -> MetaCache:
        return self.runner.app[METACACHE_KEY]


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


async def _world(tmp_path: Path, redis_url: str | None, nodes: int = 1) -> World:
    # rate limits off: these tests hammer one video
    settings = Settings(
        data_dir=tmp_path / "data", redis_url=redis_url,
        rate_limit_key_per_second=0, rate_limit_ip_per_second=0,
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
        runner = await start_server(make_app(settings), "127.0.0.1", 0, access_log=False)
        w.nodes.append(Node(f"http://127.0.0.1:{runner.addresses[0][1]}", runner))
    return w


async def _flush() -> None:
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.flushdb()  # db 13 is these tests' own; no skip if Redis is missing
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    redis_url = None
    if request.param == "redis":
        await _flush()
        redis_url = REDIS_URL
    w = await _world(tmp_path, redis_url)
    try:
        yield w
    finally:
        await w.session.close()
        for n in w.nodes:
            await n.runner.cleanup()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[World]:
    await _flush()
    w = await _world(tmp_path, REDIS_URL, nodes=2)
    try:
        yield w
    finally:
        await w.session.close()
        for n in w.nodes:
            await n.runner.cleanup()
        await _flush()


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
        await _flush()
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

    client = aioredis.from_url(REDIS_URL)
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
