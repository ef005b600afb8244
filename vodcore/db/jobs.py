"""A durable job queue in the metadata store: a table with leases, and dependencies (a DAG).

- `enqueue` is idempotent per (video, kind, version, part): a repeat returns the existing job.
- dependencies: a job enqueued with `waiting=N` starts `blocked`; each of its N parents names
  it as `then_job`, and `complete` on a parent decrements `waiting` in the same transaction
  (one atomic UPDATE, safe when two parents finish at once) and queues it at zero. A parent
  that fails for good fails its dependents too (`fail`), so nothing waits for ever. A parent
  passes its output to dependents as `result`; `results` reads them.
- `claim` takes the oldest runnable job (queued and due, or running with an expired lease)
  with a compare-and-set UPDATE, so two workers never hold one job; it runs unchanged on SQLite
  and PostgreSQL (no SKIP LOCKED needed at this scale; PostgreSQL can add it later).
- a worker `heartbeat`s to extend its lease; a worker killed mid-job simply stops heart-beating
  and its job is claimed again once the lease expires.
- `fail` either re-queues with backoff or, when attempts are used up or the failure is
  permanent, marks the job failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, case, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from vodcore.db.schema import jobs


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    video_id: str
    kind: str
    attempts: int
    max_attempts: int
    lease_owner: str
    version: int = 0
    payload: dict[str, Any] | None = None
    part: int = 0


def backoff_seconds(attempts: int) -> float:
    """Pure: delay before attempt `attempts + 1` (2 s, 4 s, 8 s … capped at 5 min)."""
    return float(min(300, 2**attempts))


async def enqueue(
    conn: AsyncConnection,
    video_id: str,
    kind: str,
    now: float,
    max_attempts: int = 3,
    *,
    version: int = 0,
    part: int = 0,
    payload: dict[str, Any] | None = None,
    waiting: int = 0,
    then_job: int | None = None,
) -> int:
    row = (
        await conn.execute(
            select(jobs.c.id).where(
                and_(
                    jobs.c.video_id == video_id,
                    jobs.c.kind == kind,
                    jobs.c.version == version,
                    jobs.c.part == part,
                )
            )
        )
    ).first()
    if row:
        return int(row.id)
    res = await conn.execute(
        jobs.insert().values(
            video_id=video_id,
            kind=kind,
            version=version,
            part=part,
            payload=payload,
            waiting=waiting,
            then_job=then_job,
            state="blocked" if waiting > 0 else "queued",
            attempts=0,
            max_attempts=max_attempts,
            run_after=now,
            created_at=now,
            updated_at=now,
        )
    )
    pk = res.inserted_primary_key
    assert pk is not None
    return int(pk[0])


async def claim(
    engine: AsyncEngine, worker: str, now: float, lease_seconds: float, kinds: tuple[str, ...]
) -> Job | None:
    runnable = or_(
        and_(jobs.c.state == "queued", jobs.c.run_after <= now),
        and_(jobs.c.state == "running", jobs.c.lease_expires_at < now),
    )
    for _ in range(5):
        async with engine.begin() as conn:
            row = (
                await conn.execute(
                    select(jobs)
                    .where(and_(runnable, jobs.c.kind.in_(kinds)))
                    .order_by(jobs.c.run_after, jobs.c.id)
                    .limit(1)
                )
            ).first()
            if row is None:
                return None
            res = await conn.execute(
                update(jobs)
                .where(and_(jobs.c.id == row.id, jobs.c.updated_at == row.updated_at, runnable))
                .values(
                    state="running",
                    lease_owner=worker,
                    lease_expires_at=now + lease_seconds,
                    attempts=row.attempts + 1,
                    updated_at=now,
                )
            )
            if res.rowcount == 1:
                return Job(
                    row.id,
                    row.video_id,
                    row.kind,
                    row.attempts + 1,
                    row.max_attempts,
                    worker,
                    row.version,
                    row.payload,
                    row.part,
                )
    return None


def _held(job: Job) -> ColumnElement[bool]:
    """The row is still this worker's running lease (a re-claimed job has another owner)."""
    return and_(
        jobs.c.id == job.id, jobs.c.lease_owner == job.lease_owner, jobs.c.state == "running"
    )


