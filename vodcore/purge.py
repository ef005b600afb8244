"""Purges: what an operator may ask for, and which cached objects a purge covers (pure).

Rules:
- a purge names exactly one kind of target: a video (`videoId`), surrogate keys
  (`surrogateKeys`, the `Surrogate-Key` values the origin sends: the video id for media), path
  prefixes (`prefix`, absolute paths), or everything (`all: true`); anything else is a 4xx;
- a video purge covers every cached object under `/v/{videoId}/` (all versions, all variants)
  and every object whose Surrogate-Key names the video; a key purge covers objects whose
  space-separated Surrogate-Key list names one of the keys; a prefix purge covers keys that
  start with it;
- `soft: true` marks the objects stale (the next use revalidates) instead of dropping them.

Actions (what else a log entry means, besides the objects it covers):
- `purge` (the default): only the objects;
- `block` and `delete` (takedowns; kind `video` and a `cutoff` required): the videos' objects
  are dropped and their tokens issued before `cutoff` are void at every edge;
- `unblock` and `restore` (kind `video`, no cutoff): the takedown is lifted; caches drop nothing
  (`drops_objects` is False, `covers` is always False) and tokens issued before the cutoff stay
  void. The origin, which follows the log too, stops refusing the videos' objects;
- `restrict` (kind `video`, a `cutoff` required; issue 11): the video was made private or
  unlisted. Like a takedown, its objects are dropped and its tokens issued before `cutoff` are
  void at every edge; unlike one, nothing refuses the video (the origin ignores the entry), so
  whoever may still see it plays it with a new token;
- `keys` (kind `none`): the signing key set changed, edges refetch it.
An action this code does not know is malformed (`from_json` raises), so a node too old for a
log makes it resynchronise rather than skip a takedown: upgrade nodes before control.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vodcore.errors import VALIDATION, ApiError

KINDS = ("video", "keys", "prefix", "all", "none")  # none: a log entry that purges nothing
TAKEDOWNS = ("block", "delete")  # void older tokens (cutoff), drop the objects
RESTRICT = "restrict"  # a video made private/unlisted: the same, but nothing is refused
CUTOFFS = (*TAKEDOWNS, RESTRICT)  # the entries that carry a token cutoff
LIFTS = ("unblock", "restore")  # lift a takedown: nothing dropped, no cutoff
ACTIONS = ("purge", "keys", *CUTOFFS, *LIFTS)
_ID = re.compile(r"[A-Za-z0-9_~.-]{1,80}\Z")  # \Z: "$" would admit a trailing newline
MAX_TARGETS = 100


@dataclass(frozen=True, slots=True)
class Purge:
    seq: int
    id: str
    kind: str
    targets: tuple[str, ...]
    soft: bool = False
    # "block"/"delete"/"restrict": also void the videos' tokens issued before `cutoff`; "unblock"/
    # "restore": the takedown is lifted (nothing dropped); "keys": the signing key set changed
    # (rotation, revocation), edges refetch it
    action: str = "purge"
    cutoff: float | None = None

    @property
    def drops_objects(self) -> bool:
        """False for entries that lift a takedown: caches keep everything."""
        return self.action not in LIFTS

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "seq": self.seq,
            "purgeId": self.id,
            "kind": self.kind,
            "targets": list(self.targets),
            "soft": self.soft,
        }
        if self.action != "purge":
            doc["action"], doc["cutoff"] = self.action, self.cutoff
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Purge:
        """Parse a purge from the stream; ValueError on anything malformed."""
        if not isinstance(doc, dict):
            raise ValueError("a purge is a JSON object")
        seq, pid, kind, targets = (
            doc.get("seq"),
            doc.get("purgeId"),
            doc.get("kind"),
            doc.get("targets"),
        )
        if type(seq) is not int or seq < 1 or not isinstance(pid, str) or kind not in KINDS:
            raise ValueError("bad seq, purgeId or kind")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError("bad targets")
        action, cutoff = doc.get("action", "purge"), doc.get("cutoff")
        if (
            action not in ACTIONS
            or (action in CUTOFFS and (kind != "video" or not _number(cutoff)))
            or (action in LIFTS and (kind != "video" or cutoff is not None))
        ):
            raise ValueError("bad action or cutoff")
        return cls(
            seq, pid, kind, tuple(targets), bool(doc.get("soft", False)), action,
            float(cutoff) if cutoff is not None else None,
        )  # fmt: skip


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def parse_request(doc: Any) -> tuple[str, tuple[str, ...], bool]:
    """(kind, targets, soft) of a `POST /v1/purges` body, or ApiError(422)."""
    if not isinstance(doc, dict):
        raise ApiError(VALIDATION, "the body must be a JSON object")
    given = [k for k in ("videoId", "surrogateKeys", "prefix", "all") if doc.get(k) is not None]
    if len(given) != 1:
        raise ApiError(VALIDATION, "name exactly one target: videoId, surrogateKeys, prefix or all")
    soft = doc.get("soft", False)
    if not isinstance(soft, bool):
        raise ApiError(VALIDATION, "soft: must be true or false")
    field = given[0]
    value = doc[field]
    if field == "all":
        if value is not True:
            raise ApiError(VALIDATION, "all: must be true")
        return "all", (), soft
    values = value if isinstance(value, list) else [value]
    if not values or len(values) > MAX_TARGETS or not all(isinstance(v, str) for v in values):
        raise ApiError(VALIDATION, f"{field}: one to {MAX_TARGETS} strings")
    if field == "prefix":
        if not all(v.startswith("/") and "\x00" not in v and len(v) <= 1024 for v in values):
            raise ApiError(VALIDATION, "prefix: absolute paths starting with /")
        return "prefix", tuple(values), soft
    if not all(_ID.match(v) for v in values):
        raise ApiError(VALIDATION, f"{field}: ids of letters, digits and ._~-")
    return ("video" if field == "videoId" else "keys"), tuple(values), soft


def covers(purge: Purge, key: str, surrogate_keys: str | None) -> bool:
    """Does `purge` cover the cached object stored under `key` with this Surrogate-Key?"""
    if not purge.drops_objects:
        return False
    if purge.kind == "all":
        return True
    if purge.kind == "none":
        return False
    if purge.kind == "prefix":
        return any(key.startswith(p) for p in purge.targets)
    names = set(surrogate_keys.split()) if surrogate_keys else set()
    if purge.kind == "keys":
        return not names.isdisjoint(purge.targets)
    # video
    return any(key.startswith(f"/v/{vid}/") or vid in names for vid in purge.targets)
