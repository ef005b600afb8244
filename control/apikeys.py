"""Listing and revoking API keys (issue 11 item 9: "API keys cannot be revoked").

The paths are `/v1/api-keys…`: `/v1/keys/…` already names the *signing* keys (JWKS, rotation,
`DELETE /v1/keys/{kid}`, `control.signing`), and `/v1/keys/{keyId}` would collide with them.

- `GET /v1/api-keys`: an operator sees every key, a creator its own; each as `{keyId, role,
  createdAt, revokedAt}`, oldest first. Never the key nor its hash.
- `DELETE /v1/api-keys/{keyId}`: an operator revokes any key, a creator only its own (another
  key is 404 to it, as an unknown one: a creator cannot probe other keys' ids). The key is
  refused (401) from the next request on, by every control process: `control.auth` reads the
  key's row on every call (no cache), and revocation is that row's `revoked_at`. Idempotent:
  revoking a revoked key answers 200 with the first revocation's time.
The same functions serve `vod keys list` and `vod keys revoke` (`vodcore.keys_cli`).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control.auth import Principal, authenticate
from control.ids import is_id
from vodcore.db.schema import api_keys
from vodcore.errors import NOT_FOUND, ApiError

_COLUMNS = (api_keys.c.id, api_keys.c.role, api_keys.c.created_at, api_keys.c.revoked_at)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def key_json(row: Any) -> dict[str, Any]:
    return {
        "keyId": row.id,
        "role": row.role,
        "createdAt": _iso(row.created_at),
        "revokedAt": _iso(row.revoked_at),
    }


async def list_keys(conn: AsyncConnection, owner: str | None = None) -> list[Any]:
    """Every key (`owner` None) or that one key, oldest first."""
    q = select(*_COLUMNS).order_by(api_keys.c.created_at, api_keys.c.id)
    if owner is not None:
        q = q.where(api_keys.c.id == owner)
    return list((await conn.execute(q)).all())


async def revoke_key(conn: AsyncConnection, key_id: str, now: float) -> Any | None:
    """Revoke the key (keeping an earlier revocation's time); its row, or None if unknown."""
    await conn.execute(
        update(api_keys)
        .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return (await conn.execute(select(*_COLUMNS).where(api_keys.c.id == key_id))).first()


def may_revoke(principal: Principal, key_id: str) -> bool:
    return principal.role == "operator" or principal.key_id == key_id


class ApiKeys:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/api-keys", self.index)
        app.router.add_delete("/v1/api-keys/{keyId}", self.revoke)

    async def index(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.engine, request)
        owner = None if principal.role == "operator" else principal.key_id
        async with self.engine.connect() as conn:
            rows = await list_keys(conn, owner)
        return web.json_response(
            {"keys": [key_json(r) for r in rows]}, headers={"Cache-Control": "private, no-store"}
        )

    async def revoke(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.engine, request)
        key_id = request.match_info["keyId"]
        if not is_id(key_id, "key") or not may_revoke(principal, key_id):
            raise ApiError(NOT_FOUND, "no such API key")
        async with self.engine.begin() as conn:
            row = await revoke_key(conn, key_id, time.time())
        if row is None:
            raise ApiError(NOT_FOUND, "no such API key")
        return web.json_response(key_json(row), headers={"Cache-Control": "no-store"})
