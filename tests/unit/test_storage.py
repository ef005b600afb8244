"""MemoryStorage and CachedResponse (vodcore.cache.storage): bounds, refusals, 304 refresh."""

from __future__ import annotations

import random

import pytest

from vodcore.cache.admission import LRU, WTinyLFU
from vodcore.cache.policy import AgeInputs
from vodcore.cache.storage import CachedResponse, MemoryStorage

T0 = 1_700_000_000.0


def entry(key: str, size: int, *, etag: str | None = None) -> CachedResponse:
    return CachedResponse(
        key=key,
        status=200,
        headers=(("Content-Type", "video/iso.segment"),),
        body=b"x" * size,
        age=AgeInputs(0, T0, T0, T0),
        lifetime=60.0,
        etag=etag,
        last_modified=None,
    )


def test_size_is_filled_from_the_body() -> None:
    e = entry("/a", 1000)
    assert e.size == 1000 and e.body_path is None
    assert e.charge > 1000
    with pytest.raises(ValueError):
        CachedResponse("/a", 200, (), b"abc", AgeInputs(0, None, T0, T0), 1.0, None, None, size=2)


async def test_never_exceeds_budget() -> None:
    rng = random.Random(5)
    s = MemoryStorage(budget_bytes=200_000, max_object_bytes=50_000)
    for _ in range(2000):
        key = f"/k{int(rng.expovariate(0.05))}"
        if s.get(key) is None:
            await s.put(entry(key, rng.randint(1, 50_000)))
        assert s.bytes_used <= 200_000
        assert s.bytes_used == sum(e.charge for k in s.keys() if (e := s.peek(k)) is not None)
    assert 0 < len(s) < 200


async def test_refuses_oversized() -> None:
    s = MemoryStorage(budget_bytes=5000, max_object_bytes=2000)
    assert not await s.put(entry("/big", 2001))  # over max_object_bytes
    s2 = MemoryStorage(budget_bytes=1000, max_object_bytes=10_000)
    assert not await s2.put(entry("/big", 1500))  # over the whole budget
    assert len(s) == len(s2) == 0 and s.bytes_used == s2.bytes_used == 0


async def test_lru_admission_behaves_as_lru() -> None:
    one = entry("/a", 1000).charge
    s = MemoryStorage(3 * one, 10_000, admission=LRU(3 * one))
    for k in ("/a", "/b", "/c"):
        assert await s.put(entry(k, 1000))
    assert s.get("/a") is not None  # /a is now most recent; /b is the LRU
    assert await s.put(entry("/d", 1000))
    assert "/b" not in s and "/a" in s and "/d" in s
    assert await s.put(entry("/a", 500))  # replacing re-charges
    assert s.bytes_used == 2 * one + entry("/a", 500).charge
    assert await s.delete("/a") and not await s.delete("/a")
    await s.clear()
    assert len(s) == 0 and s.bytes_used == 0


async def test_scan_does_not_flush_hot_entries() -> None:
    s = MemoryStorage(20 * 1400, 10_000)
    hot = [f"/hot{i}" for i in range(15)]
    for _ in range(4):
        for k in hot:
            if s.get(k) is None:
                await s.put(entry(k, 1000))
    for i in range(500):
        key = f"/cold{i}"
        assert s.get(key) is None
        await s.put(entry(key, 1000))
    assert all(k in s for k in hot)


async def test_update_after_304_keeps_the_body() -> None:
    s = MemoryStorage(100_000, 10_000)
    await s.put(entry("/a", 3000, etag='"v1"'))
    new_age = AgeInputs(5, T0 + 100, T0 + 100, T0 + 100)
    out = await s.update(
        "/a",
        headers=(("Content-Type", "video/iso.segment"), ("Cache-Control", "max-age=600")),
        age=new_age,
        lifetime=600.0,
        etag='"v1"',
        last_modified=T0,
    )
    assert out is not None and out.body == b"x" * 3000 and out.size == 3000
    assert out.age == new_age and out.lifetime == 600.0 and out.last_modified == T0
    assert s.peek("/a") == out
    assert s.bytes_used == out.charge
    missing = await s.update(
        "/nope", headers=(), age=new_age, lifetime=1.0, etag=None, last_modified=None
    )
    assert missing is None


async def test_admission_budget_must_match() -> None:
    with pytest.raises(ValueError):
        MemoryStorage(1000, 100, admission=WTinyLFU(2000))
    s = MemoryStorage(1000, 100)
    await s.open()
    assert list(s.keys()) == []
    await s.close()
