"""Thin shell shared by every tier's HTTP server: error and metrics middleware, /healthz,
/metrics, uvloop, logging, and a graceful stop on SIGINT/SIGTERM (aiohttp's run_app drains
in-flight requests for `shutdown_timeout` seconds before closing); and the hook for a tier's
fast responder (`FAST_PATH_KEY`), which answers its commonest request below aiohttp. Every
connection is guarded (`_GuardedHandler`): request-head, body-stall and idle timeouts, a
per-address cap and a file-descriptor budget (the policy is vodcore/connlimits.py), and the
answers aiohttp gives itself (a malformed head, an escaped exception) are the JSON catalogue's."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import sys
import time as _time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

import uvloop
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from aiohttp.web_server import Server

from vodcore.config import Settings
from vodcore.connlimits import (
    BODY_CHECKS,
    EVICT_BATCH,
    Admit,
    BodyWatch,
    PeerCounts,
    ServerLimits,
    admit,
    fd_reserve,
    raise_fd_limit,
)
from vodcore.errors import (
    BAD_PATH,
    CLIENT_CLOSED,
    INTERNAL,
    NOT_FOUND,
    REQUEST_TIMEOUT,
    UPSTREAM_TIMEOUT,
    ApiError,
    error_body,
    error_middleware,
    error_response,
    head_error_kind,
    is_disconnect,
)
from vodcore.metrics import (
    CONNECTIONS_CLOSED,
    OPEN_CONNECTIONS,
    metrics_handler,
    metrics_middleware,
)
from vodcore.paths import BadPath, split_raw_path


class ClientProtocolErrors(logging.Filter):
    """A malformed request (bad request line, oversized headers, garbage) is the client's
    mistake: aiohttp answers 400 and logs it with a traceback; we keep one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and (exc.code or 400) < 500:
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = (
                "bad request from client: %s",
                (str(exc.message).splitlines()[0][:200],),
            )
        return True


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stdout,
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("aiohttp.server").addFilter(ClientProtocolErrors())


def media_segments(raw_path: str, min_segments: int) -> list[str]:
    """Validated segments of a `/v/{videoId}/…` request path with at least `min_segments`
    segments (counting 'v'): unsafe paths are 400 `bad_path`, anything else is 404."""
    try:
        segs = split_raw_path(raw_path)
    except BadPath as e:
        raise ApiError(BAD_PATH, str(e)) from None
    if len(segs) < min_segments or segs[0] != "v":
        raise ApiError(NOT_FOUND)
    return segs


def base_app(
    tier: str,
    ready: Callable[[], bool] | None = None,
    *,
    client_max_size: int = 1024**2,
) -> web.Application:
    metrics = fast_path_may_skip(metrics_middleware(tier))
    app = web.Application(
        middlewares=[metrics, error_middleware],
        client_max_size=client_max_size,
    )

    async def healthz(_request: web.Request) -> web.Response:
        ok = ready() if ready else True
        return web.json_response(
            {"status": "ok" if ok else "starting", "tier": tier}, status=200 if ok else 503
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    return app


class _AccessLines:
    """Access lines of one event-loop iteration, written to stdout together in one write at
    the end of it (`call_soon`): under load one write per iteration instead of one per
    request, each a syscall when stdout is unbuffered (PYTHONUNBUFFERED, as `vod up` and the
    benches run the tiers), which also cost a wait whenever the log's file system was busy."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.pending = False
        self._second = -1
        self._stamp = ""
        atexit.register(self.flush)

    def stamp(self) -> str:
        now = _time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(now))
        return self._stamp

    def add(self, line: str) -> None:
        self.lines.append(line)
        if not self.pending:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: write it now
                self.flush()
                return
            self.pending = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.pending = False
        if not self.lines:
            return
        text = "".join(self.lines)
        self.lines.clear()
        with contextlib.suppress(OSError, ValueError):  # stdout gone (closed pipe): lost
            sys.stdout.write(text)


_access_lines = _AccessLines()


def write_access_line(
    remote: str | None,
    request_line: str,
    status: int,
    length: int,
    seconds: float,
    x_cache: str = "-",
) -> None:
    """One access line for stdout: `stamp access: addr "request line" status bytes seconds
    "X-Cache"`, the format of `FastAccessLogger` (fast responders write the same line);
    written at the end of this event-loop iteration with the others of the iteration."""
    _access_lines.add(
        f'{_access_lines.stamp()} access: {remote} "{request_line}" {status} {length} '
        f'{seconds:.6f} "{x_cache}"\n'
    )


class FastAccessLogger(AbstractAccessLogger):
    """One access line per request, written to stdout (`write_access_line`).

    Fields: `addr "METHOD path HTTP/x.y" status bytes seconds "X-Cache"`. It skips `logging`'s
    per-record machinery and aiohttp's format interpreter, which cost a cache hit 12-18% of
    its time (profile in bench/RESULTS.md). The lines of one event-loop iteration go out in
    one write at its end, through Python's stdout (unbuffered under PYTHONUNBUFFERED, as
    `vod up` runs the tiers).
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        v = request.version
        write_access_line(
            request.remote,
            f"{request.method} {request.path_qs} HTTP/{v.major}.{v.minor}",
            response.status,
            response.body_length,
            time,
            response.headers.get("X-Cache", "-"),
        )


