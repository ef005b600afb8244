"""Takedowns end to end over loopback (issue 4): control, an origin following the purge log
over the same object store (the filesystem or S3, whichever `--backend` names), and a
token-checking edge in front of it.

Delete: playback 410, old tokens refused at the edge, objects moved to the restricted prefix
(the source untouched), the origin answers 410 to a direct fetch; restore: objects back,
playable with a new token. Block: the origin answers 451 until the unblock. Every action is
recorded (who, why) and in the event log; re-running after a crash mid-move finishes the move.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import select

from control import nodes_credentials
from control.app import make_app as control_app
from control.auth import create_key, hash_key
from edge.app import ENGINE_KEY as EDGE_ENGINE_KEY
from edge.app import make_app as edge_app
from origin.app import GUARD_KEY
from origin.app import make_app as origin_app
from tests.backends import Backend
from tests.integration.test_purge import vod
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import api_keys, events, moderation, videos
from vodcore.server import start_server
from vodcore.store import ObjectStore
from vodcore.store.factory import close_store, make_store

pytestmark = pytest.mark.timeout(60)

VID = "vid_takedowntakedown"
MEDIA = {"1/master.m3u8": b"#EXTM3U\n", "1/seg-0.m4s": b"segment zero", "1/poster.jpg": b"jpg"}
SOURCE = f"source/{VID}/original"


@dataclass
class World:
    control: str
    origin: str
    edge: str
    operator: str
    creator: str
    settings: Settings
    store: ObjectStore
    origin_app: web.Application
    runners: list[web.AppRunner]
    session: aiohttp.ClientSession
    edge_settings: Settings

    async def call(
        self, method: str, path: str, body: Any = None, key: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {key or self.operator}"}
        async with self.session.request(
            method, self.control + path, json=body, headers=headers
        ) as r:
            return r.status, await r.json()

    async def get(self, url: str) -> tuple[int, bytes, dict[str, str]]:
        async with self.session.get(url) as r:
            return r.status, await r.read(), dict(r.headers)

    async def token(self) -> tuple[int, str | None]:
        async with self.session.get(f"{self.control}/v1/videos/{VID}/playback") as r:
            doc = await r.json()
            return r.status, doc["manifestUrl"].split("/")[5] if r.status == 200 else None

    async def until_complete(self, purge_id: str, nodes: int = 2) -> None:
        """Until every node (the edge and the origin) has applied the log entry."""
        deadline = time.monotonic() + 10
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            async with self.session.get(
                f"{self.control}/v1/purges/{purge_id}",
                headers={"Authorization": f"Bearer {self.operator}"},
            ) as r:
                doc = await r.json()
            if doc["complete"] and len(doc["nodes"]) >= nodes:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{purge_id} not applied everywhere: {doc}")


async def _url(runner: web.AppRunner) -> str:
    return f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def world(tmp_path: Path, backend: Backend) -> AsyncIterator[World]:
    settings = backend.settings(tmp_path / "data", upstream_timeout_seconds=3)
    settings.data_dir.mkdir()
    db = make_engine(settings.db_url)
    await create_schema(db)
    async with db.begin() as conn:
        operator = await create_key(conn, "operator", 0.0)
        creator = await create_key(conn, "creator", 0.0)
        _cred, credential = await nodes_credentials.create(conn, "any", 0.0, "tests")
        await conn.execute(
            videos.insert().values(
                id=VID, title="t", description="", visibility="public", state="READY",
                current_version=1, created_at=0.0, updated_at=0.0,
            )
        )  # fmt: skip
    await db.dispose()
    settings = replace(settings, node_credential=credential)
    store = make_store(settings)
    for name, data in MEDIA.items():
        await store.put_bytes(f"media/{VID}/{name}", data)
    await store.put_bytes(SOURCE, b"the original upload")
    runners = [await start_server(control_app(settings), "127.0.0.1", 0, access_log=False)]
    control = await _url(runners[0])
    oapp = origin_app(settings, control_url=control)
    runners.append(await start_server(oapp, "127.0.0.1", 0, access_log=False))
    origin = await _url(runners[1])
    edge_settings = Settings(
        data_dir=tmp_path / "edge", upstream_timeout_seconds=3, node_credential=credential
    )
    eapp = edge_app(
        edge_settings,
        [origin],
        tokens=True,
        control_url=control,
    )
    runners.append(await start_server(eapp, "127.0.0.1", 0, access_log=False))
    session = aiohttp.ClientSession()
    w = World(control, origin, await _url(runners[2]), operator, creator, settings, store, oapp,
              runners, session, edge_settings)  # fmt: skip
    feed = oapp[GUARD_KEY].feed
    assert feed is not None and await feed.wait_caught_up(10)
    try:
        yield w
    finally:
        await session.close()
        for r in reversed(runners):
            await r.cleanup()
        await close_store(store)


async def records(w: World, table: Any) -> list[Any]:
    db = make_engine(w.settings.db_url)
    try:
        async with db.connect() as conn:
            return list((await conn.execute(select(table))).all())
    finally:
        await db.dispose()


async def test_delete_and_restore(world: World) -> None:
    w = world
    status, token = await w.token()
    assert status == 200 and token
    seg = f"{w.edge}/v/{VID}/{token}/1/seg-0.m4s"
    assert (await w.get(seg))[:2] == (200, b"segment zero")
    assert (await w.get(f"{w.origin}/v/{VID}/1/seg-0.m4s"))[0] == 200

    code, doc = await w.call("DELETE", f"/v1/videos/{VID}", {"reason": "copyright #7"})
    assert code == 200, doc
    assert doc["state"] == "DELETED" and doc["objectsMoved"] == len(MEDIA)
    await w.until_complete(doc["purgeId"])

    assert (await w.token())[0] == 410
    status, body, _h = await w.get(f"{w.control}/v1/videos/{VID}")
    assert status == 410 and b'"gone"' in body
    status, body, _h = await w.get(seg)  # the token handed out before the delete
    assert status == 410 and b'"gone"' in body  # as the playback API says (issue 11)
    status, body, headers = await w.get(f"{w.origin}/v/{VID}/1/seg-0.m4s")  # direct fetch
    assert status == 410 and b'"gone"' in body and headers["Cache-Control"] == "no-store"
    assert await w.store.list(f"media/{VID}/") == []
    assert sorted(await w.store.list(f"restricted/media/{VID}/")) == sorted(
        f"restricted/media/{VID}/{n}" for n in MEDIA
    )
    assert await w.store.list(f"source/{VID}/") == [SOURCE]  # the source is never touched

    code, doc = await w.call("DELETE", f"/v1/videos/{VID}", {"reason": "again"})
    assert code == 409 and doc["error"]["code"] == "video_state"
    assert doc["error"]["state"] == "DELETED"

    code, doc = await w.call("POST", f"/v1/videos/{VID}/restore", {"reason": "appeal upheld"})
    assert code == 200, doc
    assert doc["state"] == "READY" and doc["objectsMoved"] == len(MEDIA)
    await w.until_complete(doc["purgeId"])
    assert await w.store.list(f"restricted/media/{VID}/") == []
    for name, data in MEDIA.items():
        assert (await w.get(f"{w.origin}/v/{VID}/{name}"))[:2] == (200, data)
    assert (await w.get(seg))[0] == 403  # still void: issued before the delete
    status, fresh = await w.token()
    assert status == 200 and fresh and fresh != token
    assert (await w.get(f"{w.edge}/v/{VID}/{fresh}/1/seg-0.m4s"))[:2] == (200, b"segment zero")
    code, doc = await w.call("POST", f"/v1/videos/{VID}/restore", {})
    assert code == 409 and doc["error"]["code"] == "video_state"

    # who, when, why: the moderation records and the event log
    (key_id,) = [k.id for k in await records(w, api_keys) if k.key_hash == hash_key(w.operator)]
    rows = [(m.action, m.reason, m.actor, m.previous_state) for m in await records(w, moderation)]
    assert rows == [
        ("delete", "copyright #7", key_id, "READY"),
        ("restore", "appeal upheld", key_id, "DELETED"),
    ]
    logged = {e.kind: e.payload for e in await records(w, events) if e.video_id == VID}
    assert logged["video.deleted"] == {
        "from": "READY", "to": "DELETED", "by": key_id, "reason": "copyright #7",
    }  # fmt: skip
    assert logged["video.restored"]["to"] == "READY"
    assert logged["video.restored"]["by"] == key_id


async def test_block_makes_the_origin_refuse_and_unblock_lifts_it(world: World) -> None:
    w = world
    direct = f"{w.origin}/v/{VID}/1/seg-0.m4s"
    code, doc = await w.call("POST", f"/v1/videos/{VID}/block", {"reason": "court order"})
    assert code == 200
    await w.until_complete(doc["purgeId"])
    status, body, _h = await w.get(direct)
    assert status == 451 and b'"blocked"' in body
    status, body, _h = await w.get(f"{w.control}/v1/videos/{VID}")
    assert status == 451 and b'"BLOCKED"' in body
    code, doc = await w.call("POST", f"/v1/videos/{VID}/unblock", {})
    assert code == 200 and doc["state"] == "READY" and doc["purgeId"]
    # this process forgot its negative answer at once: no stale 451 for the TTL
    assert (await w.get(f"{w.control}/v1/videos/{VID}"))[0] == 200
    await w.until_complete(doc["purgeId"])
    assert (await w.get(direct))[:2] == (200, b"segment zero")

    # blocked, then deleted, then restored: blocked again, at control and at the origin
    await w.call("POST", f"/v1/videos/{VID}/block", {"reason": "court order"})
    code, doc = await w.call("DELETE", f"/v1/videos/{VID}?reason=spam")
    assert code == 200 and doc["state"] == "DELETED"
    code, doc = await w.call("POST", f"/v1/videos/{VID}/restore")
    assert code == 200 and doc["state"] == "BLOCKED"
    await w.until_complete(doc["purgeId"])
    assert (await w.get(direct))[0] == 451
    assert (await w.token())[0] == 451

    # a new origin replays the whole log at start: the same refusals, exactly
    o2 = origin_app(w.settings, control_url=w.control)
    w.runners.append(await start_server(o2, "127.0.0.1", 0, access_log=False))
    feed = o2[GUARD_KEY].feed
    assert feed is not None and await feed.wait_caught_up(10)
    assert (await w.get(f"{await _url(w.runners[-1])}/v/{VID}/1/seg-0.m4s"))[0] == 451


async def test_a_restarted_edge_still_says_why_an_old_token_is_refused(world: World) -> None:
    """Issue 11 item 10, across a restart: an edge that resumes the purge log after the block
    and delete entries learns the cutoffs from `/v1/cutoffs`; it must still answer an old
    token as the playback API does (451 blocked, 410 deleted), not 403 `bad_token`."""
    w = world
    status, token = await w.token()
    assert status == 200 and token
    assert (await w.get(f"{w.edge}/v/{VID}/{token}/1/seg-0.m4s"))[0] == 200

    async def restarted_edge() -> str:
        await w.runners[2].cleanup()  # the edge stops; its applied purge seq stays on disk
        eapp = edge_app(w.edge_settings, [w.origin], tokens=True, control_url=w.control)
        w.runners[2] = await start_server(eapp, "127.0.0.1", 0, access_log=False)
        feed = eapp[EDGE_ENGINE_KEY].feed
        assert feed is not None and await feed.wait_caught_up(10)
        return f"{await _url(w.runners[2])}/v/{VID}/{token}/1/seg-0.m4s"

    code, doc = await w.call("POST", f"/v1/videos/{VID}/block", {"reason": "court order"})
    assert code == 200
    await w.until_complete(doc["purgeId"])
    status, body, _h = await w.get(await restarted_edge())
    assert status == 451 and b'"blocked"' in body
    code, doc = await w.call("DELETE", f"/v1/videos/{VID}?reason=spam")
    assert code == 200
    await w.until_complete(doc["purgeId"])
    status, body, _h = await w.get(await restarted_edge())
    assert status == 410 and b'"gone"' in body
    # and the node endpoint keeps its old shape for nodes that do not ask for the reasons
    async with w.session.get(
        f"{w.control}/v1/cutoffs", headers={"Authorization": f"Bearer {w.settings.node_credential}"}
    ) as r:
        assert r.status == 200 and isinstance((await r.json())[VID], float)


async def test_a_rerun_finishes_a_move_a_crash_cut_short(world: World) -> None:
    w = world
    code, _doc = await w.call("DELETE", f"/v1/videos/{VID}", {"reason": "x"})
    assert code == 200
    # as if control died half-way through the move: one object still on the served side
    await w.store.move(f"restricted/media/{VID}/1/seg-0.m4s", f"media/{VID}/1/seg-0.m4s")
    assert (await w.get(f"{w.origin}/v/{VID}/1/seg-0.m4s"))[0] == 410  # refused meanwhile
    code, doc = await w.call("DELETE", f"/v1/videos/{VID}", {"reason": "x"})
    assert code == 409 and doc["error"]["objectsMoved"] == 1
    assert await w.store.list(f"media/{VID}/") == []

    code, _doc = await w.call("POST", f"/v1/videos/{VID}/restore")
    assert code == 200
    await w.store.move(f"media/{VID}/1/poster.jpg", f"restricted/media/{VID}/1/poster.jpg")
    code, doc = await w.call("POST", f"/v1/videos/{VID}/restore")
    assert code == 409 and doc["error"]["objectsMoved"] == 1
    assert await w.store.list(f"restricted/media/{VID}/") == []
    assert len(await w.store.list(f"media/{VID}/")) == len(MEDIA)


@pytest.mark.parametrize(
    ("method", "path", "body", "role", "status_"),
    [
        ("DELETE", f"/v1/videos/{VID}", {"reason": "x"}, "creator", 403),
        ("DELETE", f"/v1/videos/{VID}", {"reason": "x"}, "nobody", 401),
        ("POST", f"/v1/videos/{VID}/restore", {}, "creator", 403),
        ("DELETE", f"/v1/videos/{VID}", {}, "operator", 422),  # a reason is required
        ("DELETE", f"/v1/videos/{VID}", {"reason": " "}, "operator", 422),
        ("DELETE", f"/v1/videos/{VID}", ["reason"], "operator", 422),
        ("DELETE", "/v1/videos/vid_nosuchvideoxxxxx", {"reason": "x"}, "operator", 404),
        ("POST", "/v1/videos/vid_nosuchvideoxxxxx/restore", {}, "operator", 404),
        ("POST", f"/v1/videos/{VID}/restore", {}, "operator", 409),  # not deleted
        ("POST", f"/v1/videos/{VID}/restore", {"reason": 7}, "operator", 422),
    ],
)
async def test_bad_delete_and_restore_requests(
    world: World, method: str, path: str, body: Any, role: str, status_: int
) -> None:
    key = {"operator": world.operator, "creator": world.creator, "nobody": "vod_nope"}[role]
    code, doc = await world.call(method, path, body, key)
    assert code == status_ and set(doc["error"]) >= {"code", "message"}
    assert await world.store.list(f"restricted/media/{VID}/") == []  # nothing moved


async def test_operator_cli_delete_and_restore(world: World) -> None:
    api = ["--api", world.control, "--key", world.operator, "--timeout", "10"]
    code, out, err = await vod("delete", VID, "--reason", "court order", *api)
    assert code == 0, err
    assert f"{VID} is DELETED" in out and f"{len(MEDIA)} object(s) moved" in out
    assert "complete on 2 node(s)" in out and "origin" in out and "edge" in out
    code, out, err = await vod("delete", VID, "--reason", "again", *api)
    assert code == 1 and "409" in err and "Traceback" not in err
    code, out, err = await vod("restore", VID, *api)
    assert code == 0, err
    assert f"{VID} is READY" in out and "complete on 2 node(s)" in out
    code, out, err = await vod("delete", VID, *api)  # --reason is required
    assert code == 2 and "--reason" in err


async def test_origin_fails_open_until_it_has_replayed_the_log(
    tmp_path: Path, backend: Backend
) -> None:
    settings = backend.settings(tmp_path)
    store = make_store(settings)
    try:
        await store.put_bytes(f"media/{VID}/1/seg-0.m4s", b"x")
    finally:
        await close_store(store)
    app = origin_app(settings, control_url="http://127.0.0.1:9")  # control unreachable
    runner = await start_server(app, "127.0.0.1", 0, access_log=False)
    try:
        feed = app[GUARD_KEY].feed
        assert feed is not None and not feed.caught_up
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{await _url(runner)}/v/{VID}/1/seg-0.m4s") as r,
        ):
            assert r.status == 200 and await r.read() == b"x"
    finally:
        await runner.cleanup()
