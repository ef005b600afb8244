"""Disk and tiered cache storage over real files (tmp_path); the shared contract runs against
every backend (memory, disk, tiered)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from vodcore.cache.admission import LRU
from vodcore.cache.disk import DiskStorage, _encode_meta, key_hash
from vodcore.cache.policy import AgeInputs
from vodcore.cache.storage import CachedResponse, CacheStorage, MemoryStorage
from vodcore.cache.tiered import TieredStorage

pytestmark = pytest.mark.timeout(30)
T0 = 1_700_000_000.0
MB = 1024 * 1024


def entry(key: str, size: int, *, fill: int = 120, t: float = T0) -> CachedResponse:
    return CachedResponse(
        key=key,
        status=200,
        headers=(("Content-Type", "video/iso.segment"), ("ETag", '"e1"')),
        body=bytes([fill % 256]) * size,
        age=AgeInputs(0, t, t, t),
        lifetime=3600.0,
        etag='"e1"',
        last_modified=t - 10,
    )


def body_of(e: CachedResponse) -> bytes:
    if e.body is not None:
        return e.body
    assert e.body_path is not None
    return e.body_path.read_bytes()


def disk(root: Path, budget: int = 10 * MB, max_object: int = 2 * MB) -> DiskStorage:
    return DiskStorage(root, budget, max_object, fsync=False)


Factory = Callable[[Path], CacheStorage]
BACKENDS: dict[str, Factory] = {
    "memory": lambda root: MemoryStorage(10 * MB, 2 * MB),
    "disk": lambda root: disk(root),
    "tiered": lambda root: TieredStorage(MemoryStorage(1 * MB, 256 * 1024), disk(root)),
}


@pytest.fixture(params=list(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CacheStorage]:
    s = BACKENDS[request.param](tmp_path / "cache")
    await s.open()
    yield s
    await s.close()


# --- the contract, for every backend -------------------------------------------------------------


async def test_put_get_delete(store: CacheStorage) -> None:
    assert store.get("/a") is None
    assert await store.put(entry("/a", 5000))
    got = store.get("/a")
    assert got is not None and body_of(got) == bytes([120]) * 5000 and got.size == 5000
    assert got.etag == '"e1"' and got.headers[0] == ("Content-Type", "video/iso.segment")
    assert list(store.keys()) == ["/a"] and len(store) == 1
    assert await store.put(entry("/a", 100, fill=7))  # replace
    got = store.get("/a")
    assert got is not None and body_of(got) == bytes([7]) * 100
    assert await store.delete("/a") and not await store.delete("/a")
    assert store.get("/a") is None and len(store) == 0 and store.bytes_used == 0


async def test_update_keeps_body(store: CacheStorage) -> None:
    await store.put(entry("/a", 3000))
    age = AgeInputs(3, T0 + 50, T0 + 50, T0 + 50)
    out = await store.update(
        "/a", headers=(("X", "y"),), age=age, lifetime=10.0, etag='"e1"', last_modified=None
    )
    assert out is not None and body_of(out) == bytes([120]) * 3000
    got = store.get("/a")
    assert got is not None and got.age == age and got.headers == (("X", "y"),)


async def test_refusals_and_budget(store: CacheStorage) -> None:
    assert not await store.put(entry("/huge", 3 * MB))
    for i in range(40):
        await store.put(entry(f"/k{i}", 900_000))
        assert store.bytes_used <= 11 * MB  # memory + disk share for tiered
    await store.clear()
    assert len(store) == 0 and store.bytes_used == 0 and list(store.keys()) == []


# --- disk ---------------------------------------------------------------------------------------


def body_path(s: DiskStorage, key: str) -> Path:
    e = s.peek(key)
    assert e is not None and e.body_path is not None
    return e.body_path


def files(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file())


async def test_disk_layout_and_entry_fields(tmp_path: Path) -> None:
    s = disk(tmp_path)
    await s.open()
    assert await s.put(entry("/v/1/seg-1.m4s", 1000))
    e = s.get("/v/1/seg-1.m4s")
    assert e is not None and e.body is None and e.size == 1000
    assert e.body_path is not None and e.body_path.stat().st_size == 1000
    h = key_hash("/v/1/seg-1.m4s")
    assert e.body_path.parent == tmp_path / h[:2] / h[2:4]
    assert e.body_path.with_suffix(".meta").is_file()
    assert len(files(tmp_path)) == 2


async def test_disk_survives_restart(tmp_path: Path) -> None:
    s = disk(tmp_path)
    await s.open()
    for i in range(5):
        assert await s.put(entry(f"/k{i}", 1000 + i, fill=i, t=T0 + i))
    before = {k: s.peek(k) for k in s.keys()}
    used = s.bytes_used
    await s.close()

    s2 = disk(tmp_path)
    await s2.open()
    assert s2.last_open is not None and s2.last_open.entries == 5
    assert s2.last_open.removed_files == 0
    assert {k: s2.peek(k) for k in s2.keys()} == before
    assert s2.bytes_used == used
    e = s2.get("/k3")
    assert e is not None and body_of(e) == bytes([3]) * 1003


async def test_open_cleans_crash_debris(tmp_path: Path) -> None:
    s = disk(tmp_path)
    await s.open()
    for k in ("/good", "/orphan-meta", "/short-body", "/orphan-body"):
        await s.put(entry(k, 2000))
    paths = {k: body_path(s, k) for k in s.keys()}
    await s.close()
    paths["/orphan-meta"].unlink()  # metadata, no body
    paths["/short-body"].write_bytes(b"x" * 10)  # size mismatch
    paths["/orphan-body"].with_suffix(".meta").unlink()  # body, no metadata
    (paths["/good"].parent / ".tmp-abc123").write_bytes(b"partial")  # interrupted write
    (paths["/good"].parent / "junk.meta").write_bytes(b"{not json")
    # An older version of /good next to the current one (crash before the old was unlinked).
    old = entry("/good", 50, t=T0 - 100)
    stale_body = paths["/good"].with_name(f"{key_hash('/good')}-000000000000.body")
    stale_body.write_bytes(old.body or b"")
    stale_body.with_suffix(".meta").write_bytes(_encode_meta(old))

    s2 = disk(tmp_path)
    await s2.open()
    assert list(s2.keys()) == ["/good"]
    g = s2.get("/good")
    assert g is not None and g.size == 2000 and g.body_path == paths["/good"]
    assert len(files(tmp_path)) == 2  # the good pair only
    assert s2.last_open is not None and s2.last_open.removed_files == 8


async def test_open_evicts_down_to_a_smaller_budget(tmp_path: Path) -> None:
    s = disk(tmp_path)
    await s.open()
    for i in range(8):
        await s.put(entry(f"/k{i}", 100_000, t=T0 + i))
    await s.close()
    s2 = disk(tmp_path, budget=450_000)
    await s2.open()
    assert s2.bytes_used <= 450_000 and len(s2) == 4
    assert "/k7" in s2 and "/k0" not in s2  # oldest dropped first
    assert len(files(tmp_path)) == 2 * len(s2)


async def test_disk_budget_and_eviction_removes_files(tmp_path: Path) -> None:
    budget = 1_000_000
    s = DiskStorage(tmp_path, budget, 200_000, admission=LRU(budget), fsync=False)
    await s.open()
    for i in range(30):
        assert await s.put(entry(f"/k{i}", 100_000))
        assert s.bytes_used <= budget
    assert len(s) == 9 and "/k29" in s and "/k0" not in s
    assert len(files(tmp_path)) == 18


async def test_unlinked_while_being_read(tmp_path: Path) -> None:
    """Eviction during sendfile is safe: an open descriptor keeps the unlinked file (POSIX)."""
    s = disk(tmp_path)
    await s.open()
    await s.put(entry("/a", 300_000, fill=9))
    e = s.get("/a")
    assert e is not None and e.body_path is not None
    with open(e.body_path, "rb") as f:  # noqa: ASYNC230 (a sendfile stand-in: the descriptor)
        head = f.read(1000)
        assert await s.delete("/a")
        assert not e.body_path.exists()
        rest = f.read()
    assert head + rest == bytes([9]) * 300_000
    with pytest.raises(FileNotFoundError):
        e.body_path.open("rb")  # a reader that had not opened it yet: a miss


async def test_delete_during_put_leaves_nothing(tmp_path: Path) -> None:
    s = disk(tmp_path)
    await s.open()
    put = asyncio.create_task(s.put(entry("/a", 500_000)))
    await asyncio.sleep(0)  # the write is in its thread now
    assert await s.delete("/a")
    assert not await put
    assert "/a" not in s and s.bytes_used == 0 and files(tmp_path) == []


async def test_cancelled_put_still_commits(tmp_path: Path) -> None:
    s = disk(tmp_path)
    await s.open()
    put = asyncio.create_task(s.put(entry("/a", 100_000)))
    await asyncio.sleep(0)
    put.cancel()
    await s.close()  # waits for the shielded write
    assert "/a" in s and len(files(tmp_path)) == 2


async def test_concurrent_puts_same_key(tmp_path: Path) -> None:
    s = disk(tmp_path)
    await s.open()
    results = await asyncio.gather(*(s.put(entry("/a", 10_000 + i, fill=i)) for i in range(5)))
    assert sum(results) == 1 and results[-1]  # the last writer wins, the others withdraw
    e = s.get("/a")
    assert e is not None and body_of(e) == bytes([4]) * 10_004
    assert len(files(tmp_path)) == 2


async def test_write_failure_is_a_refusal(tmp_path: Path) -> None:
    s = disk(tmp_path)
    await s.open()
    h = key_hash("/a")
    (tmp_path / h[:2]).write_bytes(b"")  # a file where the fan-out directory must go
    assert not await s.put(entry("/a", 1000))
    assert "/a" not in s and s.bytes_used == 0
    assert await s.put(entry("/b", 1000))  # the storage still works for other keys


# --- tiered -------------------------------------------------------------------------------------


async def test_tiered_put_get_and_promotion(tmp_path: Path) -> None:
    mem = MemoryStorage(1 * MB, 256 * 1024)
    t = TieredStorage(mem, disk(tmp_path), promote_max_bytes=100_000)
    await t.open()
    assert await t.put(entry("/small", 50_000))
    assert await t.put(entry("/big", 500_000))  # too big for memory: disk only
    assert "/small" in mem and "/big" not in mem
    assert t.bytes_used == t.memory_bytes + t.disk_bytes
    assert len(t) == 2 and sorted(t.keys()) == ["/big", "/small"]

    # A restart empties memory; the disk hit of a small object is copied back up.
    await t.close()
    mem2 = MemoryStorage(1 * MB, 256 * 1024)
    t2 = TieredStorage(mem2, disk(tmp_path), promote_max_bytes=100_000)
    await t2.open()
    e = t2.get("/small")
    assert e is not None and e.body is None and e.body_path is not None  # served from disk
    for _ in range(50):
        if "/small" in mem2:
            break
        await asyncio.sleep(0.01)
    got = t2.get("/small")
    assert got is not None and got.body == bytes([120]) * 50_000  # now from memory
    big = t2.get("/big")
    assert big is not None and big.body is None  # above the promotion threshold
    await asyncio.sleep(0.05)
    assert "/big" not in mem2

    await t2.update(
        "/small", headers=(), age=AgeInputs(1, T0, T0, T0), lifetime=5.0, etag=None,
        last_modified=None,
    )  # fmt: skip
    m, d = mem2.peek("/small"), t2.disk.peek("/small")
    assert m is not None and d is not None and m.lifetime == d.lifetime == 5.0
    assert await t2.delete("/small")
    assert "/small" not in mem2 and "/small" not in t2.disk
    await t2.close()
