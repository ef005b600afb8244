"""Who may see a video: the one rule `GET /v1/videos/{id}`, its playback and every engagement
call (likes, comments) share, so a video hidden from a caller is hidden the same way everywhere
(issue 11 finding 5: likes and comments used to ignore visibility).

Rules, in order:
- unknown → 404; BLOCKED → 451; DELETED → 410 (the same for everyone, so cacheable);
- public: anyone, no key needed (a key is not even checked);
- private: only its owner or an operator (`control.auth.may_manage`); anyone else, with or
  without a key (a bad or revoked one included), gets 404 exactly as for an unknown video, so
  a stranger cannot tell that it exists;
- unlisted: anyone with the id may see it (the link is the point of unlisted); to *play* it
  (`play=True`) needs the owner's or an operator's key: 401 without a key, 403 with another.
Any other state (UPLOADING…READY, FAILED) is visible as above: whether a call needs READY is the
caller's business (playback: 409).

`restricts(old, new)`: a visibility change that takes the video away from someone (public →
unlisted → private): `PATCH` then voids the tokens issued before it (`control.moderation.
restrict_tokens`), as a takedown does, so old URLs stop playing at every edge.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from control.auth import Principal, may_manage, optional_principal
from control.ids import is_id
from control.negcache import MISSING
from vodcore.errors import BLOCKED, FORBIDDEN, GONE, NOT_FOUND, UNAUTHENTICATED, ApiError
from vodcore.lifecycle import State

VideoRow = Mapping[Any, Any]  # a database row or the metadata cache's dict of one
Loader = Callable[[str], Awaitable[dict[str, Any] | None]]  # `MetaCache.get` and the like


# least to most restricted
_RANK = {"public": 0, "unlisted": 1, "private": 2}


def restricts(old: str, new: str) -> bool:
    """Whether changing visibility from `old` to `new` hides the video from someone."""
    return _RANK.get(new, 2) > _RANK.get(old, 2)


def refusal(state: str) -> ApiError | None:
    """The error for a negative answer: unknown, blocked, deleted; None for any other state."""
    if state == MISSING:
        return ApiError(NOT_FOUND, "no such video")
    if state == State.BLOCKED:
        return ApiError(BLOCKED, extra={"state": state})
    if state == State.DELETED:
        return ApiError(GONE, "the video was deleted", extra={"state": state})
    return None


def hidden() -> ApiError:
    return ApiError(NOT_FOUND, "no such video")


async def load_video(load: Loader, video_id: str) -> VideoRow:
    """The video's row, unless it is unknown, blocked or deleted (404, 451, 410)."""
    if not is_id(video_id, "vid"):
        raise hidden()
    v = await load(video_id)
    if v is None:
        raise hidden()
    if v["state"] != "READY" and (err := refusal(v["state"])) is not None:
        raise err
    return v


async def check_viewer(
    engine: AsyncEngine, request: web.Request, v: VideoRow, *, play: bool
) -> Principal | None:
    """Refuse a caller who may not see (or, with `play`, play) a non-public video. Returns the
    caller's key when it was read (non-public videos), None otherwise."""
    visibility = v["visibility"]
    if visibility == "public":
        return None
    try:
        principal = await optional_principal(engine, request)
    except ApiError as e:
        if visibility == "private" and e.kind in (UNAUTHENTICATED, FORBIDDEN):
            raise hidden() from None
        raise
    if may_manage(principal, v["owner_key_id"]):
        return principal
    if visibility == "private":
        raise hidden()
    if play:  # unlisted
        if principal is None:
            raise ApiError(
                UNAUTHENTICATED,
                "an unlisted video plays only for its owner or an operator",
                headers={"WWW-Authenticate": 'Bearer realm="vodstack"'},
            )
        raise ApiError(FORBIDDEN, "an unlisted video plays only for its owner or an operator")
    return principal


async def visible_video(
    load: Loader, engine: AsyncEngine, request: web.Request, video_id: str, *, play: bool
) -> tuple[VideoRow, Principal | None]:
    """`load_video` then `check_viewer`: the video as the caller may see it, and the caller's
    key when it was read."""
    v = await load_video(load, video_id)
    return v, await check_viewer(engine, request, v, play=play)
