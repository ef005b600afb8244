"""Faults on real processes: origin (on the object store `--backend` names), two shields and an
edge (`vod …` each), players loading segments while a shield is killed with SIGKILL and then
while the origin is stopped; plus malformed HTTP on every tier."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.backends import Backend, Backends, open_store, run_sync
from tests.conftest import free_port
from tests.procs import VodProcess, wait_http

pytestmark = pytest.mark.e2e
VID = "vid_faultsfaultsfault"
SEGMENTS = 120
SEG_BYTES = 64 * 1024


@dataclass
class Cdn:
    origin: VodProcess
    shields: list[VodProcess]
    edge: VodProcess
    edge_url: str
    origin_port: int
    shield_ports: list[int]


@pytest.fixture
def cdn(tmp_path: Path, backend: Backend) -> Iterator[Cdn]:
    """A CDN of this test's own (the test kills and stops parts of it)."""
    yield from _cdn(tmp_path, backend)


@pytest.fixture(scope="module")
def shared_cdn(tmp_path_factory: pytest.TempPathFactory, backends: Backends) -> Iterator[Cdn]:
    """One CDN for the malformed-HTTP table: each request is refused, every tier stays up."""
    with backends.lease() as backend:
        yield from _cdn(tmp_path_factory.mktemp("cdn"), backend)


def _cdn(tmp_path: Path, backend: Backend) -> Iterator[Cdn]:
    settings = backend.settings(tmp_path / "origin")

    async def fill() -> None:
        async with open_store(settings) as store:
            for i in range(SEGMENTS):
                await store.put_bytes(f"media/{VID}/1/seg-{i}.m4s", bytes([i % 256]) * SEG_BYTES)

    run_sync(fill)
    po, ps1, ps2, pe = (free_port() for _ in range(4))
    origin = VodProcess(
        ["origin", "--data", str(tmp_path / "origin"), "--port", str(po)],
        tmp_path / "o.log",
        env=backend.env(),
    )
    shields = [
        VodProcess(
            [
                "shield",
                "--data",
                str(tmp_path / f"s{n}"),
                "--port",
                str(p),
                "--upstream",
                f"http://127.0.0.1:{po}",
            ],
            tmp_path / f"s{n}.log",
        )
        for n, p in ((1, ps1), (2, ps2))
    ]
    edge = VodProcess(
        ["edge", "--data", str(tmp_path / "e"), "--port", str(pe), "--tokens", "off",
         "--upstream", f"http://127.0.0.1:{ps1},http://127.0.0.1:{ps2}",
         "--origin", f"http://127.0.0.1:{po}"],
        tmp_path / "e.log",
    )  # fmt: skip
    procs = [origin, *shields, edge]
    try:
        for proc, port in zip(procs, (po, ps1, ps2, pe), strict=True):
            wait_http(f"http://127.0.0.1:{port}/healthz", timeout=30, proc=proc.proc)
        yield Cdn(origin, shields, edge, f"http://127.0.0.1:{pe}", po, [ps1, ps2])
    finally:
        for p in procs:
            p.stop()
        for p in procs:
            assert "Traceback" not in p.output(), p.output()[-3000:]


async def _load(url: str, seconds: float, clients: int, segments: range, errors: list[str]) -> int:
    """Players fetching random segments for `seconds`; returns how many were fetched whole."""
    ok = 0
    deadline = time.monotonic() + seconds

    async def player(session: aiohttp.ClientSession) -> None:
        nonlocal ok
        rnd = random.Random(id(session))
        while time.monotonic() < deadline:
            i = rnd.choice(segments)
            try:
                async with session.get(f"{url}/v/{VID}/1/seg-{i}.m4s") as r:
                    body = await r.read()
                    if r.status != 200 or body != bytes([i % 256]) * SEG_BYTES:
                        errors.append(f"seg-{i}: {r.status} {len(body)} bytes")
                    else:
                        ok += 1
            except aiohttp.ClientError as e:
                errors.append(f"seg-{i}: {type(e).__name__}: {e}")

    sessions = [aiohttp.ClientSession() for _ in range(clients)]
    try:
        await asyncio.gather(*(player(s) for s in sessions))
    finally:
        for s in sessions:
            await s.close()
    return ok


def test_players_see_no_error_when_a_shield_dies_then_the_origin_stops(cdn: Cdn) -> None:
    async def scenario() -> None:
        errors: list[str] = []
        load = asyncio.create_task(_load(cdn.edge_url, 4.0, 8, range(SEGMENTS), errors))
        await asyncio.sleep(1.5)
        cdn.shields[0].proc.send_signal(signal.SIGKILL)  # a shield dies under load
        fetched = await load
        assert errors == [], errors[:10]
        assert fetched > 100
        # Random picks need not have covered every segment (a slow origin, e.g. S3, or a busy
        # machine serves fewer): fetch the rest once, so all is cached at the edge now
        # (immutable, one year) and the origin can go away.
        async with aiohttp.ClientSession() as session:
            for i in range(SEGMENTS):
                async with session.get(f"{cdn.edge_url}/v/{VID}/1/seg-{i}.m4s") as r:
                    assert r.status == 200 and len(await r.read()) == SEG_BYTES
        cdn.origin.stop()
        errors = []
        fetched = await _load(cdn.edge_url, 1.5, 4, range(SEGMENTS), errors)
        assert errors == [] and fetched > 20, errors[:10]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # oversized request line
        b"GET /v/x/1/a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /v/x/1/a HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET /v/x/1/a HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /v/%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_malformed_http_gets_a_4xx_on_every_tier(shared_cdn: Cdn, raw: bytes) -> None:
    cdn = shared_cdn
    for port in (cdn.origin_port, *cdn.shield_ports, int(cdn.edge_url.rsplit(":", 1)[1])):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(raw)
            s.settimeout(5)
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
        assert 400 <= status < 500, (port, data[:200])
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=5)  # and the tier is still up
