"""Tier authentication: shields and origins answer only their own tiers (issue 11).

With `tier_secret` set (VOD_TIER_SECRET; `vod up` makes a random one for its tiers), every
request an edge or a shield sends upstream carries

    X-Vod-Tier-Auth: v1.{unix seconds}.{hex HMAC-SHA256(secret, "v1\\n{METHOD}\\n{target}\\n{ts}")}

where target is the request-target as sent (path and query), and a shield or origin with the
same secret refuses (403 JSON `forbidden`) any request without a valid one; `/healthz` and
`/metrics` stay open for probes and scrapers.

Why this shape:
- an HMAC over method, target and time, not the secret itself as a header: the header is
  logged and seen by proxies; a captured one is good only for that method and object, for
  `WINDOW_SECONDS`, and reveals nothing that signs anything else;
- a timestamp, not a nonce: replay within the window of the same GET of the same object gives
  an attacker nothing it did not already see; a nonce store would be state per request on the
  hot path. The window (±30 s) covers clock skew between tiers (NTP keeps them far closer);
- HMAC-SHA256 from the standard library, compared with `hmac.compare_digest` (constant time),
  about a microsecond per request: cheap enough to check inside the fast path, so signed
  hits still take it (`vodcore.fastpath`);
- no TLS client certificates: the tiers speak plain HTTP today, and a shared secret needs no
  PKI. Run the tiers on a private network anyway: this stops strangers who reach a shield or
  an origin, not an observer on the path (whose only gain is the replay above).

Pure apart from reading nothing: `now` is passed in.
"""

from __future__ import annotations

import hashlib
import hmac

HEADER = "X-Vod-Tier-Auth"
FIELD = "x-vod-tier-auth"  # lower-case, as folded request fields are
WINDOW_SECONDS = 30
OPEN_PATHS = frozenset({"/healthz", "/metrics"})  # probes and scrapers: no object behind them
_MAX_VALUE = 100  # "v1." + ts + 64 hex: anything longer is junk, refused before any work


class TierAuth:
    """Sign and verify tier-to-tier requests with one shared secret."""

    __slots__ = ("_base",)

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("an empty tier secret signs nothing")
        # keyed once: copying the keyed state costs ~2.1 µs per MAC, keying it anew ~3.4 µs
        self._base = hmac.new(secret.encode(), digestmod=hashlib.sha256)

    def _mac(self, method: str, target: str, ts: str) -> str:
        h = self._base.copy()
        h.update(f"v1\n{method}\n{target}\n{ts}".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def sign(self, method: str, target: str, now: float) -> str:
        """The header value for a request of `method` on `target` sent at `now`."""
        ts = str(int(now))
        return f"v1.{ts}.{self._mac(method, target, ts)}"

    def verify(self, method: str, target: str, value: str | None, now: float) -> bool:
        """Is `value` a valid signature of this request at `now`? (HEAD is checked as signed:
        a HEAD signed as GET is refused.)"""
        if value is None or len(value) > _MAX_VALUE:
            return False
        version, _, rest = value.partition(".")
        ts, _, mac = rest.partition(".")
        if version != "v1" or not ts.isascii() or not ts.isdigit() or len(ts) > 12:
            return False
        if abs(now - int(ts)) > WINDOW_SECONDS:
            return False
        return hmac.compare_digest(mac, self._mac(method, target, ts))
