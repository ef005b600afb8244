"""Upload sessions below HTTP (`control.uploads.Uploads`), two instances standing for two control
processes on one SQLite database and one uploads directory, with bodies released in a chosen
order so each race has a known outcome: the database compare-and-set decides a PATCH race, a
lost commit is repaired, completion and termination race safely, and the per-process lock is
bounded."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from control.auth import Principal
from control.uploads import Uploads, chunk_path, stage_path
from control.validation import UploadRequest
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import jobs, upload_sessions
from vodcore.errors import ApiError
from vodcore.store.fs import FilesystemStore

OWNER = Principal("key_owner", "creator")


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Uploads, Uploads]]:
    """Two `Uploads` with their own engines and locks, sharing database and directory."""
    settings = Settings(data_dir=tmp_path)
    made = []
    for _ in range(2):
        engine = make_engine(settings.db_url)
        await create_schema(engine)
        made.append(Uploads(settings, engine, FilesystemStore(settings.store_dir)))
    try:
        yield made[0], made[1]
    finally:
        for u in made:
            await u.engine.dispose()


async def gated(data: bytes, gate: asyncio.Event, arrived: asyncio.Event) -> AsyncIterator[bytes]:
    """A body whose bytes all arrive at once but which ends only when `gate` opens."""
    yield data
    arrived.set()
    await gate.wait()


async def new_session(u: Uploads, size: int) -> str:
    req = UploadRequest("t", "", "public", None, size)
    return (await u.create(req, OWNER.key_id, time.time(), {})).session_id


def leftovers(u: Uploads, sid: str) -> list[str]:
    return sorted(p.name for p in u.dir.glob(f"{sid}.*") if not p.name.endswith(".part"))


async def test_the_database_cas_decides_a_race_between_processes(
    pair: tuple[Uploads, Uploads],
) -> None:
    a, b = pair
    sid = await new_session(a, 1000)
    body_a, body_b = b"A" * 300, b"B" * 400
    gate_a, gate_b = asyncio.Event(), asyncio.Event()
    in_a, in_b = asyncio.Event(), asyncio.Event()
    now = time.time()
    ta = asyncio.create_task(a.patch(sid, 0, gated(body_a, gate_a, in_a), now=now))
    tb = asyncio.create_task(b.patch(sid, 0, gated(body_b, gate_b, in_b), now=now))
    await asyncio.wait_for(asyncio.gather(in_a.wait(), in_b.wait()), 5)  # both staged
    gate_b.set()
    assert (await asyncio.wait_for(tb, 5)).offset == 400
    gate_a.set()
    with pytest.raises(ApiError) as e:
        await asyncio.wait_for(ta, 5)
    assert e.value.kind.status == 409 and e.value.headers["Upload-Offset"] == "400"
    assert a.part_path(sid).read_bytes() == body_b
    assert leftovers(a, sid) == []  # the loser's stage is gone


async def test_a_lost_commit_moves_the_offset_back(pair: tuple[Uploads, Uploads]) -> None:
    """A winner that died between its CAS and its rename: the offset is ahead of the bytes."""
    a, b = pair
    sid = await new_session(a, 1000)
    now = time.time()
    await a.patch(sid, 0, _body(b"x" * 100), now=now)
    async with a.engine.begin() as conn:
        await conn.execute(
            update(upload_sessions).where(upload_sessions.c.id == sid).values(offset=300)
        )
    chunk_path(a.dir, sid, 200).write_bytes(b"z" * 100)  # a later chunk past the gap
    stage = stage_path(a.dir, sid, 100)
    stage.write_bytes(b"y" * 200)  # looks like a commit under way: left alone
    s = await a.session(sid, now)
    assert await a.settled_offset(s) == 300
    b.stage_grace = 0.0  # …until it has sat still for the grace period
    assert await b.settled_offset(s) == 100
    assert (await a.session(sid, now)).offset == 100
    assert not chunk_path(a.dir, sid, 200).exists()  # beyond the new offset: dropped
    stage.unlink()
    await b.patch(sid, 100, _body(b"y" * 900), now=now)
    assert (a.settings.store_dir / "source").exists()
    vid = (await a.session(sid, now)).video_id
    assert (a.settings.store_dir / "source" / vid / "original").read_bytes() == (
        b"x" * 100 + b"y" * 900
    )


async def test_racing_completions_store_once(pair: tuple[Uploads, Uploads]) -> None:
    a, b = pair
    sid = await new_session(a, 10)
    now = time.time()
    gate, arrived = asyncio.Event(), asyncio.Event()
    gate.set()
    # bytes in, completion not yet run: commit through the private helper path
    s = await a.session(sid, now)
    await a._commit(s, gated(b"0123456789", gate, arrived), None, None)
    results = await asyncio.gather(a.complete(sid, now), b.complete(sid, now))
    assert results[0] == results[1] and results[0][1] == "UPLOADED"
    async with a.engine.connect() as conn:
        assert len((await conn.execute(select(jobs.c.id))).all()) == 1
    vid = results[0][0]
    assert (a.settings.store_dir / "source" / vid / "original").read_bytes() == b"0123456789"
    assert sorted(p.name for p in a.dir.glob(f"{sid}.*")) == []


async def test_termination_beats_a_patch_in_flight(pair: tuple[Uploads, Uploads]) -> None:
    a, b = pair
    sid = await new_session(a, 1000)
    now = time.time()
    gate, arrived = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(a.patch(sid, 0, gated(b"q" * 500, gate, arrived), now=now))
    await asyncio.wait_for(arrived.wait(), 5)
    await b.terminate(sid, OWNER, now)
    gate.set()
    with pytest.raises(ApiError) as e:
        await asyncio.wait_for(task, 5)
    assert e.value.kind.status == 404
    assert list(a.dir.glob(f"{sid}.*")) == []


async def test_the_process_lock_wait_is_bounded(pair: tuple[Uploads, Uploads]) -> None:
    a, _b = pair
    a.lock_wait = 0.1
    sid = await new_session(a, 1000)
    now = time.time()
    gate, arrived = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(a.patch(sid, 0, gated(b"1" * 10, gate, arrived), now=now))
    await asyncio.wait_for(arrived.wait(), 5)
    with pytest.raises(ApiError) as e:
        await a.patch(sid, 0, _body(b"2" * 10), now=now)
    assert e.value.kind.status == 409 and "in progress" in e.value.message
    gate.set()
    assert (await first).offset == 10
    assert a._locks == {}  # no lock entries outlive their users


async def _body(data: bytes) -> AsyncIterator[bytes]:
    yield data


def test_stage_names_are_private() -> None:
    d = Path("/tmp")
    assert stage_path(d, "us_x", 5) != stage_path(d, "us_x", 5)
    assert os.path.basename(stage_path(d, "us_x", 5)).startswith("us_x.00000000000000000005.")
