"""Which response a GET/HEAD for a known representation gets: 200, 304, 206 or 416 (pure).

Used by the origin (serving files) and by the cache (serving stored objects), so both tiers
answer conditional and Range requests the same way. Evaluation order is RFC 9110 §13.2.2:
If-None-Match (else If-Modified-Since), then If-Range, then Range. If-Match and
If-Unmodified-Since are not evaluated yet (media objects are immutable; nothing writes through
these tiers). Header maps use lower-case names (see `vodcore.cache.policy.fold_headers`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from vodcore.cache.policy import parse_http_date
from vodcore.ranges import ByteRange, RangeNotSatisfiable, parse_range


class Outcome(enum.Enum):
    FULL = 200
    PARTIAL = 206
    NOT_MODIFIED = 304
    UNSATISFIABLE = 416


@dataclass(frozen=True, slots=True)
class Selection:
    outcome: Outcome
    range: ByteRange | None = None


def _opaque(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def _tags(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def none_match(if_none_match: str, etag: str | None) -> bool:
    """True when If-None-Match *matches*, i.e. the condition is false (RFC 9110 §13.1.2).

    Comparison is weak (RFC 9110 §8.8.3.2): W/"x" matches "x".
    """
    if if_none_match.strip() == "*":
        return True  # the representation exists
    if etag is None:
        return False
    mine = _opaque(etag)
    return any(_opaque(t) == mine for t in _tags(if_none_match))


def if_range_holds(if_range: str, etag: str | None, last_modified: float | None) -> bool:
    """RFC 9110 §13.1.5: the Range applies only if the validator still matches."""
    v = if_range.strip()
    if v.startswith('"') or v.startswith("W/"):
        # Strong comparison; a weak tag never matches (RFC 9110 §8.8.3.2).
        return (
            etag is not None
            and not v.startswith("W/")
            and not etag.startswith("W/")
            and (v == etag)
        )
    date = parse_http_date(v)
    return date is not None and last_modified is not None and int(last_modified) == int(date)


def select(
    method: str,
    headers: Mapping[str, str],
    *,
    size: int,
    etag: str | None,
    last_modified: float | None,
) -> Selection:
    """Decide the response to a GET or HEAD for a representation of `size` bytes."""
    inm = headers.get("if-none-match")
    if inm is not None:
        if none_match(inm, etag):
            return Selection(Outcome.NOT_MODIFIED)  # RFC 9110 §13.1.2 (GET/HEAD -> 304)
    else:
        ims = parse_http_date(headers.get("if-modified-since"))
        # RFC 9110 §13.1.3: only without If-None-Match; an invalid date is ignored.
        if ims is not None and last_modified is not None and int(last_modified) <= ims:
            return Selection(Outcome.NOT_MODIFIED)
    if method != "GET":
        return Selection(Outcome.FULL)  # RFC 9110 §14.2: Range is defined for GET only
    rng = headers.get("range")
    if rng is None:
        return Selection(Outcome.FULL)
    if_range = headers.get("if-range")
    if if_range is not None and not if_range_holds(if_range, etag, last_modified):
        return Selection(Outcome.FULL)
    try:
        br = parse_range(rng, size)
    except RangeNotSatisfiable:
        return Selection(Outcome.UNSATISFIABLE)  # RFC 9110 §15.5.17
    if br is None:
        return Selection(Outcome.FULL)
    return Selection(Outcome.PARTIAL, br)
