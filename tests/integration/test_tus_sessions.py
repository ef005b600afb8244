"""Upload sessions below HTTP (`control.uploads.Uploads`), two instances standing for two control
processes on one SQLite database and one uploads directory, with bodies released in a chosen
order so each race has a known outcome: one writer at a time per session (the session's file
lock, across processes), the loser a 409 without a byte written; a dead writer's tail is cut, an
offset ahead of the stored bytes is moved back, completion and termination race safely, and
both locks' waits are bounded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from control.auth import Principal
from control.upload_files import part_path, session_flock
from control.uploads import Uploads
from control.validation import UploadRequest
from tests.backends import Backend
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import jobs, upload_sessions
from vodcore.errors import ApiError
from vodcore.store.fs import FilesystemStore

OWNER = Principal("key_owner", "creator")


@pytest.fixture
async def pair(tmp_path: Path, backend: Backend) -> AsyncIterator[tuple[Uploads, Uploads]]:
    """Two `Uploads` with their own engines and locks, sharing database (`--backend`'s) and
    uploads directory; the object store is the filesystem whatever the backend (these tests
    look at `.part`; tus on S3 is tests/integration/test_s3_uploads.py)."""
    settings = Settings(data_dir=tmp_path, database_url=backend.database_url)
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


async def test_one_writer_at_a_time_across_processes(pair: tuple[Uploads, Uploads]) -> None:
    """Two PATCHes at one offset in two processes: the first holds the session's file lock
    while its body arrives; the second waits for it, then finds the offset moved: a 409, and
    not a byte of its body was read or written."""
    a, b = pair
    sid = await new_session(a, 1000)
    body_a, body_b = b"A" * 300, b"B" * 400
    gate_a, gate_b = asyncio.Event(), asyncio.Event()
    in_a, in_b = asyncio.Event(), asyncio.Event()
    gate_b.set()
    now = time.time()
    ta = asyncio.create_task(a.patch(sid, 0, gated(body_a, gate_a, in_a), now=now))
    await asyncio.wait_for(in_a.wait(), 5)  # a is writing
    tb = asyncio.create_task(b.patch(sid, 0, gated(body_b, gate_b, in_b), now=now))
    await asyncio.sleep(0.2)
    assert not tb.done() and not in_b.is_set()  # b waits for the lock, its body unread
    gate_a.set()
    assert (await asyncio.wait_for(ta, 5)).offset == 300
    with pytest.raises(ApiError) as e:
        await asyncio.wait_for(tb, 5)
    assert e.value.kind.status == 409 and e.value.headers["Upload-Offset"] == "300"
    assert not in_b.is_set()
    assert a.part_path(sid).read_bytes() == body_a


@pytest.mark.parametrize("waiter", ["same process", "other process"])
async def test_the_lock_wait_is_bounded(pair: tuple[Uploads, Uploads], waiter: str) -> None:
    """A second PATCH waits at most `lock_wait` for the first: for this process's lock (same
    process) or for the session's file lock (another process), then it is a 409."""
    a, b = pair
    second = a if waiter == "same process" else b
    second.lock_wait = 0.1
    sid = await new_session(a, 1000)
    now = time.time()
    gate, arrived = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(a.patch(sid, 0, gated(b"1" * 10, gate, arrived), now=now))
    await asyncio.wait_for(arrived.wait(), 5)
    with pytest.raises(ApiError) as e:
        await second.patch(sid, 0, _body(b"2" * 10), now=now)
    assert e.value.kind.status == 409 and "in progress" in e.value.message
    gate.set()
    assert (await first).offset == 10
    assert a.part_path(sid).read_bytes() == b"1" * 10
    assert a._locks == {} and b._locks == {}  # no lock entries outlive their users


async def test_a_dead_writers_tail_is_cut(pair: tuple[Uploads, Uploads]) -> None:
    """A writer that died after writing its body but before its CAS left bytes past the
    offset: they are not the upload's, and the next PATCH writes over them."""
    a, b = pair
    sid = await new_session(a, 20)
    now = time.time()
    await a.patch(sid, 0, _body(b"0123456789"), now=now)
    path = a.part_path(sid)
    path.write_bytes(path.read_bytes() + b"GARBAGE-GARBAGE")  # past the offset, uncommitted
    s = await b.session(sid, now)
    assert s.offset == 10 and await b.settled_offset(s) == 10
    done = await b.patch(sid, 10, _body(b"abcdefghij"), now=now)
    assert done.completed
    vid = s.video_id
    assert (b.settings.store_dir / "source" / vid / "original").read_bytes() == (
        b"0123456789abcdefghij"
    )


