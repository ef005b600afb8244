"""Prometheus metrics shared by every tier (prometheus-client, one registry per process)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from vodcore.errors import CLIENT_CLOSED, is_disconnect

REQUESTS = Counter("vod_http_requests_total", "HTTP requests served", ["tier", "method", "status"])
LATENCY = Histogram(
    "vod_http_request_seconds",
    "Time to response headers",
    ["tier"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CACHE_RESULTS = Counter(
    "vod_cache_requests_total", "Cache lookups by result", ["tier", "result"]
)  # result: hit | miss | collapsed | bypass
CACHE_BYTES = Gauge("vod_cache_bytes", "Bytes held in the cache", ["tier"])
CACHE_OBJECTS = Gauge("vod_cache_objects", "Objects held in the cache", ["tier"])
UPSTREAM_FETCHES = Counter(
    "vod_upstream_fetches_total", "Fetches sent upstream", ["tier", "status"]
)
UPSTREAM_LATENCY = Histogram("vod_upstream_seconds", "Upstream time to headers", ["tier"])
BYTES_SENT = Counter("vod_bytes_sent_total", "Body bytes sent to clients", ["tier"])
FAST_ANSWERS = Counter(
    "vod_fastpath_answers_total", "Hits answered by the protocol-level fast path", ["tier"]
)
CONNECTIONS_CLOSED = Counter(
    "vod_connections_closed_total",
    "Connections a server closed to protect itself",
    ["tier", "reason"],
)  # reason: header_timeout | body_timeout | per_ip_cap | evicted | full (vodcore/connlimits.py)
OPEN_CONNECTIONS = Gauge("vod_open_connections", "Client connections open", ["tier"])
JOBS = Counter("vod_transcoder_jobs_total", "Transcoder jobs finished", ["result"])

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def metrics_middleware(tier: str) -> Middleware:
    latency = LATENCY.labels(tier)
    # labels() costs a lookup per call; the children are resolved once per (method, status).
    counters: dict[tuple[str, int], Counter] = {}

    @web.middleware
    async def mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except BaseException as e:
            # A client that left mid-request or mid-response is no server error (issue 11).
            if is_disconnect(request, e):
                status = CLIENT_CLOSED
            raise
        finally:
            latency.observe(time.perf_counter() - t0)
            key = (request.method, status)
            counter = counters.get(key)
            if counter is None:
                counter = counters[key] = REQUESTS.labels(tier, request.method, str(status))
            counter.inc()

    return mw


async def metrics_handler(_request: web.Request) -> web.Response:
    resp = web.Response(body=generate_latest())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp
