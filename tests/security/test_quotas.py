"""Issue 11, finding 8 (quotas): one creator key cannot fill the disk. A creation whose declared
length goes past what is left of the key's quota is 413 `quota_exceeded`, one open upload more
than the cap 429 `too_many_uploads`, both up front (nothing created, no byte read) on every
creation route (tus POST, tus creation-with-upload, POST /v1/uploads); stored sources count,
terminated uploads stop counting, operators are exempt; two racing creations (two control
processes on one database, SQLite or PostgreSQL with `--backend=scale`) cannot both pass a
quota that fits one."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from tests.backends import Backend
from tests.integration.test_tus import OCTETS, LiveControl, patch
from tests.s3server import REGION, S3Server
from vodcore.db.schema import upload_sessions, videos

QUOTA = 100_000


@pytest.fixture
def live(tmp_path: Path, backend: Backend) -> Iterator[LiveControl]:
    lc = LiveControl(
        tmp_path / "var",
        backend=backend,
        quota_bytes_per_key=QUOTA,
        max_upload_sessions_per_key=3,
        min_free_bytes=0,
    )
    try:
        yield lc
    finally:
        lc.close()


def tus_create(live: LiveControl, size: int, key: str | None = None, url: str | None = None,
               body: bytes | None = None) -> requests.Response:  # fmt: skip
    headers = {**live.auth(key), "Upload-Length": str(size)}
    if body is not None:
        headers["Content-Type"] = OCTETS
    return requests.post(f"{url or live.url}/v1/tus/", headers=headers, data=body, timeout=30)


def api_create(live: LiveControl, size: int, key: str | None = None) -> requests.Response:
    return requests.post(
        f"{live.url}/v1/uploads",
        headers={"Authorization": live.auth(key)["Authorization"]},
        json={"title": "t", "sizeBytes": size},
        timeout=30,
    )


def error_code(r: requests.Response) -> str:
    doc = json.loads(r.text)
    assert set(doc["error"]) >= {"code", "message"}, doc
    return str(doc["error"]["code"])


def test_a_creation_past_the_quota_is_413_on_every_route(live: LiveControl) -> None:
    before_videos = len(live.rows(select(videos.c.id)))
    first = tus_create(live, 60_000)
    assert first.status_code == 201, first.text
    for r in (
        tus_create(live, 50_000),
        tus_create(live, 50_000, body=b"x" * 1000),  # creation-with-upload: refused unread
        api_create(live, 50_000),
    ):
        assert r.status_code == 413, r.text
        assert error_code(r) == "quota_exceeded"
    assert r.json()["error"]["remainingBytes"] == 40_000
    # nothing of the refused creations exists: one video, one session, one .part
    assert len(live.rows(select(videos.c.id))) == before_videos + 1
    assert len(live.rows(select(upload_sessions.c.id))) == 1
    assert len(list(live.uploads_dir.glob("*.part"))) == 1
    # what is left fits
    assert tus_create(live, 40_000).status_code == 201


def test_stored_sources_count_and_terminated_uploads_do_not(live: LiveControl) -> None:
    url = tus_create(live, 70_000).headers["Location"]
    assert patch(url, live.auth(), 0, b"v" * 70_000).status_code == 204  # complete: UPLOADED
    r = tus_create(live, 40_000)
    assert r.status_code == 413 and error_code(r) == "quota_exceeded"
    ok = tus_create(live, 30_000)
    assert ok.status_code == 201
    gone = requests.delete(ok.headers["Location"], headers=live.auth(), timeout=30)
    assert gone.status_code == 204
    assert tus_create(live, 30_000).status_code == 201  # the terminated one's bytes are free


def test_operators_are_exempt_and_keys_are_separate(live: LiveControl) -> None:
    op = live.new_key("operator")
    assert tus_create(live, QUOTA, key=op).status_code == 201
    assert tus_create(live, QUOTA, key=op).status_code == 201
    other = live.new_key("creator")
    assert tus_create(live, QUOTA, key=other).status_code == 201  # its own quota
    assert tus_create(live, 1, key=other).status_code == 413


def test_open_uploads_per_key_are_capped(live: LiveControl) -> None:
    urls = [tus_create(live, 10).headers["Location"] for _ in range(3)]
    for r in (tus_create(live, 10), api_create(live, 10)):
        assert r.status_code == 429, r.text
        assert error_code(r) == "too_many_uploads"
        assert r.headers.get("Content-Type", "").startswith("application/json")
    # a completed upload is no longer open; a terminated one is gone
    assert patch(urls[0], live.auth(), 0, b"0123456789").status_code == 204
    assert tus_create(live, 10).status_code == 201
    assert tus_create(live, 10).status_code == 429
    assert requests.delete(urls[1], headers=live.auth(), timeout=30).status_code == 204
    assert tus_create(live, 10).status_code == 201


def test_racing_creations_cannot_both_pass_a_quota_that_fits_one(
    tmp_path: Path, backend: Backend
) -> None:
    """Two control processes on one database, each asked at the same moment for an upload of
    60% of the quota, for several fresh keys: exactly one of each pair is created."""
    live = LiveControl(
        tmp_path / "var", apps=2, backend=backend, quota_bytes_per_key=QUOTA, min_free_bytes=0
    )
    try:
        for _ in range(6):
            key = live.new_key("creator")
            barrier = threading.Barrier(2)
            statuses: list[int] = []

            def go(
                url: str,
                key: str = key,
                barrier: threading.Barrier = barrier,
                statuses: list[int] = statuses,
            ) -> None:
                barrier.wait(10)
                statuses.append(tus_create(live, 60_000, key=key, url=url).status_code)

            threads = [threading.Thread(target=go, args=(u,)) for u in live.urls]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert sorted(statuses) == [201, 413], statuses
    finally:
        live.close()


@pytest.mark.own_backends
def test_direct_to_s3_creation_is_checked_before_s3_is_asked(tmp_path: Path, s3: S3Server) -> None:
    """`method: "s3-multipart"` passes the same checks, before a multipart upload is created:
    a refused creation leaves nothing in the bucket either."""
    live = LiveControl(
        tmp_path / "var",
        quota_bytes_per_key=QUOTA,
        min_free_bytes=0,
        s3_bucket=s3.bucket,
        s3_endpoint_url=s3.endpoint_url,
        s3_region=REGION,
        s3_prefix="quota",
    )
    try:
        r = requests.post(
            f"{live.url}/v1/uploads",
            headers={"Authorization": live.auth()["Authorization"]},
            json={"title": "t", "sizeBytes": QUOTA + 1, "method": "s3-multipart"},
            timeout=30,
        )
        assert r.status_code == 413 and error_code(r) == "quota_exceeded", r.text
        held = s3.client().list_multipart_uploads(Bucket=s3.bucket, Prefix="quota/")
        assert not held.get("Uploads")
    finally:
        live.close()
