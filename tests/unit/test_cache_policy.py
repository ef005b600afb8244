"""Pure cache policy: RFC 9111 storability/freshness/age, 200/206/304/416 selection, the LRU
and the origin's caching-header policy. Declarative tables, no sockets."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from edge.keys import should_refresh
from origin import policy as origin_policy
from vodcore.cache import conditional
from vodcore.cache.conditional import Outcome
from vodcore.cache.policy import (
    AgeInputs,
    current_age,
    fold_headers,
    freshness_lifetime,
    is_fresh,
    is_storable,
    parse_cache_control,
    parse_http_date,
    shareable_with_waiters,
)
from vodcore.ranges import ByteRange

T0 = 1_700_000_000.0


def date(t: float) -> str:
    return formatdate(t, usegmt=True)


# --- Cache-Control parsing -----------------------------------------------------------------------

CC_TABLE = [
    (None, {}),
    ("", {}),
    ("public, max-age=60", {"public": None, "max-age": "60"}),
    ("Max-Age=5, S-MAXAGE=10", {"max-age": "5", "s-maxage": "10"}),
    ('no-cache="Set-Cookie, X-A", max-age=1', {"no-cache": "Set-Cookie, X-A", "max-age": "1"}),
    ("max-age=1, max-age=2", {"max-age": "1"}),
    (" , private ,, ", {"private": None}),
]


@pytest.mark.parametrize(("value", "expected"), CC_TABLE)
def test_parse_cache_control(value: str | None, expected: dict[str, str | None]) -> None:
    assert parse_cache_control(value) == expected


def test_fold_headers_joins_repeats() -> None:
    assert fold_headers([("Cache-Control", "public"), ("cache-control", "max-age=3")]) == {
        "cache-control": "public, max-age=3"
    }


def test_parse_http_date() -> None:
    assert parse_http_date(date(T0)) == T0
    assert parse_http_date("not a date") is None
    assert parse_http_date(None) is None


# --- storability (RFC 9111 §3) -------------------------------------------------------------------

STORABLE_TABLE = [
    # status, response headers, request headers, default ttl, storable
    (200, {"cache-control": "public, max-age=31536000, immutable"}, {}, None, True),
    (200, {"cache-control": "max-age=60"}, {}, None, True),
    (200, {"cache-control": "s-maxage=60"}, {}, None, True),
    (200, {"expires": date(T0 + 60), "date": date(T0)}, {}, None, True),
    (200, {"cache-control": "public"}, {}, None, True),
    (200, {}, {}, None, False),  # no explicit freshness, no default TTL
    (200, {}, {}, 30.0, True),  # a configured default TTL stands in for the heuristic
    (200, {"cache-control": "no-store, max-age=60"}, {}, None, False),
    (200, {"cache-control": "private, max-age=60"}, {}, None, False),
    (200, {"cache-control": "no-cache, max-age=60"}, {}, None, True),  # stored, revalidated
    (200, {"cache-control": "max-age=60"}, {"cache-control": "no-store"}, None, False),
    (200, {"cache-control": "max-age=60", "vary": "*"}, {}, None, False),
    (200, {"cache-control": "max-age=60", "vary": "Cookie"}, {}, None, True),  # keyed by Cookie
    (200, {"cache-control": "max-age=60", "vary": "Accept-Encoding"}, {}, None, True),
    (200, {"cache-control": "max-age=60"}, {"authorization": "Bearer x"}, None, False),
    (200, {"cache-control": "public, max-age=60"}, {"authorization": "Bearer x"}, None, True),
    (206, {"cache-control": "max-age=60"}, {}, None, False),  # partial bodies never stored
    (404, {"cache-control": "max-age=60"}, {}, None, True),  # cacheable by default (§15.1)
    (404, {}, {}, None, False),  # ... but only with explicit freshness
    (500, {"cache-control": "max-age=60"}, {}, None, False),
]


@pytest.mark.parametrize(("status", "resp", "req", "ttl", "expected"), STORABLE_TABLE)
def test_is_storable(
    status: int, resp: dict[str, str], req: dict[str, str], ttl: float | None, expected: bool
) -> None:
    assert is_storable(status, resp, request_headers=req, default_ttl=ttl) is expected


SHAREABLE_TABLE = [
    (200, {}, True, True),
    (200, {"cache-control": "no-store"}, False, False),
    (404, {"cache-control": "no-store"}, False, True),
    (502, {}, False, True),
    (404, {"cache-control": "private"}, False, False),
]


@pytest.mark.parametrize(("status", "headers", "storable", "expected"), SHAREABLE_TABLE)
def test_shareable_with_waiters(
    status: int, headers: dict[str, str], storable: bool, expected: bool
) -> None:
    assert shareable_with_waiters(status, headers, storable) is expected


# --- freshness lifetime (RFC 9111 §4.2.1) --------------------------------------------------------

LIFETIME_TABLE = [
    ({"cache-control": "max-age=60"}, None, 60.0),
    ({"cache-control": "max-age=60, s-maxage=600"}, None, 600.0),  # s-maxage wins
    ({"cache-control": "max-age=60", "expires": date(T0 + 999)}, None, 60.0),  # over Expires
    ({"expires": date(T0 + 120), "date": date(T0)}, None, 120.0),
    ({"expires": date(T0 + 120)}, None, 120.0),  # no Date: response_time stands in
    ({"expires": date(T0 - 10), "date": date(T0)}, None, 0.0),
    ({"expires": "0"}, None, 0.0),  # invalid Expires = already expired (§5.3)
    ({"cache-control": "max-age=abc"}, None, None),  # unusable directive
    ({"cache-control": "max-age=abc"}, 5.0, 5.0),
    ({}, None, None),
    ({}, 30.0, 30.0),
]


@pytest.mark.parametrize(("headers", "ttl", "expected"), LIFETIME_TABLE)
def test_freshness_lifetime(
    headers: dict[str, str], ttl: float | None, expected: float | None
) -> None:
    assert freshness_lifetime(headers, response_time=T0, default_ttl=ttl) == expected


# --- age (RFC 9111 §4.2.3) and freshness ---------------------------------------------------------

AGE_TABLE = [
    # age_value, date_value, request_time, response_time, now, expected current age
    (0, T0, T0, T0, T0, 0.0),
    (0, T0, T0, T0, T0 + 30, 30.0),  # resident time
    (100, T0, T0, T0, T0 + 30, 130.0),  # upstream Age counts
    (0, T0 - 50, T0, T0, T0, 50.0),  # apparent age from a Date in the past
    (10, T0, T0, T0 + 2, T0 + 2, 12.0),  # response delay corrects Age
    (0, T0 + 100, T0, T0, T0, 0.0),  # a Date in the future never makes age negative
    (0, None, T0, T0, T0 + 5, 5.0),  # no Date: response_time stands in
]


@pytest.mark.parametrize(("age", "dv", "req", "resp", "now", "expected"), AGE_TABLE)
def test_current_age(
    age: float, dv: float | None, req: float, resp: float, now: float, expected: float
) -> None:
    assert current_age(AgeInputs(age, dv, req, resp), now) == expected


FRESH_TABLE = [(60.0, 0.0, True), (60.0, 59.9, True), (60.0, 60.0, False), (None, 0.0, False)]


@pytest.mark.parametrize(("lifetime", "age", "expected"), FRESH_TABLE)
def test_is_fresh(lifetime: float | None, age: float, expected: bool) -> None:
    assert is_fresh(lifetime, age) is expected


# --- conditional and Range selection (RFC 9110 §13, §14) -----------------------------------------

ETAG = '"abc"'
LM = T0
SELECT_TABLE = [
    # method, request headers, expected outcome, expected range
    ("GET", {}, Outcome.FULL, None),
    ("GET", {"if-none-match": ETAG}, Outcome.NOT_MODIFIED, None),
    ("GET", {"if-none-match": f'"x", W/{ETAG}'}, Outcome.NOT_MODIFIED, None),  # weak compare
    ("GET", {"if-none-match": "*"}, Outcome.NOT_MODIFIED, None),
    ("HEAD", {"if-none-match": ETAG}, Outcome.NOT_MODIFIED, None),
    ("GET", {"if-none-match": '"other"'}, Outcome.FULL, None),
    ("GET", {"if-modified-since": date(LM)}, Outcome.NOT_MODIFIED, None),
    ("GET", {"if-modified-since": date(LM - 1)}, Outcome.FULL, None),
    ("GET", {"if-modified-since": "garbage"}, Outcome.FULL, None),
    # If-None-Match present: If-Modified-Since is ignored (§13.1.3)
    ("GET", {"if-none-match": '"other"', "if-modified-since": date(LM)}, Outcome.FULL, None),
    ("GET", {"range": "bytes=0-9"}, Outcome.PARTIAL, ByteRange(0, 9)),
    ("GET", {"range": "bytes=90-"}, Outcome.PARTIAL, ByteRange(90, 99)),
    ("GET", {"range": "bytes=-5"}, Outcome.PARTIAL, ByteRange(95, 99)),
    ("GET", {"range": "bytes=50-500"}, Outcome.PARTIAL, ByteRange(50, 99)),
    ("GET", {"range": "bytes=100-"}, Outcome.UNSATISFIABLE, None),
    ("GET", {"range": "bytes=200-300"}, Outcome.UNSATISFIABLE, None),
    ("GET", {"range": "bytes=0-1,5-6"}, Outcome.FULL, None),
    ("GET", {"range": "pages=1-2"}, Outcome.FULL, None),
    ("HEAD", {"range": "bytes=0-9"}, Outcome.FULL, None),  # Range is GET-only (§14.2)
    ("GET", {"range": "bytes=0-9", "if-range": ETAG}, Outcome.PARTIAL, ByteRange(0, 9)),
    ("GET", {"range": "bytes=0-9", "if-range": '"old"'}, Outcome.FULL, None),
    ("GET", {"range": "bytes=0-9", "if-range": f"W/{ETAG}"}, Outcome.FULL, None),  # weak
    ("GET", {"range": "bytes=0-9", "if-range": date(LM)}, Outcome.PARTIAL, ByteRange(0, 9)),
    ("GET", {"range": "bytes=0-9", "if-range": date(LM - 5)}, Outcome.FULL, None),
]


@pytest.mark.parametrize(("method", "headers", "outcome", "rng"), SELECT_TABLE)
def test_select(
    method: str, headers: dict[str, str], outcome: Outcome, rng: ByteRange | None
) -> None:
    sel = conditional.select(method, headers, size=100, etag=ETAG, last_modified=LM)
    assert sel.outcome is outcome
    assert sel.range == rng


# --- origin caching headers ----------------------------------------------------------------------

ORIGIN_CC_TABLE = [
    (["1", "seg-0-00001.m4s"], origin_policy.IMMUTABLE),
    (["1", "master.m3u8"], origin_policy.IMMUTABLE),
    (["12", "v0", "init.mp4"], origin_policy.IMMUTABLE),
    (["1", "poster.jpg"], origin_policy.IMMUTABLE),
    (["current.json"], origin_policy.SHORT),
    (["latest", "master.m3u8"], origin_policy.SHORT),
    (["1"], origin_policy.SHORT),  # the version itself is not an object under it
]


@pytest.mark.parametrize(("rest", "expected"), ORIGIN_CC_TABLE)
def test_origin_cache_control(rest: list[str], expected: str) -> None:
    assert origin_policy.cache_control(rest) == expected


CONTENT_TYPE_TABLE = [
    ("master.m3u8", "application/vnd.apple.mpegurl"),
    ("manifest.mpd", "application/dash+xml"),
    ("seg-0-00001.m4s", "video/iso.segment"),
    ("init.MP4", "video/mp4"),
    ("poster.jpg", "image/jpeg"),
    ("subs.vtt", "text/vtt"),
    ("data.bin", "application/octet-stream"),
    ("noext", "application/octet-stream"),
    (".m3u8", "application/octet-stream"),
]


@pytest.mark.parametrize(("name", "expected"), CONTENT_TYPE_TABLE)
def test_origin_content_type(name: str, expected: str) -> None:
    assert origin_policy.content_type(name) == expected


# --- edge JWKS refresh rule ----------------------------------------------------------------------

REFRESH_TABLE = [
    # held, kid known, last fetch, now, expected
    (False, False, None, 100.0, True),  # first need
    (True, True, 0.0, 100.0, False),  # nothing to learn
    (True, False, 98.0, 100.0, False),  # unknown kid but fetched 2 s ago
    (True, False, 95.0, 100.0, True),  # unknown kid, 5 s passed
    (False, False, 97.0, 100.0, False),  # control failed 3 s ago: wait
]


@pytest.mark.parametrize(("held", "known", "last", "now", "expected"), REFRESH_TABLE)
def test_should_refresh(
    held: bool, known: bool, last: float | None, now: float, expected: bool
) -> None:
    assert should_refresh(held, known, last, now, 5.0) is expected
