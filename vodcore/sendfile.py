"""Send a byte range of a local file as a response body, zero-copy where possible.

Why not `loop.sendfile` (what aiohttp's FileResponse uses): the servers run on uvloop, which
does not implement it (NotImplementedError), so FileResponse silently falls back to reading the
file in an executor and writing it through the transport: two copies through user space and a
thread hop per 256 KiB. We call `os.sendfile(2)` ourselves instead, on the connection's socket,
after the transport's buffer is empty. Measured on the 2-core dev box (wrk -t1 -c8 -d4s against
a 1 MB and a 16 MB file, server CPU seconds per GB served, two runs each): uvloop + chunked
0.94-1.18 / 0.76; uvloop + FileResponse's fallback 0.70-1.00 / 0.62; stdlib loop + native
loop.sendfile 0.42-0.45 / 0.14; uvloop + this module 0.36-0.37 / 0.10-0.11. So the servers keep
uvloop (faster everywhere else) and still get zero-copy bodies.

How it stays correct next to an event loop that owns the socket:
- we `dup()` the socket's descriptor and use only the duplicate, so if the transport closes
  its descriptor meanwhile (peer gone), the number can't be reused by another connection under
  us: bytes for this response can never reach another client;
- the headers aiohttp buffers are pushed out and the transport's write buffer must be empty
  before the first `sendfile`, and nothing else writes to the transport until we return, so the
  bytes on the wire stay in order;
- `sendfile` on a non-blocking socket returns EAGAIN when the kernel buffer is full; we then wait
  for writability on the duplicate (`add_writer`), and stop watching it before closing it, so
  the epoll registration never outlives the descriptor (epoll keys on the open file, which the
  duplicate shares);
- TLS transports, or transports without a real socket, use the chunked fallback.

A client that goes away mid-body is routine for a video server (players seek and cancel):
`send_file_range` aborts the connection and returns False instead of raising, because aiohttp
logs any exception out of a handler as "Error handling request" with a traceback. A file
shorter than promised also aborts the connection rather than end a short body that a cache
would take as complete (RFC 9112 §6.3: the client detects an incomplete message only by the
connection closing early).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from pathlib import Path
from typing import BinaryIO

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

log = logging.getLogger("vod.sendfile")

CHUNK = 256 * 1024
_FLUSH_TIMEOUT = 30.0
_MAX_SENDFILE = 1 << 30  # per call; Linux caps a single sendfile at ~2 GiB anyway
_DISCONNECT = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.EBADF)

# Set to False to force the chunked path (benchmarks, debugging).
USE_SENDFILE = True


class FileChanged(ConnectionResetError):
    """The file has fewer bytes than the response promised; the connection is aborted."""


class StaleStat(Exception):
    """The file is not the one a stat() described (replaced or resized since)."""


def open_for_range(
    path: Path,
    offset: int,
    count: int,
    *,
    expect_size: int | None = None,
    expect_mtime: float | None = None,
) -> BinaryIO:
    """Open `path` and check it still holds [offset, offset+count) (blocking: run in a thread).

    Raises FileNotFoundError (also for a directory or a short file), so a caller can answer a
    clean 404 before any header is sent; StaleStat when `expect_size`/`expect_mtime` (from the
    stat the headers were built from) no longer describe the file.
    """
    f = open(path, "rb")  # handed to the caller, closed in send_file_range
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size < offset + count:
            raise FileNotFoundError(str(path))
        if (expect_size is not None and st.st_size != expect_size) or (
            expect_mtime is not None and st.st_mtime != expect_mtime
        ):
            raise StaleStat(str(path))
    except BaseException:
        f.close()
        raise
    return f


async def send_file_range(
    request: web.BaseRequest,
    resp: web.StreamResponse,
    path: Path,
    offset: int,
    count: int,
    *,
    file: BinaryIO | None = None,
) -> bool:
    """Prepare `resp` (status and headers already set), send `count` bytes of `path` from
    `offset` as its body and end it; `resp.content_length` is set to `count`. For HEAD, or a
    status without a body, only the headers go out.

    The file is opened before any header is sent, so a missing file raises FileNotFoundError
    while a clean 404 can still be answered; or pass `file` from `open_for_range` (it is closed
    on return either way).

    Returns True when the whole response went out, False when the client went away or the file
    shrank: the connection is then aborted and nothing is raised, so aiohttp logs no traceback
    and no 500 (a disconnect is routine for a video server: players seek and cancel).
    """
    if file is None:
        file = await asyncio.to_thread(open_for_range, path, offset, count)
    try:
        resp.content_length = count
        try:
            writer = await resp.prepare(request)
            if writer is None or count == 0 or request.method == "HEAD":
                await resp.write_eof()
                return True
            sock_fd = _plain_socket_fd(request)
            if USE_SENDFILE and sock_fd is not None:
                writer.send_headers()
                if await _flushed(request, writer):
                    await _sendfile(request, sock_fd, file.fileno(), offset, count)
                    await resp.write_eof()
                    return True
            await _copy_chunks(resp, file, offset, count)
            await resp.write_eof()
            return True
        except ConnectionError as e:
            if isinstance(e, FileChanged):
                log.warning("%s shrank while being sent; connection aborted", path)
            abort(request)
            return False
    finally:
        file.close()


def abort(request: web.BaseRequest) -> None:
    """Drop the connection: a body cut short must never look complete to the client."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _plain_socket_fd(request: web.BaseRequest) -> int | None:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("connection lost")
    if transport.get_extra_info("sslcontext") is not None:
        return None  # TLS: the bytes must go through the transport's encryption
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        fd = sock.fileno()
    except (AttributeError, OSError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


async def _flushed(request: web.BaseRequest, writer: AbstractStreamWriter) -> bool:
    """Wait until the transport has handed every buffered byte (our headers) to the kernel.

    Usually it already has. When the socket buffer is still full (the tail of the previous
    response on this keep-alive connection), lower the transport's high-water mark to 0 so it
    pauses the protocol, and let aiohttp's drain wait for the resume that comes when the buffer
    is empty (low-water 0); then restore the limits.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("connection lost")
    if transport.get_write_buffer_size() == 0:
        return True
    low, high = transport.get_write_buffer_limits()
    transport.set_write_buffer_limits(high=0, low=0)
    try:
        async with asyncio.timeout(_FLUSH_TIMEOUT):
            await writer.drain()
    except TimeoutError:
        return False
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits(high=high, low=low)
    return transport.get_write_buffer_size() == 0


async def _sendfile(
    request: web.BaseRequest, sock_fd: int, file_fd: int, offset: int, count: int
) -> None:
    loop = asyncio.get_running_loop()
    transport = request.transport
    fd = os.dup(sock_fd)
    try:
        end = offset + count
        while offset < end:
            if transport is None or transport.is_closing():
                raise ConnectionResetError("connection lost")
            try:
                n = os.sendfile(fd, file_fd, offset, min(end - offset, _MAX_SENDFILE))
            except BlockingIOError:
                await _writable(loop, fd)
                continue
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in _DISCONNECT:
                    raise ConnectionResetError("client disconnected") from None
                raise
            if n == 0:
                raise FileChanged("file shrank while being sent")
            offset += n
    finally:
        os.close(fd)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await fut
    finally:
        loop.remove_writer(fd)  # before the descriptor is closed: see the module comment


async def _copy_chunks(resp: web.StreamResponse, file: BinaryIO, offset: int, count: int) -> None:
    def read_at(pos: int, n: int) -> bytes:
        return os.pread(file.fileno(), n, pos)

    end = offset + count
    while offset < end:
        data = await asyncio.to_thread(read_at, offset, min(CHUNK, end - offset))
        if not data:
            raise FileChanged("file shrank while being sent")
        await resp.write(data)
        offset += len(data)
