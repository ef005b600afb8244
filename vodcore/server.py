"""Thin shell shared by every tier's HTTP server: error and metrics middleware, /healthz,
/metrics, uvloop, logging, and a graceful stop on SIGINT/SIGTERM (aiohttp's run_app drains
in-flight requests for `shutdown_timeout` seconds before closing); and the hook for a tier's
fast responder (`FAST_PATH_KEY`), which answers its commonest request below aiohttp."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import sys
import time as _time
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

import uvloop
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from vodcore.config import Settings
from vodcore.errors import BAD_PATH, NOT_FOUND, ApiError, error_middleware
from vodcore.metrics import metrics_handler, metrics_middleware
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


class _FastHandler(RequestHandler):
    """aiohttp's protocol handler, with `vodcore.fastpath` answering plain fresh hits first.

    `_fast_state` tracks whether every byte given to aiohttp so far ended on a message
    boundary (0), may have left a request half-parsed (1), or carried a body/upgrade so we
    can no longer tell (2, fast path off for this connection).
    """

    def __init__(self, *args: Any, fast: FastResponder, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fast = fast
        self._fast_state = 0

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
                return
        if self._fast_state != 2:
            low = data.lower()
            if b"content-length" in low or b"transfer-encoding" in low or b"upgrade" in low:
                self._fast_state = 2
            else:
                self._fast_state = 0 if data.endswith(b"\r\n\r\n") else 1
        super().data_received(data)


class _FastServer(Server):
    fast: FastResponder | None = None

    def __call__(self) -> RequestHandler:
        if self.fast is None:
            return super().__call__()
        return _FastHandler(self, loop=self._loop, fast=self.fast, **self._kwargs)


class _Runner(web.AppRunner):
    """aiohttp's AppRunner, giving connections the fast-path handler when the app has one."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        fast = self.app.get(FAST_PATH_KEY)
        if fast is not None:
            server.__class__ = _FastServer
            cast(_FastServer, server).fast = fast
        return server


async def start_server(
    app: web.Application,
    host: str,
    port: int,
    *,
    access_log: bool = True,
    reuse_port: bool = True,
    handle_signals: bool = False,
) -> web.AppRunner:
    """Serve `app` on host:port (port 0: any); returns the runner (`cleanup()` stops it)."""
    fast = app.get(FAST_PATH_KEY)
    if fast is not None:
        fast.access_log = access_log
    runner = _Runner(
        app,
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
            app, host, port, access_log=access_log, reuse_port=reuse_port, handle_signals=True
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
