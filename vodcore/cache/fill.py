"""One in-flight upstream response, shared by every request that waits for it.

A `Fill` is written by exactly one producer (the engine's fill task) and read by any number of
readers (read-while-write): readers get the response head as soon as it is known and then body
bytes as they arrive, not after the object completes. Readers are woken by an event, never by
polling.

Rules:
- `set_head` once, then `append` chunks, then exactly one of `finish` or `fail`.
- A reader that asks for bytes beyond what has arrived waits; when the fill fails, every reader
  gets `FillFailed` instead of more bytes, so a truncated body is never presented as whole
  (the server then cuts the connection: with a Content-Length already sent, the client sees a
  short read, RFC 9112 §6.3).
- `finish` checks the byte count against the declared length; a mismatch is a failure.
- Memory: the chunks are kept until the fill is dropped (the engine caps fills at
  `max_object_bytes`; larger objects never go through a Fill).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass


class FillFailed(Exception):
    """The upstream response could not be completed; the message says why (for logs)."""


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    headers: tuple[tuple[str, str], ...]  # end-to-end fields as received (original case)
    length: int | None  # declared Content-Length, None when the upstream streamed without one
    upstream_cache: str | None  # the upstream's X-Cache value


class Fill:
    def __init__(self) -> None:
        self._head: asyncio.Future[Head] = asyncio.get_running_loop().create_future()
        self._chunks: list[bytes] = []
        self._offsets: list[int] = []  # start offset of each chunk
        self.received = 0
        self.done = False
        self.error: FillFailed | None = None
        self._changed = asyncio.Event()
        self.readers = 0

    # Producer side -------------------------------------------------------------------------
    def set_head(self, head: Head) -> None:
        self._head.set_result(head)

    def append(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._offsets.append(self.received)
        self._chunks.append(chunk)
        self.received += len(chunk)
        self._wake()

    def finish(self) -> None:
        length = self._head.result().length if self._head.done() else None
        if length is not None and length != self.received:
            self.fail(FillFailed(f"body ended after {self.received} of {length} bytes"))
            return
        self.done = True
        self._wake()

    def finish_unread(self) -> None:
        """End a fill whose body the producer will not read (readers fetch it themselves)."""
        self.done = True
        self._wake()

    def fail(self, error: FillFailed) -> None:
        if self.done or self.error is not None:
            return
        self.error = error
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved: a fill nobody waits on must not warn
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # Reader side ---------------------------------------------------------------------------
    async def head(self) -> Head:
        return await asyncio.shield(self._head)

    @property
    def complete(self) -> bool:
        return self.done

    def body(self) -> bytes:
        """The whole body; only once `done`."""
        assert self.done
        return b"".join(self._chunks)

    async def wait_done(self) -> None:
        while not self.done:
            if self.error is not None:
                raise self.error
            await self._changed.wait()

    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Yield bytes [start, end) (end None: to the end of the body) as they arrive."""
        pos = start
        index = 0
        while end is None or pos < end:
            # Serve every chunk already here that overlaps [pos, end).
            while index < len(self._chunks):
                c_start = self._offsets[index]
                chunk = self._chunks[index]
                c_end = c_start + len(chunk)
                index += 1
                if c_end <= pos:
                    continue
                lo = pos - c_start
                hi = len(chunk) if end is None else min(len(chunk), end - c_start)
                if hi > lo:
                    piece = chunk[lo:hi] if (lo or hi != len(chunk)) else chunk
                    pos += len(piece)
                    yield piece
                if end is not None and pos >= end:
                    return
            if self.error is not None:
                raise self.error
            if self.done:
                if end is not None and pos < end:
                    raise FillFailed(f"body shorter ({self.received}) than the range asked")
                return
            await self._changed.wait()
