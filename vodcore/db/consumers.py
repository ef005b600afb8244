"""Consumers of the event log (the `events` outbox): derived read models (search, counters).

Rules (DDIA's derived data):
- every state change appends an event in the same transaction as the change (the outbox), so
  the log is complete and ordered by `seq`;
- a consumer has a name and an offset (the last `seq` it applied) in `consumer_offsets`;
  `run_once` reads the next batch after the offset and applies it *in one transaction with the
  offset update*: a crash in between applies the batch again from the old offset, never half,
  so handlers only need to be idempotent per event (upserts keyed by the event's subject);
- a consumer never scans the metadata tables for what changed: it follows the log; rebuilding
  a read model is `reset` (offset 0, after the handler cleared its model) and replaying;
- one consumer name is applied by one process at a time: `run_once` first takes the consumer's
  offset row (a write), so several control processes may all run the indexer;
- `lag` is how many events a consumer has not applied yet (exported as a metric by callers);
- on PostgreSQL a `seq` is taken at insert but becomes visible at commit, so two concurrent
  transactions can commit out of seq order; a consumer that moved past a seq still in flight
  would never see it. So there a consumer reads only events older than `SETTLE_SECONDS` (a
  transaction that appends an event commits well within that); SQLite has one writer at a time
  and needs no delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Float, String, Table, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from vodcore.db.schema import SEQ, events, metadata

log = logging.getLogger("vod.consumers")

SETTLE_SECONDS = 1.0

consumer_offsets = Table(
    "consumer_offsets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("offset", SEQ, nullable=False, default=0),  # the last events.seq applied
    Column("updated_at", Float, nullable=False),
)


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    kind: str
    video_id: str | None
    payload: dict[str, Any]
    created_at: float


Handler = Callable[[AsyncConnection, Sequence[Event]], Awaitable[None]]


async def get_offset(conn: AsyncConnection, name: str) -> int:
    row = (
        await conn.execute(select(consumer_offsets.c.offset).where(consumer_offsets.c.name == name))
    ).first()
    return int(row.offset) if row else 0


async def set_offset(conn: AsyncConnection, name: str, offset: int, now: float) -> None:
    res = await conn.execute(
        update(consumer_offsets)
        .where(consumer_offsets.c.name == name)
        .values(offset=offset, updated_at=now)
    )
    if res.rowcount == 0:
        await conn.execute(
            consumer_offsets.insert().values(name=name, offset=offset, updated_at=now)
        )


@dataclass
class IdleBackoff:
    """How long a polling consumer waits before its next poll: `low` after a poll that found
    work, doubling with each empty poll up to `high`. An idle control process then wakes about
    once a second instead of five times (each wake-up with its queries cost ~5% of a core per
    process here), and a burst is followed back to back, so work waits at most `high` after an
    idle spell."""

    low: float
    high: float
    current: float = 0.0

    def after(self, found: bool) -> float:
        if found or self.current == 0.0:
            self.current = self.low
        else:  # a `high` below `low` never shortens the pause
            self.current = max(self.low, min(self.high, self.current * 2))
        return self.current


async def run_once(
    engine: AsyncEngine,
    name: str,
    handler: Handler,
    now: float,
    *,
    kinds: Sequence[str] | None = None,
    batch: int = 500,
) -> int:
    """Apply the next batch of events after the consumer's offset; returns how many events
    were read (0: caught up). Events of other `kinds` only move the offset."""
    settled = events.c.seq > 0
    if engine.dialect.name == "postgresql":
        settled = events.c.created_at <= now - SETTLE_SECONDS
    # An idle consumer only reads: it takes its row (a write) only when there is work.
    async with engine.connect() as conn:
        offset = await get_offset(conn, name)
        pending = (
            await conn.execute(select(events.c.seq).where(events.c.seq > offset, settled).limit(1))
        ).first()
    if pending is None:
        return 0
    async with engine.begin() as conn:
        # Take the consumer's row first (a write): a second process running the same consumer
        # waits here until this batch commits, then reads the new offset, instead of applying
        # the same batch beside it (PostgreSQL: row lock; SQLite: the write lock).
        held = await conn.execute(
            update(consumer_offsets).where(consumer_offsets.c.name == name).values(updated_at=now)
        )
        if held.rowcount == 0:
            await conn.execute(
                consumer_offsets.insert().values(name=name, offset=0, updated_at=now)
            )
        offset = await get_offset(conn, name)
        rows = (
            await conn.execute(
                select(events)
                .where(events.c.seq > offset, settled)
                .order_by(events.c.seq)
                .limit(batch)
            )
        ).all()
        if not rows:
            return 0
        batch_events = [
            Event(r.seq, r.kind, r.video_id, dict(r.payload or {}), r.created_at)
            for r in rows
            if kinds is None or r.kind in kinds
        ]
        if batch_events:
            await handler(conn, batch_events)
        await set_offset(conn, name, int(rows[-1].seq), now)
        return len(rows)


async def lag(engine: AsyncEngine, name: str) -> int:
    async with engine.connect() as conn:
        offset = await get_offset(conn, name)
        last = (await conn.execute(select(func.max(events.c.seq)))).scalar()
    return max(0, int(last or 0) - offset)


async def reset(engine: AsyncEngine, name: str, now: float) -> None:
    async with engine.begin() as conn:
        await set_offset(conn, name, 0, now)


async def follow(
    engine: AsyncEngine,
    name: str,
    handler: Handler,
    stop: asyncio.Event,
    clock: Callable[[], float],
    *,
    kinds: Sequence[str] | None = None,
    idle_seconds: float = 0.2,
) -> None:
    """Run `run_once` until `stop`: back to back while there is a backlog, then polling."""
    while not stop.is_set():
        try:
            n = await run_once(engine, name, handler, clock(), kinds=kinds)
        except Exception:  # a bad batch is retried (handlers are idempotent); keep the loop
            log.exception("consumer %s failed; retrying", name)
            n = 0
        if n == 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), idle_seconds)
