"""Authentication of the nodes (edges, shields, origins) on control's node endpoints.

Rules (issue 11, DESIGN "Trust boundaries"):
- the node endpoints are the purge stream (`GET /v1/purges/stream`, which also registers the
  node), the acks (`POST /v1/purges/acks`) and the cutoffs (`GET /v1/cutoffs`); every request
  to them carries `Authorization: Bearer vodn_…`, a node credential (`control.nodes_credentials`,
  made by `vod nodes create`);
- no credential, or one control does not know: 401 `unauthenticated` (with
  `WWW-Authenticate`); a revoked credential, or one for another tier than the node claims: 403
  `forbidden`. Nothing about a refused request is kept;
- the authenticated credential is put in the request (`NODE_KEY`) for the handlers (the purge
  log binds node ids to it and counts only authenticated nodes);
- acks are rate limited per credential (`ACKS_PER_SECOND`, burst `ACKS_BURST`; 429 with
  `Retry-After`): they are exempt from the per-key and per-IP limits, which nodes behind one
  address would share, so they get their own budget here. A node sends one ack request at a
  time, batched, so this budget is far above what a healthy fleet uses;
- the public signing keys (`/v1/keys/jwks.json`) stay public: they are what lets anyone check
  a token, and hold nothing secret.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from control import nodes_credentials
from control.nodes_credentials import NodeCredential
from control.ratelimit import TokenBucket
from vodcore.config import Settings
from vodcore.errors import FORBIDDEN, RATE_LIMITED, UNAUTHENTICATED, ApiError

NODE_PATHS = frozenset({"/v1/purges/stream", "/v1/purges/acks", "/v1/cutoffs"})
ACKS_PATH = "/v1/purges/acks"
ACKS_PER_SECOND = 50.0
ACKS_BURST = 200.0
NODE_KEY: web.RequestKey[NodeCredential] = web.RequestKey("node_credential", NodeCredential)
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="vodstack-nodes"'}
TIERS = ("edge", "shield", "origin")


class NodeLimits:
    """The bounds of the nodes table, from the settings (`install` puts them in the app)."""

    def __init__(self, ttl_seconds: float = 7 * 24 * 3600.0, max_per_credential: int = 64) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_per_credential = max(1, max_per_credential)


NODE_LIMITS_KEY: web.AppKey[NodeLimits] = web.AppKey("node_limits", NodeLimits)


def bearer(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


async def authenticate_node(engine: AsyncEngine, request: web.Request) -> NodeCredential:
    """The request's node credential; ApiError 401/403 as the module rules say."""
    secret = bearer(request.headers.get("Authorization", ""))
    if secret is None:
        raise ApiError(UNAUTHENTICATED, "a node credential is required", headers=CHALLENGE)
    if not nodes_credentials.looks_like(secret):
        raise ApiError(UNAUTHENTICATED, "unknown node credential", headers=CHALLENGE)
    async with engine.connect() as conn:
        cred = await nodes_credentials.find(conn, secret)
    if cred is None:
        raise ApiError(UNAUTHENTICATED, "unknown node credential", headers=CHALLENGE)
    if cred.revoked_at is not None:
        raise ApiError(FORBIDDEN, "this node credential was revoked")
    return cred


def check_tier(cred: NodeCredential, tier: object) -> None:
    """403 when a node claims a tier its credential is not for (unknown tiers are left to the
    handler's validation, 422)."""
    if isinstance(tier, str) and tier in TIERS and not cred.allows(tier):
        raise ApiError(FORBIDDEN, f"this node credential is for the {cred.tier} tier")


async def still_valid(engine: AsyncEngine, cred_id: str) -> bool:
    """Is the credential still there and unrevoked? (long-lived streams re-check it)"""
    async with engine.connect() as conn:
        cred = await nodes_credentials.get(conn, cred_id)
    return cred is not None and cred.revoked_at is None


def install(
    app: web.Application,
    engine: AsyncEngine,
    settings: Settings,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Guard the node endpoints of `app` (control)."""
    app[NODE_LIMITS_KEY] = NodeLimits(settings.node_ttl_seconds, settings.max_nodes_per_credential)
    acks = TokenBucket(ACKS_BURST, ACKS_PER_SECOND, max_keys=10_000)

    @web.middleware
    async def node_auth(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if request.path not in NODE_PATHS:
            return await handler(request)
        cred = await authenticate_node(engine, request)
        check_tier(cred, request.query.get("tier"))
        if request.path == ACKS_PATH:
            ok, retry = acks.take(cred.id, clock())  # keyed by a known credential only
            if not ok:
                raise ApiError(
                    RATE_LIMITED,
                    headers={"Retry-After": str(max(1, math.ceil(retry)))},
                    extra={"retryAfterSeconds": round(retry, 3)},
                )
        request[NODE_KEY] = cred
        return await handler(request)

    app.middlewares.append(node_auth)
