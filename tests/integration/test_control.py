"""Control over real sockets (a `vod control` process on the backend `--backend` names): a stock
tus client (tuspy) uploads through a proxy that cuts the connection mid-PATCH, resumes, and
completes; plus the bad-input table of the API."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from tusclient import client as tus_client

from control.auth import create_key
from tests.backends import Backend, Backends, read_object, run_sync
from tests.conftest import free_port
from tests.faultproxy import CuttingProxy
from tests.procs import VodProcess, wait_http
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import jobs, videos
from vodcore.layout import source_key

TUS = {"Tus-Resumable": "1.0.0"}


@dataclass
class Control:
    url: str
    settings: Settings  # what the process runs on (its data dir, database, store)
    key: str

    def rows(self, table: str) -> list[dict[str, object]]:
        async def go() -> list[dict[str, object]]:
            engine = make_engine(self.settings.db_url)
            t = {"videos": videos, "jobs": jobs}[table]
            try:
                async with engine.connect() as conn:
                    return [dict(r._mapping) for r in (await conn.execute(t.select())).all()]
            finally:
                await engine.dispose()

        return run_sync(go)

    def source(self, vid: str) -> bytes:
        """The stored upload, from whichever object store the process uses."""
        return run_sync(lambda: read_object(self.settings, source_key(vid)))


def _make_key(settings: Settings, role: str) -> str:
    async def go() -> str:
        engine = make_engine(settings.db_url)
        try:
            await create_schema(engine)
            async with engine.begin() as conn:
                return await create_key(conn, role, 0.0)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _control(root: Path, backend: Backend) -> Iterator[Control]:
    data = root / "var"
    data.mkdir()
    settings = backend.settings(data)
    key = _make_key(settings, "creator")
    port = free_port()
    p = VodProcess(
        ["control", "--data", str(data), "--port", str(port)],
        root / "control.log",
        env=backend.env(),
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=p.proc)
        yield Control(f"http://127.0.0.1:{port}", settings, key)
    finally:
        assert p.stop() == 0, p.output()
        assert "Traceback" not in p.output(), p.output()


@pytest.fixture
def control(tmp_path: Path, backend: Backend) -> Iterator[Control]:
    yield from _control(tmp_path, backend)


@pytest.fixture(scope="module")
def shared_control(
    tmp_path_factory: pytest.TempPathFactory, backends: Backends
) -> Iterator[Control]:
    """One process for the bad-input table: a refused request changes nothing."""
    with backends.lease() as backend:
        yield from _control(tmp_path_factory.mktemp("control"), backend)


def test_tuspy_upload_survives_a_cut_connection(control: Control, tmp_path: Path) -> None:
    api, key = control.url, control.key
    auth = {"Authorization": f"Bearer {key}"}
    payload = bytes(range(256)) * 4096 * 3  # 3 MiB
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    r = requests.post(
        f"{api}/v1/uploads",
        headers=auth,
        timeout=10,
        json={"title": "cut", "sizeBytes": len(payload), "contentType": "video/mp4"},
    )
    assert r.status_code == 201, r.text
    up = r.json()
    assert set(up) >= {"videoId", "uploadSessionId", "uploadUrl", "partSizeBytes", "expiresAt"}

    proxy = CuttingProxy(int(api.rsplit(":", 1)[1]), cut_after_bytes=1_200_000)
    try:
        url = up["uploadUrl"].replace(api, proxy.url)
        client = tus_client.TusClient(f"{proxy.url}/v1/tus/", headers=auth)
        uploader = client.uploader(str(src), url=url, chunk_size=len(payload), retries=0)
        with pytest.raises(Exception):  # noqa: B017 - any client error: the socket was cut
            uploader.upload_chunk()
        assert proxy.cuts == 1
    finally:
        proxy.close()

    # The server kept what arrived before the cut (tus: keep received bytes).
    # The server notices the cut asynchronously; poll HEAD briefly as a real client would.
    for _ in range(50):
        head = requests.head(up["uploadUrl"], headers={**auth, **TUS}, timeout=10)
        assert head.status_code == 200
        kept = int(head.headers["Upload-Offset"])
        if kept:
            break
        time.sleep(0.1)
    assert 0 < kept < len(payload)

    # A fresh client (as after a restart) resumes from the server's offset.
    client = tus_client.TusClient(f"{api}/v1/tus/", headers=auth)
    uploader = client.uploader(str(src), url=up["uploadUrl"], chunk_size=1024 * 1024)
    assert uploader.offset == kept
    uploader.upload()
    head = requests.head(up["uploadUrl"], headers={**auth, **TUS}, timeout=10)
    assert int(head.headers["Upload-Offset"]) == len(payload)

    # Finishing the last byte completed the upload; complete is idempotent.
    for _ in range(2):
        c = requests.post(
            f"{api}/v1/uploads/{up['uploadSessionId']}/complete", headers=auth, timeout=10
        )
        assert c.status_code == 202, c.text
        assert c.json() == {"videoId": up["videoId"], "state": "UPLOADED"}
    stored = control.source(up["videoId"])
    assert hashlib.sha256(stored).digest() == hashlib.sha256(payload).digest()
    assert len(control.rows("videos")) == 1
    job_rows = control.rows("jobs")
    assert [(j["video_id"], j["kind"], j["state"]) for j in job_rows] == [
        (up["videoId"], "transcode", "queued")
    ]
    v = requests.get(f"{api}/v1/videos/{up['videoId']}", timeout=10).json()
    assert v["state"] == "UPLOADED" and v["title"] == "cut"


def test_tus_creation_by_post_for_stock_clients(control: Control, tmp_path: Path) -> None:
    api, key = control.url, control.key
    src = tmp_path / "small.bin"
    src.write_bytes(b"x" * 100_000)
    client = tus_client.TusClient(f"{api}/v1/tus/", headers={"Authorization": f"Bearer {key}"})
    uploader = client.uploader(str(src), chunk_size=30_000, metadata={"title": "via tus"})
    uploader.upload()
    assert uploader.url and "/v1/tus/us_" in uploader.url
    opts = requests.options(f"{api}/v1/tus/", timeout=10)
    assert opts.status_code == 204
    assert opts.headers["Tus-Version"] == "1.0.0"
    assert "creation" in opts.headers["Tus-Extension"]


BAD = [
    # (method, path, headers, body, status, code)
    ("POST", "/v1/uploads", {}, b'{"title":"t","sizeBytes":1}', 401, "unauthenticated"),
    ("POST", "/v1/uploads", "AUTH", b"not json", 400, "bad_json"),
    ("POST", "/v1/uploads", "AUTH", b"[]", 422, "validation_failed"),
    ("POST", "/v1/uploads", "AUTH", b'{"title":"","sizeBytes":1}', 422, "validation_failed"),
    ("POST", "/v1/uploads", "AUTH", b'{"title":"t","sizeBytes":-1}', 422, "validation_failed"),
    ("POST", "/v1/uploads", "AUTH", b'{"title":"t","sizeBytes":true}', 422, "validation_failed"),
    ("POST", "/v1/uploads", "AUTH", b'{"title":"t","sizeBytes":1,"visibility":"x"}', 422,
     "validation_failed"),
    ("POST", "/v1/uploads", "AUTH", b'{"title":"t","sizeBytes":99999999999999}', 413, "too_large"),
    ("GET", "/v1/videos/vid_aaaaaaaaaaaaaaaa", {}, b"", 404, "not_found"),
    ("GET", "/v1/videos/..%2f..%2fetc", {}, b"", 404, "not_found"),
    ("GET", "/v1/videos/vid_aaaaaaaaaaaaaaaa/playback", {}, b"", 404, "not_found"),
    ("POST", "/v1/uploads/us_aaaaaaaaaaaaaaaa/complete", "AUTH", b"", 404, "not_found"),
    ("HEAD", "/v1/tus/us_aaaaaaaaaaaaaaaa", "TUSAUTH", b"", 404, None),
    ("PATCH", "/v1/tus/us_aaaaaaaaaaaaaaaa", "TUSAUTH", b"abc", 404, "not_found"),
    ("POST", "/v1/tus/", "AUTH", b"", 412, "precondition_failed"),
    ("POST", "/v1/tus/", "TUSAUTH", b"", 400, "bad_request"),
    ("GET", "/nope", {}, b"", 404, "not_found"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "headers", "body", "status", "code"), BAD)
def test_bad_input_gets_a_json_4xx(
    shared_control: Control,
    method: str,
    path: str,
    headers: object,
    body: bytes,
    status: int,
    code: str | None,
) -> None:
    api, key = shared_control.url, shared_control.key
    h: dict[str, str] = {}
    if headers in ("AUTH", "TUSAUTH"):
        h["Authorization"] = f"Bearer {key}"
    if headers == "TUSAUTH":
        h.update(TUS)
        h["Content-Type"] = "application/offset+octet-stream"
        h["Upload-Offset"] = "0"
    r = requests.request(method, api + path, headers=h, data=body, timeout=10)
    assert r.status_code == status, r.text
    if code:
        assert r.json()["error"]["code"] == code
    assert shared_control.rows("videos") == []  # nothing made by a refused request


def test_patch_rules(control: Control) -> None:
    api, key = control.url, control.key
    auth = {"Authorization": f"Bearer {key}"}
    up = requests.post(
        f"{api}/v1/uploads", headers=auth, json={"title": "p", "sizeBytes": 10}, timeout=10
    ).json()
    url = up["uploadUrl"]
    h = {**auth, **TUS, "Content-Type": "application/offset+octet-stream"}
    assert (
        requests.patch(url, headers={**h, "Upload-Offset": "4"}, data=b"ab", timeout=10).status_code
        == 409
    )
    r = requests.patch(
        url,
        headers={**h, "Content-Type": "text/plain", "Upload-Offset": "0"},
        data=b"ab",
        timeout=10,
    )
    assert r.status_code == 415
    r = requests.patch(url, headers={**h, "Upload-Offset": "0"}, data=b"abcd", timeout=10)
    assert r.status_code == 204 and r.headers["Upload-Offset"] == "4"
    # past Upload-Length: refused, and the bytes already stored are not lost
    r = requests.patch(url, headers={**h, "Upload-Offset": "4"}, data=b"0123456789", timeout=10)
    assert r.status_code == 413
    head = requests.head(url, headers={**auth, **TUS}, timeout=10)
    assert int(head.headers["Upload-Offset"]) >= 4
    c = requests.post(
        f"{api}/v1/uploads/{up['uploadSessionId']}/complete", headers=auth, timeout=10
    )
    assert c.status_code == 409 and c.json()["error"]["code"] == "upload_state"
    pb = requests.get(f"{api}/v1/videos/{up['videoId']}/playback", timeout=10)
    assert pb.status_code == 409 and pb.json()["error"]["state"] == "UPLOADING"


def test_vod_upload_cli_resumes_after_a_cut(control: Control, tmp_path: Path) -> None:
    """`vod upload` through a proxy that cuts the first PATCH: tuspy retries, asks the server
    where it stands (HEAD) and finishes; the stored source is byte-identical."""
    api, key = control.url, control.key
    src = tmp_path / "movie.mp4"
    src.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    proxy = CuttingProxy(int(api.rsplit(":", 1)[1]), cut_after_bytes=1_000_000)
    try:
        p = subprocess.run(
            [sys.executable, "-m", "vodcore.cli", "upload", str(src), "--title", "cli",
             "--api", proxy.url, "--key", key, "--chunk-mib", "4", "--quiet"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
        )  # fmt: skip
    finally:
        proxy.close()
    assert p.returncode == 0, p.stderr
    assert proxy.cuts == 1
    vid = p.stdout.strip()
    assert vid.startswith("vid_")
    assert control.source(vid) == src.read_bytes()
    v = requests.get(f"{api}/v1/videos/{vid}", timeout=10).json()
    assert v["state"] == "UPLOADED" and v["title"] == "cli"


def test_vod_upload_without_a_key_explains_itself(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "vodcore.cli", "upload", str(tmp_path / "x.mp4")],
        capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if k != "VOD_API_KEY"},
    )  # fmt: skip
    assert p.returncode == 2
    assert "vod keys create" in p.stderr and "Traceback" not in p.stderr


def test_vod_upload_cli_resumes_in_a_second_run(control: Control, tmp_path: Path) -> None:
    """The network goes down mid-upload and stays down: the first run gives up with a clear
    message; running the same command again continues from the server's offset."""
    api, key = control.url, control.key
    src = tmp_path / "movie.mp4"
    src.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = ["--title", "twice", "--key", key, "--chunk-mib", "4", "--quiet", "--retries", "0"]
    proxy = CuttingProxy(int(api.rsplit(":", 1)[1]), 1_000_000, refuse_after_cut=True)
    try:
        first = subprocess.run(
            [sys.executable, "-m", "vodcore.cli", "upload", str(src), "--api", proxy.url, *args],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
    finally:
        proxy.close()
    assert first.returncode == 1, first.stderr
    assert "run the same command again to resume" in first.stderr
    assert "Traceback" not in first.stderr
    second = subprocess.run(
        [sys.executable, "-m", "vodcore.cli", "upload", str(src), "--api", api, *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "resuming upload of" in second.stderr
    vid = second.stdout.strip()
    assert control.source(vid) == src.read_bytes()
    assert len(control.rows("videos")) == 1  # resumed, not uploaded again as a new video
