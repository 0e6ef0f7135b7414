"""Retry schedules for deferred mail (pure: data and `now` in, a time or None out).

Connect's defaults: a message the mail farm deferred (4xx) is retried first after 30 minutes,
the wait doubling each time up to 24 hours, at most 10 attempts in all; after the last one
the target is failed. `RetryPolicy` carries those numbers (the manager builds it from
settings); `next_attempt` says when to try again, or None when it is time to give up.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RetryPolicy:
    first: timedelta = timedelta(minutes=30)  # wait before the first retry
    longest: timedelta = timedelta(hours=24)  # the wait stops doubling here
    attempts: int = 10  # hand-offs in all, the first one included

    def __post_init__(self) -> None:
        if self.first <= timedelta(0) or self.longest < self.first or self.attempts < 1:
            raise ValueError("retry policy needs 0 < first <= longest and attempts >= 1")


def retry_delay(policy: RetryPolicy, deferrals: int) -> timedelta:
    """The wait after the `deferrals`-th deferral (1 = the first): first, 2x, 4x ... capped."""
    if deferrals < 1:
        raise ValueError("deferrals counts from 1")
    # doubling stops once it passes `longest`: no huge powers of two for large counts
    delay = policy.first
    for _ in range(deferrals - 1):
        if delay >= policy.longest:
            break
        delay *= 2
    return min(delay, policy.longest)


def next_attempt(policy: RetryPolicy, attempts_made: int, now: datetime) -> datetime | None:
    """When to hand the message off again after `attempts_made` attempts that were all
    deferred, or None if the policy's attempts are used up (the target fails)."""
    if attempts_made >= policy.attempts:
        return None
    return now + retry_delay(policy, attempts_made)
