"""A read-through cache of video rows for the GET and playback paths (issue 6 item 7).

`GET /v1/videos/{id}` and `GET /v1/videos/{id}/playback` need one video row (state,
visibility, owner, current_version, thumbnails, duration…, and the video's token revocation
cutoff). A hot video costs no database read: the row comes from

1. this process's memory (`LocalCache`: TTL + LRU, at most `LOCAL_MAX_ENTRIES` rows), then
2. Redis, when `settings.redis_url` is set (`vod:meta:{videoId}`, orjson, shared by every
   control process), then
3. the database (one query, videos LEFT JOIN video_cutoffs), which fills both levels.

What is cached, and for how long (`MetaCache.from_settings`):
- READY videos ("positive"): `LOCAL_TTL` (1 s) in memory, `REDIS_TTL` (5 s) in Redis;
- negative answers, the same for everyone: unknown (`None`), BLOCKED, DELETED: `LOCAL_TTL` in
  memory and `REDIS_NEGATIVE_TTL` (2 s) in Redis; `NEGATIVE_TTL` (2 s) in memory when there is
  no Redis (what `control.negcache` did);
- videos in any other state (UPLOADING, UPLOADED, PROCESSING, FAILED) are not cached: their
  state and progress move on without control hearing of it, and nobody plays them.

Invalidation: `invalidate(id)` (PATCH, block, unblock, delete, restore) drops the row in this
process and writes a short tombstone over the Redis entry, so this process answers from the new
state at once and another control process within its local TTL (1 s). The tombstone (not a
DEL) lasts `TOMBSTONE_TTL`; fills write with SET NX, so a process that read the database just
before the change cannot put the old row back into Redis behind the invalidation.

Staleness bounds for changes control does not see (the transcoder is another process):
- a video becomes playable at once: PROCESSING is never cached, so the first read after the
  publish sees READY (an id that was unknown when asked for is found at most
  REDIS_NEGATIVE_TTL + LOCAL_TTL = 3 s after it is created; 2 s without Redis);
- a change to a READY video (a new `current_version` when the full ladder replaces the quick
  first rung, thumbnails, quality, counters aside) shows at most REDIS_TTL + LOCAL_TTL = 6 s
  later (1 s without Redis); the previous version keeps playing meanwhile.

Single flight: concurrent misses of one id in one process share one fill (an asyncio task per
key; a caller that goes away does not cancel it for the others). An invalidation during a fill
keeps the fill's result out of memory (`LocalCache.epoch`, as in `control.negcache`) and makes
later callers start a new fill.

Refresh ahead: a hit on an entry with less than `REFRESH_AHEAD` (0.25 s) of its local TTL left
starts the same fill in the background and answers from the entry at once; the fill replaces
the entry when it lands. So a video read all the time never expires under its readers, and
they never wait for its re-read (on SQLite a read goes through a thread and can take tens of
milliseconds on a busy machine; every request of the process queued behind it). Nothing is
served longer than before: an entry still ends at its TTL, and if the refresh has not landed by
then the next read waits for it as on any miss. The bounds above are unchanged.

Redis trouble (down, slow) never fails a request: the cache falls through to the database,
skips Redis for `REDIS_BACKOFF` seconds and logs at most once per `LOG_EVERY` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncEngine

from vodcore.db.schema import video_cutoffs, videos

log = logging.getLogger(__name__)

LOCAL_TTL = 1.0
REFRESH_AHEAD = 0.25  # a hit this close to the local expiry re-reads in the background
NEGATIVE_TTL = 2.0  # in memory, when there is no Redis
LOCAL_MAX_ENTRIES = 10_000
REDIS_TTL = 5.0
REDIS_NEGATIVE_TTL = 2.0
TOMBSTONE_TTL = 5.0  # longer than any database read a fill could be in the middle of
REDIS_BACKOFF = 2.0
REDIS_TIMEOUT = 0.5
LOG_EVERY = 10.0
PREFIX = "vod:meta:"
TOMBSTONE = b"!"  # not JSON, so never a row

POSITIVE_STATES = frozenset({"READY"})
NEGATIVE_STATES = frozenset({"BLOCKED", "DELETED"})

Meta = dict[str, Any] | None  # a video row (column -> value, plus "cutoff"); None: no such video
ABSENT: Any = object()  # LocalCache.get: nothing (fresh) remembered


def kind(value: Meta) -> str | None:
    """'negative' (unknown, blocked, deleted), 'positive' (READY) or None (not cached)."""
    if value is None:
        return "negative"
    state = value.get("state")
    if state in POSITIVE_STATES:
        return "positive"
    if state in NEGATIVE_STATES:
        return "negative"
    return None


class LocalCache:
    """This process's level (pure: `now` is passed in, a monotonic clock; no I/O).

    - `get(key, now)`: the remembered value (None meaning "no such video"), or `ABSENT` when
      nothing is remembered or it is older than its TTL (then it is dropped); a hit makes the
      key the most recently used;
    - `put(key, value, now, epoch)`: remember a value read before `epoch` was taken; refused
      (False) when an invalidation happened since (`forget` bumps the epoch), when the value's
      state is not cached (`kind`) or its TTL is zero; READY rows live `ttl`, negative answers
      `negative_ttl`;
    - at most `max_entries` keys: when full, the least recently used one goes.
    """

    def __init__(
        self,
        ttl: float = LOCAL_TTL,
        negative_ttl: float = NEGATIVE_TTL,
        max_entries: int = LOCAL_MAX_ENTRIES,
    ) -> None:
        if ttl < 0 or negative_ttl < 0 or max_entries < 1:
            raise ValueError("TTLs must be >= 0 and max_entries >= 1")
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.epoch = 0
        self._entries: OrderedDict[str, tuple[float, Meta]] = OrderedDict()  # LRU first

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> Any:
        hit = self._entries.get(key)
        if hit is None:
            return ABSENT
        if now >= hit[0]:
            del self._entries[key]
            return ABSENT
        self._entries.move_to_end(key)
        return hit[1]

    def put(self, key: str, value: Meta, now: float, epoch: int) -> bool:
        k = kind(value)
        ttl = self.ttl if k == "positive" else self.negative_ttl
        if epoch != self.epoch or k is None or ttl <= 0:
            return False
        entries = self._entries
        entries.pop(key, None)
        while len(entries) >= self.max_entries:
            entries.popitem(last=False)
        entries[key] = (now + ttl, value)
        return True

    def expires(self, key: str) -> float:
        """When the key's entry ends (-inf without one); `get` first, this does not refresh
        its recency."""
        hit = self._entries.get(key)
        return hit[0] if hit is not None else -math.inf

    def forget(self, key: str) -> None:
        self.epoch += 1
        self._entries.pop(key, None)


_LOAD = (
    select(videos, video_cutoffs.c.cutoff)
    .select_from(videos.outerjoin(video_cutoffs, video_cutoffs.c.video_id == videos.c.id))
    .where(videos.c.id == bindparam("vid"))
)


def database_loader(engine: AsyncEngine) -> Callable[[str], Awaitable[Meta]]:
    async def load(video_id: str) -> Meta:
        async with engine.connect() as conn:
            row = (await conn.execute(_LOAD, {"vid": video_id})).first()
        # str(): the keys are quoted_name (a str subclass orjson refuses as a key)
        return {str(k): v for k, v in row._mapping.items()} if row is not None else None

    return load


class MetaCache:
    def __init__(
        self,
        load: Callable[[str], Awaitable[Meta]],
        *,
        redis: Any = None,  # a redis.asyncio.Redis, or None for the local level only
        local: LocalCache | None = None,
        redis_ttl: float = REDIS_TTL,
        redis_negative_ttl: float = REDIS_NEGATIVE_TTL,
        tombstone_ttl: float = TOMBSTONE_TTL,
        refresh_ahead: float = REFRESH_AHEAD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.load = load
        self.redis = redis
        self.local = local if local is not None else LocalCache()
        self.redis_ttl_ms = int(redis_ttl * 1000)
        self.redis_negative_ttl_ms = int(redis_negative_ttl * 1000)
        self.tombstone_ttl_ms = int(tombstone_ttl * 1000)
        self.refresh_ahead = refresh_ahead
        self.clock = clock
        self._inflight: dict[str, asyncio.Future[Meta]] = {}
        self._redis_skip_until = -1.0
        self._last_log = -LOG_EVERY
        self.stats = {"local": 0, "redis": 0, "db": 0, "joined": 0, "ahead": 0}

    @classmethod
    def from_settings(cls, settings: Any, engine: AsyncEngine) -> MetaCache:
        """Redis when `settings.redis_url` is set (then 1 s in memory for everything), else
        memory only (1 s for READY rows, 2 s for negative answers)."""
        url = getattr(settings, "redis_url", None)
        load = database_loader(engine)
        if not url:
            return cls(load, local=LocalCache(LOCAL_TTL, NEGATIVE_TTL, LOCAL_MAX_ENTRIES))
        import redis.asyncio as aioredis

        client = aioredis.from_url(
            url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        return cls(
            load,
            redis=client,
            local=LocalCache(LOCAL_TTL, LOCAL_TTL, LOCAL_MAX_ENTRIES),
            redis_ttl=REDIS_TTL,
            redis_negative_ttl=REDIS_NEGATIVE_TTL,
            tombstone_ttl=TOMBSTONE_TTL,
        )

    # --- reads ---------------------------------------------------------------------------------

    async def get(self, video_id: str) -> Meta:
        """The video's row (with "cutoff"), or None when there is no such video."""
        value = self.peek(video_id)
        if value is not ABSENT:
            return value  # type: ignore[no-any-return]
        fill = self._inflight.get(video_id)
        if fill is None:
            fill = self._start_fill(video_id)
        else:
            self.stats["joined"] += 1
        return await asyncio.shield(fill)

    def peek(self, video_id: str) -> Any:
        """This process's level only, without awaiting (for `control.videos.PlaybackFastPath`
        too): the row, None (no such video) or `ABSENT` (`get` reads through). A hit close to
        the entry's end starts its re-read in the background (refresh ahead); needs a running
        event loop then."""
        now = self.clock()
        value = self.local.get(video_id, now)
        if value is ABSENT:
            return ABSENT
        self.stats["local"] += 1
        if (
            self.local.expires(video_id) - now < self.refresh_ahead
            and video_id not in self._inflight
        ):
            self.stats["ahead"] += 1
            self._start_fill(video_id)
        return value

    def _start_fill(self, video_id: str) -> asyncio.Future[Meta]:
        fill = asyncio.ensure_future(self._fill(video_id))
        self._inflight[video_id] = fill
        fill.add_done_callback(lambda f: self._done(video_id, f))
        return fill

    def _done(self, video_id: str, fill: asyncio.Future[Meta]) -> None:
        if self._inflight.get(video_id) is fill:
            del self._inflight[video_id]
        if not fill.cancelled():
            fill.exception()  # retrieved: every waiter may have gone

    async def _fill(self, video_id: str) -> Meta:
        epoch = self.local.epoch  # before any read: an invalidation meanwhile keeps it out
        cached = await self._redis_get(video_id)
        if cached is not ABSENT:
            self.stats["redis"] += 1
            self.local.put(video_id, cached, self.clock(), epoch)
            return cached  # type: ignore[no-any-return]
        value = await self.load(video_id)
        self.stats["db"] += 1
        if epoch == self.local.epoch:
            await self._redis_put(video_id, value)
            self.local.put(video_id, value, self.clock(), epoch)
        return value

    # --- invalidation --------------------------------------------------------------------------

    def forget_local(self, video_id: str) -> None:
        """Drop the row in this process (and keep fills in flight from bringing it back)."""
        self.local.forget(video_id)
        self._inflight.pop(video_id, None)

    async def invalidate(self, video_id: str) -> None:
        """After a committed change: drop the row here and in Redis (a tombstone)."""
        self.forget_local(video_id)
        if self.redis is not None:
            try:
                await self.redis.set(PREFIX + video_id, TOMBSTONE, px=self.tombstone_ttl_ms)
            except Exception:  # other processes see the change within REDIS_TTL instead
                self._redis_failed("invalidating")
        # again: a fill that started during the write above may have read the old entry
        self.forget_local(video_id)

    # --- Redis ---------------------------------------------------------------------------------

    def _redis_ok(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._redis_skip_until

    def _redis_failed(self, doing: str) -> None:
        mono = time.monotonic()
        self._redis_skip_until = mono + REDIS_BACKOFF
        if mono - self._last_log >= LOG_EVERY:
            self._last_log = mono
            log.exception("metadata cache: Redis failed %s; reading the database", doing)

    async def _redis_get(self, video_id: str) -> Any:
        if not self._redis_ok():
            return ABSENT
        try:
            raw = await self.redis.get(PREFIX + video_id)
        except Exception:
            self._redis_failed("reading")
            return ABSENT
        if raw is None or raw == TOMBSTONE:
            return ABSENT
        try:
            value: Meta = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return ABSENT
        return value

    async def _redis_put(self, video_id: str, value: Meta) -> None:
        k = kind(value)
        if k is None or not self._redis_ok():
            return
        ttl = self.redis_ttl_ms if k == "positive" else self.redis_negative_ttl_ms
        try:
            # NX: never over a tombstone (an invalidation newer than this read) or a newer fill
            await self.redis.set(PREFIX + video_id, orjson.dumps(value), px=ttl, nx=True)
        except Exception:
            self._redis_failed("writing")

    async def close(self, _app: web.Application | None = None) -> None:
        if self.redis is not None:
            client, self.redis = self.redis, None
            await client.aclose()


METACACHE_KEY: web.AppKey[MetaCache] = web.AppKey("metacache", MetaCache)
