"""API keys can be listed and revoked (issue 11 item 9: "API keys cannot be revoked").

Two control processes' apps on one database (SQLite, or PostgreSQL + Redis with
`--backend=scale`), over loopback:
- a creator lists only its own key, an operator every key; no listing shows a key or its hash;
- a creator cannot revoke another key (404, as an unknown id), an operator can revoke any;
- a revoked key is refused (401) at once by both processes, on every kind of call;
- `vod keys list` and `vod keys revoke` (a real `vod` process) do the same on the data dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control.app import make_app
from control.auth import hash_key
from tests.backends import Backend
from tests.security.seed import new_key, quiet_settings
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.server import start_server

pytestmark = pytest.mark.timeout(90)
VOD = str(Path(sys.executable).with_name("vod"))


@dataclass
class Keys:
    apis: list[str]  # two control processes
    settings: Settings
    creator: str
    creator2: str
    operator: str
    ids: dict[str, str]  # key → its id
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, key: str | None, api: int = 0) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.http.request(method, self.apis[api] + path, headers=headers) as r:
            return r.status, await r.json() if r.content_type == "application/json" else None


@pytest.fixture
async def keys(tmp_path: Path, backend: Backend) -> AsyncIterator[Keys]:
    settings = quiet_settings(backend, tmp_path)
    db = make_engine(settings.db_url)
    await create_schema(db)
    async with db.begin() as conn:
        pairs = [await new_key(conn, role) for role in ("creator", "creator", "operator")]
        made = [key for key, _id in pairs]
        ids = dict(pairs)
    await db.dispose()
    runners = [
        await start_server(make_app(settings), "127.0.0.1", 0, access_log=False) for _ in range(2)
    ]
    async with aiohttp.ClientSession() as http:
        try:
            yield Keys(
                [f"http://127.0.0.1:{r.addresses[0][1]}" for r in runners],
                settings, *made, ids, http,
            )  # fmt: skip
        finally:
            for r in runners:
                await r.cleanup()


async def test_listing_shows_ids_and_times_never_secrets(keys: Keys) -> None:
    k = keys
    code, doc = await k.call("GET", "/v1/api-keys", k.creator)
    assert code == 200
    assert [row["keyId"] for row in doc["keys"]] == [k.ids[k.creator]]
    assert doc["keys"][0]["role"] == "creator" and doc["keys"][0]["revokedAt"] is None
    code, doc = await k.call("GET", "/v1/api-keys", k.operator)
    assert code == 200
    assert sorted(row["keyId"] for row in doc["keys"]) == sorted(k.ids.values())
    text = str(doc)
    for key in (k.creator, k.creator2, k.operator):
        assert key not in text and hash_key(key) not in text
    assert (await k.call("GET", "/v1/api-keys", None))[0] == 401


async def test_revoked_keys_are_refused_at_once_everywhere(keys: Keys) -> None:
    k = keys
    other, mine = k.ids[k.creator2], k.ids[k.creator]
    # a creator cannot revoke another key, nor find out whether it exists
    for target in (other, k.ids[k.operator], "key_aaaaaaaaaaaaaaaa", "nope"):
        code, doc = await k.call("DELETE", f"/v1/api-keys/{target}", k.creator)
        assert code == 404 and doc["error"]["code"] == "not_found", doc
    assert (await k.call("GET", "/v1/me/videos", k.creator2, api=1))[0] == 200

    # a creator revokes its own key (a leaked one): refused by both processes from now on
    code, doc = await k.call("DELETE", f"/v1/api-keys/{mine}", k.creator)
    assert code == 200 and doc["keyId"] == mine and doc["revokedAt"], doc
    for api in (0, 1):
        for method, path in (("GET", "/v1/me/videos"), ("GET", "/v1/api-keys")):
            code, doc = await k.call(method, path, k.creator, api=api)
            assert code == 401 and doc["error"]["code"] == "unauthenticated", (api, path, doc)

    # an operator revokes anyone's key, on the other process; idempotent
    code, first = await k.call("DELETE", f"/v1/api-keys/{other}", k.operator, api=1)
    assert code == 200 and first["revokedAt"]
    assert (await k.call("GET", "/v1/me/videos", k.creator2, api=0))[0] == 401
    code, again = await k.call("DELETE", f"/v1/api-keys/{other}", k.operator)
    assert code == 200 and again["revokedAt"] == first["revokedAt"]
    code, doc = await k.call("GET", "/v1/api-keys", k.operator)
    revoked = {row["keyId"] for row in doc["keys"] if row["revokedAt"]}
    assert revoked == {mine, other}
    assert (await k.call("GET", "/v1/me/videos", k.operator, api=1))[0] == 200


async def test_the_cli_lists_and_revokes(keys: Keys, backend: Backend) -> None:
    k = keys
    env = {**os.environ, **backend.env()}
    data = str(k.settings.data_dir)

    def vod(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [VOD, "keys", *args, "--data", data], env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip

    listed = vod("list")
    assert listed.returncode == 0, listed.stderr
    for key, key_id in k.ids.items():
        assert key_id in listed.stdout and key not in listed.stdout
        assert hash_key(key) not in listed.stdout
    target = k.ids[k.creator2]
    done = vod("revoke", target)
    assert done.returncode == 0 and target in done.stdout, done.stderr
    for api in (0, 1):  # the running processes refuse it at once
        assert (await k.call("GET", "/v1/me/videos", k.creator2, api=api))[0] == 401
    line = next(x for x in vod("list").stdout.splitlines() if target in x)
    assert line.split()[-1] != "-"  # revoked shows its time
    assert vod("revoke", "key_aaaaaaaaaaaaaaaa").returncode == 1
    assert vod("revoke", "not-an-id").returncode == 2
