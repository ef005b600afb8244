"""Pure parts of engagement: playback-event validation, the view rule, the stored form of a
batch and its merge, the aggregator's rules for taking table rows and trimming the stream,
cursors."""

from __future__ import annotations

import itertools
import math
from typing import Any

import orjson
import pytest

from control.engagement import (
    AGGREGATE_BATCH,
    MAX_BATCH,
    STREAM_READ_MAX,
    PlaybackEvent,
    Sessions,
    Watch,
    comment_text,
    counts_as_view,
    decode_cursor,
    encode_cursor,
    entries_to_read,
    merge_batch,
    merge_entries,
    merge_events,
    page_limit,
    parse_event,
    parse_events,
    parse_time,
    settled_prefix,
    trim_floor,
    watch_of,
)
from vodcore.db.engagement_schema import encode_batch
from vodcore.errors import ApiError

VID = "vid_aaaaaaaaaaaaaaaa"
MAX_POSITION_S = 7 * 86400.0


def ev(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "eventId": "e1",
        "videoId": VID,
        "sessionId": "s1",
        "eventType": "heartbeat",
        "positionSeconds": 1.5,
        "occurredAt": "2024-05-01T12:00:00Z",
    }
    doc.update(over)
    return doc


def status(doc: Any) -> int:
    with pytest.raises(ApiError) as e:
        parse_events(doc)
    return e.value.kind.status


def test_single_event_and_batch_parse() -> None:
    (one,) = parse_events(ev())
    assert one == PlaybackEvent("e1", VID, "s1", "heartbeat", 1.5, 1714564800.0)
    batch = parse_events({"events": [ev(eventId=f"e{i}") for i in range(MAX_BATCH)]})
    assert len(batch) == MAX_BATCH


def test_duplicate_event_ids_in_a_batch_are_kept_once() -> None:
    got = parse_events({"events": [ev(), ev(positionSeconds=9), ev(eventId="e2")]})
    assert [(e.event_id, e.position) for e in got] == [("e1", 1.5), ("e2", 1.5)]


@pytest.mark.parametrize(
    "doc",
    [
        [ev()],  # a bare list
        "x",
        {"events": "nope"},
        {"events": []},
        {"events": [ev()], "extra": 1},
        ev(extra=1),
        ev(eventId=""),
        ev(eventId="x" * 129),
        ev(eventId="bad id"),
        ev(eventId=7),
        ev(videoId="not-a-video"),
        ev(sessionId=None),
        ev(eventType="click"),
        ev(eventType=["start"]),
        ev(positionSeconds=-1),
        ev(positionSeconds="3"),
        ev(positionSeconds=True),
        ev(positionSeconds=math.inf),
        ev(positionSeconds=10**400),
        ev(positionSeconds=1e9),
        ev(occurredAt="yesterday"),
        ev(occurredAt=None),
        ev(occurredAt=False),
        ev(occurredAt=-5),
        ev(occurredAt="9" * 100),
        ev(occurredAt=math.nan),
        ev(occurredAt=math.inf),
        ev(occurredAt=5e10),  # past 2286 in seconds, too early in milliseconds
        ev(positionSeconds=math.nan),
        ev(videoId=["vid_aaaaaaaaaaaaaaaa"]),
        ev(sessionId={"s": 1}),
        ev(eventId=None),
        {k: v for k, v in ev().items() if k != "occurredAt"},
        {"events": [ev(), ev(eventId="e2", positionSeconds="x")]},  # one bad → all refused
    ],
)
def test_bad_events_are_4xx(doc: Any) -> None:
    assert 400 <= status(doc) < 500


def test_a_session_id_is_not_taken_for_a_video_id() -> None:
    # the fast path remembers ids it matched within a request: per kind, not across kinds
    assert status({"events": [ev(sessionId="abc"), ev(eventId="e2", videoId="abc")]}) == 422
    assert status({"events": [ev(), ev(eventId="e2", sessionId="bad id")]}) == 422


def test_the_fast_path_agrees_with_parse_event() -> None:
    items = [
        ev(),
        ev(eventId="e2", positionSeconds=3, occurredAt=1714564800),  # integers
        ev(eventId="e3", occurredAt=1714564800123),  # milliseconds
        ev(eventId="e4", occurredAt="2024-05-01T14:00:00+02:00"),
        ev(eventId="e5", sessionId=VID, eventType="start", positionSeconds=0.0),
        ev(eventId="e6", positionSeconds=MAX_POSITION_S, occurredAt=9_999_999_999.5),
    ]
    got = parse_events({"events": items})
    assert got == [parse_event(d) for d in items]
    assert all(type(e.position) is float and type(e.occurred_at) is float for e in got)
    assert got[1] == PlaybackEvent("e2", VID, "s1", "heartbeat", 3.0, 1714564800.0)


