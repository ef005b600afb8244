"""The metadata cache: the local level's policy (TTLs, LRU bound, invalidation racing a read)
and the read-through's single flight, with a fake loader and no Redis; and what the playback
fast path, which answers from this cache, needs of the rate limiter (taking a bucket without
awaiting)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from control.metacache import ABSENT, LocalCache, Meta, MetaCache, kind
from control.ratelimit import (
    RATE_LIMITERS_KEY,
    MemoryBuckets,
    Rate,
    RateLimitConfig,
    RateLimiter,
    RedisBuckets,
    install,
    make_limiter,
)

READY = {"id": "v", "state": "READY", "title": "t"}
BLOCKED = {"id": "v", "state": "BLOCKED"}


def test_what_is_cached() -> None:
    assert kind(READY) == "positive"
    assert kind(None) == kind(BLOCKED) == kind({"state": "DELETED"}) == "negative"
    for state in ("UPLOADING", "UPLOADED", "PROCESSING", "FAILED"):
        assert kind({"state": state}) is None
        c = LocalCache()
        assert not c.put("v", {"state": state}, 0.0, c.epoch)  # moves on without control
        assert c.get("v", 0.0) is ABSENT


def test_positive_ttl() -> None:
    c = LocalCache(ttl=1.0, negative_ttl=2.0)
    assert c.get("v", 0.0) is ABSENT
    assert c.put("v", READY, 10.0, c.epoch)
    assert c.get("v", 10.99) == READY
    assert c.get("v", 11.0) is ABSENT  # expired exactly at now + ttl
    assert len(c) == 0  # and dropped on the way


def test_negative_ttl_and_none_is_a_value() -> None:
    c = LocalCache(ttl=1.0, negative_ttl=2.0)
    assert c.put("gone", None, 0.0, c.epoch)
    assert c.put("b", BLOCKED, 0.0, c.epoch)
    assert c.get("gone", 1.5) is None  # "no such video", remembered: not ABSENT
    assert c.get("b", 1.99) == BLOCKED
    assert c.get("gone", 2.0) is ABSENT and c.get("b", 2.0) is ABSENT


def test_lru_bound_keeps_the_recently_used() -> None:
    c = LocalCache(ttl=100.0, max_entries=3)
    for k in "abc":
        c.put(k, READY, 0.0, c.epoch)
    assert c.get("a", 1.0) == READY  # a is now the most recently used
    c.put("d", READY, 1.0, c.epoch)  # full: b (least recently used) goes
    assert [k for k in "abcd" if c.get(k, 2.0) is not ABSENT] == ["a", "c", "d"]
    assert len(c) == 3


def test_many_keys_stay_bounded() -> None:
    c = LocalCache(ttl=2.0, negative_ttl=2.0, max_entries=100)
    for i in range(10_000):
        c.put(f"vid_{i}", None, i * 0.001, c.epoch)
    assert len(c) == 100
    assert c.get("vid_9999", 10.0) is None and c.get("vid_0", 10.0) is ABSENT


def test_a_read_older_than_an_invalidation_is_not_kept() -> None:
    c = LocalCache()
    c.put("v", READY, 0.0, c.epoch)
    epoch = c.epoch  # taken before the read
    c.forget("v")  # a PATCH commits meanwhile
    assert c.get("v", 0.1) is ABSENT
    assert not c.put("v", READY, 0.2, epoch)
    assert c.get("v", 0.2) is ABSENT
    assert c.put("v", READY, 0.2, c.epoch)  # a read after it is kept


def test_zero_ttl_keeps_nothing_and_bad_settings_refused() -> None:
    c = LocalCache(ttl=0.0, negative_ttl=0.0)
    assert not c.put("v", READY, 0.0, c.epoch) and not c.put("w", None, 0.0, c.epoch)
    with pytest.raises(ValueError):
        LocalCache(max_entries=0)
    with pytest.raises(ValueError):
        LocalCache(ttl=-1.0)


class Loader:
    """A fake database: counts reads, each waits until `gate` is set."""

    def __init__(self, rows: dict[str, Meta]) -> None:
        self.rows = rows
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, video_id: str) -> Meta:
        self.calls.append(video_id)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.rows.get(video_id)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _cache(rows: dict[str, Meta]) -> tuple[MetaCache, Loader, Clock]:
    load, clock = Loader(rows), Clock()
    return MetaCache(load, local=LocalCache(1.0, 2.0), clock=clock), load, clock


async def test_concurrent_misses_of_one_id_do_one_read() -> None:
    cache, load, clock = _cache({"v": READY})
    waiters = [asyncio.ensure_future(cache.get("v")) for _ in range(50)]
    others = [asyncio.ensure_future(cache.get("w")) for _ in range(5)]  # another id: its own
    await asyncio.sleep(0)
    load.gate.set()
    assert await asyncio.gather(*waiters) == [READY] * 50
    assert await asyncio.gather(*others) == [None] * 5
    assert sorted(load.calls) == ["v", "w"]
    assert await cache.get("v") == READY and len(load.calls) == 2  # from memory now
    clock.now += 1.0  # READY: 1 s
    assert await cache.get("v") == READY and await cache.get("w") is None
    assert load.calls[2:] == ["v"]  # the negative answer lives 2 s
    clock.now += 1.0
    assert await cache.get("w") is None and load.calls[3:] == ["w"]


async def test_a_caller_going_away_does_not_cancel_the_read_for_the_others() -> None:
    cache, load, _ = _cache({"v": READY})
    first = asyncio.ensure_future(cache.get("v"))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(cache.get("v"))
    await asyncio.sleep(0)
    first.cancel()
    load.gate.set()
    assert await second == READY
    assert load.calls == ["v"]


async def test_an_invalidation_during_a_read_keeps_its_result_out() -> None:
    cache, load, _ = _cache({"v": READY})
    early = asyncio.ensure_future(cache.get("v"))
    await asyncio.sleep(0)
    await cache.invalidate("v")  # the PATCH commits while the read is in flight
    late = asyncio.ensure_future(cache.get("v"))  # after it: does not join the old read
    await asyncio.sleep(0)
    load.rows["v"] = {**READY, "title": "new"}
    load.gate.set()
    assert (await early)["title"] == "new"  # (the fake reads late; a real one may not)
    assert (await late)["title"] == "new"
    assert load.calls == ["v", "v"]
    # the first read was not remembered, the second was
    assert await cache.get("v") == {**READY, "title": "new"} and len(load.calls) == 2


async def test_a_failed_read_reaches_every_waiter_and_is_not_cached() -> None:
    cache, load, _ = _cache({"v": READY})
    load.fail = RuntimeError("database down")
    waiters = [asyncio.ensure_future(cache.get("v")) for _ in range(3)]
    await asyncio.sleep(0)
    load.gate.set()
    results: list[Any] = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    load.fail = None
    assert await cache.get("v") == READY and load.calls == ["v", "v"]


async def test_a_hit_near_the_end_re_reads_in_the_background() -> None:
    cache, load, clock = _cache({"v": READY})
    load.gate.set()
    assert await cache.get("v") == READY and load.calls == ["v"]
    clock.now += 0.7  # 0.3 s left: more than REFRESH_AHEAD, nothing happens
    assert cache.peek("v") == READY and load.calls == ["v"]
    load.gate.clear()  # the re-read will wait
    load.rows["v"] = {**READY, "title": "new"}
    clock.now += 0.1  # 0.2 s left
    assert cache.peek("v") == READY  # answered at once, from memory
    assert await cache.get("v") == READY  # still, and no second read is started
    await asyncio.sleep(0)
    assert load.calls == ["v", "v"] and cache.stats["ahead"] == 1
    load.gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    clock.now += 0.5  # past the old entry's end: the re-read renewed it
    assert cache.peek("v") == {**READY, "title": "new"} and len(load.calls) == 2


async def _re_read_in_flight() -> tuple[MetaCache, Loader, Clock]:
    """A cached READY "v" 0.1 s before its end, whose refresh-ahead re-read has started and
    waits at `load.gate`."""
    cache, load, clock = _cache({"v": READY})
    load.gate.set()
    await cache.get("v")
    load.gate.clear()
    clock.now += 0.9
    assert cache.peek("v") == READY  # starts the re-read
    return cache, load, clock


async def test_a_refresh_not_landed_by_the_end_is_waited_for() -> None:
    cache, load, clock = await _re_read_in_flight()
    clock.now += 0.1  # the entry ends: nothing is served past its TTL
    assert cache.peek("v") is ABSENT
    waiter = asyncio.ensure_future(cache.get("v"))  # joins the re-read in flight
    await asyncio.sleep(0)
    assert not waiter.done() and cache.stats["joined"] == 1
    load.gate.set()
    assert await waiter == READY and len(load.calls) == 2


async def test_an_invalidation_keeps_a_background_re_read_out() -> None:
    cache, load, _clock = await _re_read_in_flight()
    await asyncio.sleep(0)
    await cache.invalidate("v")  # a change commits while it is in flight
    load.gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert cache.peek("v") is ABSENT  # not remembered: the next read goes to the database
    load.rows["v"] = {**READY, "title": "new"}
    assert (await cache.get("v"))["title"] == "new" and len(load.calls) == 3


async def test_a_failed_background_re_read_changes_nothing() -> None:
    cache, load, clock = _cache({"v": READY})
    load.gate.set()
    await cache.get("v")
    load.fail = RuntimeError("database down")
    clock.now += 0.9
    assert cache.peek("v") == READY
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert cache.peek("v") == READY  # the entry lives to its end; this hit tries again
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(load.calls) == 3 and not cache._inflight  # one read at a time, none left
    clock.now += 0.1
    with pytest.raises(RuntimeError):
        await cache.get("v")  # then a read as on any miss, its failure to the caller


# --- what the playback fast path (control.videos.PlaybackFastPath) needs of the rate limiter ---


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_check_now_takes_from_the_same_buckets_as_check() -> None:
    clock = _Clock()
    limiter = make_limiter(
        RateLimitConfig(key_per_second=1, key_burst=2, ip_per_second=1, ip_burst=3), clock
    )
    assert limiter.synchronous and limiter.enabled
    assert limiter.check_now("10.0.0.1", "") == 0.0
    assert asyncio.run(limiter.check("10.0.0.1", "")) == 0.0
    assert limiter.check_now("10.0.0.1", "") == 0.0
    assert limiter.check_now("10.0.0.1", "") == pytest.approx(1.0)  # the burst of 3 is spent
    assert limiter.check_now("10.0.0.2", "Bearer k") == 0.0  # another IP; a key's own bucket
    assert limiter.check_now("10.0.0.3", "Bearer k") == 0.0
    assert limiter.check_now("10.0.0.4", "Bearer k") == pytest.approx(1.0)
    clock.now += 1.0
    assert limiter.check_now("10.0.0.1", "") == 0.0


class _FakeRedis:
    def register_script(self, _script: str) -> object:
        return object()


def test_buckets_in_redis_are_not_taken_synchronously() -> None:
    on, off = Rate(10, 1), Rate(10, 0)
    limiter = RateLimiter(RedisBuckets(_FakeRedis(), on), MemoryBuckets(on))
    assert not limiter.synchronous
    with pytest.raises(RuntimeError):
        limiter.check_now("10.0.0.1", "")
    # a rate of 0 needs no Redis: answered at once
    limiter = RateLimiter(RedisBuckets(_FakeRedis(), off), RedisBuckets(_FakeRedis(), off))
    assert limiter.synchronous and not limiter.enabled
    assert limiter.check_now("10.0.0.1", "Bearer k") == 0.0


def test_limits_off_install_no_middleware_but_are_listed() -> None:
    app = web.Application()
    off = install(app, RateLimitConfig(key_per_second=0, ip_per_second=0))
    assert off.installed is None and list(app.middlewares) == []
    on = install(app, RateLimitConfig(key_per_second=0, ip_per_second=5))
    assert on.installed is not None and list(app.middlewares) == [on.installed]
    assert app[RATE_LIMITERS_KEY] == [off, on]
