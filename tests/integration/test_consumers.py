"""Event-log consumers: offsets move with the derived writes, in one transaction (on the database
`--backend` names: SQLite or PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tests.backends import Backend
from vodcore.db import consumers as c
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.videos import append_event


@pytest.fixture
async def engine(tmp_path: Path, backend: Backend) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(backend.settings(tmp_path).db_url)
    await create_schema(eng)
    yield eng
    await eng.dispose()


async def test_a_batch_and_its_offset_commit_together(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        for i in range(5):
            await append_event(conn, "video.state" if i % 2 else "other", f"v{i}", {"i": i}, i)
    seen: list[int] = []

    async def failing(_conn: AsyncConnection, evs: Sequence[c.Event]) -> None:
        raise RuntimeError("crash mid-batch")

    with pytest.raises(RuntimeError):
        await c.run_once(engine, "t", failing, now=10)
    assert await c.lag(engine, "t") == 5  # nothing applied, the offset did not move

    async def handler(_conn: AsyncConnection, evs: Sequence[c.Event]) -> None:
        seen.extend(e.payload["i"] for e in evs)

    assert await c.run_once(engine, "t", handler, now=11, kinds=("video.state",), batch=3) == 3
    assert seen == [1] and await c.lag(engine, "t") == 2
    assert await c.run_once(engine, "t", handler, now=12, kinds=("video.state",)) == 2
    assert seen == [1, 3] and await c.lag(engine, "t") == 0
    assert await c.run_once(engine, "t", handler, now=13) == 0
    await c.reset(engine, "t", now=14)  # a rebuild replays from the start
    assert await c.lag(engine, "t") == 5
