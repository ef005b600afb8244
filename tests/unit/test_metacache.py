"""The metadata cache: the local level's policy (TTLs, LRU bound, invalidation racing a read)
and the read-through's single flight, with a fake loader and no Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from control.metacache import ABSENT, LocalCache, Meta, MetaCache, kind

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
