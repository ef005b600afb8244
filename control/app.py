"""The control API (/v1): uploads, videos, playback authorization, public signing keys.

A thin aiohttp shell: request parsing in `validation` / `tus_protocol`, state in the metadata
store, lifecycle rules in `vodcore.lifecycle`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from control.apikeys import ApiKeys
from control.auth import authenticate
from control.cors import install as install_cors
from control.engagement import ENGAGEMENT_KEY, Engagement
from control.ids import is_id
from control.moderation import Moderation
from control.multipart import complete_request
from control.negcache import NegativeCache
from control.nodeauth import install as install_node_auth
from control.openapi import OpenApi
from control.playback_sessions import SessionGate, SessionSigner
from control.purges import Purges
from control.ratelimit import RateLimitConfig
from control.ratelimit import install as install_rate_limits
from control.search import Search, run_indexer
from control.signing import Signing
from control.tus import TusEndpoint, upload_url
from control.upload_expiry import run_expiry
from control.uploads import Uploads
from control.validation import decode_json, upload_request
from control.videos import Videos
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.errors import NOT_FOUND, ApiError
from vodcore.server import base_app, fast_path_may_skip
from vodcore.store.factory import close_store, make_store
from vodcore.tokens import SigningKeys


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def make_app(settings: Settings) -> web.Application:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    store = make_store(settings)
    keys = SigningKeys(settings.keys_dir).load_or_create()
    uploads = Uploads(settings, engine, store)
    ready = {"db": False}
    app = base_app("control", ready=lambda: ready["db"])
    install_rate_limits(app, RateLimitConfig.from_settings(settings))
    install_cors(app, settings.cors_origins)  # preflights are answered before rate limits
    guarded = len(app.middlewares)
    install_node_auth(app, engine, settings)  # purge stream, acks, cutoffs: nodes only
    for mw in app.middlewares[guarded:]:
        # It acts on the node paths only, which the playback fast path (`GET …/playback`,
        # `control.videos.PlaybackFastPath`) never answers: without this the fast path is off.
        fast_path_may_skip(mw)

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await create_schema(engine)
        ready["db"] = True
        stop = asyncio.Event()
        expiry = asyncio.create_task(run_expiry(engine, settings, stop))  # abandoned uploads
        indexer = None
        if settings.search_indexer:  # the search read model
            indexer = asyncio.create_task(run_indexer(engine, stop))
        yield
        stop.set()
        await expiry
        if indexer is not None:
            await indexer
        await engine.dispose()
        await close_store(store)

    app.cleanup_ctx.append(lifecycle)

    async def create_upload(request: web.Request) -> web.Response:
        principal = await authenticate(engine, request)
        req = upload_request(decode_json(await request.read()), settings.max_upload_bytes)
        created = await uploads.create(req, principal.key_id, time.time(), {})
        body: dict[str, Any] = {
            "videoId": created.video_id,
            "uploadSessionId": created.session_id,
            "uploadUrl": upload_url(settings, request, created.session_id),
            "partSizeBytes": created.part_size or settings.upload_part_bytes,
            "expiresAt": _iso(created.expires_at),
        }
        if req.method == "s3-multipart":  # PUT each part to its URL, then complete with ETags
            body["method"] = req.method
            body["parts"] = [
                {"partNumber": n, "url": url} for n, url in enumerate(created.part_urls, start=1)
            ]
        return web.json_response(body, status=201)

    async def complete_upload(request: web.Request) -> web.Response:
        principal = await authenticate(engine, request)
        sid = request.match_info["sid"]
        if not is_id(sid, "us"):
            raise ApiError(NOT_FOUND, "no such upload session")
        await uploads.session(sid, time.time(), principal)  # 404, or 403: another key's
        raw = await request.read()
        req = complete_request(decode_json(raw) if raw.strip() else None)
        async with uploads.lock(sid):
            vid, state = await uploads.complete(sid, time.time(), req)
        return web.json_response({"videoId": vid, "state": state}, status=202)

    app.router.add_post("/v1/uploads", create_upload)
    app.router.add_post("/v1/uploads/{sid}/complete", complete_upload)
    TusEndpoint(uploads).routes(app)
    negative = NegativeCache()  # shared: moderation forgets what it changes
    sessions = SessionSigner.load_or_create(settings.keys_dir)  # playback issues, ingest checks
    purges = Purges(engine)  # the log: moderation, signing and a restricting PATCH append
    videos = Videos(settings, engine, keys, negative, sessions=sessions, purges=purges)
    videos.routes(app)
    Search(engine).routes(app)
    OpenApi(settings.max_upload_bytes).routes(app)
    engagement = Engagement(
        engine,
        redis_url=settings.redis_url,
        min_watch_seconds=settings.min_watch_seconds,
        signer=sessions,
        gate=SessionGate(
            max_events_per_session=settings.playback_events_per_session,
            max_sessions_per_ip=settings.playback_sessions_per_ip,
        ),
        meta=videos.meta,
    )
    engagement.routes(app)
    app[ENGAGEMENT_KEY] = engagement
    app.cleanup_ctx.append(engagement.background)  # after `lifecycle`: the schema exists
    purges.routes(app)
    Moderation(purges, store, negative).routes(app)
    Signing(purges, keys).routes(app)
    ApiKeys(engine).routes(app)  # /v1/api-keys: list and revoke (not the signing keys)
    return app
