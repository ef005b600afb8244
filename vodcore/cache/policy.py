"""Shared-cache policy (RFC 9111), pure: header values in, decisions out.

Rules this module holds:
- Header maps use lower-case field names; a repeated field is folded into one value joined by
  ", " (RFC 9110 §5.3). `fold_headers` builds such a map from raw (name, value) pairs.
- A response is stored only if RFC 9111 §3 allows a *shared* cache to store it: a status the
  cache understands with a whole body (never 206), no `no-store`, no `private`, not `Vary: *`,
  and an explicit freshness lifetime (or a configured default TTL standing in for the heuristic
  of §4.2.2). `no-cache` responses are stored but revalidated on every use (§5.2.2.4).
- Stale responses: `stale-while-revalidate` (RFC 5861 §3) lets a stale response be served while
  one background revalidation runs; `stale-if-error` (RFC 5861 §4) lets it be served when
  revalidation fails; `must-revalidate` / `proxy-revalidate` / `s-maxage` forbid serving stale
  at all (RFC 9111 §5.2.2.2, §5.2.2.8, §5.2.2.10).
- Time is always a parameter (`now`, `request_time`, `response_time` in epoch seconds); nothing
  here reads a clock, opens a socket or imports asyncio.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

# RFC 9110 §15.1: statuses cacheable by default (heuristically cacheable), minus 206 which
# the engine never stores (it stores whole representations only).
STORABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})


def fold_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-case names and join repeated fields with ", " (RFC 9110 §5.3)."""
    out: dict[str, str] = {}
    for name, value in items:
        k = name.lower()
        out[k] = f"{out[k]}, {value}" if k in out else value
    return out


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """Directives of a Cache-Control field (RFC 9111 §5.2): lower-case name -> argument or None.

    Quoted arguments are unquoted; a directive repeated keeps its first value.
    """
    out: dict[str, str | None] = {}
    if not value:
        return out
    for part in _split_commas(value):
        name, eq, arg = part.partition("=")
        name = name.strip().lower()
        if not name or name in out:
            continue
        arg = arg.strip()
        if eq and len(arg) >= 2 and arg[0] == arg[-1] == '"':
            arg = arg[1:-1]
        out[name] = arg if eq else None
    return out


def _split_commas(value: str) -> list[str]:
    # Commas inside a quoted-string (e.g. no-cache="a, b") do not separate directives.
    parts: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _delta_seconds(arg: str | None) -> int | None:
    # RFC 9111 §1.2.2: delta-seconds is 1*DIGIT; an invalid value makes the directive unusable.
    if arg is None or not arg.isdigit():
        return None
    return min(int(arg), 2**31)


def parse_http_date(value: str | None) -> float | None:
    """An HTTP-date (RFC 9110 §5.6.7) as epoch seconds, or None if absent or invalid."""
    if not value:
        return None
    try:
        dt = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if dt.tzinfo is None:
        return None  # RFC 9110 §5.6.7: an HTTP-date is always GMT
    return dt.timestamp()


def freshness_lifetime(
    headers: Mapping[str, str], *, response_time: float, default_ttl: float | None = None
) -> float | None:
    """Freshness lifetime in seconds (RFC 9111 §4.2.1), or None when the response has none.

    Order: s-maxage (shared caches only), then max-age, then Expires minus Date.
    """
    cc = parse_cache_control(headers.get("cache-control"))
    for directive in ("s-maxage", "max-age"):
        if directive in cc:
            secs = _delta_seconds(cc[directive])
            if secs is not None:
                return float(secs)
    if "expires" in headers:
        expires = parse_http_date(headers["expires"])
        if expires is None:
            return 0.0  # RFC 9111 §5.3: an invalid Expires means "already expired"
        date = parse_http_date(headers.get("date"))
        return max(0.0, expires - (date if date is not None else response_time))
    return default_ttl  # RFC 9111 §4.2.2: heuristic freshness, here a configured TTL


def is_storable(
    status: int,
    response_headers: Mapping[str, str],
    *,
    request_headers: Mapping[str, str] | None = None,
    default_ttl: float | None = None,
) -> bool:
    """May a shared cache store this response to a GET (RFC 9111 §3)?"""
    if status not in STORABLE_STATUSES:
        return False
    req = request_headers or {}
    if "no-store" in parse_cache_control(req.get("cache-control")):
        return False  # RFC 9111 §5.2.1.5
    cc = parse_cache_control(response_headers.get("cache-control"))
    if "no-store" in cc:
        return False  # RFC 9111 §5.2.2.5
    if "private" in cc:
        return False  # RFC 9111 §5.2.2.7: a shared cache must not store it
    vary = response_headers.get("vary")
    if vary is not None and "*" in {f.strip() for f in vary.split(",")}:
        return False  # RFC 9111 §4.1: Vary: * never matches a later request
    if "authorization" in req and not ({"public", "s-maxage", "must-revalidate"} & cc.keys()):
        return False  # RFC 9111 §3.5
    # RFC 9111 §3: explicit freshness (s-maxage, max-age, Expires, public) or a heuristic.
    has_explicit = bool({"s-maxage", "max-age", "public", "no-cache"} & cc.keys()) or (
        "expires" in response_headers
    )
    return has_explicit or default_ttl is not None