class FastResponder(Protocol):
    """Answers the commonest requests of a tier from `data_received`, before aiohttp parses
    them (`vodcore.fastpath.FastPath` for cache hits, `control.videos.PlaybackFastPath`).

    `answer` gets bytes that may be one complete request head; it either writes the whole
    response with `write` and returns True (the write is the point of no return), or writes
    nothing and returns False, and aiohttp handles the bytes as usual. `access_log` is set by
    `start_server`: whether the responder writes an access line per answer.
    """

    access_log: bool

    def answer(self, data: bytes, write: Callable[[bytes], None], remote: str | None) -> bool: ...


# Middlewares a fast responder may run without: they only count (the responder counts its
# answers itself) or turn failures into error responses (a fast answer cannot fail).
_M = TypeVar("_M", bound=Callable[..., Any])
_SKIPPABLE: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet([error_middleware])


def fast_path_may_skip(middleware: _M) -> _M:
    """Mark a middleware as one that fast responders may skip; returns it."""
    _SKIPPABLE.add(middleware)
    return middleware


def fast_path_skippable(middleware: Callable[..., Any]) -> bool:
    return middleware in _SKIPPABLE


FAST_PATH_KEY: web.AppKey[FastResponder] = web.AppKey("fast_path")

log = logging.getLogger("vod.server")

# Sent when a request head was begun but not finished in time (RFC 9110 §15.5.9: 408, and
# the "close" connection option, since the server closes the connection).
_HEAD_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"Cache-Control: no-store\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
) % (len(error_body(REQUEST_TIMEOUT)), error_body(REQUEST_TIMEOUT))


class _Guard:
    """What the connections of one server share: its limits (vodcore/connlimits.py), the
    connections per peer, the connections waiting for a request head (oldest first: the
    first to yield their slot when the budget is spent) and the counters."""

    def __init__(self, limits: ServerLimits, tier: str) -> None:
        self.limits = limits
        self.peers = PeerCounts()
        # An OrderedDict, not a dict: taking the oldest of a dict whose front was deleted
        # scans the deleted slots (O(n) per eviction under a flood); this is a linked list.
        self.waiting: OrderedDict[_GuardedHandler, None] = OrderedDict()
        fd_limit = raise_fd_limit()
        self.fd_reserve = fd_reserve(fd_limit)
        self.fd_ceiling = fd_limit - self.fd_reserve
        self.body_period = limits.body_timeout / BODY_CHECKS
        self.closed = {
            reason: CONNECTIONS_CLOSED.labels(tier, reason)
            for reason in ("header_timeout", "body_timeout", "per_ip_cap", "evicted", "full")
        }
        OPEN_CONNECTIONS.labels(tier).set_function(lambda: self.peers.total)

    def admit(self, peer: str, fd: int) -> Admit:
        return admit(
            peer_connections=self.peers.get(peer),
            max_per_ip=self.limits.max_connections_per_ip,
            connections=self.peers.total,
            max_connections=self.limits.max_connections,
            fd=fd,
            fd_ceiling=self.fd_ceiling,
            fd_reserve=self.fd_reserve,
            waiting=len(self.waiting),
        )


