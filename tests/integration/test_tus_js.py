"""The stock JavaScript client, tus-js-client (what Uppy uses), under Node against the real
control app (on the backend `--backend` names): creation with the first chunk on the POST,
several PATCHes, a retry after a connection cut mid-PATCH, and a resume in a second run. The
stored source must be byte-identical (sha256) to the file.

The client is pinned in tests/js/package.json (+ package-lock.json); this module installs it
into tests/js/node_modules with `npm ci` the first time (bounded, loud on failure) and reuses
it afterwards. Node.js >= 18 and npm are required: without them the tests fail, they don't
skip."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from tests.backends import Backend, read_object, run_sync
from tests.faultproxy import CuttingProxy
from tests.integration.test_tus import LiveControl
from tests.nodejs import JS_DIR, node_with_packages
from vodcore.db.schema import videos
from vodcore.layout import source_key


@pytest.fixture(scope="module")
def node() -> str:
    return node_with_packages("the tus-js-client tests")


@pytest.fixture
def live(tmp_path: Path, backend: Backend) -> Iterator[LiveControl]:
    lc = LiveControl(tmp_path / "var", **backend.overrides())
    try:
        yield lc
    finally:
        lc.close()


def run_client(node: str, endpoint: str, src: Path, key: str, *args: str) -> dict[str, Any]:
    p = subprocess.run(
        [node, str(JS_DIR / "upload.mjs"), endpoint, str(src), "--key", key, *args],
        capture_output=True, text=True, timeout=60, cwd=JS_DIR,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
    )  # fmt: skip
    assert p.returncode == 0, f"stdout: {p.stdout}\nstderr: {p.stderr}"
    report: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return report


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_source(live: LiveControl, vid: str) -> bytes:
    return run_sync(lambda: read_object(live.settings, source_key(vid)))


def test_tus_js_client_retries_after_a_cut(node: str, backend: Backend, tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 777)
    src = tmp_path / "movie.mp4"
    src.write_bytes(payload)
    # The proxy is the server's public address (`public_control_url`: upload URLs never come
    # from Host), so the client's PATCHes go through it too; it learns the server's port after.
    proxy = CuttingProxy(0, cut_after_bytes=1_300_000)
    live = LiveControl(tmp_path / "var", **backend.overrides(), public_control_url=proxy.url)
    try:
        proxy.upstream = ("127.0.0.1", int(live.url.rsplit(":", 1)[1]))
        try:
            report = run_client(node, f"{proxy.url}/v1/tus/", src, live.key, "--chunk", "524288")
        finally:
            proxy.close()
        assert report["state"] == "done"
        assert proxy.cuts == 1 and report["retries"] >= 1  # the cut PATCH was retried
        assert report["patches"] >= 6  # 3 MiB in 512 KiB chunks, the first on the POST
        assert report["videoId"] and report["url"].startswith(proxy.url + "/v1/tus/us_")
        assert sha256(stored_source(live, report["videoId"])) == sha256(payload)
        v = requests.get(f"{live.url}/v1/videos/{report['videoId']}", timeout=10).json()
        assert v["state"] == "UPLOADED" and v["title"] == "movie.mp4"
    finally:
        live.close()


def test_tus_js_client_resumes_in_a_second_run(
    node: str, live: LiveControl, tmp_path: Path
) -> None:
    payload = os.urandom(2 * 1024 * 1024 + 5)
    src = tmp_path / "movie.mp4"
    src.write_bytes(payload)
    endpoint = f"{live.url}/v1/tus/"
    first = run_client(node, endpoint, src, live.key, "--chunk", "262144", "--stop-after", "700000")
    assert first["state"] == "stopped" and first["url"]
    head = requests.head(first["url"], headers=live.auth(), timeout=10)
    kept = int(head.headers["Upload-Offset"])
    assert 0 < kept < len(payload)
    second = run_client(
        node, endpoint, src, live.key, "--chunk", "262144", "--resume", first["url"]
    )
    assert second["state"] == "done" and second["url"] == first["url"]
    assert second["patches"] <= (len(payload) - kept) // 262144 + 1  # resumed, not restarted
    assert sha256(stored_source(live, first["videoId"])) == sha256(payload)
    assert len(live.rows(select(videos.c.id))) == 1
