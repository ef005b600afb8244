"""The aiohttp side of tier authentication (`vodcore.tierauth` holds the rules): a middleware
that refuses, with 403 JSON, any request to a shield or an origin that its own tiers did not
sign."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from vodcore.errors import FORBIDDEN, ApiError
from vodcore.tierauth import FIELD, OPEN_PATHS, TierAuth

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def install(app: web.Application, auth: TierAuth, clock: Callable[[], float] = time.time) -> None:
    """Make `app` answer only signed requests (but `/healthz` and `/metrics`)."""

    @web.middleware
    async def tier_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS and not auth.verify(
            request.method, request.raw_path, request.headers.get(FIELD), clock()
        ):
            raise ApiError(FORBIDDEN, "this tier answers only its own tiers (X-Vod-Tier-Auth)")
        return await handler(request)

    app.middlewares.append(tier_auth)
