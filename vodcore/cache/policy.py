"""Shared-cache policy (RFC 9111), pure: header values in, decisions out.

Rules this module holds:
- Header maps use lower-case field names; a repeated field is folded into one value joined by
  ", " (RFC 9110 §5.3). `fold_headers` builds such a map from raw (name, value) pairs.
- A response is stored only if RFC 9111 §3 allows a *shared* cache to store it, restricted
  further to what the engine can serve today: status 200 with a whole body, no `no-store`, no
  `private`, no `no-cache` (it would need revalidation on every use, which the engine does not do
  yet), no `Vary` other than Accept-Encoding (the engine always fetches identity), and an explicit
  freshness lifetime (or a configured default TTL standing in for the heuristic of §4.2.2).
- Time is always a parameter (`now`, `request_time`, `response_time` in epoch seconds); nothing
  here reads a clock, opens a socket or imports asyncio.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

# Statuses RFC 9111 §4.2.2 calls heuristically cacheable; only 200 is stored for now.
STORABLE_STATUSES = frozenset({200})


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
    if "no-cache" in cc:
        return False  # RFC 9111 §5.2.2.4: storable, but needs revalidation we do not do yet
    vary = response_headers.get("vary")
    if vary is not None:
        fields = {f.strip().lower() for f in vary.split(",") if f.strip()}
        if fields - {"accept-encoding"}:
            return False  # RFC 9111 §4.1: secondary keys are not implemented yet ("*" never)
    if "authorization" in req and not ({"public", "s-maxage", "must-revalidate"} & cc.keys()):
        return False  # RFC 9111 §3.5
    # RFC 9111 §3: explicit freshness (s-maxage, max-age, Expires, public) or a heuristic.
    has_explicit = bool({"s-maxage", "max-age", "public"} & cc.keys()) or (
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
