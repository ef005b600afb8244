"""Pure parts of engagement: playback-event validation, the view rule, cursors."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from control.engagement import (
    MAX_BATCH,
    PlaybackEvent,
    Watch,
    comment_text,
    counts_as_view,
    decode_cursor,
    encode_cursor,
    page_limit,
    parse_events,
    parse_time,
    watch_of,
)
from vodcore.errors import ApiError

VID = "vid_aaaaaaaaaaaaaaaa"


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
        {k: v for k, v in ev().items() if k != "occurredAt"},
        {"events": [ev(), ev(eventId="e2", positionSeconds="x")]},  # one bad → all refused
    ],
)
def test_bad_events_are_4xx(doc: Any) -> None:
    assert 400 <= status(doc) < 500


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
