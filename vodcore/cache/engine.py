"""The HTTP cache engine shared by edge and shield: lookup, collapsed fill, pass-through.

One request for cache key K moves through these states (hishel's shape, one driver in `serve`):

    lookup ─fresh─▶ HIT (serve stored object)
       └─missing/stale─▶ join or start the fill task for K
                            ├─ Fetched, this request started it ──▶ MISS
                            ├─ Fetched, shareable, we waited ─────▶ COLLAPSED (served as HIT)
                            ├─ Fetched, not shareable, we waited ─▶ fetch again alone (MISS)
                            ├─ TooLarge ──────────────────────────▶ BYPASS (stream through)
                            └─ ApiError (502/504) ────────────────▶ every requester gets it

Rules:
- At most one upstream fill per key at a time. The fill runs as its own task so a requester
  that disconnects does not cancel it for the others; waiters await it (no polling).
- A fill always asks upstream for the whole object with GET and `Accept-Encoding: identity`
  (the client's Range and validators are not forwarded), buffers it completely and only then
  answers anyone; a failed or truncated fill becomes a 502/504 JSON error, never a short body
  presented as whole. Range and conditionals are answered from the buffered object.
- Objects larger than `max_object_bytes` are not buffered: every requester streams them from
  upstream with its own Range/validators forwarded.
- Upstreams are tried in order when a connection cannot be made (issue 3: rendezvous hashing).
- `X-Cache: {tier}=HIT|MISS[, upstream's X-Cache]` on every answer; never stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from functools import partial

import aiohttp
import yarl
from aiohttp import web
from multidict import CIMultiDict

from vodcore import metrics
from vodcore.cache import conditional, policy
from vodcore.cache.storage import CachedResponse, CacheStorage, MemoryStorage
from vodcore.config import Settings
from vodcore.errors import RANGE_NOT_SATISFIABLE, UPSTREAM_FAILED, UPSTREAM_TIMEOUT, ApiError

log = logging.getLogger("vod.cache")

# RFC 9110 §7.6.1: connection-specific fields a proxy must not forward.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Fields recomputed per answer (length, range, age, cache status) or not worth replaying.
NOT_STORED = HOP_BY_HOP | {
    "content-length",
    "content-range",
    "age",
    "x-cache",
    "server",
    "set-cookie",
    "accept-ranges",
}
# RFC 9110 §15.4.5: what a 304 carries besides what a 200 would have had.
NOT_MODIFIED_FIELDS = frozenset(
    {
        "cache-control",
        "content-location",
        "date",
        "etag",
        "expires",
        "vary",
        "last-modified",
        "surrogate-key",
    }
)
PASS_THROUGH_REQUEST_FIELDS = ("Range", "If-Range", "If-None-Match", "If-Modified-Since")
CHUNK = 256 * 1024


def end_to_end(
    headers: Mapping[str, str] | CIMultiDict[str], drop: frozenset[str]
) -> tuple[tuple[str, str], ...]:
    """Fields of `headers` minus `drop` and minus anything named in Connection (RFC 9110 §7.6.1)."""
    named = {
        t.strip().lower()
        for k, v in headers.items()
        if k.lower() == "connection"
        for t in v.split(",")
    }
    return tuple((k, v) for k, v in headers.items() if k.lower() not in drop | named)


@dataclass(frozen=True, slots=True)
class Fetched:
    """A whole upstream response, buffered."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    age: policy.AgeInputs
    lifetime: float | None
    etag: str | None
    last_modified: float | None
    upstream_cache: str | None  # the upstream's X-Cache, reported after ours on a MISS
    storable: bool
    shareable: bool


@dataclass(frozen=True, slots=True)
class TooLarge:
    """The object exceeds what the cache buffers; every requester streams it through."""


Fill = Fetched | TooLarge


