"""A durable job queue in the metadata store: a table with leases.

- `enqueue` is idempotent per (video, kind): a repeat returns the existing job.
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

from sqlalchemy import ColumnElement, and_, or_, select, update
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


def backoff_seconds(attempts: int) -> float:
    """Pure: delay before attempt `attempts + 1` (2 s, 4 s, 8 s … capped at 5 min)."""
    return float(min(300, 2**attempts))


async def enqueue(
    conn: AsyncConnection, video_id: str, kind: str, now: float, max_attempts: int = 3
) -> int:
    row = (
        await conn.execute(
            select(jobs.c.id).where(and_(jobs.c.video_id == video_id, jobs.c.kind == kind))
        )
    ).first()
    if row:
        return int(row.id)
    res = await conn.execute(
        jobs.insert().values(
            video_id=video_id,
            kind=kind,
            state="queued",
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
                    row.id, row.video_id, row.kind, row.attempts + 1, row.max_attempts, worker
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


async def complete(conn: AsyncConnection, job: Job, now: float) -> bool:
    res = await conn.execute(
        update(jobs)
        .where(_held(job))
        .values(state="done", lease_expires_at=None, progress=100.0, updated_at=now)
    )
    return res.rowcount == 1


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
    )
    return final
