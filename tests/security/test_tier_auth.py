"""Issue 11, finding 8 (the tiers' part): shields and origins answer only their own tiers when
`tier_secret` is set, and each tier binds its own address.

Before: a shield or an origin served every object to anyone who reached it, and one `host`
setting bound every tier. Now an unsigned or badly signed request is 403 JSON, on the full path
and on the fast path alike, while the edge → shield → origin chain signs each request
(`vodcore.tierauth`), and signed hits still take the shield's fast path."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from edge.app import make_app as make_edge
from origin.app import make_app as make_origin
from shield.app import make_app as make_shield
from tests.procs import wait_http
from tests.security.seed import jwks_only_control, serve
from vodcore.config import Settings
from vodcore.fastpath import FastPath
from vodcore.server import FAST_PATH_KEY
from vodcore.store.factory import close_store, make_store
from vodcore.tierauth import HEADER, WINDOW_SECONDS, TierAuth
from vodcore.tokens import SigningKeys

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cret-for-the-tiers"
VID = "vid_tierauthtierauth"
SEG = "1/seg-0-00001.m4s"
BODY = os.urandom(5_000)


# --- the rules (pure) ----------------------------------------------------------------------------

NOW = 1_800_000_000.0
AUTH = TierAuth(SECRET)
GOOD = AUTH.sign("GET", "/v/a/1/s.m4s", NOW)


@pytest.mark.parametrize(
    ("method", "target", "value", "now", "ok"),
    [
        ("GET", "/v/a/1/s.m4s", GOOD, NOW, True),
        ("GET", "/v/a/1/s.m4s", GOOD, NOW + WINDOW_SECONDS, True),  # clock skew inside the window
        ("GET", "/v/a/1/s.m4s", GOOD, NOW - WINDOW_SECONDS, True),
        ("GET", "/v/a/1/s.m4s", GOOD, NOW + WINDOW_SECONDS + 1, False),  # replayed too late
        ("GET", "/v/a/1/s.m4s", GOOD, NOW - WINDOW_SECONDS - 1, False),
        ("HEAD", "/v/a/1/s.m4s", GOOD, NOW, False),  # another method
        ("GET", "/v/a/1/other.m4s", GOOD, NOW, False),  # another object
        ("GET", "/v/a/1/s.m4s?x", GOOD, NOW, False),
        ("GET", "/v/a/1/s.m4s", None, NOW, False),
        ("GET", "/v/a/1/s.m4s", "", NOW, False),
        ("GET", "/v/a/1/s.m4s", GOOD.replace("v1.", "v2.", 1), NOW, False),
        ("GET", "/v/a/1/s.m4s", GOOD[:-1] + ("0" if GOOD[-1] != "0" else "1"), NOW, False),
        ("GET", "/v/a/1/s.m4s", TierAuth("other").sign("GET", "/v/a/1/s.m4s", NOW), NOW, False),
        ("GET", "/v/a/1/s.m4s", "v1.x.y", NOW, False),
        ("GET", "/v/a/1/s.m4s", "v1.1800000000", NOW, False),
        ("GET", "/v/a/1/s.m4s", GOOD + "0" * 200, NOW, False),
        ("GET", "/v/a/1/s.m4s", "v1.99999999999999999999999.ab", NOW, False),
    ],
)
def test_signature_rules(method: str, target: str, value: str | None, now: float, ok: bool) -> None:
    assert AUTH.verify(method, target, value, now) is ok


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        TierAuth("")


# --- the tiers over loopback ----------------------------------------------------------------------


@dataclass
class Stack:
    edge: str
    shield: str
    origin: str
    shield_app: web.Application
    keys: SigningKeys
    session: aiohttp.ClientSession

    def player_url(self) -> str:
        return f"{self.edge}/v/{VID}/{self.keys.mint(VID, int(time.time()), 600)}/{SEG}"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    settings = Settings(data_dir=tmp_path, upstream_timeout_seconds=5.0, tier_secret=SECRET)
    store = make_store(settings)
    await store.put_bytes(f"media/{VID}/{SEG}", BODY)
    keys = SigningKeys(tmp_path / "keys").load_or_create()
    runners: list[web.AppRunner] = []
    origin = await serve(make_origin(settings), runners)

    control_url = await serve(jwks_only_control(keys), runners)
    shield_app = make_shield(settings, [origin])
    shield = await serve(shield_app, runners)
    edge = await serve(make_edge(settings, [shield], control_url=control_url), runners)
    session = aiohttp.ClientSession()
    try:
        yield Stack(edge, shield, origin, shield_app, keys, session)
    finally:
        await session.close()
        for r in reversed(runners):
            await r.cleanup()
        await close_store(store)


async def _raw_get(base: str, target: str, fields: dict[str, str]) -> bytes:
    """One request on a fresh connection, head in one write (the fast path's shape)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()


async def test_the_chain_signs_and_plays(stack: Stack) -> None:
    url = stack.player_url()
    for expect in ("edge=MISS, shield=MISS", "edge=HIT"):
        async with stack.session.get(url) as r:
            assert r.status == 200 and await r.read() == BODY
            assert r.headers["X-Cache"] == expect


@pytest.mark.parametrize("tier", ["shield", "origin"])
async def test_strangers_get_403_from_shields_and_origins(stack: Stack, tier: str) -> None:
    async with stack.session.get(stack.player_url()) as r:  # the shield now holds the object
        assert r.status == 200
    base = stack.shield if tier == "shield" else stack.origin
    path = f"/v/{VID}/{SEG}"
    now = time.time()
    for fields in (
        {},
        {HEADER: "v1.1.00"},
        {HEADER: TierAuth("guess").sign("GET", path, now)},
        {HEADER: AUTH.sign("GET", f"/v/{VID}/1/other.m4s", now)},  # replayed for another path
        {HEADER: AUTH.sign("GET", path, now - 120)},  # replayed too late
        {"X-Purge-Seq": "999999999"},  # a stranger's tier field changes nothing
    ):
        async with stack.session.get(base + path, headers=fields) as r:
            assert r.status == 403, (tier, fields)
            doc = await r.json()
            assert doc["error"]["code"] == "forbidden"
        head = await _raw_get(base, path, fields)  # the fast path's shape too
        assert head.startswith(b"HTTP/1.1 403"), (tier, fields, head)
    async with stack.session.get(base + "/healthz") as r:
        assert r.status == 200  # probes stay open


async def test_signed_hits_take_the_shields_fast_path(stack: Stack) -> None:
    async with stack.session.get(stack.player_url()) as r:
        assert r.status == 200
    fast = stack.shield_app[FAST_PATH_KEY]
    assert isinstance(fast, FastPath)
    before = fast.served
    path = f"/v/{VID}/{SEG}"
    # what an edge sends on a fill: Via, X-Purge-Seq, the signature
    fields = {
        "Accept": "*/*",
        "Accept-Encoding": "identity",
        "Via": "1.1 vodstack-edge",
        "X-Purge-Seq": "0",
        HEADER: AUTH.sign("GET", path, time.time()),
    }
    head = await _raw_get(stack.shield, path, fields)
    assert head.startswith(b"HTTP/1.1 200") and b"X-Cache: shield=HIT" in head
    assert fast.served == before + 1


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def test_each_tier_binds_its_own_host(tmp_path: Path) -> None:
    port = _free_port("127.0.0.2")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VOD_TIER_SECRET": SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vodcore.cli", "origin", "--data", str(tmp_path),
         "--host", "127.0.0.2", "--port", str(port), "--access-log", "off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.2:{port}/healthz", 30, proc)
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        proc.terminate()
        proc.wait(20)
