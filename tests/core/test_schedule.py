"""Retry schedule for deferred mail: Connect's defaults and the edges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from connectd.core.schedule import RetryPolicy, next_attempt, retry_delay

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)


@pytest.mark.parametrize(("deferrals", "delay"), [
    (1, timedelta(minutes=30)), (2, H), (3, 2 * H), (4, 4 * H), (5, 8 * H), (6, 16 * H),
    (7, 24 * H), (8, 24 * H), (9, 24 * H), (1000, 24 * H),
])
def test_default_delays_double_up_to_a_day(deferrals: int, delay: timedelta) -> None:
    """30 min, then doubling, never more than 24 h (Connect's defaults)."""
    assert retry_delay(RetryPolicy(), deferrals) == delay


def test_ten_attempts_then_failed() -> None:
    """After the 10th deferred attempt there is no next attempt: the target fails."""
    policy = RetryPolicy()
    times = [next_attempt(policy, n, NOW) for n in range(1, 11)]
    assert all(t is not None for t in times[:9])
    assert times[9] is None
    assert times[0] == NOW + timedelta(minutes=30)


def test_whole_schedule_spans_about_five_days() -> None:
    """The nine waits of the default policy add up to 30 min + 1+2+4+8+16 h + 3 x 24 h."""
    total = sum((retry_delay(RetryPolicy(), n) for n in range(1, 10)), timedelta())
    assert total == timedelta(minutes=30) + 31 * H + 72 * H


@pytest.mark.parametrize("kwargs", [
    {"first": timedelta(0)}, {"first": 2 * H, "longest": H}, {"attempts": 0},
])
def test_bad_policy_refused(kwargs: dict) -> None:
    """A policy that cannot work is refused when it is made."""
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_deferrals_count_from_one() -> None:
    """Asking for the delay after zero deferrals is a caller's mistake."""
    with pytest.raises(ValueError):
        retry_delay(RetryPolicy(), 0)
