"""The durable job queue on every backend it must hold for: SQLite and PostgreSQL
(STYLE.md habit 10), in every run whatever --backend says (`own_backends`). PostgreSQL runs on
127.0.0.1 on this machine kind (a private database of the run's, tests/backends.py); if it is
missing in CI the test fails loudly rather than skipping."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.backends import Backends
from vodcore.db import jobs as q
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import jobs

pytestmark = pytest.mark.own_backends


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(
    request: pytest.FixtureRequest, tmp_path: Path, backends: Backends
) -> AsyncIterator[AsyncEngine]:
    with contextlib.ExitStack() as undo:
        if request.param == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path / 'q.db'}"
        else:
            url = undo.enter_context(backends.postgres())
        eng = make_engine(url)
        await create_schema(eng)
        yield eng
        await eng.dispose()


async def test_enqueue_is_idempotent_and_claims_are_exclusive(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        a = await q.enqueue(conn, "vid_a", "transcode", now=100)
        assert await q.enqueue(conn, "vid_a", "transcode", now=101) == a
        await q.enqueue(conn, "vid_b", "transcode", now=100)
    got = await asyncio.gather(
        *(q.claim(engine, f"w{i}", now=200, lease_seconds=30, kinds=("transcode",))
          for i in range(4))
    )  # fmt: skip
    claimed = [j for j in got if j is not None]
    assert sorted(j.video_id for j in claimed) == ["vid_a", "vid_b"]
    assert await q.claim(engine, "w9", now=201, lease_seconds=30, kinds=("transcode",)) is None


async def test_expired_lease_moves_the_job_and_fences_the_old_worker(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await q.enqueue(conn, "vid_a", "transcode", now=0)
    first = await q.claim(engine, "dead", now=10, lease_seconds=30, kinds=("transcode",))
    assert first is not None
    assert await q.claim(engine, "w2", now=39, lease_seconds=30, kinds=("transcode",)) is None
    second = await q.claim(engine, "w2", now=41, lease_seconds=30, kinds=("transcode",))
    assert second is not None and second.id == first.id and second.attempts == 2
    # The worker that lost its lease can neither extend it nor complete the job.
    assert not await q.heartbeat(engine, first, now=42, lease_seconds=30, progress=50)
    async with engine.begin() as conn:
        assert not await q.complete(conn, first, now=43)
        assert await q.complete(conn, second, now=44)


async def test_retry_with_backoff_then_final_failure(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await q.enqueue(conn, "vid_a", "transcode", now=0, max_attempts=2)
    job = await q.claim(engine, "w", now=1, lease_seconds=30, kinds=("transcode",))
    assert job is not None
    async with engine.begin() as conn:
        assert not await q.fail(conn, job, now=2, error="boom", permanent=False)
    assert await q.claim(engine, "w", now=3, lease_seconds=30, kinds=("transcode",)) is None
    job = await q.claim(engine, "w", now=2 + q.backoff_seconds(1), lease_seconds=30,
                        kinds=("transcode",))  # fmt: skip
    assert job is not None and job.attempts == 2
    async with engine.begin() as conn:
        assert await q.fail(conn, job, now=10, error="boom again", permanent=False)
    assert await q.claim(engine, "w", now=10_000, lease_seconds=30, kinds=("transcode",)) is None


def test_backoff_is_bounded() -> None:
    assert [q.backoff_seconds(n) for n in (1, 2, 3)] == [2, 4, 8]
    assert q.backoff_seconds(50) == 300


async def _claim(engine: AsyncEngine, worker: str, now: float) -> q.Job | None:
    return await q.claim(engine, worker, now=now, lease_seconds=30, kinds=("a", "b", "join"))


async def test_a_dependent_waits_for_every_parent_then_keeps_its_place(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        join = await q.enqueue(conn, "v", "join", now=1, version=2, waiting=2)
        await q.enqueue(conn, "v", "a", now=1, version=2, payload={"x": 1}, then_job=join)
        await q.enqueue(conn, "v", "b", now=1, version=2, then_job=join)
        await q.enqueue(conn, "w", "a", now=1)  # another video's job, same enqueue time
        # one job per (video, kind, version): a retried planner creates nothing twice
        assert await q.enqueue(conn, "v", "join", now=5, version=2, waiting=2) == join
    a = await _claim(engine, "w1", 10)
    b = await _claim(engine, "w2", 10)
    assert a is not None and b is not None
    assert (a.kind, a.version, a.payload) == ("a", 2, {"x": 1}) and b.kind == "b"

    # the two parents finish at once, in two transactions: the join is queued exactly once
    async def finish(job: q.Job, result: dict[str, int]) -> None:
        async with engine.begin() as conn:
            assert await q.complete(conn, job, now=20, result=result)

    await asyncio.gather(finish(a, {"a": 1}), finish(b, {"b": 2}))
    # the join goes before the other video's job: it kept its enqueue time and lower id
    j = await _claim(engine, "w3", 30)
    assert j is not None and j.id == join
    async with engine.connect() as conn:
        assert await q.results(conn, "v", 2) == {"a": {"a": 1}, "b": {"b": 2}}


async def test_a_parent_that_fails_for_good_fails_its_dependents(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        last = await q.enqueue(conn, "v", "b", now=1, version=1, waiting=1)
        join = await q.enqueue(conn, "v", "join", now=1, version=1, waiting=1, then_job=last)
        await q.enqueue(conn, "v", "a", now=1, version=1, then_job=join, max_attempts=1)
    a = await _claim(engine, "w1", 10)
    assert a is not None and a.kind == "a"
    async with engine.begin() as conn:
        assert await q.fail(conn, a, now=11, error="boom", permanent=False)
    assert await _claim(engine, "w1", 12) is None  # nothing is left waiting for ever
    async with engine.connect() as conn:
        rows = (await conn.execute(select(jobs.c.kind, jobs.c.state, jobs.c.last_error))).all()
    states = {r.kind: (r.state, r.last_error) for r in rows}
    assert states["join"] == ("failed", "a failed: boom")
    assert states["b"][0] == "failed"
