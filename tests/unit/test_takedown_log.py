"""Takedown entries of the purge log (pure): parsing, what caches drop, what the origin refuses
after replaying the log."""

from __future__ import annotations

from typing import Any

import pytest

from origin.takedowns import Takedowns, is_takedown_entry
from vodcore.layout import restricted_key, restricted_prefix, unrestricted_key
from vodcore.purge import Purge, covers


def entry(seq: int, action: str, vid: str = "vid_a", cutoff: float | None = None) -> Purge:
    return Purge(seq, f"pg_{seq}", "video", (vid,), False, action, cutoff)


def doc(**kw: Any) -> dict[str, Any]:
    return {"seq": 1, "purgeId": "pg_1", "kind": "video", "targets": ["vid_a"], **kw}


@pytest.mark.parametrize(
    "action,cutoff",
    [("block", 10.0), ("delete", 10), ("unblock", None), ("restore", None), ("restrict", 10.0)],
)
def test_takedown_actions_round_trip(action: str, cutoff: float | None) -> None:
    p = entry(3, action, cutoff=cutoff)
    assert Purge.from_json(p.to_json()) == p


@pytest.mark.parametrize(
    "bad",
    [
        doc(action="delete"),  # no cutoff
        doc(action="delete", cutoff=True),  # not a number
        doc(action="block", cutoff=1.0, kind="all", targets=[]),  # takedowns name videos
        doc(action="unblock", cutoff=1.0),  # lifting has no cutoff
        doc(action="restore", kind="prefix", targets=["/v/"]),
        doc(action="restrict"),  # a restriction voids tokens: it needs its cutoff
        doc(action="restrict", cutoff=1.0, kind="prefix", targets=["/v/"]),
        doc(action="undelete"),  # unknown: the node resynchronises instead of skipping it
    ],
)
def test_malformed_takedown_entries_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Purge.from_json(bad)


def test_lifting_a_takedown_drops_nothing() -> None:
    for action in ("unblock", "restore"):
        p = entry(1, action)
        assert not p.drops_objects
        assert not covers(p, "/v/vid_a/1/seg.m4s", "vid_a")
    for action in ("block", "delete"):
        p = entry(1, action, cutoff=1.0)
        assert p.drops_objects and covers(p, "/v/vid_a/1/seg.m4s", None)
        assert not covers(p, "/v/vid_b/1/seg.m4s", "vid_b")


def replay(*entries: Purge) -> Takedowns:
    t = Takedowns()
    for p in entries:
        t.apply(p)
    return t


def test_replay_block_unblock_delete_restore() -> None:
    assert replay(entry(1, "block", cutoff=1)).refusal("vid_a") == "blocked"
    assert replay(entry(1, "block", cutoff=1), entry(2, "unblock")).refusal("vid_a") is None
    assert replay(entry(1, "delete", cutoff=1)).refusal("vid_a") == "deleted"
    assert replay(entry(1, "delete", cutoff=1), entry(2, "restore")).refusal("vid_a") is None
    # deleted while blocked, then restored: blocked again (control restores the state before)
    t = replay(entry(1, "block", cutoff=1), entry(2, "delete", cutoff=2), entry(3, "restore"))
    assert t.refusal("vid_a") == "blocked"
    t.apply(entry(4, "unblock"))
    assert t.refusal("vid_a") is None
    # a re-block keeps it blocked; other videos are untouched
    t = replay(entry(1, "block", cutoff=1), entry(2, "block", cutoff=2))
    assert t.refusal("vid_a") == "blocked" and t.refusal("vid_b") is None
    assert t.counts() == {"blocked": 1, "deleted": 0}


def test_lifts_without_a_takedown_and_other_entries_change_nothing() -> None:
    t = replay(entry(1, "unblock"), entry(2, "restore"))
    assert t.refusal("vid_a") is None
    t = replay(entry(1, "delete", cutoff=1), entry(2, "unblock"))  # unblock of a deleted
    assert t.refusal("vid_a") == "deleted"
    plain = Purge(3, "pg_3", "video", ("vid_a",))
    keys = Purge(4, "pg_4", "none", (), action="keys")
    assert not t.apply(plain) and not t.apply(keys)
    assert not is_takedown_entry(plain) and is_takedown_entry(entry(5, "restore"))
    assert t.refusal("vid_a") == "deleted"


def test_a_visibility_restriction_drops_objects_but_refuses_nothing() -> None:
    """Issue 11: a video made private or unlisted stays playable for whoever may see it, so
    its `restrict` entry voids older tokens and drops cached copies like a takedown, but the
    origin never refuses the video for it, not even for a moment."""
    p = entry(1, "restrict", cutoff=5.0)
    assert p.drops_objects and covers(p, "/v/vid_a/1/seg.m4s", None)
    t = replay(p)
    assert t.refusal("vid_a") is None and not is_takedown_entry(p)
    t = replay(entry(1, "block", cutoff=1), entry(2, "restrict", cutoff=2))  # stays blocked
    assert t.refusal("vid_a") == "blocked"


def test_restricted_layout() -> None:
    assert restricted_prefix("vid_a") == "restricted/media/vid_a/"
    key = "media/vid_a/1/seg-1.m4s"
    assert restricted_key(key) == "restricted/media/vid_a/1/seg-1.m4s"
    assert unrestricted_key(restricted_key(key)) == key
    for bad in ("source/vid_a/original", "restricted/source/vid_a/original"):
        with pytest.raises(ValueError):
            unrestricted_key(bad) if bad.startswith("restricted") else restricted_key(bad)
