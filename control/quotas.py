"""Per-key storage quota, open-upload cap and free-space headroom: the policy an upload's
creation passes before a byte of it is read (issue 11, "Disk and quotas").

What a key uses (`Usage`, read by `control/uploads.py` in the creation's transaction):
- the declared sizes of its videos whose source is stored: every state but UPLOADING and
  DELETED (a FAILED or BLOCKED video still holds its source; a deleted one is no longer the
  creator's);
- the declared sizes of its open, unexpired upload sessions: the bytes they have reserved,
  whether or not they have arrived (an expired session's reservation goes with it).

Operators are exempt from the quota and the session cap; the free-space check applies to
everyone. A declared length over the remaining quota is 413 `quota_exceeded`, one session
more than the cap 429 `too_many_uploads`, a length the filesystem that will hold it cannot
take while keeping `min_free_bytes` free 507 `insufficient_storage` (RFC 4918 §11.5)."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from vodcore.errors import INSUFFICIENT_STORAGE, QUOTA_EXCEEDED, TOO_MANY_UPLOADS, ApiError

OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class Limits:
    quota_bytes: int  # 0: no quota
    max_sessions: int  # 0: no cap
    min_free_bytes: int


@dataclass(frozen=True, slots=True)
class Usage:
    stored_bytes: int  # sources of the key's videos (states past UPLOADING, not DELETED)
    reserved_bytes: int  # declared sizes of the key's open, unexpired upload sessions
    open_sessions: int

    @property
    def total(self) -> int:
        return self.stored_bytes + self.reserved_bytes


def check_creation(limits: Limits, usage: Usage, declared: int, role: str | None) -> None:
    """Raise the 413 / 429 of a creation of `declared` bytes by a key of `role` whose usage,
    this creation not included, is `usage`."""
    if role == OPERATOR or role is None:
        return
    if limits.max_sessions and usage.open_sessions >= limits.max_sessions:
        raise ApiError(
            TOO_MANY_UPLOADS,
            f"this key already has {usage.open_sessions} open uploads (at most "
            f"{limits.max_sessions}): finish or terminate one first",
            extra={"openUploads": usage.open_sessions, "maxOpenUploads": limits.max_sessions},
        )
    if limits.quota_bytes and usage.total + declared > limits.quota_bytes:
        remaining = max(0, limits.quota_bytes - usage.total)
        raise ApiError(
            QUOTA_EXCEEDED,
            f"the upload's {declared} bytes exceed what is left of this key's storage quota "
            f"({remaining} of {limits.quota_bytes} bytes)",
            extra={
                "sizeBytes": declared,
                "quotaBytes": limits.quota_bytes,
                "usedBytes": usage.total,
                "remainingBytes": remaining,
            },
        )


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_space(limits: Limits, needed: int, free: int) -> None:
    """507 if writing `needed` bytes would leave less than `min_free_bytes` of `free`."""
    if needed + limits.min_free_bytes > free:
        raise ApiError(
            INSUFFICIENT_STORAGE,
            f"the server has no room for {needed} more bytes; try again later",
            extra={"sizeBytes": needed},
        )


def insufficient_storage(what: str, offset: int | None = None) -> ApiError:
    """The answer to ENOSPC (or EDQUOT) met while writing: nothing committed is lost, and
    `offset` (the upload's, when there is one) is where the client resumes once there is
    room again."""
    extra = {} if offset is None else {"offset": offset}
    return ApiError(
        INSUFFICIENT_STORAGE,
        f"the server ran out of storage space while {what}; what was committed is kept: "
        "retry later" + ("" if offset is None else f" from offset {offset}"),
        headers={} if offset is None else {"Upload-Offset": str(offset)},
        extra=extra,
    )


def is_out_of_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