class _GuardedHandler(RequestHandler):
    """aiohttp's protocol handler with the limits of vodcore/connlimits.py, and JSON errors.

    aiohttp times out nothing but idle keep-alive connections (`keepalive_timeout`, which
    closes a connection still waiting for a head once it has been idle that long since its
    last response, and is not pushed on by a trickle of bytes). Here, per connection:
    - one head timer (`_head_deadline`), set at the connect and when the first bytes of a
      later head arrive, cleared when a head is complete; the handle is not cancelled when
      cleared but fires and sees the deadline gone (or moved, and re-arms), so a keep-alive
      connection costs one timer, not one per request;
    - one body timer while a request body is expected, checking the body's progress
      `BODY_CHECKS` times per `body_timeout` (vodcore/connlimits.BodyWatch), not per read.
    """

    __slots__ = (
        "_admitted",
        "_body_handle",
        "_body_payload",
        "_body_watch",
        "_guard",
        "_head_deadline",
        "_head_handle",
        "_head_partial",
        "_peer",
    )

    def __init__(self, *args: Any, guard: _Guard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard
        self._peer = ""
        self._admitted = False
        self._head_deadline = 0.0
        self._head_handle: asyncio.TimerHandle | None = None
        self._head_partial = False
        self._body_payload: StreamReader | None = None
        self._body_watch: BodyWatch | None = None
        self._body_handle: asyncio.TimerHandle | None = None

    # -- connections: the per-IP cap and the descriptor budget ---------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else ""
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else 0
        verdict = guard.admit(ip, fd)
        if verdict is Admit.PER_IP_CAP or verdict is Admit.FULL:
            guard.closed[verdict.value].inc()
            transport.close()
            return
        if verdict is Admit.EVICT_WAITING:
            # several at once: a burst of accepts must not outrun the freeing of descriptors
            for _ in range(min(EVICT_BATCH, len(guard.waiting))):
                victim, _none = guard.waiting.popitem(last=False)
                guard.closed["evicted"].inc()
                victim.force_close()
        self._admitted = True
        self._peer = ip
        guard.peers.add(ip)
        super().connection_made(transport)
        # the first head is due `header_timeout` after the connect
        self._arm_head()
        guard.waiting[self] = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return  # closed at once by connection_made: aiohttp never saw it
        self._admitted = False
        guard = self._guard
        guard.peers.remove(self._peer)
        guard.waiting.pop(self, None)
        self._head_deadline = 0.0
        self._body_payload = None
        for handle in (self._head_handle, self._body_handle):
            if handle is not None:
                handle.cancel()
        self._head_handle = self._body_handle = None
        super().connection_lost(exc)

    # -- the request head timeout ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages:
            # a head is complete (or refused: its error answer is queued)
            if self._head_deadline:
                self._head_done()
            payload = self._messages[-1][1]
            if self._body_handle is None and self._guard.body_period > 0 and not payload.is_eof():
                self._watch_body(payload)
        elif data:
            if not self._head_deadline:
                waiter = self._waiter
                if waiter is None or waiter.done():
                    return  # a handler runs (these are body bytes): no head is due
                # the first bytes of the next head, on an idle keep-alive connection
                self._arm_head()
                self._guard.waiting[self] = None
            self._head_partial = True

    def _head_done(self) -> None:
        self._head_deadline = 0.0
        self._head_partial = False
        self._guard.waiting.pop(self, None)

    def _arm_head(self) -> None:
        timeout = self._guard.limits.header_timeout
        if timeout <= 0:  # no head timeout: a head is still due (evictable), never late
            self._head_deadline = math.inf
            return
        self._head_deadline = deadline = self._loop.time() + timeout
        if self._head_handle is None:
            self._head_handle = self._loop.call_at(deadline, self._on_head_timer)

    def _on_head_timer(self) -> None:
        self._head_handle = None
        deadline = self._head_deadline
        transport = self.transport
        if not deadline or transport is None:
            return
        if self._loop.time() < deadline:  # cleared and set again since: wait for the new one
            self._head_handle = self._loop.call_at(deadline, self._on_head_timer)
            return
        waiter = self._waiter
        partial = self._head_partial
        self._head_done()
        if waiter is None or waiter.done() or self._messages:
            return  # a request is being handled
        self._guard.closed["header_timeout"].inc()
        if partial and transport.get_write_buffer_size() == 0:
            transport.write(_HEAD_TIMEOUT_ANSWER)
        self.force_close()

    # -- the request body timeout ---------------------------------------------------------

    def _watch_body(self, payload: StreamReader) -> None:
        self._body_payload = payload
        self._body_watch = BodyWatch(payload.total_bytes, self._loop.time())
        self._body_handle = self._loop.call_later(self._guard.body_period, self._on_body_timer)

    def _on_body_timer(self) -> None:
        self._body_handle = None
        payload, watch = self._body_payload, self._body_watch
        if payload is None or watch is None or self.transport is None:
            return
        if payload.is_eof() or payload.exception() is not None:
            self._body_payload = None
            return
        # A reader waiting on the payload (aiohttp's StreamReader._waiter) is a handler
        # waiting for the client; without one the handler is busy and the pause is ours.
        waited_for = getattr(payload, "_waiter", None) is not None
        if watch.stalled(
            now=self._loop.time(),
            received=payload.total_bytes,
            waited_for=waited_for,
            timeout=self._guard.limits.body_timeout,
        ):
            # Closing is the answer (nginx does the same for client_body_timeout): the
            # handler's read fails as on any disconnect, which is not a server error.
            self._body_payload = None
            self._guard.closed["body_timeout"].inc()
            log.info("request body from %s stalled; connection closed", self._peer)
            self.force_close()
            return
        self._body_handle = self._loop.call_later(self._guard.body_period, self._on_body_timer)

    # -- errors aiohttp answers itself ----------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        """aiohttp's answer to a head its parser refused, to a handler's escaped exception
        and to a handler timeout: plain text there, the JSON catalogue here. A malformed
        head is the client's mistake (one INFO line, no traceback); a client that went away
        is nobody's (no line, status 499 in the access log); anything else is a bug."""
        if isinstance(exc, HttpProcessingError):
            kind, text = head_error_kind(exc)
            log.info("bad request head from %s: %d %s", request.remote, kind.status, text)
            resp: StreamResponse = error_response(ApiError(kind, text))
        elif exc is not None and is_disconnect(request, exc):
            if request.writer.output_size > 0:
                raise ConnectionResetError("client disconnected mid-response")
            resp = web.Response(status=CLIENT_CLOSED)
        else:
            if request.writer.output_size > 0:  # part of the answer is sent: cut it short
                raise ConnectionResetError("response is broken after it began")
            if status == 504:
                resp = error_response(ApiError(UPSTREAM_TIMEOUT))
            else:
                log.error(
                    "unhandled error on %s %s",
                    request.method,
                    request.path,
                    exc_info=exc if exc is not None else False,
                )
                resp = error_response(ApiError(INTERNAL))
        resp.force_close()
        return resp


# An unfinished head longer than this turns the fast path off rather than being kept.
_MAX_SPLIT_HEAD = 64 * 1024


class _FastHandler(_GuardedHandler):
    """The guarded handler, with `vodcore.fastpath` answering plain fresh hits first.

    `_fast_state` tracks whether every byte given to aiohttp so far ended on a message
    boundary (0), may have left a request half-parsed (1), or carried a body/upgrade so we
    can no longer tell (2, fast path off for this connection).
    """

    def __init__(self, *args: Any, fast: FastResponder, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fast = fast
        self._fast_state = 0
        self._fast_tail = b""  # the unfinished head's bytes so far, in state 1

    def data_received(self, data: bytes) -> None:
        state = self._fast_state
        transport = self.transport
        if (
            state == 0
            and transport is not None
            and not self._messages
            and not self._request_in_progress
            and self._payload_parser is None
            and not self._upgraded
            and not self._force_close
            and not self._close
            and transport.get_write_buffer_size() == 0
        ):
            peer = transport.get_extra_info("peername")
            remote = peer[0] if isinstance(peer, tuple) else None
            try:
                handled = self._fast.answer(data, transport.write, remote)
            except Exception:
                # A bug in the fast path must not cost the request: aiohttp answers it, and
                # this connection stops using the fast path.
                logging.getLogger("vod.fastpath").exception("fast path failed; falling back")
                handled, self._fast_state = False, 2
            if handled:
                self._request_count += 1
                # an active connection is not idle: push aiohttp's keep-alive deadline on
                self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
                if self._head_deadline:  # a complete head: none is due now
                    self._head_done()
                return
        state = self._fast_state  # (the fast path may have turned itself off just now)
        if state != 2:
            # A head split over writes is judged whole: "Content" | "-Length" in two writes
            # must not hide a body that could pass for a request (issue 11, item 9).
            seen = self._fast_tail + data if state == 1 else data
            low = seen.lower()
            if (
                b"content-length" in low
                or b"transfer-encoding" in low
                or b"upgrade" in low
                or len(seen) > _MAX_SPLIT_HEAD
            ):
                self._fast_state, self._fast_tail = 2, b""
            elif seen.endswith(b"\r\n\r\n"):
                self._fast_state, self._fast_tail = 0, b""
            else:
                self._fast_state, self._fast_tail = 1, seen
        super().data_received(data)


class _GuardedServer(Server):
    fast: FastResponder | None = None
    guard: _Guard

    def __call__(self) -> RequestHandler:
        if self.fast is None:
            return _GuardedHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)
        return _FastHandler(self, loop=self._loop, guard=self.guard, fast=self.fast, **self._kwargs)


class _Runner(web.AppRunner):
    """aiohttp's AppRunner, giving connections the guarded handler (the fast-path one when
    the app has a fast responder)."""

    def __init__(
        self, app: web.Application, *, limits: ServerLimits, tier: str, **kwargs: Any
    ) -> None:
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout, **kwargs)
        self._limits = limits
        self._tier = tier

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer
        guarded = cast(_GuardedServer, server)
        guarded.guard = _Guard(self._limits, self._tier)
        guarded.fast = self.app.get(FAST_PATH_KEY)
        return server


