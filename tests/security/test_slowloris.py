"""Issue 11, finding 2 (slowloris): no tier timed out a request head that never finished, so
~20,000 half-sent heads exhausted the edge's file descriptors and `/healthz` stopped
answering; control behaved the same.

Against a real edge and a real control on loopback, with small limits so the attack is small
(a few hundred sockets from this process, bounded in count and time), 127/8 source addresses
standing in for many attackers:
- half-sent heads are closed by the server once the head timeout passes (a 408 JSON answer
  if the head was begun), and `/healthz` answers all along;
- one peer's excess connections over the per-IP cap are closed at once, counted, and other
  peers are not affected;
- a flood from many peers that fills the connection budget makes the connections waiting
  longest for a head yield their slots: `/healthz` still answers;
- a request body that stalls longer than the body timeout is cut (closed; not a 500, not an
  "unhandled error" line), one that keeps flowing slowly is not; a tus PATCH likewise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from tests.procs import wait_http
from tests.security.wire import (
    Live,
    _origin,
    closed_by_server,
    exchange,
    healthz,
    metric,
    metric_sum,
    metrics,
    open_from,
    serve,
)
from vodcore.connlimits import ServerLimits

HALF_HEAD = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: "


@contextlib.asynccontextmanager
async def sockets(
    port: int, sources: list[str], head: bytes = HALF_HEAD
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    conns = []
    try:
        for src in sources:
            r, w = await open_from(port, src)
            w.write(head)
            conns.append((r, w))
        await asyncio.gather(*(w.drain() for _, w in conns), return_exceptions=True)
        yield conns
    finally:
        for _, w in conns:
            w.close()


async def states(
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], within: float
) -> list[bytes | None]:
    return list(await asyncio.gather(*(closed_by_server(r, within) for r, _ in conns)))


@pytest.fixture(params=["edge", "control"])
def tier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_half_sent_heads_are_closed_after_the_head_timeout(tier: str, tmp_path: Path) -> None:
    limits = ServerLimits(header_timeout=1.0, keepalive_timeout=30.0, max_connections_per_ip=0)
    async with serve(tier, tmp_path, limits) as live:
        before = await metrics(live.port)
        async with sockets(live.port, ["127.0.0.1"] * 200) as conns:
            # the attack holds 200 connections: the server still answers
            assert await healthz(live.port) == 200
            # an idle connection that never sent a byte is closed too, without an answer
            idle_r, idle_w = await open_from(live.port)
            got = await states(conns, within=15.0)
            idle = await closed_by_server(idle_r, within=15.0)
            idle_w.close()
        assert all(g is not None for g in got), "a half-sent head outlived the head timeout"
        for g in got:
            assert g is not None
            if g:  # begun heads get a 408 with the JSON error, then the close
                assert g.startswith(b"HTTP/1.1 408 "), g[:80]
                body = g.split(b"\r\n\r\n", 1)[1]
                assert orjson.loads(body)["error"]["code"] == "request_timeout"
        assert idle == b""
        after = await metrics(live.port)
        closed = metric(after, "vod_connections_closed_total", tier=tier, reason="header_timeout")
        was = metric(before, "vod_connections_closed_total", tier=tier, reason="header_timeout")
        assert closed - was >= 201
        assert await healthz(live.port) == 200


async def test_a_complete_head_on_a_keepalive_connection_is_not_cut(tmp_path: Path) -> None:
    """Requests on one keep-alive connection spaced by more than the head timeout (but less
    than the idle timeout) all get answered: the head timer runs only while a head is due."""
    limits = ServerLimits(header_timeout=0.5, keepalive_timeout=30.0)
    async with serve("edge", tmp_path, limits) as live:
        r, w = await open_from(live.port)
        try:
            for _ in range(3):
                w.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 ")
                n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await r.readexactly(n)
                await asyncio.sleep(1.0)  # idle, no head begun: twice the head timeout
        finally:
            w.close()


async def test_per_ip_cap_closes_the_excess_at_once(tier: str, tmp_path: Path) -> None:
    # a head timeout far beyond the test: what closes early is the cap, nothing else
    limits = ServerLimits(header_timeout=60.0, keepalive_timeout=60.0, max_connections_per_ip=40)
    async with serve(tier, tmp_path, limits) as live:
        before = await metrics(live.port)
        async with sockets(live.port, ["127.0.0.3"] * 70) as conns:
            got = await states(conns, within=2.0)
            refused = [g for g in got if g is not None]
            assert len(refused) == 30
            assert all(g == b"" for g in refused)  # closed before any request was read
            assert await healthz(live.port, "127.0.0.4") == 200  # other peers unaffected
            after = await metrics(live.port)
        capped = metric(after, "vod_connections_closed_total", tier=tier, reason="per_ip_cap")
        was = metric(before, "vod_connections_closed_total", tier=tier, reason="per_ip_cap")
        assert capped - was == 30
        # once the peer's connections are gone, it may connect again
        await asyncio.sleep(0.2)
        assert await healthz(live.port, "127.0.0.3") == 200


async def test_a_flood_from_many_peers_leaves_healthz_answering(tier: str, tmp_path: Path) -> None:
    limits = ServerLimits(
        header_timeout=60.0,
        keepalive_timeout=60.0,
        max_connections_per_ip=50,
        max_connections=120,
    )
    async with serve(tier, tmp_path, limits) as live:
        before = await metrics(live.port)
        sources = [f"127.0.1.{i}" for i in range(1, 7) for _ in range(50)]  # 300 sockets
        async with sockets(live.port, sources) as conns:
            for _ in range(3):
                assert await healthz(live.port, "127.0.0.1") == 200
            got = await states(conns, within=1.0)
            open_now = sum(g is None for g in got)
            assert open_now <= 120
            after = await metrics(live.port)
        evicted = metric_sum(after, "vod_connections_closed_total", tier=tier, reason="evicted")
        was = metric_sum(before, "vod_connections_closed_total", tier=tier, reason="evicted")
        assert evicted - was >= 300 - 120


async def _no_server_errors(live: Live, before: str, caplog: pytest.LogCaptureFixture) -> None:
    after = await metrics(live.port)
    fives = metric_sum(after, "vod_http_requests_total", tier=live.tier, status="500")
    was = metric_sum(before, "vod_http_requests_total", tier=live.tier, status="500")
    assert fives == was, "a disconnect was counted as a 500"
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


async def test_a_stalled_body_is_cut(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    limits = ServerLimits(header_timeout=5.0, body_timeout=1.0)
    async with serve("control", tmp_path, limits) as live:
        before = await metrics(live.port)
        r, w = await open_from(live.port)
        w.write(
            b"POST /v1/uploads HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + live.keys["creator"].encode() + b"\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"title": "x'
        )
        got = await closed_by_server(r, within=15.0)
        w.close()
        assert got is not None, "a stalled body kept its connection"
        assert b" 500 " not in got
        after = await metrics(live.port)
        cut = metric(after, "vod_connections_closed_total", tier="control", reason="body_timeout")
        was = metric(before, "vod_connections_closed_total", tier="control", reason="body_timeout")
        assert cut - was == 1
        await _no_server_errors(live, before, caplog)
        assert await healthz(live.port) == 200


async def _create_upload(live: Live, length: int) -> str:
    body = orjson.dumps({"title": "slow", "sizeBytes": length})
    status, _, resp = await exchange(
        live.port,
        b"POST /v1/uploads HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + live.keys["creator"].encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    assert status == 201, resp
    url = str(orjson.loads(resp)["uploadUrl"])
    return "/" + url.split("/", 3)[3]


def _patch_head(live: Live, path: str, length: int) -> bytes:
    return (
        f"PATCH {path} HTTP/1.1\r\nHost: t\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
        f"Authorization: Bearer {live.keys['creator']}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def test_a_stalled_tus_patch_is_cut_without_a_server_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    limits = ServerLimits(header_timeout=5.0, body_timeout=1.0)
    async with serve("control", tmp_path, limits) as live:
        path = await _create_upload(live, 1 << 20)
        before = await metrics(live.port)
        r, w = await open_from(live.port)
        w.write(_patch_head(live, path, 1 << 20) + b"\0" * 65536)
        got = await closed_by_server(r, within=15.0)
        w.close()
        assert got is not None, "a stalled PATCH kept its connection"
        assert b" 500 " not in got
        await _no_server_errors(live, before, caplog)


async def test_a_slow_but_flowing_body_is_not_cut(tmp_path: Path) -> None:
    """A PATCH whose bytes keep coming, each pause shorter than the body timeout, for
    several times the body timeout in all, completes."""
    limits = ServerLimits(header_timeout=5.0, body_timeout=2.0)
    async with serve("control", tmp_path, limits) as live:
        n, chunk = 12, 4096
        path = await _create_upload(live, n * chunk)
        r, w = await open_from(live.port)
        try:
            w.write(_patch_head(live, path, n * chunk))
            for _ in range(n):
                w.write(b"\1" * chunk)
                await w.drain()
                await asyncio.sleep(0.5)  # 6 s in all, 3x the body timeout
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        finally:
            w.close()
        assert head.startswith(b"HTTP/1.1 204 "), head
        assert f"upload-offset: {n * chunk}".encode() in head.lower()


async def test_timeouts_set_to_zero_are_off(tmp_path: Path) -> None:
    """0 turns the head and body timeouts off (not: close at once)."""
    limits = ServerLimits(header_timeout=0, body_timeout=0)
    async with serve("control", tmp_path, limits) as live:
        r, w = await open_from(live.port)
        try:
            w.write(b"GET /healthz HTTP/1.1\r\n")
            await w.drain()
            await asyncio.sleep(0.3)
            w.write(b"Host: t\r\n\r\n")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        finally:
            w.close()
        assert head.startswith(b"HTTP/1.1 200 ")


async def test_an_idle_keepalive_connection_is_closed(tier: str, tmp_path: Path) -> None:
    """After its answer, a keep-alive connection that stays silent is closed after the idle
    timeout (aiohttp's default was an hour)."""
    limits = ServerLimits(header_timeout=60.0, keepalive_timeout=1.0)
    async with serve(tier, tmp_path, limits) as live:
        r, w = await open_from(live.port)
        try:
            w.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await r.readexactly(n)
            assert await closed_by_server(r, within=15.0) == b""
        finally:
            w.close()


async def test_a_real_edge_keeps_descriptors_for_itself_under_a_flood(tmp_path: Path) -> None:
    """`vod edge` in a process limited to 512 descriptors (so 448 for connections, a reserve
    of 64), flooded with 600 half-sent heads from eight addresses: the longest-waiting ones
    yield their slots, /healthz answers, and a cache miss, which needs an upstream socket and
    a cache file, is served; the process never runs out of descriptors."""
    origin = await _origin()
    port = int(await asyncio.to_thread(_free_port))
    config = tmp_path / "vod.toml"
    config.write_text("header_timeout_seconds = 60.0\nmax_connections_per_ip = 100\n")
    log = tmp_path / "edge.log"
    upstream = str(origin.make_url("")).rstrip("/")
    edge = await asyncio.to_thread(_start_limited_edge, tmp_path, port, upstream, config, log)
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/healthz", 30, edge)
        sources = [f"127.0.3.{i}" for i in range(1, 9) for _ in range(75)]
        async with sockets(port, sources) as conns:
            assert await healthz(port, "127.0.0.1") == 200
            status, _, body = await exchange(
                port, b"GET /v/small/1/seg.m4s HTTP/1.1\r\nHost: t\r\n\r\n"
            )
            assert status == 200 and body == b"x" * 1024
            got = await states(conns, within=1.0)
            assert sum(g is None for g in got) <= 448
            text = await metrics(port)
        assert metric(text, "vod_connections_closed_total", tier="edge", reason="evicted") > 0
    finally:
        edge.terminate()
        await asyncio.to_thread(edge.wait, 20)
        await origin.close()
    output = log.read_text(errors="replace")
    assert "Too many open files" not in output and "EMFILE" not in output, output[-2000:]


def _start_limited_edge(
    tmp_path: Path, port: int, upstream: str, config: Path, log: Path
) -> subprocess.Popen[bytes]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vodcore.cli", "edge", "--config", str(config),
             "--port", str(port), "--tokens", "off", "--upstream", upstream,
             "--data", str(tmp_path / "edge")],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
