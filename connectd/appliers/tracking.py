"""Appliers of the tracker's clicks.

`link.clicked` (connectd.records.LinkClicked; `ts` is the time of the click), each judged
person or machine first (the tracker's mark, then history: connectd.appliers.hits):
- customer DB: people's clicks only (a profile is about the person: a scanner that clicks
  every link must not make anyone "interested in shoes"; machine clicks stay in the stream
  and the report DB): per-customer click count and last click (customer_stats), and Connect's
  inferred interests, one count per label of the clicked link (customer_interests); not
  clicks on trial sends (test copies); every click, person's or machine's, updates the
  target's last click (the history of the next).
- report DB, people and machines side by side: one click_facts row per click (machine, why);
  hourly_counts (per hour) and event_totals (per segment: message_facts.segment_id, from
  composer.content) with totals and unique clickers; link_counts with totals per link (unique
  clickers per link: `link_uniques`, counted from click_facts when asked); first_hits, the
  memory of who already clicked an instance; message_facts' last click and its link (the
  history of the next judgement) where the send is known.
Updates are aggregated within the run first: one statement per table (first_hits: one
executemany per group of new clickers on SQLite).

Cost (bench/profiler_ingest.py, 1M clicks, 100k customers, SQLite, cProfile of each worker
alone, about 3.0-3.2 s each): customer worker: its two upserts ~1.2 s (rows in key order),
record decoding ~0.4 s, the applier's own Python ~0.35 s, commits ~0.2 s; report worker: SQLite
inserts ~0.5 s (click_facts in multi-row VALUES ~0.4 s, first_hits sorted ~0.1 s), the
applier's own Python ~0.45 s, record decoding ~0.36 s, looking the run's clickers up in the
remembered ones ~0.28 s, counting ~0.24 s, commits ~0.23 s. The whole bench reads 0.37-0.39x a
bare executemany (load ~1 on 2 cores).
"""

from __future__ import annotations

import time
from collections import Counter
from itertools import chain, compress, filterfalse, islice
from operator import attrgetter, itemgetter, le
from typing import Any

from sqlalchemy import Connection, distinct, func, select

from connectd.appliers import applies, hits
from connectd.appliers.sql import db_time, insert_columns, upsert
from connectd.db.customer import CustomerInterest, CustomerStats, Link
from connectd.db.report import (
    NO_SEGMENT,
    ClickFact,
    EventTotal,
    HourlyCount,
    LinkCount,
    MessageFact,
)
from connectd.records import LinkClicked

_LABEL_TTL = 60.0  # seconds a link's labels are cached (the editor may change them)
CLICKED = "link.clicked"

_stats = CustomerStats.__table__
_interests = CustomerInterest.__table__
_links = Link.__table__
_clicks = ClickFact.__table__
_hourly = HourlyCount.__table__
_totals = EventTotal.__table__
_links_n = LinkCount.__table__
_facts = MessageFact.__table__


def _link_labels(conn: Connection, link_ids: set[int], cache: dict[str, Any]) -> dict[int, list]:
    labels: dict[int, tuple[float, list]] = cache.setdefault("link_labels", {})
    now = time.monotonic()
    missing = [lid for lid in link_ids if lid not in labels or now - labels[lid][0] > _LABEL_TTL]
    for start in range(0, len(missing), 500):
        chunk = missing[start:start + 500]
        found = dict(conn.execute(select(_links.c.id, _links.c.labels)
                                  .where(_links.c.id.in_(chunk))).all())
        for lid in chunk:
            labels[lid] = (now, [str(x) for x in (found.get(lid) or [])][:4])
    return {lid: labels[lid][1] for lid in link_ids}