async def heartbeat(
    engine: AsyncEngine, job: Job, now: float, lease_seconds: float, progress: float | None
) -> bool:
    """Extend the lease; False means the lease was lost (another worker took the job)."""
    async with engine.begin() as conn:
        res = await conn.execute(
            update(jobs)
            .where(_held(job))
            .values(lease_expires_at=now + lease_seconds, progress=progress, updated_at=now)
        )
        return res.rowcount == 1


async def complete(
    conn: AsyncConnection, job: Job, now: float, result: dict[str, Any] | None = None
) -> bool:
    """Mark the job done with its `result` and unblock its dependent. False: not our lease."""
    res = await conn.execute(
        update(jobs)
        .where(_held(job))
        .values(state="done", lease_expires_at=None, progress=100.0, result=result, updated_at=now)
        .returning(jobs.c.then_job)
    )
    row = res.first()
    if row is None:
        return False
    if row.then_job is not None:
        await conn.execute(
            update(jobs)
            .where(jobs.c.id == row.then_job)
            .values(
                waiting=jobs.c.waiting - 1,
                # run_after stays the enqueue time: a dependent keeps its place in the queue
                # (a publish goes before later encodes), it does not join the back of it
                state=case((jobs.c.waiting <= 1, "queued"), else_=jobs.c.state),
                updated_at=now,
            )
        )
    return True


async def results(conn: AsyncConnection, video_id: str, version: int) -> dict[str, Any]:
    """{kind: result} of the finished single-part jobs that built `version` of the video."""
    rows = await conn.execute(
        select(jobs.c.kind, jobs.c.result).where(
            and_(
                jobs.c.video_id == video_id,
                jobs.c.version == version,
                jobs.c.part == 0,
                jobs.c.state == "done",
            )
        )
    )
    return {r.kind: r.result for r in rows}


async def part_results(
    conn: AsyncConnection, video_id: str, version: int, kind: str
) -> list[dict[str, Any] | None]:
    """The results of every part of a many-part stage (e.g. chunks), in part order; a part
    not done yet shows as None."""
    rows = await conn.execute(
        select(jobs.c.state, jobs.c.result)
        .where(and_(jobs.c.video_id == video_id, jobs.c.version == version, jobs.c.kind == kind))
        .order_by(jobs.c.part)
    )
    return [r.result if r.state == "done" else None for r in rows]


async def _fail_dependents(
    conn: AsyncConnection, then_job: int | None, now: float, why: str
) -> None:
    seen = 0
    while then_job is not None and seen < 32:  # a chain, never a cycle; bounded anyway
        row = (
            await conn.execute(
                update(jobs)
                .where(and_(jobs.c.id == then_job, jobs.c.state == "blocked"))
                .values(state="failed", last_error=why[:2000], updated_at=now)
                .returning(jobs.c.then_job)
            )
        ).first()
        then_job = row.then_job if row else None
        seen += 1


async def release(engine: AsyncEngine, job: Job, now: float) -> bool:
    """Give a running job back (graceful stop): queued again at once, the attempt not counted."""
    async with engine.begin() as conn:
        res = await conn.execute(
            update(jobs)
            .where(_held(job))
            .values(
                state="queued",
                lease_owner=None,
                lease_expires_at=None,
                attempts=jobs.c.attempts - 1,
                run_after=now,
                updated_at=now,
            )
        )
        return res.rowcount == 1


async def fail(conn: AsyncConnection, job: Job, now: float, error: str, *, permanent: bool) -> bool:
    """Record a failure. Returns True when the job is finally failed (no more retries)."""
    final = permanent or job.attempts >= job.max_attempts
    row = (
        await conn.execute(
            update(jobs)
            .where(_held(job))
            .values(
                state="failed" if final else "queued",
                lease_owner=None,
                lease_expires_at=None,
                last_error=error[:2000],
                run_after=now + (0 if final else backoff_seconds(job.attempts)),
                updated_at=now,
            )
            .returning(jobs.c.then_job)
        )
    ).first()
    if final and row is not None:
        await _fail_dependents(conn, row.then_job, now, f"{job.kind} failed: {error}")
    return final