def test_the_seeds_example_event_parses() -> None:
    """The seed's example: no eventId, `play_started`; the id made of its fields keeps
    distinct events apart and merges identical ones."""
    seed = {
        "videoId": VID,
        "sessionId": "ps_44",
        "eventType": "play_started",
        "positionSeconds": 0,
        "occurredAt": "2026-04-26T18:16:03Z",
    }
    (one,) = parse_events(seed)
    assert (one.video_id, one.session_id, one.event_type, one.position) == (
        VID,
        "ps_44",
        "play_started",
        0.0,
    )
    later = {**seed, "eventType": "heartbeat", "positionSeconds": 10}
    assert len(parse_events({"events": [seed, later, seed]})) == 2


def test_too_many_events_is_413() -> None:
    assert status({"events": [ev(eventId=f"e{i}") for i in range(MAX_BATCH + 1)]}) == 413


def test_times_iso_epoch_and_milliseconds() -> None:
    assert parse_time("2024-05-01T12:00:00+00:00") == 1714564800.0
    assert parse_time("2024-05-01T14:00:00+02:00") == 1714564800.0
    assert parse_time("2024-05-01T12:00:00") == 1714564800.0  # naive is UTC
    assert parse_time(1714564800) == 1714564800.0
    assert parse_time(1714564800123) == pytest.approx(1714564800.123)


def _session(points: list[tuple[float, float]], sid: str = "s") -> list[PlaybackEvent]:
    return [
        PlaybackEvent(f"{sid}{i}", VID, sid, "heartbeat", pos, at)
        for i, (pos, at) in enumerate(points)
    ]


def test_heartbeats_past_the_minimum_count() -> None:
    evs = _session([(0, 100), (5, 105), (10, 110), (12, 112)])
    assert counts_as_view(evs, 10)
    assert not counts_as_view(evs[:2], 10)
    assert counts_as_view(evs[:3], 10)  # exactly the minimum counts


def test_under_the_minimum_does_not_count() -> None:
    assert not counts_as_view(_session([(0, 0), (9.9, 9.9)]), 10)
    assert not counts_as_view([], 10)


def test_a_seek_to_the_end_is_not_watching() -> None:
    assert not counts_as_view(_session([(0, 0), (3600, 1), (3601, 2)]), 10)


def test_a_paused_player_is_not_watching() -> None:
    assert not counts_as_view(_session([(3, 0), (3, 60), (4, 600)]), 10)


def test_order_and_duplicates_do_not_matter() -> None:
    evs = _session([(0, 0), (4, 4), (8, 8), (11, 11)])
    want = watch_of(evs)
    for perm in itertools.permutations(evs + evs[:2]):
        assert watch_of(perm) == want
    assert want is not None and want.watched_seconds == 11


def test_merge_is_idempotent_and_commutative() -> None:
    a, b = Watch(0, 5, 10, 15), Watch(3, 20, 12, 40)
    assert a.merge(b) == b.merge(a) == a.merge(b).merge(b).merge(a)
    assert a.merge(a) == a


def test_the_minimum_is_configurable() -> None:
    evs = _session([(0, 0), (3, 3)])
    assert counts_as_view(evs, 3) and not counts_as_view(evs, 3.5)


def test_cursor_round_trip_and_garbage() -> None:
    for seq in (1, 42, 10**15):
        assert decode_cursor(encode_cursor(seq)) == seq
    for bad in ("", "x", "!!!!", encode_cursor(5) + "A", "YzEuMA", "a" * 200, "YzEuLTE"):
        with pytest.raises(ApiError) as e:
            decode_cursor(bad)
        assert e.value.kind.status == 400


def test_page_limit() -> None:
    assert page_limit(None) == 20 and page_limit("100") == 100
    for bad in ("0", "101", "-1", "x", "1.5"):
        with pytest.raises(ApiError):
            page_limit(bad)


def test_comment_text() -> None:
    assert comment_text({"text": "  héllo 🎬 世界 "}) == "héllo 🎬 世界"
    assert comment_text({"text": "🎬" * 5000}) == "🎬" * 5000
    for bad in ({"text": ""}, {"text": "   "}, {"text": 3}, {"text": "a\x00"}, {},
                {"text": "x", "y": 1}, {"text": "a" * 5001}, ["text"]):  # fmt: skip
        with pytest.raises(ApiError) as e:
            comment_text(bad)
        assert e.value.kind.status == 422


def _by_session(events: list[PlaybackEvent]) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = {}
    for key in {(e.video_id, e.session_id) for e in events}:
        w = watch_of(e for e in events if (e.video_id, e.session_id) == key)
        assert w is not None
        out[key] = [w.min_position, w.max_position, w.first_at, w.last_at]
    return out


