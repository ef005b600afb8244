"""Which videos the origin refuses, from the takedown entries of the purge log (pure).

Rules:
- the origin replays the whole log in seq order (it keeps no state file), and applies only the
  takedown actions: `block` → the video is refused as blocked (451), `unblock` lifts a block,
  `delete` → refused as deleted (410), `restore` goes back to what the video was just before the
  delete (a video blocked, then deleted, then restored is blocked again: control's restore
  goes back to the state recorded before the delete, the same way);
- every other entry (purges, key changes) changes nothing here;
- the result after a full replay is exactly control's takedown state, because every change into
  or out of BLOCKED and DELETED appends one of these entries in the same transaction.
  Exception: logs written before `unblock` entries existed hold blocks whose unblocks left no
  entry; such a video stays refused until it is blocked and unblocked again.
"""

from __future__ import annotations

from typing import Literal

from vodcore.purge import Purge

Refusal = Literal["blocked", "deleted"]
ACTIONS = frozenset({"block", "unblock", "delete", "restore"})


def is_takedown_entry(p: Purge) -> bool:
    return p.action in ACTIONS


class Takedowns:
    def __init__(self) -> None:
        self._refused: dict[str, Refusal] = {}
        self._before_delete: dict[str, Refusal | None] = {}

    def apply(self, p: Purge) -> bool:
        """Apply one log entry; True if it was a takedown entry."""
        if p.action not in ACTIONS:
            return False
        for vid in p.targets:
            now = self._refused.get(vid)
            after: Refusal | None
            if p.action == "block":
                after = "blocked" if now != "deleted" else now  # control never blocks a deleted
            elif p.action == "unblock":
                after = None if now == "blocked" else now
            elif p.action == "delete":
                if now != "deleted":
                    self._before_delete[vid] = now
                after = "deleted"
            else:  # restore
                after = self._before_delete.pop(vid, None) if now == "deleted" else now
            if after is None:
                self._refused.pop(vid, None)
            else:
                self._refused[vid] = after
        return True

    def assume(self, refusals: dict[str, Refusal]) -> None:
        """Take control's current refusals (`/v1/cutoffs?refusals=1`) as known: for a node
        that resumes the log after the entries that made them. Later entries apply on top."""
        for vid, refusal in refusals.items():
            if refusal in ("blocked", "deleted"):
                self._refused[vid] = refusal

    def refusal(self, video_id: str) -> Refusal | None:
        return self._refused.get(video_id)

    def counts(self) -> dict[Refusal, int]:
        out: dict[Refusal, int] = {"blocked": 0, "deleted": 0}
        for r in self._refused.values():
            out[r] += 1
        return out
