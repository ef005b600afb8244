"""Issue 11, finding 3: the node plane (purge stream, acks, cutoffs) answers only nodes with a
credential, and nothing a node says can be forged or grow without bound.

Each test is an attack that worked before: a forged ack for a real node made a paused edge look
up to date; fake nodes on the stream kept `vod purge --wait` from ever completing; 70,000 ack
rows in two requests; a `nodes` table without bound."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select

from control import nodeauth, nodes_credentials
from control.app import make_app as control_app
from control.auth import create_key
from tests.backends import Backend
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.db.schema import nodes, purge_acks
from vodcore.server import start_server

pytestmark = pytest.mark.timeout(60)


@dataclass
class Control:
    url: str
    settings: Settings
    operator: str
    creds: dict[str, str]  # name -> secret
    ids: dict[str, str]  # name -> credential id
    session: aiohttp.ClientSession

    def auth(self, name: str | None) -> dict[str, str]:
        if name == "operator":
            return {"Authorization": f"Bearer {self.operator}"}
        return {"Authorization": f"Bearer {self.creds[name]}"} if name else {}

    async def call(
        self, method: str, path: str, cred: str | None = None, body: Any = None
    ) -> tuple[int, Any]:
        async with self.session.request(
            method, self.url + path, json=body, headers=self.auth(cred)
        ) as r:
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, None

    async def purge(self) -> tuple[str, int]:
        async with self.session.post(
            self.url + "/v1/purges",
            json={"prefix": "/nothing/"},
            headers={"Authorization": f"Bearer {self.operator}"},
        ) as r:
            assert r.status == 202
            doc = await r.json()
            return doc["purgeId"], doc["seq"]

    async def ack(self, cred: str | None, node: str, seqs: list[int], tier: str = "edge") -> int:
        body = {"node": node, "tier": tier, "seqs": seqs}
        return (await self.call("POST", "/v1/purges/acks", cred, body))[0]

    async def db_count(self, query: Any) -> int:
        db = make_engine(self.settings.db_url)
        try:
            async with db.connect() as conn:
                return int((await conn.execute(query)).scalar() or 0)
        finally:
            await db.dispose()


async def _control(tmp_path: Path, backend: Backend, **overrides: Any) -> AsyncIterator[Control]:
    settings = backend.settings(tmp_path / "control", **overrides)
    settings.data_dir.mkdir(parents=True)
    db = make_engine(settings.db_url)
    await create_schema(db)
    creds, ids = {}, {}
    async with db.begin() as conn:
        operator = await create_key(conn, "operator", 0.0)
        for name, tier in (("edge", "edge"), ("edge2", "edge"), ("shield", "shield"),
                           ("any", "any"), ("revoked", "any")):  # fmt: skip
            cred, secret = await nodes_credentials.create(conn, tier, 0.0, name)
            creds[name], ids[name] = secret, cred.id
        await nodes_credentials.revoke(conn, ids["revoked"], 1.0)
    await db.dispose()
    runner = await start_server(control_app(settings), "127.0.0.1", 0, access_log=False)
    session = aiohttp.ClientSession()
    try:
        yield Control(
            f"http://127.0.0.1:{runner.addresses[0][1]}", settings, operator, creds, ids, session
        )
    finally:
        await session.close()
        await runner.cleanup()


@pytest.fixture
async def ctl(tmp_path: Path, backend: Backend) -> AsyncIterator[Control]:
    async for c in _control(tmp_path, backend):
        yield c


STREAM = "/v1/purges/stream?after=0&node=edge@attacker&tier=edge"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", STREAM, None),
        ("POST", "/v1/purges/acks", {"node": "edge@real", "tier": "edge", "seqs": [1]}),
        ("GET", "/v1/cutoffs", None),
    ],
)
async def test_node_endpoints_refuse_strangers(
    ctl: Control, method: str, path: str, body: Any
) -> None:
    await ctl.purge()
    for cred, status in ((None, 401), ("revoked", 403)):
        code, doc = await ctl.call(method, path, cred, body)
        assert code == status, (cred, code)
        assert doc["error"]["code"] == ("unauthenticated" if status == 401 else "forbidden")
    for junk in ("vodn_" + "x" * 40, "vod_someapikey", "x" * 5000):
        async with ctl.session.request(
            method, ctl.url + path, json=body, headers={"Authorization": f"Bearer {junk}"}
        ) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "unauthenticated"
    # the public signing keys stay public
    assert (await ctl.call("GET", "/v1/keys/jwks.json"))[0] == 200


async def test_a_credential_is_for_its_tier(ctl: Control) -> None:
    _pid, seq = await ctl.purge()
    assert await ctl.ack("shield", "edge@x", [seq], tier="edge") == 403
    assert (await ctl.call("GET", STREAM, "shield"))[0] == 403
    assert await ctl.ack("shield", "shield@x", [seq], tier="shield") == 200
    assert await ctl.ack("any", "origin@x", [seq], tier="origin") == 200


async def test_forged_acks_cannot_say_a_purge_was_applied(ctl: Control) -> None:
    pid, seq = await ctl.purge()
    assert await ctl.ack("edge", "edge@real", [seq]) == 200  # the real node registers
    pid2, seq2 = await ctl.purge()  # the real edge is paused: it never applies this one
    # a stranger says it applied everything
    assert await ctl.ack(None, "edge@real", [2**62 - 1]) == 401
    # even a node with a credential cannot claim a purge the log does not hold yet
    code, doc = await ctl.call(
        "POST",
        "/v1/purges/acks",
        "edge",
        {"node": "edge@real", "tier": "edge", "seqs": [2**62 - 1]},
    )
    assert code == 422 and doc["error"]["code"] == "validation_failed"
    # nor ack for a node another credential registered
    assert await ctl.ack("edge2", "edge@real", [seq2]) == 403
    code, doc = await ctl.call("GET", f"/v1/purges/{pid2}", "operator")
    assert code == 200 and not doc["complete"]
    assert [(n["node"], n["applied"]) for n in doc["nodes"]] == [("edge@real", False)]
    assert (await ctl.call("GET", f"/v1/purges/{pid}", "operator"))[1]["complete"]


async def test_nodes_without_a_credential_never_hold_up_completion(ctl: Control) -> None:
    """A fake node on the stream (refused now) or a row from before credentials existed does
    not count: completion is decided by authenticated nodes only."""
    db = make_engine(ctl.settings.db_url)
    async with db.begin() as conn:  # a pre-v6 row: no credential, seen just now, applied 0
        await conn.execute(
            nodes.insert().values(id="edge@legacy", tier="edge", applied_seq=0, last_seen=9e12)
        )
    await db.dispose()
    async with ctl.session.get(ctl.url + STREAM) as r:
        assert r.status == 401
    pid, seq = await ctl.purge()
    assert await ctl.ack("edge", "edge@good", [seq]) == 200
    _code, doc = await ctl.call("GET", f"/v1/purges/{pid}", "operator")
    assert doc["complete"] and [n["node"] for n in doc["nodes"]] == ["edge@good"]


async def test_purge_status_is_for_operators_only(ctl: Control) -> None:
    """It names every node of the fleet (tier, host, port, pid): not for strangers or nodes."""
    pid, _seq = await ctl.purge()
    assert (await ctl.call("GET", f"/v1/purges/{pid}"))[0] == 401
    assert (await ctl.call("GET", f"/v1/purges/{pid}", "edge"))[0] == 401
    assert (await ctl.call("GET", f"/v1/purges/{pid}", "operator"))[0] == 200


async def test_acks_are_bounded_per_request(ctl: Control) -> None:
    for _ in range(3):
        _pid, seq = await ctl.purge()
    code, _doc = await ctl.call(
        "POST", "/v1/purges/acks", "edge", {"node": "edge@n", "tier": "edge", "seqs": [1] * 1001}
    )
    assert code == 422
    assert await ctl.db_count(select(func.count()).select_from(purge_acks)) == 0
    assert await ctl.ack("edge", "edge@n", list(range(1, seq + 1))) == 200
    assert await ctl.db_count(select(func.count()).select_from(purge_acks)) == seq


async def test_acks_are_rate_limited_per_credential(
    tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nodeauth, "ACKS_BURST", 5.0)
    monkeypatch.setattr(nodeauth, "ACKS_PER_SECOND", 0.01)
    async for c in _control(tmp_path, backend):
        _pid, seq = await c.purge()
        codes = [await c.ack("edge", "edge@n", [seq]) for _ in range(8)]
        assert codes[:5] == [200] * 5 and set(codes[5:]) == {429}
        async with c.session.post(
            c.url + "/v1/purges/acks",
            json={"node": "edge@n", "tier": "edge", "seqs": [seq]},
            headers=c.auth("edge"),
        ) as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
        assert await c.ack("edge2", "edge@m", [seq]) == 200  # another credential: its own budget


async def test_the_nodes_table_is_bounded(tmp_path: Path, backend: Backend) -> None:
    async for c in _control(tmp_path, backend, max_nodes_per_credential=3, node_ttl_seconds=3600):
        db = make_engine(c.settings.db_url)
        async with db.begin() as conn:  # a node of another credential, unseen for days
            await conn.execute(nodes.insert().values(
                id="edge@gone", tier="edge", applied_seq=0, last_seen=1.0,
                credential_id=c.ids["edge2"],
            ))  # fmt: skip
        await db.dispose()
        _pid, seq = await c.purge()
        for i in range(20):  # one credential, many node ids (restarts, or an attacker)
            assert await c.ack("edge", f"edge@{i}", [seq]) == 200
        mine = select(func.count()).select_from(nodes).where(nodes.c.credential_id == c.ids["edge"])
        assert await c.db_count(mine) == 3  # the three most recently seen
        assert await c.db_count(select(func.count()).select_from(nodes)) == 3  # expired: gone
        acks = select(func.count()).select_from(purge_acks)
        assert await c.db_count(acks) == 3  # the dropped nodes' acks went with them
        # another credential is not crowded out
        assert await c.ack("edge2", "edge@other", [seq]) == 200
        assert await c.db_count(mine) == 3


async def test_a_follower_with_a_credential_completes_purges(ctl: Control) -> None:
    from vodcore.cache.purgefeed import PurgeFeed

    applied: list[int] = []

    async def apply(p: Any) -> None:
        applied.append(p.seq)

    feed = PurgeFeed(ctl.url, "edge@follower", "edge", apply, credential=ctl.creds["edge"])
    async with aiohttp.ClientSession() as s:
        await feed.start(s)
        try:
            assert await feed.wait_caught_up(10)
            pid, seq = await ctl.purge()
            for _ in range(200):
                doc = (await ctl.call("GET", f"/v1/purges/{pid}", "operator"))[1]
                if doc["complete"]:
                    break
                await asyncio.sleep(0.02)
            assert doc["complete"] and [n["node"] for n in doc["nodes"]] == ["edge@follower"]
            assert applied[-1] == seq
        finally:
            await feed.close()


async def test_vod_nodes_create_list_revoke(tmp_path: Path) -> None:
    data = str(tmp_path / "d")

    async def vod(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vodcore.cli", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k != "VOD_DATABASE_URL"},
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        return int(proc.returncode or 0), out.decode(), err.decode()

    code, out, err = await vod("nodes", "create", "--data", data, "--tier", "edge", "--name", "e1")
    secret = out.strip()
    assert code == 0 and secret.startswith("vodn_") and len(secret) > 40, err
    code, out, _err = await vod("nodes", "list", "--data", data)
    assert code == 0 and "e1" in out and "edge" in out and secret not in out
    cred_id = out.splitlines()[1].split()[0]
    settings = Settings(data_dir=Path(data))
    db = make_engine(settings.db_url)
    async with db.connect() as conn:
        found = await nodes_credentials.find(conn, secret)
        assert found is not None and found.id == cred_id and found.revoked_at is None
    code, out, _err = await vod("nodes", "revoke", "--data", data, cred_id)
    assert code == 0 and cred_id in out
    async with db.connect() as conn:
        found = await nodes_credentials.find(conn, secret)
        assert found is not None and found.revoked_at is not None
    await db.dispose()
    code, _out, err = await vod("nodes", "revoke", "--data", data, cred_id)
    assert code == 1 and "no unrevoked" in err


async def test_a_revoked_credential_loses_its_open_stream(
    ctl: Control, monkeypatch: pytest.MonkeyPatch
) -> None:
    from control import purges

    monkeypatch.setattr(purges, "PING_SECONDS", 0.05)  # the stream re-checks at each ping
    url = ctl.url + "/v1/purges/stream?after=0&node=edge@revokee&tier=edge"
    async with ctl.session.get(url, headers=ctl.auth("edge")) as r:
        assert r.status == 200
        db = make_engine(ctl.settings.db_url)
        async with db.begin() as conn:
            assert await nodes_credentials.revoke(conn, ctl.ids["edge"], 2.0)
        await db.dispose()
        rest = await asyncio.wait_for(r.content.read(), 20)  # the stream ends
        assert rest is not None
    assert (await ctl.call("GET", url.removeprefix(ctl.url), "edge"))[0] == 403