def test_a_stored_batch_merges_as_watch_does() -> None:
    # floats, as validation makes them (a stored integer is damage: see below)
    events = _session([(5.0, 105.0), (0.0, 100.0), (12.0, 112.0), (3.0, 103.0)], "a")
    events += _session([(7.0, 50.0), (7.0, 40.0)], "b")
    body = encode_batch(events)
    assert orjson.loads(body)[0] == ["a0", VID, "a", "heartbeat", 5.0, 105.0]
    sessions: Sessions = {}
    assert merge_batch(sessions, body) == len(events)
    assert sessions == _by_session(events)
    # merging more (a duplicate, any order) is merging the union
    assert merge_events(sessions, list(reversed(events[:3]))) == 3
    assert sessions == _by_session(events)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"a": 1}',
        b"[[1, 2]]",
        b'[["e", "vid_aaaaaaaaaaaaaaaa", "s", "heartbeat", "1", 2.0]]',
        b'[["e", "vid_aaaaaaaaaaaaaaaa", 7, "heartbeat", 1.0, 2.0]]',
        b'[["e", ["v"], "s", "heartbeat", 1.0, 2.0]]',
    ],
)
def test_a_damaged_batch_is_refused_before_sql(body: bytes) -> None:
    with pytest.raises((TypeError, ValueError)):
        merge_batch({}, body)


def test_rows_after_a_hole_wait_until_settled() -> None:
    now = 1000.0
    fresh, old = now - 0.5, now - 5
    # no hole: everything at once, however fresh
    assert settled_prefix(7, [(8, fresh, 10), (9, fresh, 10)], now, 2, 100) == (9, 20)
    # a hole (10 missing): stop before the fresh row after it
    assert settled_prefix(7, [(8, fresh, 10), (11, fresh, 10), (12, fresh, 1)], now, 2, 100) == (
        8,
        10,
    )
    # ... but take it once old enough (10 was rolled back), then go on without holes
    assert settled_prefix(8, [(11, old, 10), (12, fresh, 1)], now, 2, 100) == (12, 11)
    assert settled_prefix(7, [], now, 2, 100) == (7, 0)
    assert settled_prefix(0, [(3, fresh, 1)], now, 0, 100) == (3, 1)  # SQLite: no waiting
    # at most max_events, but at least one row
    assert settled_prefix(0, [(1, old, 60), (2, old, 60)], now, 2, 100) == (2, 120)
    assert settled_prefix(0, [(1, old, 60), (2, old, 60), (3, old, 1)], now, 2, 100) == (2, 120)
    assert settled_prefix(0, [(1, old, 500), (2, old, 1)], now, 2, 100) == (1, 500)


def test_the_stream_is_trimmed_below_what_every_group_acknowledged() -> None:
    assert trim_floor([]) is None  # nobody consumes it: keep everything
    assert trim_floor([(b"0-0", None)]) == (0, 1)  # nothing delivered: nothing goes
    assert trim_floor([(b"1700-3", None)]) == (1700, 4)  # all acknowledged, 1700-3 included
    assert trim_floor([(b"1700-3", b"1650-0")]) == (1650, 0)  # the oldest pending stays
    assert trim_floor([(b"1700-3", None), ("1600-9", None)]) == (1600, 10)  # the slowest group


def test_stream_reads_follow_the_events_per_entry() -> None:
    assert entries_to_read(0, 0) == min(STREAM_READ_MAX, AGGREGATE_BATCH)
    assert entries_to_read(10, 5000) == AGGREGATE_BATCH // 500
    assert entries_to_read(10, 10) == min(STREAM_READ_MAX, AGGREGATE_BATCH)
    assert entries_to_read(1, 10**9) == 1


def test_stream_entries_batched_legacy_damaged_and_trimmed() -> None:
    a = _session([(0.0, 100.0), (11.0, 111.0)], "a")
    legacy = {**ev(sessionId="b", positionSeconds=4.0), "occurredAt": 1714564800.5}
    entries = [
        (b"1-0", {b"b": encode_batch(a)}),
        (b"2-0", {b"e": orjson.dumps(legacy)}),  # one event, as releases before batches wrote
        (b"3-0", {b"b": b"[[1]]"}),  # damaged: acknowledged, not applied
        (b"4-0", None),  # trimmed while pending
    ]
    sessions: Sessions = {}
    assert merge_entries(sessions, entries) == ([b"1-0", b"2-0", b"3-0", b"4-0"], 3)
    assert sessions == {
        (VID, "a"): [0.0, 11.0, 100.0, 111.0],
        (VID, "b"): [4.0, 4.0, 1714564800.5, 1714564800.5],
    }
