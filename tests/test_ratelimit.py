"""Shared token buckets in rate_buckets: one budget across processes, chunks, unlimited."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from connectd.db.engine import make_engine
from connectd.ratelimit import RateLimiter, parse_domain_rates

_WORKER = """
import json, sys, time
from connectd.db.engine import make_engine
from connectd.ratelimit import RateLimiter
url, start, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
lim = RateLimiter(make_engine(url), rate_global=40)
while time.time() < start:
    time.sleep(0.001)
n = 0
while time.time() < start + seconds:
    wait = lim.take("example.com")
    if wait:
        time.sleep(max(0.0, min(wait, start + seconds - time.time())))
    else:
        n += 1
print(json.dumps({"taken": n, "trips": lim.db_trips}))
"""


def test_two_processes_share_one_budget(migrated_customer_url):
    """Two processes taking as fast as they can get 40/s between them, not 40/s each."""
    seconds = 1.0
    start = time.time() + 0.8  # both past their imports before the clock starts
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, migrated_customer_url,
                               str(start), str(seconds)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    results = [json.loads(out) for out, _ in outs]
    total = sum(r["taken"] for r in results)
    # the full bucket (40) + the refill over the run (40) + at most one chunk each in hand
    assert total <= 40 + 40 * seconds + 2 * 4
    assert total >= 40 + 40 * seconds * 0.5  # and not starved (a loaded machine is slower)
    assert all(r["taken"] > 0 for r in results)


def test_unlimited_never_touches_the_database():
    """Rate 0 everywhere: take() answers at once without a database at all."""
    lim = RateLimiter(make_engine("sqlite:////nonexistent/dir/x.db"))
    assert not lim.enabled
    assert all(lim.take("example.com") == 0.0 for _ in range(1000)) and lim.db_trips == 0


def test_domain_buckets_are_separate(migrated_customer_url):
    """An exhausted domain waits; another domain still goes; the wait is positive."""
    now = [1000.0]
    lim = RateLimiter(make_engine(migrated_customer_url), domain_rates=["slow.example=2"],
                      clock=lambda: now[0])
    assert lim.take("slow.example") == 0.0 and lim.take("slow.example") == 0.0
    wait = lim.take("slow.example")
    assert 0 < wait <= 0.5 * 1.3  # half a second for one token at 2/s, with jitter
    assert lim.take("fast.example") == 0.0  # no per-domain default: unlimited
    now[0] += 0.5
    assert lim.take("slow.example") == 0.0  # refilled one token in half a second


def test_chunks_bound_the_database_trips(migrated_customer_url):
    """At 1000/s a composer takes 100 tokens per transaction."""
    lim = RateLimiter(make_engine(migrated_customer_url), rate_global=1000,
                      clock=lambda: 5000.0)
    assert all(lim.take("a.example") == 0.0 for _ in range(300))
    assert lim.db_trips == 3


@pytest.mark.parametrize("bad", ["gmail.com", "=5", "x.com=fast", "x.com=-1"])
def test_bad_domain_rates_are_refused(bad):
    """Malformed domain_rates items raise ValueError naming the item."""
    with pytest.raises(ValueError, match="domain=rate"):
        parse_domain_rates([bad])
