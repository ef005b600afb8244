"""API keys with roles. A key is shown once at creation; only its SHA-256 is stored.

`authenticate` requires a key (401 without one or with a bad or revoked one, 403 for the wrong
role); `optional_principal` is for calls anyone may make but a key may see more (a private
video for its owner); `may_manage` is the ownership rule: the key that created a video, or any
operator key."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control.ids import new_id
from vodcore.db.schema import api_keys
from vodcore.errors import FORBIDDEN, UNAUTHENTICATED, ApiError

ROLES = ("creator", "operator")


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    role: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_key(conn: AsyncConnection, role: str, now: float) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    key = "vod_" + secrets.token_urlsafe(24)
    await conn.execute(
        api_keys.insert().values(
            id=new_id("key"), key_hash=hash_key(key), role=role, created_at=now
        )
    )
    return key


async def authenticate(
    engine: AsyncEngine, request: web.Request, roles: tuple[str, ...] = ROLES
) -> Principal:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(UNAUTHENTICATED, headers={"WWW-Authenticate": 'Bearer realm="vodstack"'})
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(api_keys.c.id, api_keys.c.role, api_keys.c.revoked_at).where(
                    api_keys.c.key_hash == hash_key(key.strip())
                )
            )
        ).first()
    if row is None or row.revoked_at is not None:
        raise ApiError(UNAUTHENTICATED, "unknown or revoked API key")
    if row.role not in roles:
        raise ApiError(FORBIDDEN, f"this call needs the {' or '.join(roles)} role")
    return Principal(row.id, row.role)


async def optional_principal(engine: AsyncEngine, request: web.Request) -> Principal | None:
    """The caller's key, or None when the request carries no `Authorization` header at all
    (a header with a bad or revoked key is still 401)."""
    if not request.headers.get("Authorization", "").strip():
        return None
    return await authenticate(engine, request)


def may_manage(principal: Principal | None, owner_key_id: str | None) -> bool:
    """A video's owner (the key that created it) and operators may see, play and edit it
    whatever its visibility."""
    if principal is None:
        return False
    return principal.role == "operator" or (
        owner_key_id is not None and principal.key_id == owner_key_id
    )
