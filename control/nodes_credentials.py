"""Node credentials: what edges, shields and origins present to control's node endpoints
(purge stream, acks, cutoffs; a node registers by opening the stream or acknowledging).

Rules:
- a credential is `vodn_` + 32 random bytes (URL-safe base64), shown once at creation; only
  its SHA-256 is stored (table `node_credentials`), as for API keys (`control.auth`);
- a credential is for one tier (`edge`, `shield`, `origin`) or `any` (what `vod up` makes for
  its own tiers); a node claiming another tier with it is refused (403);
- revoked credentials stay in the table (who had what, and a clear 403 instead of a 401);
  rotation is: create a new one, deploy it, revoke the old one.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from control.ids import new_id
from vodcore.db.schema import node_credentials

PREFIX = "vodn_"
TIERS = ("edge", "shield", "origin", "any")


@dataclass(frozen=True, slots=True)
class NodeCredential:
    id: str
    tier: str  # edge | shield | origin | any
    name: str
    created_at: float
    revoked_at: float | None

    def allows(self, tier: str) -> bool:
        return self.tier in ("any", tier)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def looks_like(secret: str) -> bool:
    """A cheap shape check before any database read (a junk header costs nothing)."""
    return secret.startswith(PREFIX) and 16 <= len(secret) <= 100 and secret.isascii()


def _row(r: object) -> NodeCredential:
    return NodeCredential(
        r.id,  # type: ignore[attr-defined]
        r.tier,  # type: ignore[attr-defined]
        r.name,  # type: ignore[attr-defined]
        r.created_at,  # type: ignore[attr-defined]
        r.revoked_at,  # type: ignore[attr-defined]
    )


async def create(
    conn: AsyncConnection, tier: str, now: float, name: str = ""
) -> tuple[NodeCredential, str]:
    """A new credential and its secret (the only time the secret exists in clear)."""
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}")
    if len(name) > 80:
        raise ValueError("name: at most 80 characters")
    secret = PREFIX + secrets.token_urlsafe(32)
    cred = NodeCredential(new_id("nc"), tier, name, now, None)
    await conn.execute(
        node_credentials.insert().values(
            id=cred.id, secret_hash=hash_secret(secret), tier=tier, name=name, created_at=now
        )
    )
    return cred, secret


async def find(conn: AsyncConnection, secret: str) -> NodeCredential | None:
    """The credential whose secret this is (revoked or not), or None."""
    if not looks_like(secret):
        return None
    row = (
        await conn.execute(
            select(node_credentials).where(node_credentials.c.secret_hash == hash_secret(secret))
        )
    ).first()
    return None if row is None else _row(row)


async def get(conn: AsyncConnection, cred_id: str) -> NodeCredential | None:
    row = (
        await conn.execute(select(node_credentials).where(node_credentials.c.id == cred_id))
    ).first()
    return None if row is None else _row(row)


async def listing(conn: AsyncConnection) -> list[NodeCredential]:
    rows = (
        await conn.execute(select(node_credentials).order_by(node_credentials.c.created_at))
    ).all()
    return [_row(r) for r in rows]


async def revoke(conn: AsyncConnection, cred_id: str, now: float) -> bool:
    """Revoke a credential; False if there is no such (unrevoked) credential."""
    res = await conn.execute(
        update(node_credentials)
        .where(node_credentials.c.id == cred_id, node_credentials.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return bool(res.rowcount)
