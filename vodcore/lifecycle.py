"""Video lifecycle as a transition table (h11's _state.py is the model).

Rules:
- states: UPLOADING → UPLOADED → PROCESSING → READY, FAILED from UPLOADED/PROCESSING;
- a READY video can be reprocessed (a new version is published beside the old one);
- moderation moves any state to BLOCKED or DELETED, and `unblock`/`restore` go back to the
  state recorded before (the caller passes it);
- anything not in the table is an illegal transition, raised as `IllegalTransition`.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    UPLOADING = "UPLOADING"
    UPLOADED = "UPLOADED"
    PROCESSING = "PROCESSING"
    READY = "READY"
    FAILED = "FAILED"
    BLOCKED = "BLOCKED"
    DELETED = "DELETED"


class Event(StrEnum):
    UPLOAD_COMPLETE = "upload_complete"
    PROCESSING_STARTED = "processing_started"
    PUBLISHED = "published"
    FAILED = "failed"
    RETRY = "retry"
    BLOCK = "block"
    DELETE = "delete"


class IllegalTransition(ValueError):
    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"cannot {event.value} a video in state {state.value}")
        self.state = state
        self.event = event


S, E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.UPLOADING, E.UPLOAD_COMPLETE): S.UPLOADED,
    (S.UPLOADED, E.PROCESSING_STARTED): S.PROCESSING,
    (S.PROCESSING, E.PROCESSING_STARTED): S.PROCESSING,  # a retried job starts again
    (S.PROCESSING, E.PUBLISHED): S.READY,
    (S.READY, E.PROCESSING_STARTED): S.READY,  # a new version is built while READY serves
    (S.READY, E.PUBLISHED): S.READY,
    (S.UPLOADED, E.FAILED): S.FAILED,
    (S.PROCESSING, E.FAILED): S.FAILED,
    (S.FAILED, E.RETRY): S.UPLOADED,
    **{(s, E.BLOCK): S.BLOCKED for s in State if s is not S.DELETED},
    **{(s, E.DELETE): S.DELETED for s in State},
}


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


PLAYABLE = frozenset({State.READY})
