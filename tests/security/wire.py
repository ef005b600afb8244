"""Raw-socket helpers and live servers for the protocol attack tests (issue 11, finding 2 and
the malformed-head / disconnect items): an edge in front of a scriptable origin, and a control
on SQLite with a creator and an operator key, each served by `vodcore.server.start_server` on
loopback with the limits a test passes in."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

from control.app import make_app as control_app
from control.auth import create_key
from edge.app import make_app as edge_app
from tests.integration.test_cache_engine import fixed
from vodcore.config import Settings
from vodcore.connlimits import ServerLimits
from vodcore.db.engine import create_schema, make_engine
from vodcore.errors import NOT_FOUND, ApiError, error_response
from vodcore.server import start_server

BIG = bytes(range(256)) * 4096 * 8  # 8 MiB: a response far larger than socket buffers


@dataclass
class Live:
    tier: str
    port: int
    keys: dict[str, str] = field(default_factory=dict)  # role → API key (control)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _control_keys(settings: Settings) -> dict[str, str]:
    engine = make_engine(settings.db_url)
    try:
        await create_schema(engine)
        async with engine.begin() as conn:
            return {role: await create_key(conn, role, 0.0) for role in ("creator", "operator")}
    finally:
        await engine.dispose()


async def _origin() -> TestServer:
    """An origin with two objects; anything else is the catalogue's 404, as ours answers."""
    objects = {"/v/big/1/seg.m4s": fixed(BIG), "/v/small/1/seg.m4s": fixed(b"x" * 1024)}

    async def handle(request: web.Request) -> web.StreamResponse:
        found = objects.get(request.path)
        return await found(request) if found else error_response(ApiError(NOT_FOUND))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@contextlib.asynccontextmanager
async def serve(tier: str, tmp_path: Path, limits: ServerLimits) -> AsyncIterator[Live]:
    """An edge (fast path on, tokens off, one 8 MiB and one 1 KiB object at its origin) or a
    control (SQLite, rate limits off), served with `limits`."""
    upstream = None
    keys: dict[str, str] = {}
    if tier == "edge":
        upstream = await _origin()
        settings = Settings(data_dir=tmp_path / "edge", upstream_timeout_seconds=3)
        url = str(upstream.make_url("")).rstrip("/")
        app: web.Application = edge_app(settings, [url], tokens=False)
    else:
        settings = Settings(
            data_dir=tmp_path / "control",
            rate_limit_ip_per_second=0,
            rate_limit_key_per_second=0,
        )
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        keys = await _control_keys(settings)
        app = control_app(settings)
    runner = await start_server(app, "127.0.0.1", 0, access_log=False, tier=tier, limits=limits)
    try:
        yield Live(tier, runner.addresses[0][1], keys)
    finally:
        await runner.cleanup()
        if upstream is not None:
            await upstream.close()


async def open_from(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to 127.0.0.1:port from `source` (any 127/8 address is this host's)."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bytes | None:
    """What the server sent before closing the connection, or None if it is still open
    after `within` seconds."""
    data = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                data += chunk
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return data


async def exchange(
    port: int, raw: bytes, source: str = "127.0.0.1", within: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """Send `raw` on a new connection and read one response to its end (Content-Length, or
    the close); returns status, headers (lower-case names), body."""
    reader, writer = await open_from(port, source)
    try:
        writer.write(raw)
        async with asyncio.timeout(within):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
            if "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            else:
                body = await reader.read()
        return status, headers, body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2)


async def healthz(port: int, source: str = "127.0.0.1") -> int:
    status, _, _ = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", source)
    return status


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text `text` (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def metrics(port: int) -> str:
    _, _, body = await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
    return body.decode()


def set_linger0(writer: asyncio.StreamWriter) -> None:
    """Close with a RST, as a client killed mid-transfer does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
