"""Circuit breaker for one upstream, pure: outcomes and `now` in, "may I send?" out.

States and transitions (the table `TRANSITIONS` below is the whole state machine):

    CLOSED ──TRIP──▶ OPEN ──COOLED──▶ HALF_OPEN ──SUCCESS──▶ CLOSED
                      ▲                   │
                      └─────FAILURE───────┘  (cool-down doubles, up to max_cooldown)

Rules:
- CLOSED passes everything. A failure becomes TRIP (→ OPEN) when it makes `failures`
  consecutive failures, or when the failure share of the last `window` outcomes reaches
  `failure_rate` with at least `min_calls` of them recorded (an upstream failing every other
  request never reaches the consecutive count). A success resets the consecutive count.
- OPEN refuses until `cooldown` has passed since it opened; the first `allow(now)` after that
  is COOLED (→ HALF_OPEN) and is granted as the probe.
- HALF_OPEN lets exactly one probe through. Its success closes the breaker and resets the
  cool-down; its failure reopens it with the cool-down doubled (capped at `max_cooldown`).
  A probe that is granted but never reported (the caller chose another upstream, or was
  cancelled) is a lease: after `probe_timeout` the next `allow` is granted as a new probe.
- Outcomes arriving while OPEN come from requests sent before it opened; they change nothing
  (a late success from an overloaded upstream must not close the breaker and make it flap).
- `now` is any monotonic clock in seconds, always passed in; nothing here reads a clock.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass


class State(enum.IntEnum):
    # IntEnum: the value is what the `vod_upstream_breaker_state` gauge exports.
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class Event(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"  # a failure that does not reach the trip threshold
    TRIP = "trip"  # a failure that reaches it
    COOLED = "cooled"  # allow() after the cool-down elapsed


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.CLOSED, Event.SUCCESS): State.CLOSED,
    (State.CLOSED, Event.FAILURE): State.CLOSED,
    (State.CLOSED, Event.TRIP): State.OPEN,
    (State.CLOSED, Event.COOLED): State.CLOSED,  # not produced; listed so the table is total
    (State.OPEN, Event.SUCCESS): State.OPEN,  # late outcomes: see the module rules
    (State.OPEN, Event.FAILURE): State.OPEN,
    (State.OPEN, Event.TRIP): State.OPEN,
    (State.OPEN, Event.COOLED): State.HALF_OPEN,
    (State.HALF_OPEN, Event.SUCCESS): State.CLOSED,
    (State.HALF_OPEN, Event.FAILURE): State.OPEN,
    (State.HALF_OPEN, Event.TRIP): State.OPEN,
    (State.HALF_OPEN, Event.COOLED): State.HALF_OPEN,  # not produced
}


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failures: int = 5  # consecutive failures that open the breaker
    failure_rate: float = 0.5  # ...or this share of failures in the window
    window: int = 20  # outcomes remembered for the rate
    min_calls: int = 10  # outcomes needed before the rate counts
    cooldown: float = 1.0  # seconds OPEN before the first probe
    max_cooldown: float = 30.0  # cap of the doubling after failed probes
    probe_timeout: float = 10.0  # an unreported probe is given up after this long

    def __post_init__(self) -> None:
        if self.failures < 1 or self.window < 1 or self.min_calls < 1:
            raise ValueError("failures, window and min_calls must be >= 1")
        if not 0 < self.failure_rate <= 1:
            raise ValueError("failure_rate must be in (0, 1]")
        if not 0 < self.cooldown <= self.max_cooldown or self.probe_timeout <= 0:
            raise ValueError("need 0 < cooldown <= max_cooldown and probe_timeout > 0")


class CircuitBreaker:
    def __init__(self, policy: BreakerPolicy | None = None) -> None:
        self.policy = policy or BreakerPolicy()
        self.state = State.CLOSED
        self.consecutive = 0
        self.outcomes: deque[bool] = deque(maxlen=self.policy.window)  # True = failure
        self.cooldown = self.policy.cooldown  # the cool-down of the current/next OPEN
        self.open_until = 0.0
        self.probe_deadline = 0.0  # HALF_OPEN: when the granted probe's lease runs out

    # Queries -------------------------------------------------------------------------------
    def allow(self, now: float) -> bool:
        """May a request be sent now? In OPEN/HALF_OPEN a True is the (single) probe."""
        match self.state:
            case State.CLOSED:
                return True
            case State.OPEN:
                if now < self.open_until:
                    return False
                self._apply(Event.COOLED, now)
                return True
            case State.HALF_OPEN:
                if now < self.probe_deadline:
                    return False  # the probe is out; wait for its outcome
                self.probe_deadline = now + self.policy.probe_timeout  # lease ran out: new probe
                return True

    # Outcomes ------------------------------------------------------------------------------
    def record_success(self, now: float) -> None:
        self._apply(Event.SUCCESS, now)

    def record_failure(self, now: float) -> None:
        self._apply(self._classify_failure(), now)

    def _classify_failure(self) -> Event:
        if self.state is not State.CLOSED:
            return Event.FAILURE
        p = self.policy
        consecutive = self.consecutive + 1
        failed = sum(self.outcomes) + 1
        seen = min(len(self.outcomes) + 1, p.window)
        if len(self.outcomes) == p.window and self.outcomes[0]:
            failed -= 1  # the oldest outcome falls out of the window as this one enters
        if consecutive >= p.failures or (seen >= p.min_calls and failed >= p.failure_rate * seen):
            return Event.TRIP
        return Event.FAILURE

    # The driver: one table lookup, then the bookkeeping of the state entered ----------------
    def _apply(self, event: Event, now: float) -> None:
        before = self.state
        after = TRANSITIONS[(before, event)]
        if before is State.CLOSED and event in (Event.SUCCESS, Event.FAILURE):
            failed = event is Event.FAILURE
            self.outcomes.append(failed)
            self.consecutive = self.consecutive + 1 if failed else 0
        self.state = after
        if after is before:
            return
        match after:
            case State.OPEN:
                if before is State.HALF_OPEN:  # a failed probe: back off further
                    self.cooldown = min(self.cooldown * 2, self.policy.max_cooldown)
                self.open_until = now + self.cooldown
                self.consecutive = 0
                self.outcomes.clear()
            case State.HALF_OPEN:
                self.probe_deadline = now + self.policy.probe_timeout
            case State.CLOSED:
                self.cooldown = self.policy.cooldown
                self.consecutive = 0
                self.outcomes.clear()
