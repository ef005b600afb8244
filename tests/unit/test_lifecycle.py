"""The lifecycle table: every allowed move, and that everything else is refused."""

from __future__ import annotations

import pytest

from vodcore.lifecycle import TRANSITIONS, Event, IllegalTransition, State, next_state

S, E = State, Event

ALLOWED = [
    (S.UPLOADING, E.UPLOAD_COMPLETE, S.UPLOADED),
    (S.UPLOADED, E.PROCESSING_STARTED, S.PROCESSING),
    (S.PROCESSING, E.PUBLISHED, S.READY),
    (S.PROCESSING, E.FAILED, S.FAILED),
    (S.UPLOADED, E.FAILED, S.FAILED),
    (S.READY, E.PUBLISHED, S.READY),
    (S.READY, E.BLOCK, S.BLOCKED),
    (S.BLOCKED, E.DELETE, S.DELETED),
]


@pytest.mark.parametrize(("state", "event", "new"), ALLOWED)
def test_allowed(state: State, event: Event, new: State) -> None:
    assert next_state(state, event) is new


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (S.UPLOADING, E.PUBLISHED),
        (S.UPLOADING, E.PROCESSING_STARTED),
        (S.FAILED, E.PUBLISHED),
        (S.READY, E.UPLOAD_COMPLETE),
        (S.DELETED, E.BLOCK),
        (S.UPLOADED, E.PUBLISHED),
    ],
)
def test_refused(state: State, event: Event) -> None:
    with pytest.raises(IllegalTransition):
        next_state(state, event)


def test_ready_only_through_publish() -> None:
    # From any other state READY is reached only by a publish: nothing plays early.
    into_ready = {e for (s, e), new in TRANSITIONS.items() if new is S.READY and s is not S.READY}
    assert into_ready == {E.PUBLISHED}