def shareable_with_waiters(
    status: int, response_headers: Mapping[str, str], storable: bool
) -> bool:
    """May a collapsed fill's response be handed to the requests that waited on it?

    A storable response may. So may an error (>= 400) that is not `private`: concurrent players
    probing a missing segment then cost one upstream fetch instead of one each. Anything else
    (a non-storable success) is fetched again by each waiter.
    """
    if storable:
        return True
    cc = parse_cache_control(response_headers.get("cache-control"))
    return status >= 400 and "private" not in cc


@dataclass(frozen=True, slots=True)
class AgeInputs:
    """What RFC 9111 §4.2.3 needs to know about a stored response's age."""

    age_value: float  # the Age header as received, 0 when absent
    date_value: float | None  # the Date header, None when absent or invalid
    request_time: float  # when the cache sent the request that produced the response
    response_time: float  # when the response was received


def age_inputs(
    headers: Mapping[str, str], *, request_time: float, response_time: float
) -> AgeInputs:
    age = _delta_seconds((headers.get("age") or "").strip())
    return AgeInputs(
        age_value=float(age or 0),
        date_value=parse_http_date(headers.get("date")),
        request_time=request_time,
        response_time=response_time,
    )


def current_age(a: AgeInputs, now: float) -> float:
    """RFC 9111 §4.2.3 current_age, in seconds."""
    date_value = a.date_value if a.date_value is not None else a.response_time
    apparent_age = max(0.0, a.response_time - date_value)
    response_delay = a.response_time - a.request_time
    corrected_age_value = a.age_value + response_delay
    corrected_initial_age = max(apparent_age, corrected_age_value)
    resident_time = now - a.response_time
    return corrected_initial_age + resident_time


def is_fresh(lifetime: float | None, age: float) -> bool:
    """RFC 9111 §4.2: fresh while freshness_lifetime > current_age."""
    return lifetime is not None and lifetime > age


@dataclass(frozen=True, slots=True)
class StaleRules:
    """What a stored response allows once it is stale (lower-case Cache-Control of the response)."""

    no_cache: bool  # RFC 9111 §5.2.2.4: revalidate before every use, even when fresh
    never_stale: bool  # must-revalidate, proxy-revalidate or s-maxage (§5.2.2.2, .8, .10)
    while_revalidate: float  # RFC 5861 §3, seconds past expiry
    if_error: float  # RFC 5861 §4, seconds past expiry


def stale_rules(headers: Mapping[str, str]) -> StaleRules:
    cc = parse_cache_control(headers.get("cache-control"))
    never = bool({"must-revalidate", "proxy-revalidate", "s-maxage"} & cc.keys())
    swr = _delta_seconds(cc.get("stale-while-revalidate"))
    sie = _delta_seconds(cc.get("stale-if-error"))
    return StaleRules(
        no_cache="no-cache" in cc,
        never_stale=never,
        while_revalidate=0.0 if never or swr is None else float(swr),
        if_error=0.0 if never or sie is None else float(sie),
    )


class Use(enum.Enum):
    FRESH = "fresh"  # serve as is
    STALE_REVALIDATE_BEHIND = "swr"  # serve stale now, revalidate in the background
    REVALIDATE = "revalidate"  # revalidate first (conditional request upstream)


def usability(lifetime: float | None, age: float, rules: StaleRules) -> Use:
    """How a stored response may answer a request now (RFC 9111 §4.2, §4.3; RFC 5861)."""
    if rules.no_cache:
        return Use.REVALIDATE
    if is_fresh(lifetime, age):
        return Use.FRESH
    staleness = age - (lifetime or 0.0)
    if staleness < rules.while_revalidate:
        return Use.STALE_REVALIDATE_BEHIND
    return Use.REVALIDATE


def may_serve_stale_on_error(lifetime: float | None, age: float, rules: StaleRules) -> bool:
    """After a failed revalidation (5xx or no upstream), may the stale response be used?"""
    if rules.never_stale:
        return False
    return age - (lifetime or 0.0) < rules.if_error


# RFC 9111 §3.2: fields a 304 must not change in the stored response.
NOT_UPDATED_BY_304 = frozenset({"content-length", "content-encoding", "content-range", "etag"})


def merge_304(
    stored: tuple[tuple[str, str], ...], fresh: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    """Stored header fields updated from a 304's fields (RFC 9111 §3.2, §4.3.4).

    Every field in the 304 replaces the stored field of the same name, except those the stored
    body depends on; fields only in the stored response stay.
    """
    incoming: dict[str, list[tuple[str, str]]] = {}
    for k, v in fresh:
        if k.lower() not in NOT_UPDATED_BY_304:
            incoming.setdefault(k.lower(), []).append((k, v))
    out = [(k, v) for k, v in stored if k.lower() not in incoming]
    for pairs in incoming.values():
        out.extend(pairs)
    return tuple(out)


UNSAFE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})


def invalidation_targets(
    method: str, status: int, target: str, location: str | None, content_location: str | None
) -> list[str]:
    """Paths whose stored responses an unsafe request invalidates (RFC 9111 §4.4).

    Only after a non-error response (2xx/3xx). `target` is the request's path (with query);
    Location and Content-Location count only when they are same-origin paths (a relative
    reference or an absolute path), since a cache must not invalidate another origin's URIs.
    """
    if method.upper() not in UNSAFE_METHODS or not 200 <= status < 400:
        return []
    out = [target]
    for ref in (location, content_location):
        if ref and ref.startswith("/") and not ref.startswith("//") and ref not in out:
            out.append(ref)
    return out
