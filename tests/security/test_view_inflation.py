"""View inflation (issue 11 finding 6): one anonymous `POST /v1/playback-events` with 500
invented sessions added 500 views, even to a private video that was still UPLOADING.

Against the real control app over loopback (SQLite, or PostgreSQL + Redis with
`--backend=scale`), its own aggregator counting:
- invented session ids count nothing (on a public READY video, a private UPLOADING one);
- a session issued for one video counts nothing on another;
- one session is one view at most, and its events are capped;
- one client IP opens at most the per-IP number of sessions (real ones, from the playback API);
- a session signed for a video that is not READY counts nothing (the aggregator's own check);
- the seed's example event (`play_started`, a client-made `ps_44`, no eventId) is answered 202
  and counted as rejected.
Plus the pure rules of `control.playback_sessions` (signing, the caps), without sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from control.app import make_app
from control.engagement import ENGAGEMENT_KEY, Engagement, counters
from control.playback_sessions import (
    SESSION_ID_CHARS,
    SESSION_TTL,
    SessionGate,
    SessionSigner,
)
from tests.backends import Backend
from tests.security.seed import add_videos, new_key, quiet_settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.server import start_server

pytestmark = pytest.mark.timeout(90)

PUBLIC = "vid_publicpublicpubl"
OTHER = "vid_otherotherothero"
PRIVATE_UPLOADING = "vid_uploadinguploadi"
T0 = 1_714_564_800.0


def session(video: str, sid: str, seconds: float = 12, step: float = 2.0) -> list[dict[str, Any]]:
    out = []
    t = 0.0
    while t <= seconds:
        out.append({
            "eventId": f"{sid}-{len(out)}", "videoId": video, "sessionId": sid,
            "eventType": "heartbeat", "positionSeconds": t, "occurredAt": T0 + t,
        })  # fmt: skip
        t += step
    return out


@dataclass
class Stack:
    api: str
    engine: AsyncEngine
    engagement: Engagement
    owner: str
    http: aiohttp.ClientSession

    async def sid(self, video: str, key: str | None = None) -> tuple[int, str | None]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.http.get(f"{self.api}/v1/videos/{video}/playback", headers=headers) as r:
            doc = await r.json()
            return r.status, doc.get("sessionId")

    async def post(self, body: Any) -> tuple[int, Any]:
        async with self.http.post(f"{self.api}/v1/playback-events", json=body) as r:
            return r.status, await r.json()

    async def views(self, video: str) -> int:
        async with self.engine.connect() as conn:
            return (await counters(conn, video))[0]

    async def settle(self, video: str, views: int) -> None:
        """Until the counter reaches `views` (bounded), then check it stays there."""
        deadline = time.monotonic() + 15
        for _ in range(300):
            if await self.views(video) >= views or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # the aggregator polls well within this
        assert await self.views(video) == views


@pytest.fixture
async def stack(tmp_path: Path, backend: Backend) -> AsyncIterator[Stack]:
    settings = quiet_settings(backend, tmp_path)
    engine = make_engine(settings.db_url)
    await create_schema(engine)
    async with engine.begin() as conn:
        owner, owner_id = await new_key(conn, "creator")
        await add_videos(
            conn,
            owner_id,
            [
                (PUBLIC, "public", "READY"),
                (OTHER, "public", "READY"),
                (PRIVATE_UPLOADING, "private", "UPLOADING"),
            ],
        )
    app = make_app(settings)
    runner = await start_server(app, "127.0.0.1", 0, access_log=False)
    async with aiohttp.ClientSession() as http:
        try:
            yield Stack(
                f"http://127.0.0.1:{runner.addresses[0][1]}",
                engine,
                app[ENGAGEMENT_KEY],
                owner,
                http,
            )
        finally:
            await runner.cleanup()
            await engine.dispose()


async def test_invented_sessions_count_nothing(stack: Stack) -> None:
    s = stack
    for video in (PUBLIC, PRIVATE_UPLOADING):
        events = [e for i in range(500) for e in session(video, f"ps_{i}", 12, step=6)]
        code, doc = await s.post({"events": events[:1000]})
        assert code == 202 and doc == {"accepted": 0, "rejected": 1000}, doc
    # a real session on PUBLIC counts, so the aggregator did run
    code, sid = await s.sid(PUBLIC)
    assert code == 200 and sid and len(sid) == SESSION_ID_CHARS
    assert (await s.post({"events": session(PUBLIC, sid)}))[1]["accepted"] == 7
    await s.settle(PUBLIC, 1)
    assert await s.views(PRIVATE_UPLOADING) == 0
    # nobody gets a session for a private video still uploading, not even its owner (not READY)
    assert (await s.sid(PRIVATE_UPLOADING))[0] == 404
    assert (await s.sid(PRIVATE_UPLOADING, s.owner))[0] == 409


async def test_a_session_is_one_view_of_its_own_video(stack: Stack) -> None:
    s = stack
    _code, sid = await s.sid(PUBLIC)
    assert sid
    # on another video: refused whole
    code, doc = await s.post({"events": session(OTHER, sid)})
    assert (code, doc) == (202, {"accepted": 0, "rejected": 7})
    # tampered: refused
    forged = sid[:-1] + ("A" if sid[-1] != "A" else "B")
    assert (await s.post({"events": session(PUBLIC, forged)}))[1]["rejected"] == 7
    # replayed many times (new event ids each time): still one view
    for i in range(5):
        events = [{**e, "eventId": f"r{i}-{e['eventId']}"} for e in session(PUBLIC, sid)]
        assert (await s.post({"events": events}))[1] == {"accepted": 7, "rejected": 0}
    await s.settle(PUBLIC, 1)
    assert await s.views(OTHER) == 0


async def test_per_session_and_per_ip_caps(stack: Stack) -> None:
    s = stack
    s.engagement.gate = SessionGate(max_events_per_session=10, max_sessions_per_ip=3)
    sids = [(await s.sid(PUBLIC))[1] for _ in range(5)]
    assert len(set(sids)) == 5  # one session per playback call
    results = [await s.post({"events": session(PUBLIC, str(sid))}) for sid in sids]
    assert [doc["accepted"] for _code, doc in results] == [7, 7, 7, 0, 0]  # 3 sessions per IP
    # the first session is at 7 of its 10 events: 3 more go in, the rest is refused
    more = [{**e, "eventId": f"m-{e['eventId']}"} for e in session(PUBLIC, str(sids[0]))]
    assert (await s.post({"events": more}))[1] == {"accepted": 3, "rejected": 4}
    await s.settle(PUBLIC, 3)


async def test_only_ready_videos_count(stack: Stack) -> None:
    """Even a correctly signed session (as if minted by a buggy or older control) counts no
    view for a video that is not READY: the aggregator checks the state itself."""
    s = stack
    sid = s.engagement.signer.mint(PRIVATE_UPLOADING, int(time.time()))
    assert (await s.post({"events": session(PRIVATE_UPLOADING, sid)}))[1]["accepted"] == 7
    _code, real = await s.sid(PUBLIC)
    assert (await s.post({"events": session(PUBLIC, str(real))}))[1]["accepted"] == 7
    await s.settle(PUBLIC, 1)  # the aggregator applied both requests' batches by now
    assert await s.views(PRIVATE_UPLOADING) == 0


async def test_the_seeds_example_event_is_answered(stack: Stack) -> None:
    s = stack
    seed = {
        "videoId": PUBLIC,
        "sessionId": "ps_44",
        "eventType": "play_started",
        "positionSeconds": 0,
        "occurredAt": "2026-04-26T18:16:03Z",
    }
    assert await s.post(seed) == (202, {"accepted": 0, "rejected": 1})  # client-made id
    _code, sid = await s.sid(PUBLIC)
    assert await s.post({**seed, "sessionId": sid}) == (202, {"accepted": 1, "rejected": 0})


# --- the pure rules ----------------------------------------------------------------------------


def test_signer_binds_video_and_time() -> None:
    signer = SessionSigner(b"k" * 32)
    now = 1_800_000_000
    sid = signer.mint(PUBLIC, now)
    assert len(sid) == SESSION_ID_CHARS and sid.startswith("ps1.")
    assert signer.verify(sid, PUBLIC, now)
    assert signer.verify(sid, PUBLIC, now + SESSION_TTL)
    assert not signer.verify(sid, PUBLIC, now + SESSION_TTL + 1)  # expired
    assert not signer.verify(sid, PUBLIC, now - 3600)  # from the future
    assert not signer.verify(sid, OTHER, now)  # another video
    assert not SessionSigner(b"x" * 32).verify(sid, PUBLIC, now)  # another secret
    for bad in ("", "ps_44", "ps1....", "ps1." + "z" * (SESSION_ID_CHARS - 4), sid + "x"):
        assert not signer.verify(bad, PUBLIC, now)


def test_signer_secret_is_shared_through_keys_dir(tmp_path: Path) -> None:
    a = SessionSigner.load_or_create(tmp_path)
    b = SessionSigner.load_or_create(tmp_path)
    sid = a.mint(PUBLIC, 1_800_000_000)
    assert b.verify(sid, PUBLIC, 1_800_000_000)
    assert (tmp_path / "playback-sessions.key").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["playback-sessions.key"]


def test_gate_caps_and_windows() -> None:
    gate = SessionGate(max_events_per_session=5, max_sessions_per_ip=2, window_seconds=100)
    assert gate.admit("ip1", "s1", 3, 0) == 3
    assert gate.admit("ip1", "s1", 3, 1) == 2  # 5 per session
    assert gate.admit("ip1", "s1", 1, 2) == 0
    assert gate.admit("ip1", "s2", 1, 3) == 1
    assert gate.admit("ip1", "s3", 1, 4) == 0  # 2 sessions per IP
    assert gate.admit("ip2", "s3", 1, 5) == 1  # another IP
    assert gate.admit("ip1", "s1", 1, 150) == 0  # the previous window still counts
    assert gate.admit("ip1", "s4", 1, 160) == 0
    assert gate.admit("ip1", "s4", 1, 320) == 1  # two windows later: forgotten
    bounded = SessionGate(max_tracked=10, window_seconds=1e9)
    for i in range(1000):
        bounded.admit(f"ip{i}", f"s{i}", 1, 0)
    assert len(bounded._events) + len(bounded._old_events) <= 20  # bounded memory
