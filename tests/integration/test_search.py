"""Search on SQLite (FTS5) and PostgreSQL (tsvector + GIN): the index follows the event log.

Both in every run, whatever --backend says (`own_backends`). PostgreSQL runs on 127.0.0.1 on this
machine kind (a private database of the run's, tests/backends.py); if it is missing the tests
fail loudly rather than skip."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from control.app import make_app
from control.search import CONSUMER, Indexer, Search
from tests.backends import Backends
from vodcore.config import Settings
from vodcore.db import consumers
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import videos
from vodcore.db.search_schema import search_docs
from vodcore.db.videos import append_event, transition
from vodcore.lifecycle import Event, State

COUNTERS_DDL = (
    "CREATE TABLE IF NOT EXISTS video_counters (video_id VARCHAR(40) PRIMARY KEY, "
    "views BIGINT NOT NULL DEFAULT 0, likes BIGINT NOT NULL DEFAULT 0)"
)

Client = Callable[..., Awaitable[TestClient[Any, Any]]]


pytestmark = pytest.mark.own_backends


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, backends: Backends) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 's.db'}"
        return
    with backends.postgres() as url:  # private and empty
        yield url


@pytest.fixture(autouse=True)
def no_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    # PostgreSQL consumers wait SETTLE_SECONDS for commits in flight; these tests append and
    # commit before they index, so nothing is in flight
    monkeypatch.setattr(consumers, "SETTLE_SECONDS", 0.0)


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(db_url)
    await create_schema(eng)
    yield eng
    await eng.dispose()


@pytest.fixture
async def client(
    engine: AsyncEngine, db_url: str, tmp_path: Path, aiohttp_client: Client
) -> TestClient[Any, Any]:
    # the tests drive the indexer step by step: no background one in the app
    settings = Settings(data_dir=tmp_path / "var", database_url=db_url, search_indexer=False)
    app = make_app(settings)
    return await aiohttp_client(app)


async def add_video(
    engine: AsyncEngine,
    vid: str,
    title: str,
    description: str = "",
    visibility: str = "public",
    ready: bool = True,
) -> None:
    now = time.time()
    async with engine.begin() as conn:
        await conn.execute(
            videos.insert().values(
                id=vid, title=title, description=description, visibility=visibility,
                state=State.UPLOADING.value, created_at=now, updated_at=now,
            )
        )  # fmt: skip
        await append_event(conn, "video.created", vid, {"title": title}, now)
        if ready:
            for ev in (Event.UPLOAD_COMPLETE, Event.PROCESSING_STARTED, Event.PUBLISHED):
                await transition(conn, vid, ev, now)


async def patch(engine: AsyncEngine, vid: str, **fields: str) -> None:
    """What PATCH /v1/videos/{id} does: the change and its `video.updated` event together."""
    async with engine.begin() as conn:
        await conn.execute(update(videos).where(videos.c.id == vid).values(fields))
        await append_event(conn, "video.updated", vid, fields, time.time())


async def block(engine: AsyncEngine, vid: str) -> None:
    async with engine.begin() as conn:
        await transition(conn, vid, Event.BLOCK, time.time())


async def catch_up(engine: AsyncEngine) -> Indexer:
    ix = Indexer(engine)
    await ix.ensure()
    while await ix.run_once(time.time(), batch=7):
        pass
    assert await ix.update_lag() == 0
    return ix


async def ids(client: TestClient[Any, Any], q: str, **params: str) -> list[str]:
    r = await client.get("/v1/search", params={"q": q, **params})
    assert r.status == 200, await r.text()
    return [x["videoId"] for x in (await r.json())["results"]]


async def snapshot(engine: AsyncEngine) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(search_docs.c.video_id, search_docs.c.title, search_docs.c.description)
            .order_by(search_docs.c.video_id)
        )  # fmt: skip
        out = [tuple(r) for r in rows]
        if engine.dialect.name == "sqlite":
            n = (await conn.execute(text("SELECT count(*) FROM search_fts"))).scalar()
            assert n == len(out)
    return out


async def test_ready_public_videos_become_searchable(
    engine: AsyncEngine, client: TestClient[Any, Any]
) -> None:
    await add_video(engine, "vid_a", "Cooking pasta at home", "a quick dinner")
    await add_video(engine, "vid_b", "Pasta carbonara", "classic Roman recipe")
    await add_video(engine, "vid_c", "Pasta still processing", ready=False)
    await add_video(engine, "vid_d", "Pasta private", visibility="private")
    await add_video(engine, "vid_e", "Pasta unlisted", visibility="unlisted")
    await add_video(engine, "vid_f", "Pasta blocked")
    await block(engine, "vid_f")
    assert await ids(client, "pasta") == []  # nothing indexed before the consumer runs
    await catch_up(engine)
    assert sorted(await ids(client, "pasta")) == ["vid_a", "vid_b"]
    assert await ids(client, "roman recipe") == ["vid_b"]  # description is searched
    assert await ids(client, "CARBONARA") == ["vid_b"]
    r = await client.get("/v1/search", params={"q": "carbonara"})
    body = await r.json()
    assert body == {
        "results": [
            {"videoId": "vid_b", "title": "Pasta carbonara", "thumbnailUrl": None, "viewCount": 0}
        ],
        "nextCursor": None,
    }
    # the title weighs more than the description
    await add_video(engine, "vid_g", "Dinner party", "pasta, pasta")
    await add_video(engine, "vid_h", "Dinner", "")
    await catch_up(engine)
    assert (await ids(client, "dinner"))[0] in ("vid_h", "vid_g")
    assert (await ids(client, "dinner"))[-1] == "vid_a"


async def test_unicode_titles(engine: AsyncEngine, client: TestClient[Any, Any]) -> None:
    await add_video(engine, "vid_u", "Caf\u00e9 \u2013 東京 🎥", "Ünïcödé déscription")
    await add_video(engine, "vid_v", "Straße in München")
    await catch_up(engine)
    r = await client.get("/v1/search", params={"q": "東京"})
    assert (await r.json())["results"][0]["title"] == "Caf\u00e9 \u2013 東京 🎥"
    assert await ids(client, "café") == ["vid_u"]
    assert await ids(client, "CAFÉ 東京") == ["vid_u"]
    assert await ids(client, "münchen") == ["vid_v"]
    assert await ids(client, "🎥") == []
    if engine.dialect.name == "sqlite":  # remove_diacritics 2
        assert await ids(client, "cafe") == ["vid_u"]
        assert await ids(client, "unicode") == ["vid_u"]
        assert await ids(client, "munchen") == ["vid_v"]


HOSTILE = [
    '"',
    '""',
    "'",
    "*",
    "a*",
    "-",
    "-pasta",
    ":",
    "title:pasta",
    "(",
    ")",
    "(pasta",
    "NEAR",
    "NEAR(pasta dinner)",
    "pasta AND",
    "OR",
    "NOT pasta",
    "^pasta",
    "{title}: pasta",
    "%",
    "_",
    "\\",
    "'; DROP TABLE videos; --",
    "pasta\x00",
    "\x00",
    "&|!<->",
    "a:*",
    "!!",
    "@@",
    "\u02bc",
    "\u200b",
    "\ufeff",
    "🎥🎥",
    "x" * 200,
    '日本語 "東京" -大阪',
    'pas"ta',
    "pasta'",
    "$1",
    ":q",
    "?",
    "\ud800",
]


async def test_hostile_queries_never_500(engine: AsyncEngine, client: TestClient[Any, Any]) -> None:
    await add_video(engine, "vid_a", "Pasta dinner", "title: pasta (NEAR) -x")
    await catch_up(engine)
    for q in HOSTILE:
        for raw in (False, True):
            if raw:  # straight into the URL, percent-encoded by hand
                from urllib.parse import quote

                r = await client.get(
                    "/v1/search?q=" + quote(q.encode("utf-8", "surrogatepass"), safe="")
                )
            else:
                r = await client.get("/v1/search", params={"q": q})
            assert r.status in (200, 400, 422), (q, r.status, await r.text())
            body = await r.json()
            assert "results" in body or "error" in body
    assert await ids(client, "-pasta") == ["vid_a"]  # a term, not a negation
    assert await ids(client, "(pasta") == ["vid_a"]
    for bad in ("/v1/search", "/v1/search?q=", "/v1/search?q=%20", "/v1/search?q=a&limit=x",
                "/v1/search?q=a&limit=51", "/v1/search?q=a&limit=0"):  # fmt: skip
        r = await client.get(bad)
        assert r.status == 422 and (await r.json())["error"]["code"] == "validation_failed"
    for cur in ("x", "%%%", "eyJ2IjoxfQ", "a" * 1000):
        r = await client.get("/v1/search", params={"q": "pasta", "cursor": cur})
        assert r.status == 400 and (await r.json())["error"]["code"] == "bad_request"


async def test_updates_visibility_and_takedowns_follow_the_log(
    engine: AsyncEngine, client: TestClient[Any, Any]
) -> None:
    await add_video(engine, "vid_a", "Old title", "nothing")
    await catch_up(engine)
    assert await ids(client, "old") == ["vid_a"]
    await patch(engine, "vid_a", title="Brand new name")
    await catch_up(engine)
    assert await ids(client, "old") == []
    assert await ids(client, "brand") == ["vid_a"]
    await patch(engine, "vid_a", visibility="unlisted")
    await catch_up(engine)
    assert await ids(client, "brand") == []
    await patch(engine, "vid_a", visibility="public")
    await catch_up(engine)
    assert await ids(client, "brand") == ["vid_a"]
    await block(engine, "vid_a")
    await catch_up(engine)
    assert await ids(client, "brand") == [] and await snapshot(engine) == []


async def test_replay_is_idempotent_and_reindex_rebuilds_the_same_index(
    engine: AsyncEngine, client: TestClient[Any, Any]
) -> None:
    for i in range(12):
        await add_video(engine, f"vid_{i:02d}", f"Talk number {i}", "conference talk" * (i % 3))
    await patch(engine, "vid_03", title="Keynote talk")
    await patch(engine, "vid_04", visibility="private")
    await block(engine, "vid_05")
    await catch_up(engine)
    before = await snapshot(engine)
    r = await client.get("/v1/search", params={"q": "talk", "limit": "50"})
    results = (await r.json())["results"]
    assert len(before) == 10 and len(results) == 10
    # replay the same events again (a crash after applying, before the offset moved)
    await consumers.reset(engine, CONSUMER, time.time())
    await catch_up(engine)
    assert await snapshot(engine) == before
    # and a batch applied twice inside the handler changes nothing either
    ix = Indexer(engine)
    async with engine.begin() as conn:
        evs = [consumers.Event(1, "video.state", f"vid_{i:02d}", {}, 0.0) for i in range(12)]
        await ix.apply(conn, evs + evs)
    assert await snapshot(engine) == before
    # vod reindex: clear + replay
    lines: list[tuple[int, int]] = []
    total = await Indexer(engine).rebuild(time.time(), lambda d, lag: lines.append((d, lag)),
                                          batch=10)  # fmt: skip
    assert total >= 12 * 4 and lines and lines[-1][1] == 0
    assert await snapshot(engine) == before
    r = await client.get("/v1/search", params={"q": "talk", "limit": "50"})
    again = (await r.json())["results"]
    assert [x["videoId"] for x in again] == [x["videoId"] for x in results]


async def test_cursor_pagination_and_popularity(
    engine: AsyncEngine, client: TestClient[Any, Any]
) -> None:
    for i in range(23):
        await add_video(engine, f"vid_{i:02d}", "Same words here", "")
    await catch_up(engine)
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"q": "same words", "limit": "5"}
        if cursor:
            params["cursor"] = cursor
        r = await client.get("/v1/search", params=params)
        body = await r.json()
        seen += [x["videoId"] for x in body["results"]]
        pages += 1
        cursor = body["nextCursor"]
        if cursor is None:
            break
        if pages == 2:  # a video indexed meanwhile does not shift the pages after the cursor
            await add_video(engine, "vid_zz_new", "Same words here", "")
            await catch_up(engine)
    assert pages == 5 and len(seen) == len(set(seen))
    assert set(seen) >= {f"vid_{i:02d}" for i in range(23)}
    # a cursor belongs to its query
    r = await client.get("/v1/search", params={"q": "words", "limit": "5"})
    cur = (await r.json())["nextCursor"]
    r = await client.get("/v1/search", params={"q": "other", "cursor": cur})
    assert r.status == 400
    # popularity: views from video_counters when that table exists (engagement owns it)
    async with engine.begin() as conn:
        await conn.execute(text(COUNTERS_DDL))
        await conn.execute(
            text("INSERT INTO video_counters (video_id, views, likes) VALUES ('vid_17', 5000, 0)")
        )
    search2 = Search(engine)  # a fresh instance sees the new table at once
    from control.search import SearchRequest

    body = await search2.search(SearchRequest("same words", 3, None))
    assert body["results"][0] == {
        "videoId": "vid_17", "title": "Same words here", "thumbnailUrl": None, "viewCount": 5000,
    }  # fmt: skip
    # popularity does not bury a better textual match
    await add_video(engine, "vid_best", "Same words", "same words same words")
    await catch_up(engine)
    body = await search2.search(SearchRequest("same words", 3, None))
    assert body["results"][0]["videoId"] in ("vid_best", "vid_17")


async def test_the_indexer_task_follows_and_exports_its_lag(
    engine: AsyncEngine, db_url: str, tmp_path: Path, aiohttp_client: Client
) -> None:
    # the tests drive the indexer step by step: no background one in the app
    settings = Settings(data_dir=tmp_path / "var", database_url=db_url, search_indexer=False)
    app = make_app(settings)
    Search(engine).routes(app)

    async def indexer(_app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(Indexer(engine).follow(stop, idle=0.05))
        yield
        stop.set()
        await task

    app.cleanup_ctx.append(indexer)
    client = await aiohttp_client(app)
    for i in range(30):
        await add_video(engine, f"vid_{i:02d}", f"Live video {i}")
    deadline = time.monotonic() + 20
    while len(await ids(client, "live", limit="50")) < 30:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    while REGISTRY.get_sample_value("vod_consumer_lag", {"consumer": "search"}) != 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    r = await client.get("/metrics")
    assert 'vod_consumer_lag{consumer="search"} 0.0' in await r.text()


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_vod_reindex_command(
    db: str,
    backends: Backends,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from argparse import Namespace

    from control.search import cmd_reindex

    data = tmp_path / "var"
    data.mkdir()
    undo = contextlib.ExitStack()
    url = (
        undo.enter_context(backends.postgres())
        if db == "postgresql"
        else f"sqlite+aiosqlite:///{data / 'vod.db'}"
    )
    request.addfinalizer(undo.close)
    monkeypatch.setenv("VOD_DATABASE_URL", url)

    async def setup() -> list[tuple[Any, ...]]:
        eng = make_engine(url)
        await create_schema(eng)
        for i in range(5):
            await add_video(eng, f"vid_{i}", f"Reindexed {i}")
        await patch(eng, "vid_2", visibility="private")
        await catch_up(eng)
        snap = await snapshot(eng)
        async with eng.begin() as conn:  # a damaged index: a stray row, a missing one
            await conn.execute(search_docs.delete().where(search_docs.c.video_id == "vid_0"))
        await eng.dispose()
        return snap

    async def after() -> tuple[list[tuple[Any, ...]], int]:
        eng = make_engine(url)
        snap, lag = await snapshot(eng), await consumers.lag(eng, CONSUMER)
        await eng.dispose()
        return snap, lag

    before = asyncio.run(setup())
    assert len(before) == 4
    assert cmd_reindex(Namespace(data=str(data), config=None)) == 0
    assert asyncio.run(after()) == (before, 0)
    out = capsys.readouterr().out
    assert "reindex: done, 21 events replayed" in out
