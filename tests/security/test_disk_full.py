"""Issue 11, finding 8 (disk): a full disk is a clean 507 `insufficient_storage`, never a 500,
and loses nothing already committed. Each test mounts a REAL small tmpfs (we are root here and
in CI) as the uploads or the store directory, fills it, and unmounts it afterwards:

- a declared length the filesystem cannot take (keeping `min_free_bytes`) is refused up front;
- a PATCH whose Content-Length cannot fit is a 507 before its body is read; one that meets
  ENOSPC mid-body (chunked: no length; O_DIRECT and buffered writes alike: tmpfs takes
  O_DIRECT on this kernel) is a 507 whose offset is the last committed byte, `.part` is cut
  back to it, and the client resumes once there is room, ending with the right sha256; a
  slow body that checkpointed keeps its checkpoints;
- the move into the store failing for room (the store on its own filesystem: a copy) is a 507,
  no half-written object is visible, and an empty PATCH at the end finishes the upload later;
- tus on S3: the local part buffer filling is a 507 too, resumable;
- the filesystem object store never shows a half-written object.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from tests.backends import Backend
from tests.integration.test_tus import OCTETS, LiveControl, patch, sid_of, stored_source
from tests.s3server import REGION, S3Server
from vodcore.db.schema import upload_sessions, videos
from vodcore.store.fs import FilesystemStore

MiB = 1024 * 1024


@contextlib.contextmanager
def tmpfs(path: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of `size_mib` MiB mounted at `path` for the duration."""
    path.mkdir(parents=True, exist_ok=True)
    # A full disk is only real on a filesystem we can fill: like a missing PostgreSQL, a
    # machine where these cannot run fails them loudly rather than passing them unseen.
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (CI runs these tests as root)")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.fail(f"mount is not permitted here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> Path:
    """A filler file in `path`'s filesystem leaving about `leave` bytes free."""
    filler = path / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free(path) - leave))
    return filler


def chunked(data: bytes) -> Iterator[bytes]:
    """A body sent with chunked framing (requests: a generator), so no length is declared."""
    for i in range(0, len(data), 256 * 1024):
        yield data[i : i + 256 * 1024]


def error_of(r: requests.Response) -> dict[str, str]:
    doc = r.json()["error"]
    assert {"code", "message"} <= set(doc), doc
    return dict(doc)


def head_offset(live: LiveControl, url: str) -> int:
    r = requests.head(url, headers=live.auth(), timeout=30)
    assert r.status_code == 200, r.text
    return int(r.headers["Upload-Offset"])


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    """Mounts and servers, closed in reverse: the servers before their filesystems go."""
    with contextlib.ExitStack() as s:
        yield s


def start(
    stack: contextlib.ExitStack, data: Path, backend: Backend | None, **kw: object
) -> LiveControl:
    live = LiveControl(data, backend=backend, min_free_bytes=0, **kw)  # type: ignore[arg-type]
    stack.callback(live.close)
    return live


def test_a_length_past_the_free_space_is_refused_up_front(
    tmp_path: Path, backend: Backend, stack: contextlib.ExitStack
) -> None:
    data = tmp_path / "var"
    stack.enter_context(tmpfs(data / "uploads", 8))
    live = start(stack, data, backend)
    before = live.rows(select(videos.c.id))
    for headers in ({"Upload-Length": str(16 * MiB)},):
        r = requests.post(f"{live.url}/v1/tus/", headers={**live.auth(), **headers}, timeout=30)
        assert r.status_code == 507, r.text
        assert error_of(r)["code"] == "insufficient_storage"
    r = requests.post(
        f"{live.url}/v1/uploads",
        headers={"Authorization": live.auth()["Authorization"]},
        json={"title": "t", "sizeBytes": 16 * MiB},
        timeout=30,
    )
    assert r.status_code == 507 and error_of(r)["code"] == "insufficient_storage"
    assert live.rows(select(videos.c.id)) == before
    assert not list((data / "uploads").glob("us_*"))


def test_the_headroom_counts(tmp_path: Path, backend: Backend, stack: contextlib.ExitStack) -> None:
    data = tmp_path / "var"
    stack.enter_context(tmpfs(data / "uploads", 8))
    live = LiveControl(data, backend=backend, min_free_bytes=4 * MiB)
    stack.callback(live.close)
    r = requests.post(
        f"{live.url}/v1/tus/", headers={**live.auth(), "Upload-Length": str(6 * MiB)}, timeout=30
    )
    assert r.status_code == 507 and error_of(r)["code"] == "insufficient_storage"
    ok = requests.post(
        f"{live.url}/v1/tus/", headers={**live.auth(), "Upload-Length": str(3 * MiB)}, timeout=30
    )
    assert ok.status_code == 201


