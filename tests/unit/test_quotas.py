"""control/quotas.py: the creation policy (quota, open-upload cap, operators exempt) and the
free-space check, as pure functions."""

from __future__ import annotations

import errno

import pytest

from control import quotas
from vodcore.errors import ApiError

LIMITS = quotas.Limits(quota_bytes=1000, max_sessions=2, min_free_bytes=100)


def code(e: pytest.ExceptionInfo[ApiError]) -> tuple[int, str]:
    return e.value.kind.status, e.value.kind.code


@pytest.mark.parametrize(
    ("stored", "reserved", "sessions", "declared", "want"),
    [
        (0, 0, 0, 1000, None),  # exactly the quota fits
        (0, 0, 0, 1001, (413, "quota_exceeded")),
        (600, 300, 1, 100, None),
        (600, 300, 1, 101, (413, "quota_exceeded")),  # stored and reserved both count
        (0, 0, 2, 1, (429, "too_many_uploads")),  # the cap first: it says what to do
        (2000, 0, 5, 1, (429, "too_many_uploads")),
    ],
)
def test_creator_limits(
    stored: int, reserved: int, sessions: int, declared: int, want: tuple[int, str] | None
) -> None:
    usage = quotas.Usage(stored, reserved, sessions)
    if want is None:
        quotas.check_creation(LIMITS, usage, declared, "creator")
        return
    with pytest.raises(ApiError) as e:
        quotas.check_creation(LIMITS, usage, declared, "creator")
    assert code(e) == want


def test_operators_and_zero_limits_are_unbounded() -> None:
    over = quotas.Usage(10**12, 10**12, 10**6)
    quotas.check_creation(LIMITS, over, 10**12, "operator")
    quotas.check_creation(quotas.Limits(0, 0, 0), over, 10**12, "creator")


def test_remaining_is_reported_and_never_negative() -> None:
    with pytest.raises(ApiError) as e:
        quotas.check_creation(LIMITS, quotas.Usage(1500, 0, 0), 1, "creator")
    assert e.value.extra["remainingBytes"] == 0


def test_space_keeps_the_headroom() -> None:
    quotas.check_space(LIMITS, 900, 1000)
    with pytest.raises(ApiError) as e:
        quotas.check_space(LIMITS, 901, 1000)
    assert code(e) == (507, "insufficient_storage")


def test_out_of_space_errors() -> None:
    assert quotas.is_out_of_space(OSError(errno.ENOSPC, "full"))
    assert quotas.is_out_of_space(OSError(errno.EDQUOT, "quota"))
    assert not quotas.is_out_of_space(OSError(errno.EIO, "io"))
    assert not quotas.is_out_of_space(ValueError())
    e = quotas.insufficient_storage("writing", 42)
    assert e.headers["Upload-Offset"] == "42" and e.kind.status == 507
