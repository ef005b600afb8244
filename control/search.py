"""Search: a read model derived from the event log, and `GET /v1/search?q=&limit=&cursor=`.

Rules:
- The index is derived data. The indexer is the event-log consumer named "search"
  (`vodcore.db.consumers.run_once`): it never scans the `videos` table and is never called on the
  upload or playback path. For each `video.*` event of a batch it reads the row of the event's
  subject (a point lookup by id: `video.created` carries only the title, `video.state` only
  from/to) and reconciles that one document: READY and public → upsert (title, description);
  anything else (processing, private, unlisted, blocked, deleted, gone) → remove. The batch and
  the consumer offset commit in one transaction, and a document is a pure function of the
  subject's current row, so applying an event twice (a crash and retry, a replay, two control
  processes racing) leaves the same index.
- Backends behind one `SearchBackend` (upsert, remove, query, clear): SQLite FTS5
  (`unicode61 remove_diacritics 2`, ranked by bm25 with the title weighted 10 times the
  description) and PostgreSQL full text (a `tsvector`, weights A/B, configuration `simple`, a GIN
  index, `plainto_tsquery`, ranked by `ts_rank`). Tables: `vodcore.db.search_schema`.
- Ranking: `score = relevance * (1 + views / (views + 100))`, relevance being `-bm25(...)` (FTS5)
  or `ts_rank(...)` (PostgreSQL), both > 0 for a match. Popularity at most doubles a score
  (half of that at 100 views), so it breaks near-ties and never buries a better textual match.
  Views come from `video_counters.views` (owned by the engagement counters) by a LEFT JOIN on the
  page's matches when that table exists, else 0. The formula needs no `ln()`, which SQLite may
  lack. Ties are ordered by video id.
- Queries are data, never syntax. FTS5: each whitespace-separated term becomes a quoted string
  (`"` doubled), terms are ANDed; terms with no letter or digit are dropped (the tokenizer
  would drop them too), so `"`, `*`, `NEAR`, `-`, `:`, `(` and `)` are plain characters.
  PostgreSQL: `plainto_tsquery` (AND of the terms, no operators), the same meaning as FTS5.
  NUL and other control characters are removed. Empty `q` → 422, `q` over 200 characters →
  422, `limit` outside 1..50 → 422, a bad cursor → 400. Nothing a client sends yields a 500.
- Pagination is keyset, not offset: `cursor` is an opaque base64url JSON of the last result's
  (score, videoId) plus a hash of the query; the next page is `score < s OR (score = s AND
  videoId > id)` under `ORDER BY score DESC, videoId`. A page costs the same at any depth, and a
  video indexed meanwhile never shifts later pages (an offset would repeat or skip one). A
  cursor from another query is refused (400). Scores move when views change between pages, so
  a video whose popularity changes mid-browse may show twice or not at all: acceptable for
  search results, and the same is true of every offset scheme.
- Lag: the `vod_consumer_lag{consumer="search"}` gauge (events not yet applied) is set after
  every batch and every idle poll. `vod reindex` (`cmd_reindex`) clears the index and resets the
  offset in one transaction, then replays the log to its end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import math
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client import REGISTRY, Gauge
from sqlalchemy import inspect, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from vodcore.db import consumers
from vodcore.db.schema import videos
from vodcore.db.search_schema import FTS_DDL, FTS_TABLE, search_docs
from vodcore.errors import BAD_REQUEST, VALIDATION, ApiError

log = logging.getLogger("vod.search")

CONSUMER = "search"
MAX_QUERY_CHARS = 200
MAX_LIMIT = 50
DEFAULT_LIMIT = 20
MAX_CURSOR_CHARS = 512
POPULARITY_HALF = 100.0  # views at which popularity adds half of its maximum (x1.5)
COUNTERS_TABLE = "video_counters"
PG_TS_CONFIG = "simple"


def _lag_gauge() -> Gauge:
    # One gauge per process; another module may have registered it first (the engagement
    # consumers use the same name with their own `consumer` label).
    try:
        return Gauge("vod_consumer_lag", "Events a log consumer has not applied yet", ["consumer"])
    except ValueError:
        existing = REGISTRY._names_to_collectors.get("vod_consumer_lag")
        assert isinstance(existing, Gauge)
        return existing


LAG = _lag_gauge()


# --- query input ----------------------------------------------------------------------------


def clean_query(raw: str) -> str:
    """Drop control characters (NUL breaks PostgreSQL text) and lone surrogates; trim."""
    kept = (ch for ch in raw if unicodedata.category(ch) not in ("Cc", "Cs"))
    return " ".join("".join(kept).split())


def fts5_query(q: str) -> str | None:
    """An FTS5 MATCH expression where every term is a quoted string (so no operator, column
    filter or prefix syntax can come from the user); None when no term can match anything."""
    terms = [t for t in q.split() if any(ch.isalnum() for ch in t)]
    if not terms:
        return None
    return " ".join('"' + t.replace('"', '""') + '"' for t in terms)


def _query_tag(q: str) -> str:
    return hashlib.sha256(q.encode("utf-8", "surrogatepass")).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Cursor:
    score: float
    video_id: str


def encode_cursor(q: str, c: Cursor) -> str:
    doc = {"v": 1, "s": c.score, "id": c.video_id, "q": _query_tag(q)}
    return base64.urlsafe_b64encode(orjson.dumps(doc)).decode().rstrip("=")


def decode_cursor(q: str, token: str) -> Cursor:
    """The position a cursor names, or ApiError(400) for anything that isn't one of ours for
    this query."""
    bad = ApiError(BAD_REQUEST, "cursor: invalid or from another query", extra={"field": "cursor"})
    if not token or len(token) > MAX_CURSOR_CHARS:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = orjson.loads(raw)
    except (binascii.Error, ValueError):
        raise bad from None
    if not isinstance(doc, dict) or doc.get("v") != 1 or doc.get("q") != _query_tag(q):
        raise bad
    score, vid = doc.get("s"), doc.get("id")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise bad
    if not isinstance(vid, str) or not 0 < len(vid) <= 40:
        raise bad
    return Cursor(float(score), vid)


@dataclass(frozen=True, slots=True)
class SearchRequest:
    q: str
    limit: int
    cursor: Cursor | None


def parse_request(params: Any) -> SearchRequest:
    """`q`, `limit`, `cursor` from a query-string mapping; ApiError 422/400 when invalid."""
    raw_q = params.get("q")
    q = clean_query(raw_q) if isinstance(raw_q, str) else ""
    if not q:
        raise ApiError(VALIDATION, "q: must not be empty", extra={"field": "q"})
    if len(q) > MAX_QUERY_CHARS:
        raise ApiError(VALIDATION, f"q: at most {MAX_QUERY_CHARS} characters", extra={"field": "q"})
    raw_limit = params.get("limit")
    limit = DEFAULT_LIMIT
    if raw_limit is not None:
        if not (isinstance(raw_limit, str) and raw_limit.isascii() and raw_limit.isdigit()):
            raise ApiError(VALIDATION, "limit: must be an integer", extra={"field": "limit"})
        limit = int(raw_limit) if len(raw_limit) <= 6 else MAX_LIMIT + 1
        if not 1 <= limit <= MAX_LIMIT:
            raise ApiError(VALIDATION, f"limit: 1..{MAX_LIMIT}", extra={"field": "limit"})
    raw_cursor = params.get("cursor")
    cursor = decode_cursor(q, raw_cursor) if raw_cursor is not None else None
    return SearchRequest(q, limit, cursor)


# --- backends -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Doc:
    video_id: str
    title: str
    description: str


@dataclass(frozen=True, slots=True)
class Hit:
    video_id: str
    title: str
    views: int
    score: float


class SearchBackend(Protocol):
    async def ensure(self, conn: AsyncConnection) -> None: ...
    async def upsert(self, conn: AsyncConnection, doc: Doc, now: float) -> None: ...
    async def remove(self, conn: AsyncConnection, video_id: str) -> None: ...
    async def clear(self, conn: AsyncConnection) -> None: ...
    async def query(
        self, conn: AsyncConnection, q: str, limit: int, cursor: Cursor | None, views: bool
    ) -> list[Hit]: ...


def _views_sql(views: bool) -> tuple[str, str]:
    """(the views expression, the join that provides it)."""
    if not views:
        return "CAST(0 AS DOUBLE PRECISION)", ""
    return (
        "CAST(COALESCE(c.views, 0) AS DOUBLE PRECISION)",
        f"LEFT JOIN {COUNTERS_TABLE} c ON c.video_id = d.video_id",
    )


def _ranked(matches: str, cursor: Cursor | None) -> str:
    """Wrap a subquery of (video_id, title, views, score) with the keyset and order."""
    after = ""
    if cursor is not None:
        after = "WHERE m.score < :cs OR (m.score = :cs AND m.video_id > :cid)"
    return (
        f"SELECT m.video_id, m.title, m.views, m.score FROM ({matches}) AS m {after} "
        "ORDER BY m.score DESC, m.video_id LIMIT :n"
    )


def _hits(rows: Sequence[Any]) -> list[Hit]:
    return [Hit(r.video_id, r.title, int(r.views or 0), float(r.score)) for r in rows]


def _cursor_params(cursor: Cursor | None) -> dict[str, Any]:
    return {} if cursor is None else {"cs": cursor.score, "cid": cursor.video_id}


async def _doc_id(conn: AsyncConnection, video_id: str) -> int | None:
    row = (
        await conn.execute(select(search_docs.c.doc_id).where(search_docs.c.video_id == video_id))
    ).first()
    return int(row.doc_id) if row else None


async def _upsert_row(conn: AsyncConnection, doc: Doc, now: float) -> int:
    values = {"title": doc.title, "description": doc.description, "indexed_at": now}
    doc_id = await _doc_id(conn, doc.video_id)
    if doc_id is None:
        res = await conn.execute(search_docs.insert().values(video_id=doc.video_id, **values))
        key = res.inserted_primary_key
        assert key is not None
        return int(key[0])
    await conn.execute(search_docs.update().where(search_docs.c.doc_id == doc_id).values(values))
    return doc_id


class SqliteSearch:
    """FTS5: the document text lives in `search_fts` with rowid = `search_docs.doc_id`."""

    async def ensure(self, conn: AsyncConnection) -> None:
        await conn.execute(text(FTS_DDL))

    async def upsert(self, conn: AsyncConnection, doc: Doc, now: float) -> None:
        doc_id = await _upsert_row(conn, doc, now)
        await conn.execute(text(f"DELETE FROM {FTS_TABLE} WHERE rowid = :id"), {"id": doc_id})
        await conn.execute(
            text(f"INSERT INTO {FTS_TABLE}(rowid, title, description) VALUES (:id, :t, :d)"),
            {"id": doc_id, "t": doc.title, "d": doc.description},
        )

    async def remove(self, conn: AsyncConnection, video_id: str) -> None:
        doc_id = await _doc_id(conn, video_id)
        if doc_id is None:
            return
        await conn.execute(text(f"DELETE FROM {FTS_TABLE} WHERE rowid = :id"), {"id": doc_id})
        await conn.execute(search_docs.delete().where(search_docs.c.doc_id == doc_id))

    async def clear(self, conn: AsyncConnection) -> None:
        await conn.execute(text(f"DELETE FROM {FTS_TABLE}"))
        await conn.execute(search_docs.delete())

    async def query(
        self, conn: AsyncConnection, q: str, limit: int, cursor: Cursor | None, views: bool
    ) -> list[Hit]:
        match = fts5_query(q)
        if match is None:
            return []
        v, join = _views_sql(views)
        matches = (
            f"SELECT d.video_id AS video_id, d.title AS title, {v} AS views, "
            f"(-bm25({FTS_TABLE}, 10.0, 1.0)) * (1.0 + {v} / ({v} + {POPULARITY_HALF})) AS score "
            f"FROM {FTS_TABLE} JOIN search_docs d ON d.doc_id = {FTS_TABLE}.rowid {join} "
            f"WHERE {FTS_TABLE} MATCH :q"
        )
        params = {"q": match, "n": limit, **_cursor_params(cursor)}
        return _hits((await conn.execute(text(_ranked(matches, cursor)), params)).all())


_PG_TSV = (
    f"setweight(to_tsvector('{PG_TS_CONFIG}', :t), 'A') || "
    f"setweight(to_tsvector('{PG_TS_CONFIG}', :d), 'B')"
)


class PostgresSearch:
    """Full text on `search_docs.tsv` (GIN index), kept by the indexer."""

    async def ensure(self, conn: AsyncConnection) -> None:
        return None  # create_schema made the table and its GIN index

    async def upsert(self, conn: AsyncConnection, doc: Doc, now: float) -> None:
        doc_id = await _upsert_row(conn, doc, now)
        await conn.execute(
            text(f"UPDATE search_docs SET tsv = {_PG_TSV} WHERE doc_id = :id"),
            {"id": doc_id, "t": doc.title, "d": doc.description},
        )

    async def remove(self, conn: AsyncConnection, video_id: str) -> None:
        await conn.execute(search_docs.delete().where(search_docs.c.video_id == video_id))

    async def clear(self, conn: AsyncConnection) -> None:
        await conn.execute(search_docs.delete())

    async def query(
        self, conn: AsyncConnection, q: str, limit: int, cursor: Cursor | None, views: bool
    ) -> list[Hit]:
        v, join = _views_sql(views)
        matches = (
            f"SELECT d.video_id AS video_id, d.title AS title, {v} AS views, "
            f"CAST(ts_rank(d.tsv, query) AS DOUBLE PRECISION) "
            f"* (1.0 + {v} / ({v} + {POPULARITY_HALF})) AS score "
            f"FROM search_docs d CROSS JOIN plainto_tsquery('{PG_TS_CONFIG}', :q) AS query "
            f"{join} WHERE d.tsv @@ query"
        )
        params = {"q": q, "n": limit, **_cursor_params(cursor)}
        return _hits((await conn.execute(text(_ranked(matches, cursor)), params)).all())


def make_backend(engine: AsyncEngine) -> SearchBackend:
    name = engine.dialect.name
    if name == "sqlite":
        return SqliteSearch()
    if name == "postgresql":
        return PostgresSearch()
    raise ValueError(f"search: no backend for {name}")


# --- the indexer (the "search" consumer) ----------------------------------------------------

SEARCHABLE_STATE = "READY"
SEARCHABLE_VISIBILITY = "public"


class Indexer:
    def __init__(self, engine: AsyncEngine, backend: SearchBackend | None = None) -> None:
        self.engine = engine
        self.backend = backend or make_backend(engine)
        self._now = 0.0

    async def ensure(self) -> None:
        async with self.engine.begin() as conn:
            await self.backend.ensure(conn)

    async def apply(self, conn: AsyncConnection, evs: Sequence[consumers.Event]) -> None:
        """Reconcile each video named by a `video.*` event of the batch, once per batch."""
        subjects = dict.fromkeys(
            e.video_id for e in evs if e.video_id and e.kind.startswith("video.")
        )
        for vid in subjects:
            assert vid is not None
            row = (
                await conn.execute(
                    select(
                        videos.c.title, videos.c.description, videos.c.visibility, videos.c.state
                    ).where(videos.c.id == vid)
                )
            ).first()
            if (
                row is not None
                and row.state == SEARCHABLE_STATE
                and row.visibility == SEARCHABLE_VISIBILITY
            ):
                doc = Doc(vid, row.title or "", row.description or "")
                await self.backend.upsert(conn, doc, self._now)
            else:
                await self.backend.remove(conn, vid)

    async def run_once(self, now: float, batch: int = 500) -> int:
        self._now = now
        n = await consumers.run_once(self.engine, CONSUMER, self.apply, now, batch=batch)
        return n

    async def update_lag(self) -> int:
        n = await consumers.lag(self.engine, CONSUMER)
        LAG.labels(CONSUMER).set(n)
        return n

    async def follow(
        self,
        stop: asyncio.Event,
        clock: Callable[[], float] = time.time,
        idle: float = 0.2,
        max_idle: float = 1.0,
    ) -> None:
        """Apply batches back to back while there is a backlog, then poll, `idle` seconds
        apart at first and up to `max_idle` while nothing comes (`IdleBackoff`); the lag gauge
        is refreshed after each round. A failing batch is retried (handlers are idempotent)."""
        with contextlib.suppress(Exception):
            await self.ensure()
        wait = consumers.IdleBackoff(idle, max_idle)
        while not stop.is_set():
            try:
                n = await self.run_once(clock())
                await self.update_lag()
            except Exception:
                log.exception("search indexer failed; retrying")
                n = 0
            if n == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait.after(False))
            else:
                wait.after(True)

    async def rebuild(
        self, now: float, progress: Callable[[int, int], None] | None = None, batch: int = 500
    ) -> int:
        """Clear the index and the offset together, then replay the whole log; returns the
        number of events read."""
        await self.ensure()
        async with self.engine.begin() as conn:
            await self.backend.clear(conn)
            await consumers.set_offset(conn, CONSUMER, 0, now)
        total = 0
        while n := await self.run_once(now, batch=batch):
            total += n
            if progress is not None:
                progress(total, await self.update_lag())
        await self.update_lag()
        return total


async def run_indexer(
    engine: AsyncEngine, stop: asyncio.Event, clock: Callable[[], float] = time.time
) -> None:
    """The indexer task control runs beside its API (see the wiring in the module's users)."""
    await Indexer(engine).follow(stop, clock)


# --- the API --------------------------------------------------------------------------------


class Search:
    """`GET /v1/search`: public, no authentication; reads only the index (plus view counts)."""

    def __init__(self, engine: AsyncEngine, backend: SearchBackend | None = None) -> None:
        self.engine = engine
        self.backend = backend or make_backend(engine)
        self._counters: bool | None = None
        self._counters_checked = 0.0

    async def _has_counters(self, conn: AsyncConnection) -> bool:
        now = time.monotonic()
        if self._counters is None or (not self._counters and now - self._counters_checked > 30):
            self._counters = await conn.run_sync(lambda c: inspect(c).has_table(COUNTERS_TABLE))
            self._counters_checked = now
        return self._counters

    async def search(self, req: SearchRequest) -> dict[str, Any]:
        async with self.engine.connect() as conn:
            views = await self._has_counters(conn)
            hits = await self.backend.query(conn, req.q, req.limit + 1, req.cursor, views)
        page = hits[: req.limit]
        next_cursor = None
        if len(hits) > req.limit:
            last = page[-1]
            next_cursor = encode_cursor(req.q, Cursor(last.score, last.video_id))
        return {
            "results": [
                # a poster URL needs a playback token: players get it from /playback
                {"videoId": h.video_id, "title": h.title, "thumbnailUrl": None,
                 "viewCount": h.views}
                for h in page
            ],
            "nextCursor": next_cursor,
        }  # fmt: skip

    async def handle(self, request: web.Request) -> web.Response:
        req = parse_request(request.query)
        body = await self.search(req)
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/search", self.handle)


# --- vod reindex ----------------------------------------------------------------------------


def cmd_reindex(args: argparse.Namespace) -> int:
    """`vod reindex [--data DIR] [--config FILE]`: rebuild the search index from the log."""
    from vodcore import config
    from vodcore.db.engine import create_schema, make_engine

    s = config.load(getattr(args, "config", None), data_dir=getattr(args, "data", None))

    def progress(done: int, lag: int) -> None:
        print(f"reindex: {done} events replayed, {lag} to go", flush=True)

    async def main() -> int:
        engine = make_engine(s.db_url)
        try:
            await create_schema(engine)
            return await Indexer(engine).rebuild(time.time(), progress)
        finally:
            await engine.dispose()

    total = asyncio.run(main())
    print(f"reindex: done, {total} events replayed", flush=True)
    return 0
