"""Uploads into S3 (control/multipart.py) against moto's server over loopback: the real control app
(`LiveControl` from test_tus) with an S3 object store.

Direct-to-S3: `POST /v1/uploads {method: "s3-multipart"}` hands out presigned part URLs, the parts
go up with plain `requests.put` (no control process in the data path), `…/complete {parts}` checks
and completes (wrong/malformed ETag, missing or not-uploaded part, sizes that do not add up, a
wrong whole-file sha256: each a 4xx), and a repeat returns the same video. tus on S3: tuspy PATCHes
(1 MiB ones, so remainders are buffered) end as one S3 object equal to the file, with no local
copy left; termination and expiry abort the multipart upload."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select, update
from tusclient import client as tus_client

from control.upload_expiry import expire_once
from tests.integration.test_tus import TUS, LiveControl, patch, sid_of
from tests.s3server import REGION, S3Server
from vodcore.db.schema import jobs, upload_sessions, videos

# S3 by nature (the direct-upload refusal without it too), whatever --backend says; the `s3`
# server is the session's.
pytestmark = [pytest.mark.timeout(120), pytest.mark.own_backends]

MiB = 1024 * 1024
PREFIX = "vod"


@pytest.fixture
def live(tmp_path: Path, s3: S3Server) -> Iterator[LiveControl]:
    lc = LiveControl(
        tmp_path / "var",
        s3_bucket=s3.bucket,
        s3_endpoint_url=s3.endpoint_url,
        s3_region=REGION,
        s3_prefix=PREFIX,
        upload_part_bytes=5 * MiB,
    )
    try:
        yield lc
    finally:
        lc.close()


def source(s3: S3Server, vid: str) -> bytes:
    r = s3.client().get_object(Bucket=s3.bucket, Key=f"{PREFIX}/source/{vid}/original")
    data: bytes = r["Body"].read()
    return data


def open_uploads(s3: S3Server, vid: str) -> list[str]:
    r = s3.client().list_multipart_uploads(Bucket=s3.bucket, Prefix=f"{PREFIX}/source/{vid}/")
    return [u["UploadId"] for u in r.get("Uploads", [])]


def create(live: LiveControl, size: int, **extra: Any) -> dict[str, Any]:
    r = requests.post(
        f"{live.url}/v1/uploads",
        headers=live.auth(),
        json={"title": "direct", "sizeBytes": size, "method": "s3-multipart", **extra},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    return doc


def put_parts(doc: dict[str, Any], payload: bytes) -> list[dict[str, Any]]:
    """PUT every part straight to S3 (the presigned URLs); returns the complete body's parts."""
    part = doc["partSizeBytes"]
    out = []
    for p in doc["parts"]:
        n = p["partNumber"]
        r = requests.put(p["url"], data=payload[(n - 1) * part : n * part], timeout=30)
        assert r.status_code == 200, r.text
        out.append({"partNumber": n, "etag": r.headers["ETag"]})
    return out


def complete(live: LiveControl, sid: str, body: Any) -> requests.Response:
    return requests.post(
        f"{live.url}/v1/uploads/{sid}/complete", headers=live.auth(), json=body, timeout=60
    )


# --- direct to S3 -----------------------------------------------------------------------------


def test_direct_upload_checks_parts_then_completes_once(live: LiveControl, s3: S3Server) -> None:
    payload = os.urandom(12 * MiB + 12345)
    doc = create(live, len(payload))
    sid, vid = doc["uploadSessionId"], doc["videoId"]
    assert doc["method"] == "s3-multipart" and doc["partSizeBytes"] == 5 * MiB
    assert [p["partNumber"] for p in doc["parts"]] == [1, 2, 3]
    assert doc["uploadUrl"].endswith(f"/v1/tus/{sid}") and doc["expiresAt"].endswith("Z")
    assert all(p["url"].startswith(s3.endpoint_url) for p in doc["parts"])
    # the tus resource refuses bytes: they go to S3
    assert patch(doc["uploadUrl"], live.auth(), 0, b"abc").status_code == 409

    parts = put_parts(doc, payload)
    # the client's ETags are MD5s of what it sent: S3's part ETags are the same
    for p, n in zip(parts, range(3), strict=True):
        chunk = payload[n * 5 * MiB : (n + 1) * 5 * MiB]
        assert p["etag"].strip('"') == hashlib.md5(chunk).hexdigest()

    bad_bodies: list[tuple[Any, str]] = [
        ({"parts": parts[:2]}, "part 3 is missing"),
        ({"parts": [parts[0], parts[2]]}, "part 2 is missing"),
        ({"parts": [parts[1], parts[0], parts[2]]}, "ascending"),
        ({"parts": [*parts[:2], {"partNumber": 3, "etag": '"' + "0" * 32 + '"'}]}, "ETag"),
        ({"parts": [*parts[:2], {"partNumber": 3, "etag": "nope"}]}, "etag"),
        ({"parts": [*parts, {"partNumber": 4, "etag": parts[0]["etag"]}]}, "not one"),
        ({"parts": []}, "non-empty"),
        ({}, "parts"),
        ({"parts": parts, "sha256": "xyz"}, "sha256"),
    ]
    for body, why in bad_bodies:
        r = complete(live, sid, body)
        assert r.status_code == 422, (body, r.text)
        assert why in r.json()["error"]["message"], (why, r.text)
    assert open_uploads(s3, vid)  # nothing was completed or aborted by the refusals
    assert live.rows(select(jobs.c.id)) == []

    sha = hashlib.sha256(payload).hexdigest()
    for _ in range(2):  # a repeat returns the same video, never a second job
        r = complete(live, sid, {"parts": parts, "sha256": sha})
        assert r.status_code == 202, r.text
        assert r.json() == {"videoId": vid, "state": "UPLOADED"}
    assert len(live.rows(select(jobs.c.id))) == 1
    assert hashlib.sha256(source(s3, vid)).digest() == hashlib.sha256(payload).digest()
    assert open_uploads(s3, vid) == []
    assert live.files(sid) == []