def test_a_patch_meeting_a_full_disk_is_507_and_resumes(
    tmp_path: Path, backend: Backend, stack: contextlib.ExitStack
) -> None:
    data = tmp_path / "var"
    uploads = stack.enter_context(tmpfs(data / "uploads", 16))
    live = start(stack, data, backend)
    body = os.urandom(10 * MiB)
    url, vid = live.create(len(body))
    filler = fill(uploads, 5 * MiB)
    r = patch(url, live.auth(), 0, chunked(body))  # no length: the disk fills mid-body
    assert r.status_code == 507, r.text
    assert error_of(r)["code"] == "insufficient_storage"
    offset = int(r.headers["Upload-Offset"])
    assert head_offset(live, url) == offset
    part = uploads / f"{sid_of(url)}.part"
    assert part.stat().st_size == offset  # cut back to what is committed
    assert part.read_bytes() == body[:offset]
    filler.unlink()  # room again: the client resumes
    r = patch(url, live.auth(), offset, body[offset:])
    assert r.status_code == 204, r.text
    assert hashlib.sha256(stored_source(live, vid)).digest() == hashlib.sha256(body).digest()


def test_a_patch_body_that_cannot_fit_is_refused_before_it_is_read(
    tmp_path: Path, backend: Backend, stack: contextlib.ExitStack
) -> None:
    data = tmp_path / "var"
    uploads = stack.enter_context(tmpfs(data / "uploads", 16))
    live = start(stack, data, backend)
    body = os.urandom(6 * MiB)
    url, vid = live.create(len(body))
    assert patch(url, live.auth(), 0, body[: 1 * MiB]).status_code == 204
    filler = fill(uploads, 2 * MiB)
    r = patch(url, live.auth(), 1 * MiB, body[1 * MiB :])  # 5 MiB with its Content-Length
    assert r.status_code == 507 and error_of(r)["code"] == "insufficient_storage", r.text
    assert r.headers["Upload-Offset"] == str(1 * MiB)
    assert (uploads / f"{sid_of(url)}.part").stat().st_size == 1 * MiB
    filler.unlink()
    assert patch(url, live.auth(), 1 * MiB, body[1 * MiB :]).status_code == 204
    assert stored_source(live, vid) == body


