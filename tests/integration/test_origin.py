"""The origin over real loopback sockets, on every object store: the filesystem (sendfile) and
S3 (moto's server, streamed, Range passed through). Same tests, both backends (STYLE habit 10).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import uvloop
import yarl
from aiohttp import web

from origin import app as origin_app
from origin.app import STORE_KEY, make_app
from origin.policy import SHORT
from tests.s3server import REGION, S3Server
from vodcore import sendfile
from vodcore.config import Settings
from vodcore.store import ObjectStore
from vodcore.store.s3 import S3Store

# Both stores in every run, whatever --backend says (the `s3` server is the session's).
pytestmark = [pytest.mark.timeout(30), pytest.mark.own_backends]

VID = "vid_or1"
BIG = os.urandom(3 * 1024 * 1024 + 17)
OBJECTS = {
    "1/seg-0-00001.m4s": os.urandom(100_000),
    "1/big.m4s": BIG,
    "1/master.m3u8": b"#EXTM3U\n",
    "1/empty.vtt": b"",
    "current.json": b'{"version": 1}',
}


@pytest.fixture(scope="session")
def s3_prefix(s3: S3Server) -> str:
    """The test objects, uploaded once: no test here writes, and moto is slow to fill."""
    prefix = f"o-{uuid.uuid4().hex[:10]}"
    client = s3.client()
    for name, data in OBJECTS.items():
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/media/{VID}/{name}", Body=data)
    return prefix


@dataclass
class Origin:
    url: str
    store: ObjectStore
    session: aiohttp.ClientSession
    s3_ranges: list[str | None] = field(default_factory=list)  # Range of each GetObject sent

    async def get(self, path: str, **kw: Any) -> tuple[aiohttp.ClientResponse, bytes]:
        url = yarl.URL(self.url + path, encoded=True)
        async with self.session.get(url, **kw) as resp:
            return resp, await resp.read()


async def start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture(params=["fs", "s3"])
async def origin(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Origin]:
    if request.param == "fs":
        app = make_app(Settings(data_dir=tmp_path))
        for name, data in OBJECTS.items():
            await app[STORE_KEY].put_bytes(f"media/{VID}/{name}", data)
    else:
        s3 = request.getfixturevalue("s3")
        settings = Settings(
            data_dir=tmp_path,
            s3_bucket=s3.bucket,
            s3_endpoint_url=s3.endpoint_url,
            s3_region=REGION,
            s3_prefix=request.getfixturevalue("s3_prefix"),
        )
        app = make_app(settings)  # make_store picks S3 from the settings
    store = app[STORE_KEY]
    (tmp_path / "secret.txt").write_bytes(b"TOP-SECRET")
    runner, url = await start(app)
    session = aiohttp.ClientSession(auto_decompress=False)
    o = Origin(url, store, session)
    if isinstance(store, S3Store):

        def record(request: Any, **_kw: Any) -> None:
            o.s3_ranges.append(as_range(request.headers.get("Range")))

        client = (await store.open())._client
        client.meta.events.register("before-send.s3.GetObject", record)
    try:
        yield o
    finally:
        await session.close()
        await runner.cleanup()  # closes the store


def assert_json_error(resp: aiohttp.ClientResponse, body: bytes, *statuses: int) -> None:
    assert resp.status in statuses, body
    assert resp.content_type == "application/json"
    assert set(orjson.loads(body)["error"]) >= {"code", "message"}


def as_range(header: str | bytes | None) -> str | None:
    return header.decode() if isinstance(header, bytes) else header


# --- 200 and HEAD ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["1/seg-0-00001.m4s", "1/big.m4s", "1/master.m3u8"])
async def test_full_object(origin: Origin, name: str) -> None:
    resp, body = await origin.get(f"/v/{VID}/{name}")
    assert resp.status == 200
    assert body == OBJECTS[name]
    info = await origin.store.stat(f"media/{VID}/{name}")
    h = resp.headers
    assert h["Content-Length"] == str(len(OBJECTS[name]))
    assert h["ETag"] == info.etag
    assert h["Last-Modified"]
    assert h["Accept-Ranges"] == "bytes"
    assert h["Cache-Control"] == "public, max-age=31536000, immutable"
    assert h["Surrogate-Key"] == VID
    assert "X-Cache" not in h
    if isinstance(origin.store, S3Store):
        assert origin.s3_ranges == [f"bytes=0-{len(OBJECTS[name]) - 1}"]


async def test_content_types_and_short_ttl(origin: Origin) -> None:
    resp, body = await origin.get(f"/v/{VID}/current.json")
    assert resp.status == 200 and body == OBJECTS["current.json"]
    assert resp.headers["Cache-Control"] == SHORT
    resp, _ = await origin.get(f"/v/{VID}/1/master.m3u8")
    assert resp.headers["Content-Type"] == "application/vnd.apple.mpegurl"
    resp, _ = await origin.get(f"/v/{VID}/1/seg-0-00001.m4s")
    assert resp.headers["Content-Type"] == "video/iso.segment"


async def test_empty_object(origin: Origin) -> None:
    resp, body = await origin.get(f"/v/{VID}/1/empty.vtt")
    assert resp.status == 200 and body == b""
    assert resp.headers["Content-Length"] == "0"


async def test_head(origin: Origin) -> None:
    async with origin.session.head(f"{origin.url}/v/{VID}/1/big.m4s") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(BIG))
        assert resp.headers["Surrogate-Key"] == VID
        assert "ETag" in resp.headers
        assert await resp.read() == b""
    assert origin.s3_ranges == []  # HEAD never reads the body from S3


# --- ranges ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=100-199", 100, 199),
        ("bytes=1048576-", 1048576, len(BIG) - 1),
        ("bytes=-10", len(BIG) - 10, len(BIG) - 1),
        ("bytes=5-99999999", 5, len(BIG) - 1),
    ],
)
async def test_single_range(origin: Origin, header: str, start: int, end: int) -> None:
    resp, body = await origin.get(f"/v/{VID}/1/big.m4s", headers={"Range": header})
    assert resp.status == 206
    assert body == BIG[start : end + 1]
    assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{len(BIG)}"
    assert resp.headers["Content-Length"] == str(end - start + 1)
    assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    if isinstance(origin.store, S3Store):
        # Only the range was asked of S3, not the whole object.
        assert origin.s3_ranges == [f"bytes={start}-{end}"]


async def test_unsatisfiable_range(origin: Origin) -> None:
    resp, body = await origin.get(f"/v/{VID}/1/big.m4s", headers={"Range": "bytes=99999999-"})
    assert_json_error(resp, body, 416)
    assert resp.headers["Content-Range"] == f"bytes */{len(BIG)}"


async def test_invalid_or_multi_range_is_ignored(origin: Origin) -> None:
    for header in ("bytes=9-1", "bytes=0-1,5-6", "garbage"):
        resp, body = await origin.get(f"/v/{VID}/1/seg-0-00001.m4s", headers={"Range": header})
        assert resp.status == 200, header
        assert body == OBJECTS["1/seg-0-00001.m4s"]


async def test_if_range(origin: Origin) -> None:
    path = f"/v/{VID}/1/seg-0-00001.m4s"
    data = OBJECTS["1/seg-0-00001.m4s"]
    resp, _ = await origin.get(path)
    etag, lm = resp.headers["ETag"], resp.headers["Last-Modified"]
    for validator in (etag, lm):
        resp, body = await origin.get(path, headers={"Range": "bytes=0-9", "If-Range": validator})
        assert resp.status == 206 and body == data[:10]
    for stale in ('"not-it"', "Mon, 01 Jan 2001 00:00:00 GMT", "W/" + etag):
        resp, body = await origin.get(path, headers={"Range": "bytes=0-9", "If-Range": stale})
        assert resp.status == 200 and body == data, stale


# --- conditionals ------------------------------------------------------------------------------


async def test_not_modified(origin: Origin) -> None:
    path = f"/v/{VID}/1/seg-0-00001.m4s"
    resp, _ = await origin.get(path)
    etag, lm = resp.headers["ETag"], resp.headers["Last-Modified"]
    for headers in (
        {"If-None-Match": etag},
        {"If-None-Match": f'"other", W/{etag}'},
        {"If-Modified-Since": lm},
        {"If-None-Match": etag, "Range": "bytes=0-9"},
    ):
        resp, body = await origin.get(path, headers=headers)
        assert resp.status == 304, headers
        assert body == b""
        assert resp.headers["ETag"] == etag
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    # A non-matching tag wins over a matching date (RFC 9110 §13.1.3).
    resp, body = await origin.get(path, headers={"If-None-Match": '"x"', "If-Modified-Since": lm})
    assert resp.status == 200 and body == OBJECTS["1/seg-0-00001.m4s"]
    resp, _ = await origin.get(path, headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"})
    assert resp.status == 200


# --- errors ------------------------------------------------------------------------------------


async def test_not_found_is_json(origin: Origin) -> None:
    for path in (f"/v/{VID}/1/nope.m4s", "/v/other/1/x.m4s", f"/v/{VID}/1", "/nothing"):
        resp, body = await origin.get(path)
        assert_json_error(resp, body, 404)


@pytest.mark.parametrize(
    "path",
    [
        f"/v/{VID}/../../secret.txt",
        f"/v/{VID}/%2e%2e/%2e%2e/secret.txt",
        f"/v/{VID}/..%2f..%2fsecret.txt",
        f"/v/{VID}/1/%00.m4s",
        f"/v/{VID}/1%5c..%5c..%5csecret.txt",
        "/v/%2e%2e/secret.txt",
        "/v/./1/x",
    ],
)
async def test_traversal_refused(origin: Origin, path: str) -> None:
    resp, body = await origin.get(path)
    assert_json_error(resp, body, 400, 404)
    assert b"TOP-SECRET" not in body


# --- disconnects and the sendfile path ---------------------------------------------------------


async def test_client_disconnect_mid_body_is_quiet(
    origin: Origin, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    aborted: list[object] = []

    def spy_abort(request: web.BaseRequest) -> None:
        aborted.append(request)
        real_abort(request)

    real_abort = sendfile.abort
    monkeypatch.setattr(sendfile, "abort", spy_abort)
    monkeypatch.setattr(origin_app, "abort", spy_abort)
    caplog.set_level(logging.WARNING)
    name, data = "1/big.m4s", BIG
    if origin.store.local_path(f"media/{VID}/{name}") is not None:
        # sendfile fills loopback's socket buffers (MiBs) at once: the body must be larger.
        name, data = "1/huge.m4s", os.urandom(24 * 1024 * 1024)
        await origin.store.put_bytes(f"media/{VID}/{name}", data)
    loop = asyncio.get_running_loop()
    for _ in range(3):
        # A small receive buffer, so the server is still mid-body when the client leaves.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.setblocking(False)
        await loop.sock_connect(sock, (yarl.URL(origin.url).host, yarl.URL(origin.url).port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(f"GET /v/{VID}/{name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readexactly(1000)
        writer.transport.abort()  # RST: the server is mid-body
    await asyncio.sleep(0.2)
    resp, body = await origin.get(f"/v/{VID}/{name}")
    assert resp.status == 200 and body == data
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert noisy == []
    assert aborted, "the server never saw the disconnect mid-body"


async def test_fs_uses_sendfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.sendfile

    def spy(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        calls.append(count)
        return real(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", spy)
    body, ranged = await asyncio.to_thread(uvloop.run, _fs_scenario(tmp_path))
    assert body == BIG
    assert ranged == BIG[1000:2000]
    assert calls, "the filesystem body did not go through sendfile"


async def _fs_scenario(tmp_path: Path) -> tuple[bytes, bytes]:
    """On uvloop, like the servers: uvloop has no loop.sendfile, so this is our own path."""
    app = make_app(Settings(data_dir=tmp_path))
    await app[STORE_KEY].put_bytes(f"media/{VID}/1/big.m4s", BIG)
    runner, url = await start(app)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/v/{VID}/1/big.m4s") as r:
                body = await r.read()
            async with s.get(f"{url}/v/{VID}/1/big.m4s", headers={"Range": "bytes=1000-1999"}) as r:
                assert r.status == 206
                ranged = await r.read()
        return body, ranged
    finally:
        await runner.cleanup()


async def test_pipelined_responses_stay_in_order(origin: Origin) -> None:
    """Two requests on one connection, read late: the second response must come whole after
    the first one's body (sendfile writes beside the transport, so order is on us)."""
    name, data = "1/big.m4s", BIG
    if origin.store.local_path(f"media/{VID}/{name}") is not None:
        name, data = "1/huge.m4s", os.urandom(12 * 1024 * 1024)
        await origin.store.put_bytes(f"media/{VID}/{name}", data)
    url = yarl.URL(origin.url)
    reader, writer = await asyncio.open_connection(url.host, url.port, limit=1 << 20)
    req = f"GET /v/{VID}/{name} HTTP/1.1\r\nHost: x\r\n\r\n"
    ranged = f"GET /v/{VID}/{name} HTTP/1.1\r\nHost: x\r\nRange: bytes=7-1000006\r\n\r\n"
    writer.write((req + ranged).encode())
    await writer.drain()
    await asyncio.sleep(0.3)
    for status, expect in ((b"200", data), (b"206", data[7:1000007])):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.split(b" ")[1] == status, head[:200]
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert length == len(expect)
        assert await reader.readexactly(length) == expect
    writer.close()
