"""Purges end to end over loopback: control's API and log (on the backend `--backend` names), an
edge following the stream, acknowledgements and completeness, replay after a node was down,
resynchronisation on garbage and gaps, and the API's bad input."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import jwt
import pytest
from aiohttp import web

from control import nodes_credentials
from control.app import make_app as control_app
from control.auth import create_key
from edge.app import ENGINE_KEY
from edge.app import make_app as edge_app
from shield.app import ENGINE_KEY as SHIELD_ENGINE
from shield.app import make_app as shield_app
from tests.backends import Backend
from tests.integration.test_cache_engine import Upstream, _start_upstream, fixed
from vodcore.cache.purgefeed import PurgeFeed, Resync
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import videos
from vodcore.purge import Purge
from vodcore.server import start_server

VID = "vid_purgepurgepurgep"


@dataclass
class World:
    control: str
    operator: str
    creator: str
    upstream: Upstream
    tmp: Path
    runners: list[web.AppRunner]
    credential: str = ""  # the nodes' credential (control's node endpoints)

    async def edge(
        self, name: str = "e", blind: float = 30.0, wait: bool = True
    ) -> tuple[str, web.Application, web.AppRunner]:
        settings = Settings(
            data_dir=self.tmp / name,
            upstream_timeout_seconds=3,
            purge_blind_seconds=blind,
            node_credential=self.credential,
        )
        app = edge_app(settings, [self.upstream.url], tokens=False, control_url=self.control)
        runner = await start_server(app, "127.0.0.1", 0, access_log=False)
        self.runners.append(runner)
        # until it has applied control's backlog the edge is blind (it revalidates everything)
        feed = app[ENGINE_KEY].feed
        assert feed is not None
        for _ in range(500 if wait else 0):
            if not feed.blind(time.monotonic()):
                break
            await asyncio.sleep(0.01)
        return f"http://127.0.0.1:{runner.addresses[0][1]}", app, runner


@pytest.fixture
async def world(tmp_path: Path, backend: Backend) -> AsyncIterator[World]:
    data = tmp_path / "control"
    data.mkdir()
    settings = backend.settings(data)  # control's; edges and shields hold no backend
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
    ctl = await start_server(control_app(settings), "127.0.0.1", 0, access_log=False)
    up = await _start_upstream()
    for i in range(3):
        up.routes[f"/v/{VID}/1/seg-{i}.m4s"] = fixed(
            f"seg{i}".encode(), "public, max-age=31536000, immutable", **{"Surrogate-Key": VID}
        )
    up.routes["/v/other/1/seg.m4s"] = fixed(b"other", "public, max-age=3600")
    w = World(
        f"http://127.0.0.1:{ctl.addresses[0][1]}", operator, creator, up, tmp_path, [ctl],
        credential,
    )  # fmt: skip
    yield w
    for r in reversed(w.runners):
        await r.cleanup()
    assert up.server is not None
    await up.server.close()


async def fetch(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        await r.read()
        return r.status, r.headers.get("X-Cache", "")


async def purge(w: World, body: object, key: str | None = None) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as s:
        headers = {"Authorization": f"Bearer {key or w.operator}"}
        r = await s.post(f"{w.control}/v1/purges", json=body, headers=headers)
        await r.read()
        return r


async def status(w: World, pid: str) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {w.operator}"}
    async with (
        aiohttp.ClientSession(headers=headers) as s,
        s.get(f"{w.control}/v1/purges/{pid}") as r,
    ):
        assert r.status == 200
        doc: dict[str, object] = await r.json()
        return doc


async def wait_complete(w: World, pid: str, nodes: int = 1) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        doc = await status(w, pid)
        if doc["complete"] and len(doc["nodes"]) >= nodes:  # type: ignore[arg-type]
            return doc
        await asyncio.sleep(0.02)
    raise AssertionError(f"purge {pid} never completed: {doc}")


async def wait_node(w: World, url: str) -> None:
    """Until the edge has connected to the stream (it registers as a node)."""
    for _ in range(200):
        doc = await purge_probe(w)
        if doc:
            return
        await asyncio.sleep(0.02)


async def purge_probe(w: World) -> bool:
    r = await purge(w, {"prefix": "/nothing-here/"})
    doc = await status(w, (await r.json())["purgeId"]) if r.status == 202 else {}
    return bool(doc.get("nodes"))


async def test_video_purge_reaches_the_edge_and_reports_complete(world: World) -> None:
    url, _app, _r = await world.edge()
    seg = f"{url}/v/{VID}/1/seg-0.m4s"
    other = f"{url}/v/other/1/seg.m4s"
    for u in (seg, other):
        await fetch(u)
        assert (await fetch(u))[1] == "edge=HIT"
    await wait_node(world, url)
    r = await purge(world, {"videoId": VID})
    assert r.status == 202
    body = await r.json()
    assert body["purgeId"].startswith("pg_") and body["seq"] >= 1
    doc = await wait_complete(world, body["purgeId"])
    node = doc["nodes"][0]  # type: ignore[index]
    assert node["applied"] and node["appliedAt"] and node["tier"] == "edge"
    assert (await fetch(seg))[1] == "edge=MISS"  # purged
    assert (await fetch(other))[1] == "edge=HIT"  # another video's object stays


@pytest.mark.parametrize(
    ("body", "purged", "kept"),
    [
        ({"surrogateKeys": [VID]}, f"/v/{VID}/1/seg-1.m4s", "/v/other/1/seg.m4s"),
        ({"prefix": "/v/other/"}, "/v/other/1/seg.m4s", f"/v/{VID}/1/seg-1.m4s"),
        ({"all": True}, "/v/other/1/seg.m4s", None),
    ],
)
async def test_key_prefix_and_all_purges(
    world: World, body: dict[str, object], purged: str, kept: str | None
) -> None:
    url, _app, _r = await world.edge()
    for p in (purged, kept):
        if p:
            await fetch(url + p)
    await wait_node(world, url)
    r = await purge(world, body)
    await wait_complete(world, (await r.json())["purgeId"])
    assert (await fetch(url + purged))[1] == "edge=MISS"
    if kept:
        assert (await fetch(url + kept))[1] == "edge=HIT"


async def test_soft_purge_revalidates(world: World) -> None:
    url, _app, _r = await world.edge()
    seg = f"{url}/v/{VID}/1/seg-2.m4s"
    await fetch(seg)
    await wait_node(world, url)
    r = await purge(world, {"videoId": VID, "soft": True})
    await wait_complete(world, (await r.json())["purgeId"])
    status_, x_cache = await fetch(seg)
    assert status_ == 200 and x_cache != "edge=HIT"  # stale: went upstream to revalidate


async def test_a_stream_after_beyond_32_bits_is_not_an_error(world: World) -> None:
    """Found by the run on PostgreSQL (`--backend=scale`), where purge seqs are 32-bit columns:
    a process whose in-memory tail is empty (nothing purged since it started) asks the
    database, and an `after` the column cannot hold broke the stream after its headers."""
    url = f"{world.control}/v1/purges/stream?after={2**40}&node=big-after&tier=edge"
    headers = {"Authorization": f"Bearer {world.credential}"}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        assert r.status in (200, 422), r.status
        if r.status == 200:  # nothing after it: the stream says it is live
            try:
                line = await asyncio.wait_for(r.content.readline(), 5)
            except TimeoutError:
                line = b"nothing within 5 s"
            assert line.startswith((b"id: ", b"event: ")), line


async def test_a_node_that_was_down_replays_what_it_missed(world: World) -> None:
    url, app, runner = await world.edge("down")
    seg = f"{url}/v/{VID}/1/seg-0.m4s"
    await fetch(seg)
    await wait_node(world, url)
    applied = app[ENGINE_KEY].feed.applied  # type: ignore[union-attr]
    await runner.cleanup()  # the edge goes down (its disk tier keeps the object)
    world.runners.remove(runner)
    r = await purge(world, {"videoId": VID})
    pid = (await r.json())["purgeId"]
    url, app, _r = await world.edge("down", wait=False)  # back, same data dir
    feed = app[ENGINE_KEY].feed
    assert feed is not None and feed.applied == applied  # remembered across the restart
    for _ in range(300):
        if feed.applied >= (await r.json())["seq"]:
            break
        await asyncio.sleep(0.02)
    assert feed.applied >= (await r.json())["seq"]
    assert (await fetch(f"{url}/v/{VID}/1/seg-0.m4s"))[1] == "edge=MISS"
    assert pid


async def test_stream_consumer_resynchronises_on_garbage_and_gaps(tmp_path: Path) -> None:
    applied: list[int] = []

    async def apply(p: Purge) -> None:
        applied.append(p.seq)

    feed = PurgeFeed("http://127.0.0.1:9", "n", "edge", apply, tmp_path / "seq")

    def ev(seq: int) -> list[str]:
        return [f'{{"seq": {seq}, "purgeId": "pg_x", "kind": "all", "targets": []}}']

    await feed._dispatch(ev(1), first=True)
    await feed._dispatch(ev(1), first=False)  # a replay: ignored
    with pytest.raises(Resync):
        await feed._dispatch(["not json"], first=False)
    with pytest.raises(Resync):
        await feed._dispatch(ev(3), first=False)  # 2 is missing: resync first
    await feed._dispatch(ev(3), first=True)  # the same gap right after a resync: real
    assert applied == [1, 3] and feed.applied == 3
    assert feed._unacked == [1, 3]  # queued for one batched acknowledgement
    feed._save()  # what the ack loop does before acknowledging
    assert (tmp_path / "seq").read_text() == "3"  # remembered for a restart


@pytest.mark.parametrize(
    ("body", "role", "status_"),
    [
        ({}, "operator", 422),
        ({"videoId": VID, "prefix": "/v/"}, "operator", 422),
        ({"videoId": "vid_nosuchvideoxxxxx"}, "operator", 404),
        ({"prefix": "relative"}, "operator", 422),
        ({"all": False}, "operator", 422),
        ({"surrogateKeys": []}, "operator", 422),
        ({"videoId": VID}, "creator", 403),
        ({"videoId": VID}, "none", 401),
        ("garbage", "operator", 422),
    ],
)
async def test_bad_purge_requests(world: World, body: object, role: str, status_: int) -> None:
    key = {"operator": world.operator, "creator": world.creator, "none": "nope"}[role]
    r = await purge(world, body, key)
    assert r.status == status_
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{world.control}/v1/purges/pg_nope") as r2:
            assert r2.status == 401  # the status of a purge is for operators
        op = {"Authorization": f"Bearer {world.operator}"}
        async with s.get(f"{world.control}/v1/purges/pg_nope", headers=op) as r2:
            assert r2.status == 404


async def test_an_edge_never_gets_pre_purge_bytes_back_from_a_lagging_shield(
    world: World,
) -> None:
    """The shield follows a control it cannot reach, so it never applies the purge; the edge
    applied it and says so (X-Purge-Seq): the shield must not answer from its cache."""
    shield_settings = Settings(
        data_dir=world.tmp / "shield", upstream_timeout_seconds=3, node_credential=world.credential
    )
    shield = shield_app(shield_settings, [world.upstream.url], control_url="http://127.0.0.1:9")
    shield[SHIELD_ENGINE].purge_wait_seconds = 0.2
    sr = await start_server(shield, "127.0.0.1", 0, access_log=False)
    world.runners.append(sr)
    shield_url = f"http://127.0.0.1:{sr.addresses[0][1]}"
    settings = Settings(
        data_dir=world.tmp / "edge", upstream_timeout_seconds=3, node_credential=world.credential
    )
    edge = edge_app(settings, [shield_url], tokens=False, control_url=world.control)
    er = await start_server(edge, "127.0.0.1", 0, access_log=False)
    world.runners.append(er)
    url = f"http://127.0.0.1:{er.addresses[0][1]}/v/{VID}/1/seg-0.m4s"
    await fetch(url)
    assert (await fetch(url))[1] == "edge=HIT"
    origin_fetches = world.upstream.hits[f"/v/{VID}/1/seg-0.m4s"]
    await wait_node(world, url)
    r = await purge(world, {"videoId": VID})
    doc = await wait_complete(world, (await r.json())["purgeId"])
    assert [n["tier"] for n in doc["nodes"]] == ["edge"]  # type: ignore[index]
    status_, x_cache = await fetch(url)
    assert status_ == 200 and x_cache == "edge=MISS, shield=MISS"
    # the shield held the object but did not hand it back: the origin was asked again
    assert world.upstream.hits[f"/v/{VID}/1/seg-0.m4s"] == origin_fetches + 1


async def tokened_edge(w: World, name: str) -> str:
    settings = Settings(
        data_dir=w.tmp / name, upstream_timeout_seconds=3, node_credential=w.credential
    )
    app = edge_app(settings, [w.upstream.url], tokens=True, control_url=w.control)
    runner = await start_server(app, "127.0.0.1", 0, access_log=False)
    w.runners.append(runner)
    return f"http://127.0.0.1:{runner.addresses[0][1]}"


async def playback_token(w: World) -> tuple[int, str | None]:
    async with aiohttp.ClientSession() as s, s.get(f"{w.control}/v1/videos/{VID}/playback") as r:
        doc = await r.json()
        token = doc["manifestUrl"].split("/")[5] if r.status == 200 else None
        return r.status, token


async def operator_post(
    w: World, path: str, body: object, key: str | None = None
) -> tuple[int, dict]:  # type: ignore[type-arg]
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{w.control}{path}",
            json=body,
            headers={"Authorization": f"Bearer {key or w.operator}"},
        ) as r,
    ):
        return r.status, await r.json()


async def test_block_voids_existing_tokens_everywhere_and_unblock_needs_new_ones(
    world: World,
) -> None:
    url = await tokened_edge(world, "te")
    status_, token = await playback_token(world)
    assert status_ == 200 and token
    seg = f"{url}/v/{VID}/{token}/1/seg-0.m4s"
    for _ in range(3):  # verified once, then fast
        assert (await fetch(seg))[0] == 200
    await wait_node(world, url)
    code, doc = await operator_post(world, f"/v1/videos/{VID}/block", {"reason": "DMCA #1"})
    assert code == 200 and doc["state"] == "BLOCKED"
    await wait_complete(world, doc["purgeId"])
    # the old token, on the fast path's old favourite: refused as the playback API refuses
    # the video (issue 11: the edge saw the block on the log, so it knows why)
    assert (await fetch(seg))[0] == 451
    assert (await playback_token(world))[0] == 451
    code, doc = await operator_post(world, f"/v1/videos/{VID}/unblock", {})
    assert code == 200 and doc["state"] == "READY"
    await wait_complete(world, doc["purgeId"])
    assert (await fetch(seg))[0] == 403  # still void: issued before the takedown
    status_, fresh = await playback_token(world)
    assert status_ == 200 and fresh and fresh != token
    assert (await fetch(f"{url}/v/{VID}/{fresh}/1/seg-0.m4s"))[0] == 200
    # a restarted edge that has already applied the log still learns the cutoff
    last = (await operator_post(world, "/v1/purges", {"prefix": "/none/"}))[1]["seq"]
    state = world.tmp / "te2" / "cache" / "edge-8080.purge-seq"
    state.parent.mkdir(parents=True)
    state.write_text(str(last))
    url2 = await tokened_edge(world, "te2")
    for _ in range(100):
        if (await fetch(f"{url2}/v/{VID}/{token}/1/seg-0.m4s"))[0] == 403:
            break
        await asyncio.sleep(0.05)
    assert (await fetch(f"{url2}/v/{VID}/{token}/1/seg-0.m4s"))[0] == 403


@pytest.mark.parametrize(
    ("path", "body", "role", "status_"),
    [
        (f"/v1/videos/{VID}/block", {}, "operator", 422),
        (f"/v1/videos/{VID}/block", {"reason": "x"}, "creator", 403),
        ("/v1/videos/vid_nosuchvideoxxxxx/block", {"reason": "x"}, "operator", 404),
        (f"/v1/videos/{VID}/unblock", {}, "operator", 409),  # not blocked
    ],
)
async def test_bad_takedown_requests(
    world: World, path: str, body: object, role: str, status_: int
) -> None:
    key = world.operator if role == "operator" else world.creator
    assert (await operator_post(world, path, body, key))[0] == status_


async def vod(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vodcore.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "VOD_API_KEY"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_operator_cli_purges_and_blocks_with_a_propagation_report(world: World) -> None:
    url, _app, _r = await world.edge()
    await fetch(f"{url}/v/other/1/seg.m4s")
    await wait_node(world, url)
    api = ["--api", world.control, "--key", world.operator, "--timeout", "10"]
    code, out, err = await vod("purge", "--prefix", "/v/other/", "--wait", *api)
    assert code == 0, err
    assert "accepted" in out and "complete on 1 node(s)" in out and "edge" in out
    assert (await fetch(f"{url}/v/other/1/seg.m4s"))[1] == "edge=MISS"
    code, out, err = await vod("block", VID, "--reason", "court order", *api)
    assert code == 0, err
    assert f"{VID} is BLOCKED" in out and "complete on" in out
    code, out, err = await vod("unblock", VID, *api)
    assert code == 0 and f"{VID} is READY" in out, err
    code, out, err = await vod("purge", "--video", "vid_nosuchvideoxxxxx", *api)
    assert code == 1 and "404" in err and "Traceback" not in err
    code, out, err = await vod("purge", "--all", "--api", world.control)
    assert code == 2 and "operator API key" in err
    # signing keys: rotate, then revoke the new key; the report names the kids
    code, out, err = await vod("signing", "rotate", *api)
    assert code == 0 and out.startswith("signing with "), err
    kid = out.split()[2].rstrip(";")
    code, out, err = await vod("signing", "revoke", kid, *api)
    assert code == 0 and f"revoked {kid}" in out and "purge log at seq" in out, err
    code, out, err = await vod("signing", "revoke", "no-such-kid", *api)
    assert code == 1 and "revoke refused" in err and "Traceback" not in err


async def test_key_rotation_without_downtime_and_revocation_everywhere(world: World) -> None:
    url = await tokened_edge(world, "keys")
    _s, old = await playback_token(world)
    assert old
    old_seg = f"{url}/v/{VID}/{old}/1/seg-1.m4s"
    assert (await fetch(old_seg))[0] == 200
    await wait_node(world, url)
    code, rotated = await operator_post(world, "/v1/keys/rotate", {})
    assert code == 200
    _s, new = await playback_token(world)
    assert new and jwt.get_unverified_header(new)["kid"] == rotated["kid"]
    new_seg = f"{url}/v/{VID}/{new}/1/seg-1.m4s"
    assert (await fetch(new_seg))[0] == 200
    assert (await fetch(old_seg))[0] == 200  # rotation: tokens already out keep playing
    old_kid = jwt.get_unverified_header(old)["kid"]
    async with (
        aiohttp.ClientSession() as s,
        s.delete(
            f"{world.control}/v1/keys/{old_kid}",
            headers={"Authorization": f"Bearer {world.operator}"},
        ) as r,
    ):
        assert r.status == 200
    for _ in range(100):  # the log entry makes the edge refetch the key set
        if (await fetch(old_seg))[0] == 403:
            break
        await asyncio.sleep(0.02)
    assert (await fetch(old_seg))[0] == 403
    assert (await fetch(new_seg))[0] == 200
    async with aiohttp.ClientSession() as s:
        for kid, key, want in (
            ("k_nope", world.operator, 404),
            (rotated["kid"], world.creator, 403),
        ):
            async with s.delete(
                f"{world.control}/v1/keys/{kid}", headers={"Authorization": f"Bearer {key}"}
            ) as r:
                assert r.status == want


async def test_an_edge_out_of_touch_with_control_revalidates_instead_of_serving_blindly(
    world: World,
) -> None:
    async def conditional(request: web.Request) -> web.StreamResponse:
        hdrs = {"Cache-Control": "public, max-age=3600", "ETag": '"v1"', "Surrogate-Key": VID}
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=hdrs)
        return web.Response(body=b"blind", headers=hdrs)

    path = f"/v/{VID}/1/blind.m4s"
    world.upstream.routes[path] = conditional
    url, app, _r = await world.edge("blind", blind=0.6)
    await wait_node(world, url)
    assert (await fetch(url + path))[1] == "edge=MISS"
    assert (await fetch(url + path))[1] == "edge=HIT"  # in touch: served from the cache
    control = world.runners.pop(0)
    await control.cleanup()  # control goes away; the edge cannot hear of purges any more
    await asyncio.sleep(1.0)
    assert app[ENGINE_KEY].feed.blind(time.monotonic())  # type: ignore[union-attr]
    before = world.upstream.hits[path]
    for _ in range(2):  # every request asks upstream (here: 304), none is answered blindly
        status_, x_cache = await fetch(url + path)
        assert (status_, x_cache) == (200, "edge=REVALIDATED")
    assert world.upstream.hits[path] == before + 2
    assert world.upstream.seen[-1][1].get("If-None-Match") == '"v1"'