@applies(LinkClicked, db="customer")
def clicks_to_profiles(conn: Connection, records: list[LinkClicked],
                       cache: dict[str, Any]) -> None:
    instances = set(map(_instance, records))
    live = hits.present(conn, "targets", instances)
    if live or any(map(_machine, records)):
        # pairs built only for instances with sends: before them there is no history
        pairs = {(r.instance, r.customer) for r in records if r.instance in live}
        past, _ = hits.history(conn, "targets", pairs, clicks=True, live=live)
        verdicts, last = hits.judge(records, past, clicks=True)
        hits.update_last_clicks(conn, last, "targets")
        records = [r for r, v in zip(records, verdicts, strict=True) if not v.machine]
    _profiles(conn, hits.without_trials(conn, records, cache, instances), cache)


def _profiles(conn: Connection, records: list[LinkClicked], cache: dict[str, Any]) -> None:
    """People's clicks into customer_stats and customer_interests, rows in key order (fewer
    B-tree pages touched per statement: the upserts 1.44 -> 1.22 s per 1M clicks)."""
    if not records:
        return
    cust = list(map(_customer, records))
    ts = list(map(_ts, records))
    counts = Counter(cust)
    last = _latest(cust, ts)
    keys = sorted(counts)
    # record timestamps go into the columns as they are (connectd.appliers.sql.db_time)
    upsert(conn, _stats, ("customer_id", "click_count", "last_click_at"),
           list(zip(keys, map(counts.__getitem__, keys), map(last.__getitem__, keys),
                    strict=True)),
           keys=("customer_id",), add=("click_count",), greatest=("last_click_at",))
    links = list(map(_link, records))
    labels = _link_labels(conn, set(links), cache)
    interests = _interest_counts(cust, links, labels)
    if not interests:
        return
    ikeys = sorted(interests, key=_first)
    upsert(conn, _interests, ("customer_id", "label", "count"),
           list(zip(map(_first, ikeys), map(_second, ikeys), map(interests.__getitem__, ikeys),
                    strict=True)),
           keys=("customer_id", "label"), add=("count",))


def _interest_counts(cust: list[int], links: list[int], labels: dict[int, list]
                     ) -> Counter[tuple[int, str]]:
    """(customer, label) -> clicks on links carrying the label: one (customer, label) per
    click and label, counted in C (a Python loop over (customer, link) counts, adding to a
    Counter whose misses go through __missing__, cost three times as much)."""
    labelled = {link for link, names in labels.items() if names}
    if not labelled:
        return Counter()
    keep = list(map(labelled.__contains__, links))
    c_of = list(compress(cust, keep))
    l_of = list(compress(links, keep))
    pairs: list[Any] = []
    for k in range(max(map(len, labels.values()))):
        label_k = {link: names[k] for link, names in labels.items() if len(names) > k}
        if k == 0:  # every labelled link has a first label
            pairs.append(zip(c_of, map(label_k.__getitem__, l_of), strict=True))
            continue
        more = list(map(label_k.__contains__, l_of))
        pairs.append(zip(compress(c_of, more), map(label_k.__getitem__, compress(l_of, more)),
                         strict=True))
    return Counter(chain.from_iterable(pairs))


def _latest(keys: list[int], ts: list[str]) -> dict[int, str]:
    """key -> its latest ts. Text timestamps sort in time order; records mostly come in it,
    so the usual case is one C-level pass."""
    if all(map(le, ts, islice(ts, 1, None))):
        return dict(zip(keys, ts, strict=True))
    order = sorted(range(len(ts)), key=ts.__getitem__)
    return {keys[k]: ts[k] for k in order}