async def start_server(
    app: web.Application,
    host: str,
    port: int,
    *,
    access_log: bool = True,
    reuse_port: bool = True,
    handle_signals: bool = False,
    settings: Settings | None = None,
    tier: str | None = None,
    limits: ServerLimits | None = None,
) -> web.AppRunner:
    """Serve `app` on host:port (port 0: any); returns the runner (`cleanup()` stops it).

    The connection limits are `limits`, else those `settings` configure for `tier`
    (vodcore/connlimits.py), else the defaults: the protections are always on."""
    fast = app.get(FAST_PATH_KEY)
    if fast is not None:
        fast.access_log = access_log
    runner = _Runner(
        app,
        limits=limits or ServerLimits.from_settings(settings, tier),
        tier=tier or "http",
        handle_signals=handle_signals,
        access_log=logging.getLogger("aiohttp.access") if access_log else None,
        access_log_class=FastAccessLogger,
        shutdown_timeout=10.0,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        host,
        port,
        reuse_port=reuse_port,
        backlog=4096,  # a stampede connects at once; 128 made SYNs retry after 1 s
    )
    await site.start()
    return runner


def run(
    app: web.Application,
    host: str,
    port: int,
    *,
    tier: str,
    reuse_port: bool = True,
    access_log: bool = True,
    settings: Settings | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, then drain in-flight requests (10 s) and stop."""
    configure_logging()
    logging.getLogger("vod").info("%s listening on http://%s:%d", tier, host, port)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)

    async def serve() -> None:
        runner = await start_server(
            app,
            host,
            port,
            access_log=access_log,
            reuse_port=reuse_port,
            handle_signals=True,
            settings=settings,
            tier=tier,
        )
        try:
            await asyncio.Event().wait()  # until a signal raises GracefulExit
        finally:
            await runner.cleanup()

    main = loop.create_task(serve())
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError, web.GracefulExit):
            loop.run_until_complete(main)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