class CacheEngine:
    def __init__(
        self,
        tier: str,
        upstreams: list[str],
        storage: CacheStorage,
        *,
        timeout_seconds: float,
        max_object_bytes: int,
        default_ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not upstreams:
            raise ValueError(f"{tier}: at least one upstream is required")
        self.tier = tier
        self.upstreams = [u.rstrip("/") for u in upstreams]
        self.storage = storage
        self.timeout_seconds = timeout_seconds
        self.max_object_bytes = max_object_bytes
        self.default_ttl = default_ttl
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._fills: dict[str, asyncio.Task[Fill]] = {}
        self._via = f"1.1 vodstack-{tier}"  # RFC 9110 §7.6.3

    @classmethod
    def from_settings(cls, settings: Settings, tier: str, upstreams: list[str]) -> CacheEngine:
        """An engine with a memory cache of `settings.cache_bytes[tier]` bytes."""
        return cls(
            tier,
            upstreams,
            MemoryStorage(settings.cache_bytes.get(tier, 0), settings.max_object_bytes),
            timeout_seconds=settings.upstream_timeout_seconds,
            max_object_bytes=settings.max_object_bytes,
        )

    # Lifecycle -----------------------------------------------------------------------------
    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("CacheEngine used before start()")
        return self._session

    async def start(self) -> None:
        # auto_decompress off: the cache stores and replays bytes exactly as upstream sent them.
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=1024, ttl_dns_cache=60),
        )

    async def close(self) -> None:
        for task in list(self._fills.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def cleanup_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        """For `app.cleanup_ctx`: one shared ClientSession for the app's lifetime."""
        await self.start()
        yield
        await self.close()

    def _gauges(self) -> None:
        metrics.CACHE_BYTES.labels(self.tier).set(self.storage.bytes_used)
        metrics.CACHE_OBJECTS.labels(self.tier).set(len(self.storage))

    # The driver ----------------------------------------------------------------------------
    async def serve(self, request: web.Request, key: str, upstream_path: str) -> web.StreamResponse:
        """Answer a GET or HEAD for cache key `key`, filling from `upstream_path` on a miss."""
        now = self.clock()
        entry = self.storage.get(key)
        if entry is not None:
            age = policy.current_age(entry.age, now)
            if policy.is_fresh(entry.lifetime, age):
                metrics.CACHE_RESULTS.labels(self.tier, "hit").inc()
                return self._answer(request, entry, f"{self.tier}=HIT", age)
            # Stale: revalidation (RFC 9111 §4.3) is not implemented yet, so refetch.
            self.storage.delete(key)
            self._gauges()

        task = self._fills.get(key)
        leader = task is None
        if task is None:
            task = asyncio.create_task(self._fill(key, upstream_path))
            self._fills[key] = task
            task.add_done_callback(partial(self._fill_done, key))
        # shield: a requester going away must not cancel the fill the others wait on.
        fill = await asyncio.shield(task)

        if isinstance(fill, TooLarge):
            metrics.CACHE_RESULTS.labels(self.tier, "bypass").inc()
            return await self._pass_through(request, upstream_path)
        if leader:
            metrics.CACHE_RESULTS.labels(self.tier, "miss").inc()
            return self._answer(request, fill, self._miss_label(fill), self._age(fill))
        if fill.shareable:
            metrics.CACHE_RESULTS.labels(self.tier, "collapsed").inc()
            return self._answer(request, fill, f"{self.tier}=HIT", self._age(fill))
        # Not shareable (e.g. a non-storable 200): this waiter fetches for itself, unstored.
        metrics.CACHE_RESULTS.labels(self.tier, "miss").inc()
        own = await self._fill(None, upstream_path)
        if isinstance(own, TooLarge):
            return await self._pass_through(request, upstream_path)
        return self._answer(request, own, self._miss_label(own), self._age(own))

    def _fill_done(self, key: str, task: asyncio.Task[Fill]) -> None:
        if self._fills.get(key) is task:
            del self._fills[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: every requester may have gone away

    def _miss_label(self, fill: Fetched) -> str:
        label = f"{self.tier}=MISS"
        return f"{label}, {fill.upstream_cache}" if fill.upstream_cache else label

    def _age(self, fill: Fetched) -> float:
        return policy.current_age(fill.age, self.clock())

    # Upstream ------------------------------------------------------------------------------
    async def _open(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        client_timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        """Send a request to the first upstream that accepts a connection."""
        for base in self.upstreams:
            t0 = time.perf_counter()
            try:
                resp = await self.session.request(
                    method,
                    yarl.URL(base + path, encoded=True),
                    headers=headers,
                    timeout=client_timeout,
                    allow_redirects=False,
                )
            except TimeoutError:
                metrics.UPSTREAM_FETCHES.labels(self.tier, "timeout").inc()
                raise ApiError(UPSTREAM_TIMEOUT) from None
            except aiohttp.ClientConnectionError as e:
                metrics.UPSTREAM_FETCHES.labels(self.tier, "error").inc()
                log.warning("%s: upstream %s failed: %r", self.tier, base, e)
                continue  # try the next upstream
            metrics.UPSTREAM_LATENCY.labels(self.tier).observe(time.perf_counter() - t0)
            metrics.UPSTREAM_FETCHES.labels(self.tier, str(resp.status)).inc()
            return resp
        raise ApiError(UPSTREAM_FAILED, "no upstream could be reached")

    async def _fill(self, key: str | None, path: str) -> Fill:
        """Fetch the whole object; store it under `key` when storable (None: never store)."""
        headers = {"Accept-Encoding": "identity", "Via": self._via}
        timeout = aiohttp.ClientTimeout(total=self.timeout_seconds)
        request_time = self.clock()
        resp = await self._open("GET", path, headers, timeout)
        try:
            async with resp:
                response_time = self.clock()
                if resp.content_length is not None and resp.content_length > self.max_object_bytes:
                    return TooLarge()
                body = await self._read_capped(resp)
                if body is None:
                    return TooLarge()
        except TimeoutError:
            metrics.UPSTREAM_FETCHES.labels(self.tier, "timeout").inc()
            raise ApiError(UPSTREAM_TIMEOUT, "the upstream timed out sending the body") from None
        except aiohttp.ClientError as e:
            # Includes ClientPayloadError: the body ended before Content-Length.
            metrics.UPSTREAM_FETCHES.labels(self.tier, "error").inc()
            raise ApiError(
                UPSTREAM_FAILED, f"the upstream failed mid-body: {type(e).__name__}"
            ) from None

        folded = policy.fold_headers(resp.headers.items())
        storable = policy.is_storable(resp.status, folded, default_ttl=self.default_ttl)
        fetched = Fetched(
            status=resp.status,
            headers=end_to_end(resp.headers, NOT_STORED),
            body=body,
            age=policy.age_inputs(folded, request_time=request_time, response_time=response_time),
            lifetime=policy.freshness_lifetime(
                folded, response_time=response_time, default_ttl=self.default_ttl
            ),
            etag=folded.get("etag"),
            last_modified=policy.parse_http_date(folded.get("last-modified")),
            upstream_cache=resp.headers.get("X-Cache"),
            storable=storable,
            shareable=policy.shareable_with_waiters(resp.status, folded, storable),
        )
        if key is not None and storable:
            self.storage.put(
                CachedResponse(
                    key=key,
                    status=fetched.status,
                    headers=fetched.headers,
                    body=fetched.body,
                    age=fetched.age,
                    lifetime=fetched.lifetime,
                    etag=fetched.etag,
                    last_modified=fetched.last_modified,
                )
            )
            self._gauges()
        return fetched

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes | None:
        """The whole body, or None once it exceeds max_object_bytes (no Content-Length case)."""
        chunks: list[bytes] = []
        n = 0
        async for chunk in resp.content.iter_chunked(CHUNK):
            n += len(chunk)
            if n > self.max_object_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    # Answers -------------------------------------------------------------------------------
    def _answer(
        self, request: web.Request, obj: CachedResponse | Fetched, x_cache: str, age: float
    ) -> web.Response:
        headers: CIMultiDict[str] = CIMultiDict(obj.headers)
        headers["X-Cache"] = x_cache
        if obj.status != 200:
            # Upstream errors and redirects pass through as they are (a 404 stays a 404).
            metrics.BYTES_SENT.labels(self.tier).inc(
                0 if request.method == "HEAD" else len(obj.body)
            )
            return web.Response(status=obj.status, body=obj.body, headers=headers)
        headers["Age"] = str(int(max(0.0, age)))  # RFC 9111 §5.1
        headers["Accept-Ranges"] = "bytes"
        size = len(obj.body)
        sel = conditional.select(
            request.method,
            policy.fold_headers(request.headers.items()),
            size=size,
            etag=obj.etag,
            last_modified=obj.last_modified,
        )
        body = obj.body
        status = 200
        match sel.outcome:
            case conditional.Outcome.NOT_MODIFIED:
                keep = CIMultiDict(
                    (k, v) for k, v in headers.items() if k.lower() in NOT_MODIFIED_FIELDS
                )
                keep["X-Cache"] = x_cache
                keep["Age"] = headers["Age"]
                return web.Response(status=304, headers=keep)
            case conditional.Outcome.UNSATISFIABLE:
                raise ApiError(
                    RANGE_NOT_SATISFIABLE,
                    headers={"Content-Range": f"bytes */{size}", "X-Cache": x_cache},
                )
            case conditional.Outcome.PARTIAL:
                br = sel.range
                assert br is not None
                body = obj.body[br.start : br.end + 1]
                headers["Content-Range"] = br.content_range(size)
                status = 206
            case conditional.Outcome.FULL:
                pass
        if request.method != "HEAD":
            metrics.BYTES_SENT.labels(self.tier).inc(len(body))
        return web.Response(status=status, body=body, headers=headers)

    async def _pass_through(self, request: web.Request, path: str) -> web.StreamResponse:
        """Stream an object too large to cache, forwarding the client's Range and validators."""
        headers = {"Accept-Encoding": "identity", "Via": self._via}
        for name in PASS_THROUGH_REQUEST_FIELDS:
            if name in request.headers:
                headers[name] = request.headers[name]
        # No total timeout: a large body may take long; stalls are bounded per read.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout_seconds, sock_read=self.timeout_seconds
        )
        method = "HEAD" if request.method == "HEAD" else "GET"
        resp = await self._open(method, path, headers, timeout)
        async with resp:
            out = web.StreamResponse(status=resp.status)
            out.headers.extend(end_to_end(resp.headers, HOP_BY_HOP | {"x-cache", "server"}))
            upstream_cache = resp.headers.get("X-Cache")
            label = f"{self.tier}=MISS"
            out.headers["X-Cache"] = f"{label}, {upstream_cache}" if upstream_cache else label
            await out.prepare(request)
            if method == "HEAD":
                return out
            try:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    await out.write(chunk)
                    metrics.BYTES_SENT.labels(self.tier).inc(len(chunk))
            except (aiohttp.ClientError, TimeoutError):
                # Headers are gone already: cutting the connection is the only honest signal
                # that the body is incomplete (RFC 9112 §6.3).
                raise ConnectionResetError("upstream failed mid-body") from None
            await out.write_eof()
            return out