def test_direct_upload_part_not_uploaded_and_sizes(live: LiveControl, s3: S3Server) -> None:
    payload = os.urandom(6 * MiB)
    doc = create(live, len(payload))
    sid, vid = doc["uploadSessionId"], doc["videoId"]
    first = put_parts({**doc, "parts": doc["parts"][:1]}, payload)[0]
    fake = {"partNumber": 2, "etag": hashlib.md5(payload[5 * MiB :]).hexdigest()}
    r = complete(live, sid, {"parts": [first, fake]})
    assert r.status_code == 422 and "part 2 was not uploaded" in r.json()["error"]["message"]

    # part 2 too long: the parts do not add up to sizeBytes; nothing changes, fix and retry
    r = requests.put(doc["parts"][1]["url"], data=payload[5 * MiB :] + b"extra", timeout=30)
    wrong = {"partNumber": 2, "etag": r.headers["ETag"]}
    r = complete(live, sid, {"parts": [first, wrong]})
    assert r.status_code == 422 and r.json()["error"]["sizeBytes"] == len(payload)
    assert open_uploads(s3, vid)
    r = requests.put(doc["parts"][1]["url"], data=payload[5 * MiB :], timeout=30)
    right = {"partNumber": 2, "etag": r.headers["ETag"]}
    r = complete(live, sid, {"parts": [first, right]})
    assert r.status_code == 202 and r.json()["state"] == "UPLOADED"
    assert source(s3, vid) == payload


def test_direct_upload_wrong_sha256_discards_it(live: LiveControl, s3: S3Server) -> None:
    payload = os.urandom(MiB)
    doc = create(live, len(payload))
    sid, vid = doc["uploadSessionId"], doc["videoId"]
    assert len(doc["parts"]) == 1  # one (last, so small) part
    parts = put_parts(doc, payload)
    r = complete(live, sid, {"parts": parts, "sha256": hashlib.sha256(b"other").hexdigest()})
    assert r.status_code == 422 and "sha256" in r.json()["error"]["message"]
    keys = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"{PREFIX}/source/{vid}/")
    assert keys.get("KeyCount", 0) == 0  # the source was deleted
    assert live.rows(select(videos.c.id).where(videos.c.id == vid)) == []
    assert complete(live, sid, {"parts": parts}).status_code == 404
    assert open_uploads(s3, vid) == [] and live.files(sid) == []


def test_direct_upload_needs_an_s3_store(tmp_path: Path) -> None:
    lc = LiveControl(tmp_path / "var")
    try:
        r = requests.post(
            f"{lc.url}/v1/uploads",
            headers=lc.auth(),
            json={"title": "x", "sizeBytes": 10, "method": "s3-multipart"},
            timeout=10,
        )
        assert r.status_code == 422 and "S3" in r.json()["error"]["message"]
        r = requests.post(
            f"{lc.url}/v1/uploads",
            headers=lc.auth(),
            json={"title": "x", "sizeBytes": 10, "method": "ftp"},
            timeout=10,
        )
        assert r.status_code == 422 and r.json()["error"]["field"] == "method"
        assert lc.rows(select(videos.c.id)) == []
        # the default (tus) is unchanged: no method, no parts in the answer
        r = requests.post(
            f"{lc.url}/v1/uploads", headers=lc.auth(), json={"title": "x", "sizeBytes": 10}
        )
        assert r.status_code == 201 and "parts" not in r.json()
        assert r.json()["partSizeBytes"] == lc.settings.upload_part_bytes
    finally:
        lc.close()