def test_a_slow_patch_keeps_its_checkpoints_when_the_disk_fills(
    tmp_path: Path, backend: Backend, stack: contextlib.ExitStack
) -> None:
    """curl at 4 MB/s: the body checkpoints (its first 4 MiB batch at least) before the disk
    fills at ~17 MiB (past what loopback's socket buffers let arrive in one burst, so the body
    has run for over a second by then); the 507 keeps them."""
    data = tmp_path / "var"
    uploads = stack.enter_context(tmpfs(data / "uploads", 40))
    live = start(stack, data, backend)
    src = tmp_path / "body.bin"
    body = os.urandom(24 * MiB)
    src.write_bytes(body)
    url, vid = live.create(len(body))
    filler = fill(uploads, 17 * MiB)
    out = subprocess.run(  # from stdin: chunked, no length to refuse up front
        ["curl", "-sS", "-X", "PATCH", "--limit-rate", "4M", "-T", "-",
         "-H", f"Authorization: {live.auth()['Authorization']}", "-H", "Tus-Resumable: 1.0.0",
         "-H", f"Content-Type: {OCTETS}", "-H", "Upload-Offset: 0",
         "-o", "/dev/null", "-w", "%{http_code}", url],
        stdin=src.open("rb"), capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.stdout == b"507", out
    offset = head_offset(live, url)
    assert offset >= 4 * MiB
    assert (uploads / f"{sid_of(url)}.part").read_bytes() == body[:offset]
    filler.unlink()
    assert patch(url, live.auth(), offset, body[offset:]).status_code == 204
    assert hashlib.sha256(stored_source(live, vid)).digest() == hashlib.sha256(body).digest()


def test_storing_the_source_on_a_full_store_is_507_and_finishes_later(
    tmp_path: Path, backend: Backend, stack: contextlib.ExitStack
) -> None:
    data = tmp_path / "var"
    store = stack.enter_context(tmpfs(data / "store", 8))
    live = start(stack, data, backend)
    body = os.urandom(3 * MiB)
    url, vid = live.create(len(body))
    filler = fill(store, 1 * MiB)
    r = patch(url, live.auth(), 0, body)
    assert r.status_code == 507, r.text
    assert error_of(r)["code"] == "insufficient_storage"
    assert head_offset(live, url) == len(body)  # every byte is committed; storing is not
    # nothing half-written is visible in the store
    assert not (store / "source" / vid / "original").exists()
    assert not [p for p in store.rglob("*") if p.is_file() and p != filler]
    rows = live.rows(select(upload_sessions.c.status).where(upload_sessions.c.video_id == vid))
    assert rows == [{"status": "open"}]
    filler.unlink()
    r = patch(url, live.auth(), len(body), b"")  # an empty PATCH at the end finishes it
    assert r.status_code == 204, r.text
    assert stored_source(live, vid) == body
    state = live.rows(select(videos.c.state).where(videos.c.id == vid))[0]["state"]
    assert state != "UPLOADING"


@pytest.mark.own_backends
def test_tus_on_s3_buffer_full_is_507_and_resumes(
    tmp_path: Path, s3: S3Server, stack: contextlib.ExitStack
) -> None:
    data = tmp_path / "var"
    # flushing a part rewrites the buffer's tail into a new file: room for about twice a
    # PATCH body is needed (control/multipart.py), hence 32 MiB for 12
    uploads = stack.enter_context(tmpfs(data / "uploads", 32))
    live = start(
        stack,
        data,
        None,
        s3_bucket=s3.bucket,
        s3_endpoint_url=s3.endpoint_url,
        s3_region=REGION,
        s3_prefix="vod",
        upload_part_bytes=5 * MiB,
    )
    body = os.urandom(12 * MiB)
    url, vid = live.create(len(body))
    filler = fill(uploads, 3 * MiB)
    r = patch(url, live.auth(), 0, chunked(body))
    assert r.status_code == 507, r.text
    assert error_of(r)["code"] == "insufficient_storage"
    offset = head_offset(live, url)
    filler.unlink()
    r = patch(url, live.auth(), offset, body[offset:])
    assert r.status_code == 204, r.text
    got = s3.client().get_object(Bucket=s3.bucket, Key=f"vod/source/{vid}/original")["Body"]
    assert hashlib.sha256(got.read()).digest() == hashlib.sha256(body).digest()


def test_the_filesystem_store_never_shows_a_half_written_object(
    tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    root = stack.enter_context(tmpfs(tmp_path / "store", 4))
    store = FilesystemStore(root)
    outside = tmp_path / "big.bin"
    outside.write_bytes(os.urandom(6 * MiB))

    async def go() -> None:
        for put in (
            store.put_bytes("source/vid_x/original", os.urandom(6 * MiB)),
            store.put_file("source/vid_y/original", outside),
            store.put_file("source/vid_z/original", outside, move=True),
        ):
            with pytest.raises(OSError) as e:
                await put
            assert e.value.errno == errno.ENOSPC
        assert await store.list("source") == []
        for key in ("source/vid_x/original", "source/vid_y/original", "source/vid_z/original"):
            assert not await store.exists(key)

    asyncio.run(go())
    assert not [p for p in root.rglob("*") if p.is_file()]  # no temporary file left
    assert outside.exists()  # a move that failed keeps its source


def test_vod_upload_finishes_in_a_later_run_after_a_full_store(
    tmp_path: Path, backend: Backend, stack: contextlib.ExitStack
) -> None:
    """`vod upload` against a full store: every byte is committed but storing fails (507), and
    runs keep failing while the store is full; each run says so and keeps the resume entry, so
    the run after room is freed finishes the same upload (no new one)."""
    data = tmp_path / "var"
    store = stack.enter_context(tmpfs(data / "store", 8))
    live = start(stack, data, backend)
    src = tmp_path / "clip.mp4"
    src.write_bytes(os.urandom(2 * MiB))
    filler = fill(store, 512 * 1024)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "VOD_API_KEY": live.key}
    cmd = [sys.executable, "-m", "vodcore.cli", "upload", str(src), "--api", live.url]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    first = run()
    assert first.returncode == 1, first.stderr
    second = run()
    assert second.returncode == 1 and "507 insufficient_storage" in second.stderr, second.stderr
    filler.unlink()
    third = run()
    assert third.returncode == 0, third.stderr
    vids = live.rows(select(videos.c.id))
    assert len(vids) == 1  # one upload, resumed twice
    assert stored_source(live, str(vids[0]["id"])) == src.read_bytes()