@applies(LinkClicked, db="report")
def clicks_to_facts(conn: Connection, records: list[LinkClicked],
                    cache: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    # column lists, zipped and counted in C: this path runs for every click
    inst = list(map(_instance, records))
    cust = list(map(_customer, records))
    ts = list(map(_ts, records))
    links = list(map(_link, records))
    pair_list = list(zip(inst, cust, strict=True))
    # each (instance, customer)'s first click in the run; its keys are the run's pairs
    first_of = dict(zip(reversed(pair_list), reversed(ts), strict=True))
    live = hits.present(conn, "message_facts", set(inst))
    past: dict = {}
    known: dict = {}
    if live:
        pairs = first_of.keys() if len(live) == len(set(inst)) else \
            {p for p in first_of if p[0] in live}
        past, known = hits.history(conn, "message_facts", pairs, clicks=True, live=live)
    if past:
        verdicts, last = hits.judge(records, past, clicks=True)
        hits.update_last_clicks(conn, last, "message_facts")
        mach = [v.machine for v in verdicts]
        why = [v.why for v in verdicts]
    else:  # nobody's send known yet: the tracker's marks stand (the usual bulk path)
        mach = list(map(_machine, records))
        why = list(map(_why, records)) if any(mach) else [None] * len(mach)
    machines = any(mach)
    _insert_clicks(conn, inst, cust, links, ts, mach, why)
    segment = {k: v[0] for k, v in known.items() if v[0] is not None}
    hours = list(map(_hour_prefix, ts))
    # [people, machines, new people, new machines] per (instance, hour) and (instance, segment)
    hourly = _counted(inst, hours, mach if machines else None)
    if segment:
        segs = [segment.get(p, NO_SEGMENT) for p in pair_list]
        totals = _counted(inst, segs, mach if machines else None)
        inst_seg: list[Any] = list(zip(inst, segs, strict=True))
        first_at = dict(zip(reversed(inst_seg), reversed(ts), strict=True))
        last_at = dict(zip(inst_seg, ts, strict=True))
    else:  # everyone outside any segment: the per-hour counts summed, times per instance
        totals = {}
        for (i, _), n in hourly.items():
            got = totals.setdefault((i, NO_SEGMENT), [0, 0, 0, 0])
            got[0] += n[0]
            got[1] += n[1]
        first_at = {(i, NO_SEGMENT): t for i, t in
                    dict(zip(reversed(inst), reversed(ts), strict=True)).items()}
        last_at = {(i, NO_SEGMENT): t for i, t in dict(zip(inst, ts, strict=True)).items()}
    # each customer's first click in this run, as a person and as a machine
    firsts: dict[bool, dict[tuple[int, int], str]] = {False: first_of, True: {}}
    if machines:
        firsts[False] = {}
        for p, m, t in zip(reversed(pair_list), reversed(mach), reversed(ts), strict=True):
            firsts[m][p] = t
    for (i, m, h, seg), n in _new_clickers(conn, firsts, segment, cache).items():
        hourly[(i, h)][3 if m else 2] += n
        totals[(i, seg)][3 if m else 2] += n
    per_link = _counted(inst, links, mach if machines else None)
    upsert(conn, _hourly, ("instance_id", "hour", "event", "total", "machine", "uniques",
                           "machine_uniques"),
           [(i, _hour(dialect, h), CLICKED, *n) for (i, h), n in hourly.items()],
           keys=("instance_id", "hour", "event"),
           add=("total", "machine", "uniques", "machine_uniques"))
    upsert(conn, _totals, ("instance_id", "segment_id", "event", "total", "machine", "uniques",
                           "machine_uniques", "first_at", "last_at"),
           [(i, seg, CLICKED, *n, first_at[(i, seg)], last_at[(i, seg)])
            for (i, seg), n in totals.items()],
           keys=("instance_id", "segment_id", "event"),
           add=("total", "machine", "uniques", "machine_uniques"), least=("first_at",),
           greatest=("last_at",))
    upsert(conn, _links_n, ("instance_id", "link_id", "total", "machine"),
           [(i, link, n[0], n[1]) for (i, link), n in per_link.items()],
           keys=("instance_id", "link_id"), add=("total", "machine"))


def _insert_clicks(conn: Connection, inst: list[int], cust: list[int], links: list[int],
                   ts: list[str], mach: list[bool], why: list[str | None]) -> None:
    """click_facts rows, one per click. On SQLite `machine` goes in as 0/1 and `why` is left
    to its default when no click has one: pysqlite binds a bool or None through its adapter
    look-up, which cost more than the insert itself (connectd.appliers.sql.insert_many)."""
    columns: tuple[str, ...] = ("instance_id", "customer_id", "link_id", "clicked_at", "machine")
    m: list[Any] = mach
    if conn.dialect.name == "sqlite":
        m = [1 if x else 0 for x in mach] if any(mach) else [0] * len(mach)
    values: list[list[Any]] = [inst, cust, links, ts, m]
    if why.count(None) < len(why):
        values.append(why)
        columns += ("why",)
    insert_columns(conn, _clicks, columns, values)


def _counted(inst: list[int], other: list[Any], mach: list[bool] | None
             ) -> dict[tuple[int, Any], list[int]]:
    """(instance, other) -> [people, machines, 0, 0], counted in C; `mach` None when no
    record is a machine's (2-tuples are cheaper to count)."""
    if mach is None:
        return {k: [n, 0, 0, 0] for k, n in Counter(zip(inst, other, strict=True)).items()}
    out: dict[tuple[int, Any], list[int]] = {}
    for (i, o, m), n in Counter(zip(inst, other, mach, strict=True)).items():
        out.setdefault((i, o), [0, 0, 0, 0])[1 if m else 0] += n
    return out


_FIRST_SQLITE = ("INSERT INTO first_hits (instance_id, machine, customer_id) "
                 "VALUES (?, ?, ?) ON CONFLICT DO NOTHING")
_FIRST_PG = ("INSERT INTO first_hits (instance_id, machine, customer_id) "
             "SELECT * FROM unnest(%b::bigint[], %b::boolean[], %b::bigint[]) "
             "ON CONFLICT DO NOTHING RETURNING instance_id, machine, customer_id")
_KNOWN_MAX = 500_000  # clickers remembered per consumer (about 50 MB at most)
_FIRST_PER = 500  # customers per multi-row statement on SQLite (+2 parameters: < 999)
_FIRST_MULTI = ("INSERT INTO first_hits (instance_id, machine, customer_id) VALUES "
                + ", ".join(f"(?1, ?2, ?{k + 3})" for k in range(_FIRST_PER))
                + " ON CONFLICT DO NOTHING")


def _new_clickers(conn: Connection, firsts: dict[bool, dict[tuple[int, int], str]],
                  segment: dict[tuple[int, int], int], cache: dict[str, Any]) -> Counter:
    """Customers clicking an instance for the first time, as people or as machines: Counter of
    (instance, machine, hour of that first click, segment), from the first_hits rows inserted.
    `firsts`: machine -> (instance, customer) -> ts of the run's first such click.

    Clickers already in first_hits are mostly passed over without a database round: the
    process remembers the keys of earlier runs, but trusts them only once their transaction
    is known to have committed (one key it inserted is looked up at the next run; a rolled
    back run, retried or bisected by the consumer, leaves no trace and is forgotten)."""
    known = _committed_clickers(conn, cache)
    # the run's keys looked up in the memory (keys() - known would walk all of the memory:
    # a set's difference_update iterates over its argument)
    tried = {m: set(filterfalse(known[m].__contains__, first)) for m, first in firsts.items()}
    if not any(tried.values()):
        return Counter()
    if conn.dialect.name == "sqlite" and cache.get("clickers.all_new", True):
        new = _insert_all_new(conn, firsts, tried, segment)
        if new is not None:
            probe = next((k[0], m, k[1]) for m, keys in tried.items() for k in keys)
            cache["clickers.pending"] = (tried, probe)
            return new
    # (instance, machine, hour, segment) -> customers not known to have clicked before
    groups: dict[tuple, list[int]] = {}
    for m, first in firsts.items():
        unknown = tried[m]
        for i, c in unknown:
            t = first[(i, c)]
            seg = segment.get((i, c), NO_SEGMENT) if segment else NO_SEGMENT
            group = (i, m, t[:13], seg)
            got = groups.get(group)
            if got is None:
                groups[group] = [c]
            else:
                got.append(c)
    if not groups:
        return Counter()
    if conn.dialect.name == "postgresql":
        new, probe = _insert_returning(conn, groups)
    else:
        new, probe = _insert_grouped(conn, groups)
        # every key new: the memory knows the table again, the next run may try all at once
        cache["clickers.all_new"] = sum(new.values()) == sum(map(len, groups.values()))
    cache["clickers.pending"] = (tried, probe)
    return new


def _first_all(machine: bool) -> str:
    return ("INSERT INTO first_hits (instance_id, machine, customer_id) VALUES "
            + ", ".join([f"(?, {int(machine)}, ?)"] * _FIRST_PER) + " ON CONFLICT DO NOTHING")


_FIRST_ALL = {m: _first_all(m) for m in (False, True)}
_FIRST_ONE = {m: ("INSERT INTO first_hits (instance_id, machine, customer_id) "
                  f"VALUES (?, {int(m)}, ?) ON CONFLICT DO NOTHING") for m in (False, True)}


def _insert_all_new(conn: Connection, firsts: dict[bool, dict[tuple[int, int], str]],
                    tried: dict[bool, set[tuple[int, int]]], segment: dict[tuple[int, int], int]
                    ) -> Counter | None:
    """SQLite, the usual case once the process remembers the table (every clicker it does not
    know is new): all of them in a few multi-row statements under a savepoint, and the counts
    per (instance, machine, hour, segment) taken from the keys with C-level calls. None (and
    nothing inserted) when some key was in the table after all: the caller counts group by
    group, and runs go that way until one finds every key new again."""
    raw = conn.connection.driver_connection
    total = sum(map(len, tried.values()))
    nested = conn.begin_nested()
    cursor = raw.cursor()  # type: ignore[union-attr]
    try:
        before = raw.total_changes  # type: ignore[union-attr]
        for m, keys in tried.items():
            # key order: measured 0.4 s per 1M clicks less than unsorted; two stable sorts on
            # int keys cost a third of one sort comparing tuples
            pairs = sorted(keys, key=_second)
            pairs.sort(key=_first)
            flat = list(chain.from_iterable(pairs))
            full = len(pairs) // _FIRST_PER * _FIRST_PER
            step = 2 * _FIRST_PER
            if full:
                cursor.executemany(_FIRST_ALL[m], [flat[k:k + step]
                                                   for k in range(0, 2 * full, step)])
            if full < len(pairs):
                cursor.executemany(_FIRST_ONE[m], pairs[full:])
        inserted = raw.total_changes - before  # type: ignore[union-attr]
    finally:
        cursor.close()
    if inserted != total:
        nested.rollback()
        return None
    nested.commit()
    new: Counter = Counter()
    for m, keys in tried.items():
        if not keys:
            continue
        pairs = list(keys)
        first = firsts[m]
        hours = list(map(_hour_prefix, map(first.__getitem__, pairs)))
        segs = ([segment.get(p, NO_SEGMENT) for p in pairs] if segment
                else [NO_SEGMENT] * len(pairs))
        new.update(zip([p[0] for p in pairs], [m] * len(pairs), hours, segs, strict=True))
    return new


def _insert_returning(conn: Connection, groups: dict[tuple, list[int]]
                      ) -> tuple[Counter, tuple | None]:
    """PostgreSQL: one unnest insert of every key, the new ones returned."""
    group_of = {(g[0], g[1], c): g for g, custs in groups.items() for c in custs}
    keys = list(group_of)
    got = conn.exec_driver_sql(_FIRST_PG, ([k[0] for k in keys], [k[1] for k in keys],
                                           [k[2] for k in keys])).all()
    new = Counter(group_of[(i, bool(m), c)] for i, m, c in got)
    probe = next(((i, bool(m), c) for i, m, c in got), None)
    return new, probe


def _insert_grouped(conn: Connection, groups: dict[tuple, list[int]]
                    ) -> tuple[Counter, tuple | None]:
    """SQLite: insert-or-ignore each group's customers in multi-row statements (instance and
    machine bound once per statement, machine as 0/1: a bool goes through pysqlite's adapter
    look-up), counting the rows each group inserted by the connection's change counter
    instead of RETURNING every row. Returns the counts and one key that was inserted."""
    raw = conn.connection.driver_connection
    cursor = raw.cursor()  # type: ignore[union-attr]
    new: Counter = Counter()
    probe = None
    try:
        for group, custs in groups.items():
            i, m = group[0], 1 if group[1] else 0
            custs.sort()  # key order: fewer B-tree pages touched per statement
            before = raw.total_changes  # type: ignore[union-attr]
            full = len(custs) // _FIRST_PER * _FIRST_PER
            if full:
                cursor.executemany(_FIRST_MULTI, [(i, m, *custs[k:k + _FIRST_PER])
                                                  for k in range(0, full, _FIRST_PER)])
            if full < len(custs):
                cursor.executemany(_FIRST_SQLITE, [(i, m, c) for c in custs[full:]])
            n = raw.total_changes - before  # type: ignore[union-attr]
            if n:
                new[group] += n
                if probe is None and n == len(custs):  # then every one of them was new
                    probe = (i, group[1], custs[0])
    finally:
        cursor.close()
    return new, probe


def _committed_clickers(conn: Connection, cache: dict[str, Any]
                       ) -> dict[bool, set[tuple[int, int]]]:
    """The clickers (machine -> {(instance, customer)}) this process knows to be in
    first_hits: the previous run's keys join them once the key it inserted is found (its
    transaction committed); if not, they are dropped (it rolled back: it will be applied
    again)."""
    known: dict[bool, set[tuple[int, int]]] = cache.setdefault(
        "clickers", {False: set(), True: set()})
    pending = cache.pop("clickers.pending", None)
    if pending is None:
        return known
    tried, probe = pending
    if probe is None:  # nothing new last time: nothing to vouch for the others
        return known
    mark = "?" if conn.dialect.name == "sqlite" else "%s"
    found = conn.exec_driver_sql(
        f"SELECT 1 FROM first_hits WHERE instance_id = {mark} AND machine = {mark} "
        f"AND customer_id = {mark}", probe).first()
    if found is not None:
        if sum(map(len, known.values())) + sum(map(len, tried.values())) > _KNOWN_MAX:
            known[False].clear()
            known[True].clear()
        for m, keys in tried.items():
            known[m].update(keys)
    return known


def link_uniques(conn: Connection, instance: int) -> dict[int, tuple[int, int]]:
    """Unique clickers per link of a message instance: link -> (people, machines), counted
    from click_facts (a report's query; the profiler does not keep them)."""
    rows = conn.execute(
        select(_clicks.c.link_id, _clicks.c.machine, func.count(distinct(_clicks.c.customer_id)))
        .where(_clicks.c.instance_id == instance)
        .group_by(_clicks.c.link_id, _clicks.c.machine))
    out: dict[int, list[int]] = {}
    for link, machine, n in rows:
        out.setdefault(link, [0, 0])[1 if machine else 0] = n
    return {link: (p, m) for link, (p, m) in out.items()}


_ts = attrgetter("ts")
_instance = attrgetter("instance")
_customer = attrgetter("customer")
_link = attrgetter("link")
_machine = attrgetter("machine")
_why = attrgetter("why")
_first = itemgetter(0)
_second = itemgetter(1)
_hour_prefix = itemgetter(slice(0, 13))  # 'YYYY-MM-DDTHH' of a record ts


def _hour(dialect: str, prefix: str) -> str:
    """'YYYY-MM-DD?HH' (either timestamp spelling) -> the start of that hour as the column's
    timestamp text."""
    return db_time(dialect, f"{prefix[:10]}T{prefix[11:13]}:00:00.000000Z")
