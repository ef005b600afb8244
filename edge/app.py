"""The edge tier: the player-facing cache with playback-token checks.

With tokens (the default), `GET`/`HEAD /v/{videoId}/{token}/{version}/{file…}`:
1. the raw path is validated (`vodcore.paths.split_raw_path`; bad → 400 JSON);
2. the token is verified against control's public keys for that video at the current time
   (`vodcore.tokens.verify`; any failure → 403 `bad_token`, before the cache is consulted, so
   a refusal is never cached and a valid cached object never leaks to a bad token). A token
   issued before its video's takedown is refused as the playback API refuses the video: 451
   `blocked` or 410 `gone` when the edge saw the block or delete on the purge log (it knows
   the reason), else 403 `bad_token` (a cutoff learnt from control's `/v1/cutoffs` at a
   reconnect carries no reason);
3. the cache key and the upstream path are the path without the token segment,
   `/v/{videoId}/{version}/{file…}`, so every viewer shares one cached object.

On token-checked paths the player's `Cookie` and `Authorization` and every tier-to-tier field
(`X-Purge-Seq`, `X-Vod-Tier-Auth`) are ignored: the token in the path is the only credential,
so a valid player request is always cacheable, and no player can make a shield wait or skip
its cache (issue 11). Upstream requests are signed when `tier_secret` is set
(`vodcore.tierauth`).

With `tokens=False` the edge is a plain caching reverse proxy (RFC 9111): cache key and upstream
path are the request's raw path and query, after a traversal check; unsafe methods are
forwarded and invalidate the stored responses of their target.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from urllib.parse import unquote

import aiohttp
import jwt
from aiohttp import web

from edge.keys import KeyRing
from edge.tokencache import VerifiedTokens
from origin.takedowns import Takedowns
from vodcore.cache import CacheEngine
from vodcore.cache.engine import PLAYER_IGNORED_FIELDS
from vodcore.cache.purgefeed import follow_purges, node_headers
from vodcore.config import Settings
from vodcore.errors import BAD_PATH, BAD_TOKEN, BLOCKED, GONE, ApiError
from vodcore.fastpath import FastPath
from vodcore.purge import CUTOFFS, Purge
from vodcore.server import FAST_PATH_KEY, base_app, media_segments
from vodcore.tokens import TokenError, verify

TIER = "edge"
JWKS_PATH = "/v1/keys/jwks.json"
ENGINE_KEY: web.AppKey[CacheEngine] = web.AppKey("engine", CacheEngine)
KEYS_KEY: web.AppKey[KeyRing] = web.AppKey("keys", KeyRing)
TOKENS_KEY: web.AppKey[VerifiedTokens] = web.AppKey("verified_tokens", VerifiedTokens)
CUTOFFS_KEY: web.AppKey[dict[str, float]] = web.AppKey("cutoffs", dict)
TAKEDOWNS_KEY: web.AppKey[Takedowns] = web.AppKey("takedowns", Takedowns)
FAST_MEMO_KEY: web.AppKey[dict[str, tuple[str, str, str]]] = web.AppKey("fast_memo", dict)


def split_media_path(raw_path: str) -> tuple[str, str, str]:
    """(video id, token, cache path without the token) of a player-facing raw path."""
    segs = media_segments(raw_path, 5)
    vid, token, rest = segs[1], segs[2], segs[3:]
    return vid, token, "/" + "/".join(["v", vid, *rest])


def proxy_path(raw_path: str) -> str:
    """The raw path+query to forward in tokens-off mode; refuses traversal and hidden separators.

    Looser than `split_raw_path` (arbitrary upstreams use characters media keys never do), but
    no segment may decode to '.' or '..' or hide a '/', '\\' or NUL.
    """
    path = raw_path.partition("?")[0]
    if not path.startswith("/"):
        raise ApiError(BAD_PATH, "path must be absolute")
    if "%" not in path and "/." not in path and "\\" not in path and "\x00" not in path:
        return raw_path  # nothing encoded, no dot segment: the common case, checked cheaply
    for seg in path.split("/"):
        decoded = unquote(seg)
        if decoded in (".", "..") or any(c in decoded for c in "/\\\x00"):
            raise ApiError(BAD_PATH, "traversal or encoded separator in path")
    return raw_path


def fast_proxy_key(target: str) -> str | None:
    """The cache key `serve_proxy` would use for `target`, when no check is needed (nothing
    percent-encoded, no dot segment, no backslash); None sends the request the full way."""
    path = target.partition("?")[0]
    if "%" in path or "/." in path or "\\" in path:
        return None
    return target


# the cache key of a plain media path: /v/{videoId}/{version}/{file…}, nothing to decode
_PLAIN_KEY = re.compile(r"^/v(?:/[A-Za-z0-9_~-][A-Za-z0-9._~-]*){3,}$")
PARSED_TARGETS = 65536  # URLs whose parse the fast path keeps
MAX_FAST_TARGET = 4096  # longer targets (a real token is ~250 bytes) take the full path


def fast_tokened_key(
    tokens: VerifiedTokens,
    ring: KeyRing,
    cutoffs: dict[str, float],
    clock: Callable[[], float] = time.time,
    parsed: dict[str, tuple[str, str, str]] | None = None,
) -> Callable[[str], str | None]:
    """Cache keys for the fast path of the token-checked edge: only a plain media path whose
    token was verified before and is still good (VerifiedTokens' rules); anything else goes
    the full way, which verifies (and refuses) as usual. The token is looked up before any
    pattern is matched: it is the long part of the path, and an unknown one ends it at once.

    `parsed` (the caller's, to watch its size): target -> (cache key, video, token). Players
    ask for the same URLs again and again, so the parse is done once per URL; the token's
    validity is still checked on every request. Only URLs whose token was verified are
    remembered (issue 11: junk tokens, all refused, used to fill it with 100 KB keys), and only
    plausible lengths. A closure, not a class: attribute lookups cost ~0.4 µs per hit."""
    memo: dict[str, tuple[str, str, str]] = {} if parsed is None else parsed

    def key_of(target: str) -> str | None:
        hit = memo.get(target)
        if hit is None:
            if len(target) > MAX_FAST_TARGET:
                return None
            parts = target.partition("?")[0].split("/", 4)  # '', 'v', vid, token, rest
            if len(parts) != 5 or parts[1] != "v":
                return None
            if tokens.get(parts[3], parts[2], clock(), ring.keys, cutoffs) is None:
                return None  # unknown token: the full path verifies (or refuses) it
            key = f"/v/{parts[2]}/{parts[4]}"
            if not _PLAIN_KEY.match(key):
                return None
            if len(memo) >= PARSED_TARGETS:
                memo.clear()
            memo[target] = (key, parts[2], parts[3])
            return key
        key, vid, token = hit
        if tokens.get(token, vid, clock(), ring.keys, cutoffs) is None:
            return None
        return key

    return key_of


def track_cutoffs(
    engine: CacheEngine,
    verified: VerifiedTokens,
    cutoffs: dict[str, float],
    control: str,
    ring: KeyRing,
    takedowns: Takedowns | None = None,
    credential: str | None = None,
) -> None:
    """Keep the videos' token cutoffs: set by each `block` or `delete` entry of the purge log
    (before the video's cached objects are dropped; `unblock` and `restore` leave them), and
    reloaded from control whenever the log's stream (re)connects, so a restarted edge knows
    every takedown, not only the ones it replays."""

    def on_purge(p: Purge) -> None:
        if p.action == "keys":
            # The signing key set changed: refetch it now. Until then a revoked kid's tokens
            # may still pass for the few ms the fetch takes.
            engine.spawn(ring.refresh(engine.session))
        if takedowns is not None:
            takedowns.apply(p)  # why a cutoff is there: 451 or 410 for old tokens
        if p.action in CUTOFFS and p.cutoff is not None:  # block, delete, restrict
            for vid in p.targets:
                cutoffs[vid] = max(cutoffs.get(vid, 0.0), p.cutoff)
                verified.forget_video(vid)

    async def reload(session: aiohttp.ClientSession) -> None:
        async with session.get(
            f"{control}/v1/cutoffs?refusals=1",
            timeout=aiohttp.ClientTimeout(total=10),
            headers=node_headers(credential),
        ) as r:
            if r.status != 200:
                return
            doc = await r.json()
        # a control older than `?refusals=1` answers the plain `{videoId: cutoff}`
        plain = not isinstance(doc.get("cutoffs"), dict)
        for vid, cutoff in (doc if plain else doc["cutoffs"]).items():
            cutoffs[vid] = max(cutoffs.get(vid, 0.0), float(cutoff))
        if not plain and takedowns is not None and isinstance(doc.get("refusals"), dict):
            takedowns.assume(doc["refusals"])  # why: 451/410 for old tokens after a restart

    engine.purge_hooks.append(on_purge)
    if engine.feed is not None:
        engine.feed.on_connect = reload


async def check_token(request: web.Request, vid: str, token: str) -> None:
    ring = request.app[KEYS_KEY]
    verified = request.app[TOKENS_KEY]
    cutoffs = request.app[CUTOFFS_KEY]
    now = time.time()
    if verified.get(token, vid, now, ring.keys, cutoffs) is not None:
        return  # verified before and still good: no signature check per segment
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except (jwt.PyJWTError, ValueError):
        raise ApiError(BAD_TOKEN) from None
    keys = await ring.keys_for(
        request.app[ENGINE_KEY].session, kid if isinstance(kid, str) else None
    )
    try:
        claims = verify(token, keys, vid, int(now))
    except TokenError:
        raise ApiError(BAD_TOKEN) from None
    cutoff = cutoffs.get(vid)
    if cutoff is not None and claims.issued_at < cutoff:
        # issued before the video's takedown: answer as the playback API does when the log
        # said why (issue 11), else as a void token
        refusal = request.app[TAKEDOWNS_KEY].refusal(vid)
        if refusal == "blocked":
            raise ApiError(BLOCKED, extra={"state": "BLOCKED"})
        if refusal == "deleted":
            raise ApiError(GONE, "the video was deleted", extra={"state": "DELETED"})
        raise ApiError(BAD_TOKEN)
    verified.put(token, claims)


async def serve_tokened(request: web.Request) -> web.StreamResponse:
    vid, token, path = split_media_path(request.raw_path)
    await check_token(request, vid, token)
    return await request.app[ENGINE_KEY].serve(request, path, path)


async def serve_proxy(request: web.Request) -> web.StreamResponse:
    path = proxy_path(request.raw_path)
    engine = request.app[ENGINE_KEY]
    if request.method in ("GET", "HEAD"):
        return await engine.serve(request, path, path)
    # Unsafe methods go upstream and invalidate what is stored for the URI (RFC 9111 §4.4).
    return await engine.forward_unsafe(request, path, path, key_for=lambda target: target)


def make_app(
    settings: Settings,
    upstreams: list[str],
    *,
    tokens: bool = True,
    control_url: str | None = None,
    fallback: list[str] | None = None,
    purge_feed: bool = True,
) -> web.Application:
    """The edge's aiohttp app. Keys are spread over `upstreams` (shields) by rendezvous
    hashing; when no shield is usable, `fallback` (the origin) is asked directly, with a cap on
    concurrent fetches."""
    # A foreign upstream (tokens off: any origin) has no /healthz; rely on passive health.
    engine = CacheEngine.from_settings(
        settings, TIER, upstreams, fallback=fallback, health_path="/healthz" if tokens else None
    )
    if purge_feed and (tokens or control_url):
        follow_purges(engine, settings, TIER, control_url or settings.url("control"))
    app = base_app(TIER)
    app[ENGINE_KEY] = engine
    app.cleanup_ctx.append(engine.cleanup_ctx)
    if tokens:
        base = (control_url or settings.url("control")).rstrip("/")
        ring = app[KEYS_KEY] = KeyRing(base + JWKS_PATH)
        verified = app[TOKENS_KEY] = VerifiedTokens()
        cutoffs: dict[str, float] = {}
        app[CUTOFFS_KEY] = cutoffs
        app.router.add_get("/{tail:.*}", serve_tokened)
        app[FAST_MEMO_KEY] = {}
        # a player's Cookie/Authorization and the tiers' own fields change nothing (issue 11)
        engine.ignored_fields = PLAYER_IGNORED_FIELDS
        app[FAST_PATH_KEY] = FastPath(
            engine,
            fast_tokened_key(verified, ring, cutoffs, parsed=app[FAST_MEMO_KEY]),
            access_log=True,
            ignore=PLAYER_IGNORED_FIELDS,
        )
        takedowns = app[TAKEDOWNS_KEY] = Takedowns()
        track_cutoffs(
            engine, verified, cutoffs, base, ring, takedowns, credential=settings.node_credential
        )
    else:
        app.router.add_route("*", "/{tail:.*}", serve_proxy)
        app[FAST_PATH_KEY] = FastPath(engine, fast_proxy_key, access_log=True)
    return app
