"""One ObjectStore contract, every backend: the filesystem and S3 (moto's server over loopback).

Each test runs once per backend (STYLE.md habit 10). S3 tests share one bucket and one server
per session; each test gets its own key prefix, so they can't see each other's objects.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.s3server import REGION, S3Server
from vodcore.paths import BadPath
from vodcore.store import ObjectNotFound, ObjectStore
from vodcore.store.fs import FilesystemStore
from vodcore.store.s3 import S3Store

# Every store in every run, whatever --backend says (the `s3` server is the session's).
pytestmark = [pytest.mark.timeout(30), pytest.mark.own_backends]

MiB = 1024 * 1024


@dataclass
class Case:
    store: ObjectStore
    # Make the next put_file fail half-way through writing its bytes.
    break_writes: Callable[[pytest.MonkeyPatch], None]
    # Anything a failed write left behind in the backend (temporary files, open uploads).
    leftovers: Callable[[], list[str]]


def _fs_case(root: Path) -> Case:
    store = FilesystemStore(root)

    def break_writes(mp: pytest.MonkeyPatch) -> None:
        def half_then_fail(src: Any, dst: Any, length: int = 0) -> None:
            dst.write(src.read(MiB))
            raise OSError("disk on fire")

        mp.setattr(shutil, "copyfileobj", half_then_fail)

    def leftovers() -> list[str]:
        return sorted(str(p) for p in root.rglob(".tmp-*"))

    return Case(store, break_writes, leftovers)


def _s3_case(s3: S3Server) -> Case:
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    store = S3Store(s3.bucket, endpoint_url=s3.endpoint_url, region=REGION, prefix=prefix)

    def break_writes(mp: pytest.MonkeyPatch) -> None:
        real = S3Store._upload_part

        async def fail_second(self: S3Store, key: str, upload_id: str, n: int, d: bytes) -> str:
            if n >= 2:
                raise OSError("network on fire")
            return await real(self, key, upload_id, n, d)

        mp.setattr(S3Store, "_upload_part", fail_second)

    def leftovers() -> list[str]:
        r = s3.client().list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix + "/")
        return [u["Key"] for u in r.get("Uploads", [])]

    return Case(store, break_writes, leftovers)


@pytest.fixture(params=["fs", "s3"])
async def case(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Case]:
    if request.param == "fs":
        yield _fs_case(tmp_path / "store")
        return
    c = _s3_case(request.getfixturevalue("s3"))
    assert isinstance(c.store, S3Store)
    async with c.store:
        yield c


async def read_all(store: ObjectStore, key: str, start: int = 0, length: int | None = None,
                   chunk: int = 256 * 1024) -> bytes:  # fmt: skip
    return b"".join([c async for c in store.open_range(key, start, length, chunk)])


# --- the contract ------------------------------------------------------------------------------


async def test_put_stat_read_list_delete(case: Case) -> None:
    store = case.store
    data = os.urandom(300_000)
    info = await store.put_bytes("media/v1/1/seg-1.m4s", data)
    assert info.size == len(data)
    assert info.etag.startswith('"') and info.etag.endswith('"')
    st = await store.stat("media/v1/1/seg-1.m4s")
    assert (st.size, st.etag) == (info.size, info.etag)
    assert abs(st.mtime - info.mtime) < 2
    assert await store.exists("media/v1/1/seg-1.m4s")
    assert not await store.exists("media/v1/1/seg-2.m4s")
    assert isinstance(store, ObjectStore)

    assert await read_all(store, "media/v1/1/seg-1.m4s") == data
    assert await read_all(store, "media/v1/1/seg-1.m4s", 1000, 5000) == data[1000:6000]
    assert await read_all(store, "media/v1/1/seg-1.m4s", 299_990) == data[299_990:]
    # A length past the end stops at the end; a start past the end reads nothing.
    assert await read_all(store, "media/v1/1/seg-1.m4s", 299_000, 10_000) == data[299_000:]
    assert await read_all(store, "media/v1/1/seg-1.m4s", 400_000, 10) == b""
    assert await read_all(store, "media/v1/1/seg-1.m4s", 10, 0) == b""

    await store.put_bytes("media/v1/1/seg-2.m4s", b"two")
    await store.put_bytes("media/v1/current.json", b"{}")
    await store.put_bytes("media/v2/1/seg-1.m4s", b"other video")
    assert await store.list("media/v1/") == [
        "media/v1/1/seg-1.m4s",
        "media/v1/1/seg-2.m4s",
        "media/v1/current.json",
    ]
    assert await store.list("media/v1/1/") == ["media/v1/1/seg-1.m4s", "media/v1/1/seg-2.m4s"]
    assert await store.list("media/none/") == []

    # Replacing an object changes its validator.
    again = await store.put_bytes("media/v1/1/seg-2.m4s", b"TWO!")
    assert again.etag != (await store.stat("media/v1/1/seg-1.m4s")).etag
    assert await read_all(store, "media/v1/1/seg-2.m4s") == b"TWO!"

    await store.delete("media/v1/1/seg-1.m4s")
    await store.delete("media/v1/1/seg-1.m4s")  # deleting twice is fine
    assert not await store.exists("media/v1/1/seg-1.m4s")
    assert await store.list("media/v1/1/") == ["media/v1/1/seg-2.m4s"]


async def test_streams_in_chunks(case: Case) -> None:
    data = os.urandom(2 * MiB + 123)
    await case.store.put_bytes("media/v1/1/big.m4s", data)
    chunks = [c async for c in case.store.open_range("media/v1/1/big.m4s", 5, None, 64 * 1024)]
    assert b"".join(chunks) == data[5:]
    assert len(chunks) > 2 and max(map(len, chunks)) <= 64 * 1024


async def test_closing_a_stream_early_is_clean(case: Case) -> None:
    await case.store.put_bytes("media/v1/1/big.m4s", os.urandom(2 * MiB))
    it = case.store.open_range("media/v1/1/big.m4s", 0, None, 64 * 1024)
    assert len(await anext(it)) > 0
    await it.aclose()  # type: ignore[attr-defined]
    # The store is still usable afterwards (the S3 connection was released, not leaked).
    assert await read_all(case.store, "media/v1/1/big.m4s", 0, 10) != b""


@pytest.mark.parametrize("size", [3 * MiB, 12 * MiB])
async def test_put_file(case: Case, tmp_path: Path, size: int) -> None:
    src = tmp_path / "upload.bin"
    data = os.urandom(size)
    src.write_bytes(data)
    info = await case.store.put_file("source/v1/original.mp4", src)
    assert info.size == size
    assert src.exists()
    if isinstance(case.store, S3Store):
        # 12 MiB crosses the multipart threshold: S3 marks such an ETag with the part count.
        assert info.etag.endswith('-2"') == (size > 8 * MiB)
    assert await read_all(case.store, "source/v1/original.mp4") == data
    sample = data[size // 2 : size // 2 + 4096]
    assert await read_all(case.store, "source/v1/original.mp4", size // 2, 4096) == sample

    moved = await case.store.put_file("source/v1/again.mp4", src, move=True)
    assert moved.size == size
    assert not src.exists()
    assert case.leftovers() == []


async def test_failed_put_leaves_nothing(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "upload.bin"
    src.write_bytes(os.urandom(12 * MiB))
    case.break_writes(monkeypatch)
    with pytest.raises(OSError, match="on fire"):
        await case.store.put_file("source/v1/original.mp4", src)
    assert not await case.store.exists("source/v1/original.mp4")
    assert await case.store.list("source/v1/") == []
    assert case.leftovers() == []
    assert src.exists()  # the source of a failed put is kept

    # A failed replacement leaves the old object whole.
    monkeypatch.undo()
    old = await case.store.put_file("source/v1/original.mp4", src)
    case.break_writes(monkeypatch)
    shutil.copyfile(src, tmp_path / "other.bin")
    with pytest.raises(OSError, match="on fire"):
        await case.store.put_file("source/v1/original.mp4", tmp_path / "other.bin")
    now = await case.store.stat("source/v1/original.mp4")
    assert (now.size, now.etag) == (old.size, old.etag)
    assert case.leftovers() == []


async def test_missing_objects(case: Case) -> None:
    with pytest.raises(ObjectNotFound):
        await case.store.stat("media/v1/nope.m4s")
    with pytest.raises(ObjectNotFound):
        await read_all(case.store, "media/v1/nope.m4s")
    with pytest.raises(ObjectNotFound):
        await read_all(case.store, "media/v1/nope.m4s", 10, 10)
    assert not await case.store.exists("media/v1/nope.m4s")
    await case.store.delete("media/v1/nope.m4s")


async def test_move(case: Case) -> None:
    """Takedowns move a video's objects to a restricted prefix and back: same bytes, the
    source key gone, the destination replaced if it was there (a re-run after a crash)."""
    store = case.store
    data = os.urandom(200_000)
    await store.put_bytes("media/v1/1/seg-1.m4s", data)
    await store.put_bytes("media/v1/1/master.m3u8", b"#EXTM3U\n")
    before = await store.stat("media/v1/1/seg-1.m4s")
    await store.move("media/v1/1/seg-1.m4s", "restricted/media/v1/1/seg-1.m4s")
    assert not await store.exists("media/v1/1/seg-1.m4s")
    assert await read_all(store, "restricted/media/v1/1/seg-1.m4s") == data
    assert await store.list("media/v1/") == ["media/v1/1/master.m3u8"]
    assert await store.list("restricted/media/v1/") == ["restricted/media/v1/1/seg-1.m4s"]
    # and back: on the filesystem it is a rename, so even the validator survives
    await store.move("restricted/media/v1/1/seg-1.m4s", "media/v1/1/seg-1.m4s")
    after = await store.stat("media/v1/1/seg-1.m4s")
    assert await read_all(store, "media/v1/1/seg-1.m4s") == data
    assert after.size == before.size
    if not isinstance(store, S3Store):
        assert after.etag == before.etag
    assert await store.list("restricted/") == []
    # a destination already there (a copy a crash left behind) is replaced
    await store.put_bytes("restricted/media/v1/1/master.m3u8", b"#EXTM3U\n")
    await store.move("media/v1/1/master.m3u8", "restricted/media/v1/1/master.m3u8")
    assert await store.list("media/v1/") == ["media/v1/1/seg-1.m4s"]
    with pytest.raises(ObjectNotFound):
        await store.move("media/v1/1/master.m3u8", "restricted/media/v1/1/master.m3u8")
    with pytest.raises(BadPath):
        await store.move("media/v1/1/seg-1.m4s", "../outside")
    assert await store.exists("media/v1/1/seg-1.m4s")  # a refused move moves nothing
    assert case.leftovers() == []


BAD_KEYS = ["../etc/passwd", "media/../../x", "/abs", "a//b", "a\\b", "a\x00b", ".", "media/v1/"]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_keys_refused(case: Case, key: str) -> None:
    with pytest.raises(BadPath):
        await case.store.stat(key)
    with pytest.raises(BadPath):
        await case.store.put_bytes(key, b"x")
    with pytest.raises(BadPath):
        await read_all(case.store, key)
    with pytest.raises(BadPath):
        await case.store.delete(key)
    with pytest.raises(BadPath):
        await case.store.list("../")


async def test_fs_objects_are_readable_like_other_media(tmp_path: Path) -> None:
    """put_bytes writes through a mkstemp temporary (0600): the object must come out 0644 like
    the media ffmpeg writes, or an origin running as another user cannot serve it (issue 11:
    quality.json was the one 0600 file of a version)."""
    store = _fs_case(tmp_path / "store").store
    await store.put_bytes("media/v1/1/quality.json", b"{}")
    mode = (tmp_path / "store" / "media/v1/1/quality.json").stat().st_mode & 0o777
    assert mode == 0o644