# --- tus on S3 --------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [MiB, 3 * MiB + 17, 7 * MiB])
def test_tuspy_upload_streams_into_s3_parts(
    live: LiveControl, s3: S3Server, tmp_path: Path, chunk: int
) -> None:
    payload = os.urandom(11 * MiB + 777)
    src = tmp_path / "movie.bin"
    src.write_bytes(payload)
    auth = {"Authorization": f"Bearer {live.key}"}
    uploader = tus_client.TusClient(f"{live.url}/v1/tus/", headers=auth).uploader(
        str(src), chunk_size=chunk, upload_checksum=True, metadata={"title": "tus on s3"}
    )
    uploader.upload(stop_at=6 * MiB)  # creation and some PATCHes
    assert uploader.url is not None
    sid = sid_of(uploader.url)
    vid = live.rows(select(upload_sessions.c.video_id))[0]["video_id"]
    [upload_id] = open_uploads(s3, vid)
    held = s3.client().list_parts(
        Bucket=s3.bucket, Key=f"{PREFIX}/source/{vid}/original", UploadId=upload_id
    )
    sizes = [p["Size"] for p in held.get("Parts", [])]
    assert sizes == [5 * MiB]  # one whole part in S3, the rest buffered locally
    local = sum((live.uploads_dir / n).stat().st_size for n in live.files(sid))
    assert local < 5 * MiB + 4096  # never a full local copy
    head = requests.head(uploader.url, headers=live.auth(), timeout=10)
    assert int(head.headers["Upload-Offset"]) == uploader.offset

    resumed = tus_client.TusClient(f"{live.url}/v1/tus/", headers=auth).uploader(
        str(src), url=uploader.url, chunk_size=chunk, upload_checksum=True
    )
    assert resumed.offset == uploader.offset  # tuspy asked the server (HEAD)
    resumed.upload()
    assert hashlib.sha256(source(s3, vid)).digest() == hashlib.sha256(payload).digest()
    assert open_uploads(s3, vid) == [] and live.files(sid) == []
    assert live.rows(select(videos.c.state)) == [{"state": "UPLOADED"}]
    assert len(live.rows(select(jobs.c.id))) == 1
    c = requests.post(f"{live.url}/v1/uploads/{sid}/complete", headers=live.auth(), timeout=10)
    assert c.status_code == 202 and c.json() == {"videoId": vid, "state": "UPLOADED"}


def test_tus_on_s3_offset_follows_what_is_stored(live: LiveControl, s3: S3Server) -> None:
    url, vid = live.create(7 * MiB)
    sid = sid_of(url)
    assert patch(url, live.auth(), 0, b"a" * (5 * MiB + 10)).status_code == 204
    # a commit that died between its CAS and its append: the offset is ahead of the data
    live.execute(update(upload_sessions).where(upload_sessions.c.id == sid).values(offset=6 * MiB))
    head = requests.head(url, headers=live.auth(), timeout=10)
    assert head.headers["Upload-Offset"] == str(5 * MiB + 10)
    rest = b"b" * (2 * MiB - 10)
    r = patch(url, live.auth(), 5 * MiB + 10, rest)
    assert r.status_code == 204 and r.headers["Upload-Offset"] == str(7 * MiB)
    assert source(s3, vid) == b"a" * (5 * MiB + 10) + rest


def test_tus_on_s3_termination_and_expiry_abort(live: LiveControl, s3: S3Server) -> None:
    for why in ("terminated", "expired"):
        url, vid = live.create(8 * MiB)
        sid = sid_of(url)
        assert patch(url, live.auth(), 0, os.urandom(6 * MiB)).status_code == 204
        assert len(open_uploads(s3, vid)) == 1
        if why == "terminated":
            r = requests.delete(url, headers={**live.auth(), **TUS}, timeout=10)
            assert r.status_code == 204
        else:
            past = time.time() - 1
            live.execute(
                update(upload_sessions).where(upload_sessions.c.id == sid).values(expires_at=past)
            )
            swept = live.call(expire_once(live.engine, live.uploads_dir, time.time()))
            assert swept.expired == 1
        assert open_uploads(s3, vid) == [], why
        assert live.files(sid) == [], why
        assert requests.head(url, headers=live.auth(), timeout=10).status_code == 404
    # a direct upload is aborted by termination too
    doc = create(live, 6 * MiB)
    r = requests.delete(doc["uploadUrl"], headers={**live.auth(), **TUS}, timeout=10)
    assert r.status_code == 204 and open_uploads(s3, doc["videoId"]) == []
