"""The tracker's metrics, shared by its worker processes: counters in shared memory -> the
Prometheus text format.

Inputs: `inc`/`observe` calls on the request path (one add to a shared double each, no
lock: every worker writes only its own slice, so there is never a second writer). Outputs:
`render()`, the sum over all workers, for GET /metrics (whichever worker answers the scrape
reports the whole tracker). The parent creates the memory before forking; a restarted worker
continues its predecessor's slice, so counters never go backwards.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

KINDS = ("click", "open", "unsubscribe", "conversion", "healthz", "metrics", "other")
STATUSES = (200, 204, 302, 400, 404, 405, 408, 413, 414, 431, 500, 503)
# stream append latency buckets, seconds: a write() into the page cache is some microseconds
BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
           0.025, 0.1)
COUNTERS = ("bad_tokens", "unknown_links", "conversions_unattributed", "machine_hits",
            "append_errors", "links_waited")

_REQ = {(k, s): i for i, (k, s) in enumerate((k, s) for k in KINDS for s in STATUSES)}
_BAD = {k: len(_REQ) + i for i, k in enumerate(KINDS)}  # bad tokens by kind
_CTR = {c: len(_REQ) + len(KINDS) + i for i, c in enumerate(COUNTERS)}
_HIST = len(_REQ) + len(KINDS) + len(COUNTERS)  # buckets..., +Inf, sum, count
_LINKS = _HIST + len(BUCKETS) + 3  # gauge: links known (per worker; max is reported)
SLOTS = _LINKS + 1


def shared_memory(workers: int) -> Any:
    """Zeroed shared doubles for `workers` workers (create before forking)."""
    return multiprocessing.RawArray("d", workers * SLOTS)


class Metrics:
    """One worker's view: writes its own slice, reads everyone's."""

    def __init__(self, memory: Any, worker: int) -> None:
        self.mem = memory
        self.workers = len(memory) // SLOTS
        self.base = (worker - 1) * SLOTS

    def request(self, kind: str, status: int) -> None:
        idx = _REQ.get((kind, status))
        if idx is not None:
            self.mem[self.base + idx] += 1

    def bad_token(self, kind: str) -> None:
        self.mem[self.base + _BAD[kind]] += 1

    def inc(self, counter: str) -> None:
        self.mem[self.base + _CTR[counter]] += 1

    def links(self, known: int) -> None:
        self.mem[self.base + _LINKS] = known

    def observe_append(self, seconds: float) -> None:
        base = self.base + _HIST
        for i, le in enumerate(BUCKETS):
            if seconds <= le:
                self.mem[base + i] += 1
                break
        else:
            self.mem[base + len(BUCKETS)] += 1
        self.mem[base + len(BUCKETS) + 1] += seconds
        self.mem[base + len(BUCKETS) + 2] += 1

    def total(self, idx: int) -> float:
        return sum(self.mem[w * SLOTS + idx] for w in range(self.workers))

    def requests(self, kind: str, status: int) -> int:
        return int(self.total(_REQ[(kind, status)]))

    def counter(self, name: str) -> int:
        return int(self.total(_CTR[name]))

    def render(self) -> bytes:
        """All workers' figures in the Prometheus text exposition format (version 0.0.4)."""
        out = ["# HELP tracker_requests_total HTTP requests answered, by kind and status.",
               "# TYPE tracker_requests_total counter"]
        for (kind, status), idx in _REQ.items():
            value = self.total(idx)
            if value:
                out.append(f'tracker_requests_total{{kind="{kind}",status="{status}"}} {value:.0f}')
        out += ["# HELP tracker_bad_tokens_total Forged, truncated, tampered or wrong-kind tokens.",
                "# TYPE tracker_bad_tokens_total counter"]
        for kind, idx in _BAD.items():
            out.append(f'tracker_bad_tokens_total{{kind="{kind}"}} {self.total(idx):.0f}')
        for name, idx in _CTR.items():
            out += [f"# TYPE tracker_{name}_total counter",
                    f"tracker_{name}_total {self.total(idx):.0f}"]
        out += ["# HELP tracker_stream_append_seconds Time to append a hit's record to its "
                "stream (write into the kernel).",
                "# TYPE tracker_stream_append_seconds histogram"]
        cumulative = 0.0
        for i, le in enumerate(BUCKETS):
            cumulative += self.total(_HIST + i)
            out.append(f'tracker_stream_append_seconds_bucket{{le="{le:g}"}} {cumulative:.0f}')
        cumulative += self.total(_HIST + len(BUCKETS))
        out.append(f'tracker_stream_append_seconds_bucket{{le="+Inf"}} {cumulative:.0f}')
        out.append(f"tracker_stream_append_seconds_sum {self.total(_HIST + len(BUCKETS) + 1):.6f}")
        out.append(f"tracker_stream_append_seconds_count "
                   f"{self.total(_HIST + len(BUCKETS) + 2):.0f}")
        known = max(self.mem[w * SLOTS + _LINKS] for w in range(self.workers))
        out += ["# TYPE tracker_links_known gauge", f"tracker_links_known {known:.0f}",
                "# TYPE tracker_workers gauge", f"tracker_workers {self.workers}"]
        return ("\n".join(out) + "\n").encode("ascii")
