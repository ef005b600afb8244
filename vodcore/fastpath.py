"""A fast path for the commonest request a cache tier sees: a plain GET (or HEAD) of an object
that is fresh in the memory tier.

Why: aiohttp's per-request machinery (request and response objects, router, middleware, header
serialisation) costs several times what a cache hit itself does: about 15k hits/s per process
(bench/RESULTS.md). Here such a request is answered from `data_received`, one parse and one
`transport.write`, without that machinery. Everything else goes to aiohttp untouched.

Rules (the fast path answers only when all hold, else aiohttp handles the bytes as usual):
- the connection is idle in aiohttp's eyes: no request queued or in progress, no request body
  or upgrade, nothing half-parsed (we track whether every byte aiohttp was given ended on a
  message boundary), nothing waiting in the transport's write buffer;
- the bytes are exactly one complete request head, `GET|HEAD target HTTP/1.1`, whose header
  fields are all in a small allow-list (so Range, conditionals, Authorization, Cookie,
  Cache-Control, Expect, bodies, Connection: close… all take the full path);
- the tier maps the target to a cache key (`key_of`), the object is in memory, status 200,
  fresh, and its key has no Vary variants.
The response is what the full path would send for a HIT: the stored end-to-end fields plus
Content-Length, Accept-Ranges, Age, Date and X-Cache. Metrics and the access log are kept.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from vodcore import metrics
from vodcore.cache import policy

if TYPE_CHECKING:
    from vodcore.cache.engine import CacheEngine
    from vodcore.cache.storage import CachedResponse

# Request fields that do not change what a cache hit answers (RFC 9110 / 9111): anything else
# sends the request down the full path.
ALLOWED_FIELDS = frozenset(
    {
        "host",
        "user-agent",
        "accept",
        "accept-encoding",  # the cache always holds identity bytes
        "accept-language",  # only matters with Vary, and Vary'd keys are excluded
        "connection",  # keep-alive only (checked)
        "referer",
        "origin",
        "dnt",
        "x-forwarded-for",
        "x-request-id",
        "sec-fetch-mode",
        "sec-fetch-site",
        "sec-fetch-dest",
    }
)
HEADER_MEMO = 4096  # entries whose serialised header block is kept


class Sniffed:
    __slots__ = ("head", "target")

    def __init__(self, target: str, head: bool) -> None:
        self.target = target
        self.head = head


def sniff(data: bytes) -> Sniffed | None:
    """`data` as one complete bodiless GET/HEAD request head that the fast path may answer,
    or None (pure: no I/O)."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 != len(data):
        return None  # partial, pipelined, or followed by a body
    if data.startswith(b"GET "):
        is_head = False
    elif data.startswith(b"HEAD "):
        is_head = True
    else:
        return None
    try:
        text = data[:end].decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1" or not parts[1].startswith("/"):
        return None
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        lname = name.lower()
        if lname not in ALLOWED_FIELDS:
            return None
        if lname == "connection" and value.strip().lower() != "keep-alive":
            return None
    return Sniffed(parts[1], is_head)


class FastPath:
    """One per tier process: answers fresh in-memory hits for `engine`."""

    def __init__(
        self,
        engine: CacheEngine,
        key_of: Callable[[str], str | None],
        *,
        access_log: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.key_of = key_of
        self.access_log = access_log
        self.clock = clock
        tier = engine.tier
        self._x_cache = f"X-Cache: {tier}=HIT\r\n".encode()
        self._requests = metrics.REQUESTS.labels(tier, "GET", "200")
        self._head_requests = metrics.REQUESTS.labels(tier, "HEAD", "200")
        self._latency = metrics.LATENCY.labels(tier)
        self._answers = metrics.FAST_ANSWERS.labels(tier)
        self._blocks: dict[tuple[str, int], tuple[bytes, bool]] = {}
        self._date_second = -1
        self._date = b""
        self._stamp = ""
        self.served = 0

    def _memory_entry(self, key: str) -> CachedResponse | None:
        storage: Any = self.engine.storage
        memory = getattr(storage, "memory", storage)
        peek = getattr(memory, "peek", None)
        if peek is None:
            return None
        entry: CachedResponse | None = peek(key)
        return entry

    def _block(self, entry: CachedResponse) -> tuple[bytes, bool]:
        """The status line and stored fields of an entry, serialised once; and whether they
        carry a Date (a stored response keeps the origin's Date, RFC 9110 §6.6.1)."""
        memo = (entry.key, id(entry))
        block = self._blocks.get(memo)
        if block is None:
            if len(self._blocks) >= HEADER_MEMO:
                self._blocks.clear()
            lines = ["HTTP/1.1 200 OK\r\n"]
            lines.extend(f"{k}: {v}\r\n" for k, v in entry.headers)
            lines.append(f"Content-Length: {len(entry.body or b'')}\r\nAccept-Ranges: bytes\r\n")
            has_date = any(k.lower() == "date" for k, _v in entry.headers)
            block = self._blocks[memo] = ("".join(lines).encode("latin-1"), has_date)
        return block

    def answer(self, data: bytes, write: Callable[[bytes], None], remote: str | None) -> bool:
        """Answer `data` by `write` if it is a fast-path hit; False leaves it to aiohttp."""
        t0 = time.perf_counter()
        req = sniff(data)
        if req is None:
            return False
        key = self.key_of(req.target)
        if key is None or key in self.engine._vary:
            return False
        entry = self._memory_entry(key)
        if entry is None or entry.status != 200 or entry.body is None:
            return False
        now = self.clock()
        age = policy.current_age(entry.age, now)
        if not policy.is_fresh(entry.lifetime, age):
            return False
        feed = self.engine.feed
        if feed is not None and not feed.trusts(entry.stored_at, time.monotonic()):
            return False  # out of touch with the purge log: the engine revalidates
        self.engine.storage.get(key)  # count the access (recency/frequency), as a hit does
        second = int(now)
        if second != self._date_second:
            self._date_second = second
            self._date = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        block, has_date = self._block(entry)
        date = b"" if has_date else self._date
        head = block + b"Age: %d\r\n" % int(age) + date + self._x_cache + b"\r\n"
        # The write is the point of no return: nothing after it may fail the request (the caller
        # would otherwise hand the same bytes to aiohttp and answer twice).
        write(head if req.head else head + entry.body)
        self.served += 1
        try:
            if req.head:
                self._head_requests.inc()
            else:
                self._requests.inc()
                self.engine._bytes_sent.inc(len(entry.body))
            self.engine._count("hit")
            self._answers.inc()
            self._latency.observe(time.perf_counter() - t0)
            if self.access_log:  # the same line FastAccessLogger writes for the full path
                method = "HEAD" if req.head else "GET"
                sys.stdout.write(
                    f'{self._stamp} access: {remote} "{method} {req.target} HTTP/1.1" 200 '
                    f"{0 if req.head else len(entry.body)} {time.perf_counter() - t0:.6f} "
                    f'"{self.engine.tier}=HIT"\n'
                )
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): the answer went out, the log line is lost
        return True
