"""Sending rates shared by every composer: token buckets in the customer DB's rate_buckets.

Inputs: a customer-DB Engine, composer settings (rate_global, rate_per_domain,
domain_rates "domain=rate"), the recipient domain of each message, the clock.
Outputs: take(domain) -> 0.0 when the message may go now, else the seconds to wait; rows
of rate_buckets ("global", "domain:<domain>") updated.

One budget for all composers on all hosts: the tokens live in the database, not in a
process. To keep the database off the per-message path, a composer takes tokens in chunks
(about a tenth of a second's worth, at least 1) in one short transaction covering every
bucket it needs, and spends them locally; tokens it holds when it stops are lost, which
only ever errs on the slow side. A bucket refills at `rate` per second up to `burst` (one
second's worth), computed in that transaction from its `updated_at`. Rate 0 = unlimited:
with no limits configured this module never touches the database.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.dialects import postgresql, sqlite

from connectd.db.customer import RateBucket
from connectd.db.engine import writer

_R = RateBucket.__table__
GLOBAL = "global"
CHUNK_SECONDS = 0.1  # a chunk is this many seconds' worth of a bucket's rate


def parse_domain_rates(items: tuple[str, ...] | list[str]) -> dict[str, float]:
    """["gmail.com=50", ...] -> {"gmail.com": 50.0}; ValueError naming a bad item."""
    out = {}
    for item in items:
        domain, sep, rate = item.partition("=")
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if not sep or not domain.strip() or not math.isfinite(value) or value < 0:
            raise ValueError(f"composer.domain_rates: {item!r} is not \"domain=rate\"")
        out[domain.strip().lower()] = value
    return out


class RateLimiter:
    """Per-composer front of the shared buckets; not thread-safe (one per composer loop)."""

    def __init__(self, engine: Engine, rate_global: float = 0.0, rate_per_domain: float = 0.0,
                 domain_rates: tuple[str, ...] | list[str] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.rate_global = rate_global
        self.rate_per_domain = rate_per_domain
        self.domain_rates = parse_domain_rates(domain_rates)
        self.clock = clock
        self.enabled = bool(rate_global or rate_per_domain or any(self.domain_rates.values()))
        self._held: dict[str, int] = {}
        self.db_trips = 0  # transactions so far (tests and benchmarks read it)

    def _rate(self, domain: str) -> float:
        return self.domain_rates.get(domain, self.rate_per_domain)

    def take(self, domain: str) -> float:
        """One token from the global bucket and from `domain`'s: 0.0 if taken, else how
        long to wait before asking again (nothing is taken then)."""
        if not self.enabled:
            return 0.0
        needs = []
        if self.rate_global:
            needs.append((GLOBAL, self.rate_global))
        rate = self._rate(domain)
        if rate:
            needs.append((f"domain:{domain}", rate))
        missing = [(k, r) for k, r in needs if self._held.get(k, 0) < 1]
        wait = self._refill(missing) if missing else 0.0
        if any(self._held.get(k, 0) < 1 for k, _ in needs):
            return max(wait, 0.001)
        for k, _ in needs:
            self._held[k] -= 1
        return 0.0

    def _refill(self, needs: list[tuple[str, float]]) -> float:
        """Take a chunk for each bucket in one transaction; the longest wait for those that
        had none."""
        now = self.clock()
        wait = 0.0
        self.db_trips += 1
        with writer(self.engine).begin() as conn:
            for key, rate in sorted(needs):  # one lock order for every composer: no deadlock
                burst = max(1.0, rate)
                chunk = max(1, int(rate * CHUNK_SECONDS))
                tokens = self._bucket(conn, key, rate, burst, now)
                got = min(chunk, int(tokens))
                conn.execute(update(_R).where(_R.c.key == key).values(
                    tokens=tokens - got, updated_at=now, rate=rate, burst=burst))
                self._held[key] = self._held.get(key, 0) + got
                if got == 0:
                    wait = max(wait, (min(chunk, burst) - tokens) / rate)
        # jitter: composers that found the bucket empty together do not all come back at the
        # same instant, where the first would win every time
        return wait * random.uniform(0.7, 1.3)

    def _bucket(self, conn: Any, key: str, rate: float, burst: float, now: float) -> float:
        """The bucket's tokens as of `now` (created full if missing), its row locked."""
        stmt = select(_R.c.tokens, _R.c.updated_at).where(_R.c.key == key).with_for_update()
        row = conn.execute(stmt).first()
        if row is None:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            conn.execute(dialect.insert(_R).values(key=key, rate=rate, burst=burst,
                                                   tokens=burst, updated_at=now)
                         .on_conflict_do_nothing(index_elements=["key"]))
            row = conn.execute(stmt).first()
        elapsed = max(0.0, now - row.updated_at)  # another host's clock may run ahead
        return min(burst, row.tokens + elapsed * rate)
