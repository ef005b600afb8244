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

Beyond the allow-list, a tier names the fields it handles itself (`accept`; issue 11):
- the token-checked edge accepts and ignores a player's Cookie, Authorization and the
  tier-to-tier fields (the full path drops them too), so a player's cookie costs no cache hit;
- a shield accepts what its edges send on a fill: Via, X-Purge-Seq (answered here only when
  this node has applied that seq; else the full path waits for its feed) and, with a tier
  secret, X-Vod-Tier-Auth, which is verified here (`vodcore.tierauth`, one HMAC): an unsigned
  or badly signed request is never answered from the fast path (the full path refuses it).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from vodcore import metrics
from vodcore.cache import policy
from vodcore.tierauth import FIELD as TIER_AUTH_FIELD
from vodcore.tierauth import TierAuth

PURGE_SEQ_FIELD = "x-purge-seq"

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
NO_FIELDS: frozenset[str] = frozenset()


class Sniffed:
    __slots__ = ("fields", "head", "target")

    def __init__(self, target: str, head: bool, fields: dict[str, str] | None = None) -> None:
        self.target = target
        self.head = head
        self.fields = fields  # values of the `accept`ed fields present (None: none was)


def sniff(data: bytes, accept: frozenset[str] = NO_FIELDS) -> Sniffed | None:
    """`data` as one complete bodiless GET/HEAD request head that the fast path may answer,
    or None (pure: no I/O). Fields in `accept` (lower-case) are allowed too, and their values
    returned for the caller to judge."""
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
    fields: dict[str, str] | None = None
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        lname = name.lower()
        if lname not in ALLOWED_FIELDS:
            if lname not in accept:
                return None
            if fields is None:
                fields = {}
            elif lname in fields:
                return None  # repeated: the full path decides what that means
            fields[lname] = value.strip()
        elif lname == "connection" and value.strip().lower() != "keep-alive":
            return None
    return Sniffed(parts[1], is_head, fields)


class FastPath:
    """One per tier process: answers fresh in-memory hits for `engine`."""

    def __init__(
        self,
        engine: CacheEngine,
        key_of: Callable[[str], str | None],
        *,
        access_log: bool,
        clock: Callable[[], float] = time.time,
        ignore: frozenset[str] = NO_FIELDS,
        upstream_fields: bool = False,
        tier_auth: TierAuth | None = None,
    ) -> None:
        """`ignore`: fields accepted and ignored (the edge's player fields); `upstream_fields`:
        accept what a downstream tier sends (Via, X-Purge-Seq); `tier_auth`: require and
        verify the tier signature."""
        self.engine = engine
        self.key_of = key_of
        self.ignore = ignore
        self.tier_auth = tier_auth
        accept = set(ignore)
        if upstream_fields:
            accept |= {"via", PURGE_SEQ_FIELD}
        if tier_auth is not None:
            accept.add(TIER_AUTH_FIELD)
        self.accept = frozenset(accept)
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

    def _fields_allow(self, req: Sniffed) -> bool:
        """The accepted fields' verdict: a valid tier signature when one is required, and the
        purges the asking tier has applied applied here too."""
        fields = req.fields or {}
        if self.tier_auth is not None and not self.tier_auth.verify(
            "HEAD" if req.head else "GET", req.target, fields.get(TIER_AUTH_FIELD), self.clock()
        ):
            return False
        need = fields.get(PURGE_SEQ_FIELD)
        if need is not None and PURGE_SEQ_FIELD not in self.ignore:
            feed = self.engine.feed
            if feed is not None and (not need.isdigit() or feed.applied < int(need)):
                return False  # behind the asking tier: the full path waits for the feed
        return True

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
        req = sniff(data, self.accept)
        if req is None:
            return False
        if req.fields is not None or self.tier_auth is not None:
            if not self._fields_allow(req):
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
