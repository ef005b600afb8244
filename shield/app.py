"""The shield tier: a cache between the edges and the origin, no tokens.

`GET`/`HEAD /v/{videoId}/{version}/{file…}` is validated (`vodcore.paths.split_raw_path`, bad
paths → 400 before any upstream is asked), looked up in the shared cache engine under the
normalised path (the query string is dropped: the origin ignores it, so it must not split the
cache), and filled from the origin with that same path.

Trust (issue 11): with `tier_secret` set the shield answers only requests its edges signed
(`vodcore.tierauth`; 403 JSON otherwise, `/healthz` and `/metrics` excepted), in the fast path
too, and signs its own requests to the origin. `X-Purge-Seq` is honoured from whoever may ask:
with a tier secret that is only the edges; without one, anyone who reaches the shield, which is
why a shield without a tier secret must sit on a private network.
"""

from __future__ import annotations

import re

from aiohttp import web

from vodcore.cache import CacheEngine
from vodcore.cache.purgefeed import follow_purges
from vodcore.config import Settings
from vodcore.fastpath import FastPath
from vodcore.server import FAST_PATH_KEY, base_app, media_segments
from vodcore.tierauth import TierAuth
from vodcore.tierguard import install as install_tier_guard

TIER = "shield"
ENGINE_KEY: web.AppKey[CacheEngine] = web.AppKey("engine", CacheEngine)


def media_path(raw_path: str) -> str:
    """The normalised `/v/…` path of a request; ApiError for anything else."""
    return "/" + "/".join(media_segments(raw_path, 4))


_PLAIN_MEDIA = re.compile(r"^/v(?:/[A-Za-z0-9_~-][A-Za-z0-9._~-]*){3,}$")


def fast_media_key(target: str) -> str | None:
    """The cache key `serve` would use for `target` when its path is plainly valid (no
    percent-encoding, no segment starting with a dot); None sends it the full way."""
    path = target.partition("?")[0]
    return path if _PLAIN_MEDIA.match(path) else None


async def serve(request: web.Request) -> web.StreamResponse:
    path = media_path(request.raw_path)
    return await request.app[ENGINE_KEY].serve(request, path, path)


def make_app(
    settings: Settings, upstreams: list[str], *, control_url: str | None = None
) -> web.Application:
    """The shield's aiohttp app, filling from `upstreams` (origins, tried in order)."""
    engine = CacheEngine.from_settings(settings, TIER, upstreams)
    if control_url:  # follow control's purge log (issue 4)
        follow_purges(engine, settings, TIER, control_url)
    app = base_app(TIER)
    auth = TierAuth(settings.tier_secret) if settings.tier_secret else None
    if auth is not None:
        install_tier_guard(app, auth)
    app[ENGINE_KEY] = engine
    app.cleanup_ctx.append(engine.cleanup_ctx)
    app.router.add_get("/{tail:.*}", serve)
    app[FAST_PATH_KEY] = FastPath(
        engine, fast_media_key, access_log=True, upstream_fields=True, tier_auth=auth
    )
    return app