async def test_a_body_that_falls_silent_frees_the_lock(pair: tuple[Uploads, Uploads]) -> None:
    """A vanished client (no FIN, no bytes) counts as cut short after `body_idle` seconds: what
    arrived is kept, the lock is freed, the client resumes from the new offset."""
    a, _b = pair
    a.body_idle = 0.2
    sid = await new_session(a, 100)
    now = time.time()
    never = asyncio.Event()
    arrived = asyncio.Event()
    with pytest.raises(ApiError) as e:
        await asyncio.wait_for(a.patch(sid, 0, gated(b"k" * 40, never, arrived), now=now), 5)
    assert e.value.kind.status == 400 and "interrupted" in e.value.message
    assert (await a.session(sid, now)).offset == 40
    assert (await a.patch(sid, 40, _body(b"m" * 60), now=now)).completed


async def test_a_lost_commit_moves_the_offset_back(pair: tuple[Uploads, Uploads]) -> None:
    """`.part` holds less than the offset says (a disk that lost data): HEAD moves it back."""
    a, b = pair
    sid = await new_session(a, 1000)
    now = time.time()
    await a.patch(sid, 0, _body(b"x" * 100), now=now)
    async with a.engine.begin() as conn:
        await conn.execute(
            update(upload_sessions).where(upload_sessions.c.id == sid).values(offset=300)
        )
    s = await a.session(sid, now)
    async with session_flock(a.dir, sid, 5):  # a writer holds the lock: the repair waits
        with pytest.raises(ApiError) as e:
            b.lock_wait = 0.1
            await b.settled_offset(s)
        assert e.value.kind.status == 409
    b.lock_wait = 5
    assert await b.settled_offset(s) == 100
    assert (await a.session(sid, now)).offset == 100
    assert part_path(a.dir, sid).stat().st_size == 100
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


async def test_completion_whose_link_went_with_the_winners_cleanup(
    pair: tuple[Uploads, Uploads], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interleaving CI once hit: b links the part under the lock and is about to store it
    when a's whole completion runs and removes the session's files, b's link among them. b
    answers like a repeat completion (same video, one job), not with a 500."""
    a, b = pair
    sid = await new_session(a, 10)
    now = time.time()
    gate, arrived = asyncio.Event(), asyncio.Event()
    gate.set()
    body = gated(b"0123456789", gate, arrived)
    assert (await a._commit(await a.session(sid, now), body, None, None))[0] == 10
    b_linked, a_done = asyncio.Event(), asyncio.Event()
    real_put = b.store.put_file

    async def put_after_a(key: str, src: Path, *, move: bool = False) -> object:
        b_linked.set()
        await a_done.wait()
        return await real_put(key, src, move=move)

    monkeypatch.setattr(b.store, "put_file", put_after_a)
    tb = asyncio.create_task(b.complete(sid, now))
    await asyncio.wait_for(b_linked.wait(), 5)
    ra = await a.complete(sid, now)
    a_done.set()
    rb = await asyncio.wait_for(tb, 5)
    assert ra == rb and ra[1] == "UPLOADED"
    async with a.engine.connect() as conn:
        assert len((await conn.execute(select(jobs.c.id))).all()) == 1
    assert (a.settings.store_dir / "source" / ra[0] / "original").read_bytes() == b"0123456789"
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


async def _body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_a_cancelled_patch_keeps_what_arrived(pair: tuple[Uploads, Uploads]) -> None:
    """A handler cancelled mid-body (a server's timeout, a shutdown) keeps the bytes that
    arrived, moves the offset to them, and lets the cancellation go on."""
    a, _b = pair
    sid = await new_session(a, 100)
    now = time.time()
    never, arrived = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(a.patch(sid, 0, gated(b"k" * 40, never, arrived), now=now))
    await asyncio.wait_for(arrived.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await a.session(sid, now)).offset == 40
    assert part_path(a.dir, sid).read_bytes() == b"k" * 40
    assert (await a.patch(sid, 40, _body(b"m" * 60), now=now)).completed
