"""`connectd spool status|tail|gc|replay`: inspect and maintain the event streams.

Inputs: the settings (from the click context), the spool's streams, and the consumer positions
stored in the customer and report DBs (connectd.consumer.load_positions).
Outputs: text or JSON on stdout; `gc` removes consumed segments (through Spool.gc); `replay`
appends record.replayed records to the replay stream. Every file operation goes through
connectd.spool.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import orjson

from connectd.spool import (
    REPLAY,
    SHUNT,
    BadRecord,
    Position,
    Spool,
    SpoolError,
    decode,
)


@click.group("spool")
def spool_group() -> None:
    """Inspect and maintain the event streams."""


# --- shared pieces --------------------------------------------------------------------------


def _settings() -> Any:
    # cli imports this module at import time: reach its Context through click, not an import
    return click.get_current_context().obj.settings


def _spool(settings: Any) -> Spool:
    return Spool(settings.paths.spool, settings.spool)


def _spool_id(spool: Spool) -> str | None:
    """This spool's identity, without creating one (a read-only command must not write)."""
    if not (spool.root / "spool-id").exists():
        return None
    return spool.spool_id


@dataclass
class Positions:
    """Consumer positions of this spool, or why there are none."""

    states: list[Any]
    note: str | None = None

    def for_stream(self, name: str) -> list[Any]:
        return [s for s in self.states if s.stream == name]


NOT_INITIALISED = "no consumer positions (databases not initialised?)"


def _missing_sqlite(url: str) -> bool:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return False
    db = parsed.database or ""
    return db not in ("", ":memory:") and not Path(db).exists()


def load_positions(settings: Any, spool: Spool) -> Positions:
    """The stored positions of this spool's consumers; an empty list and a note when the
    databases are missing or unreadable (status still shows the streams)."""
    from sqlalchemy.exc import SQLAlchemyError

    from connectd.consumer import load_positions as load

    urls = (settings.database.customer_url, settings.database.report_url)
    if any(_missing_sqlite(u) for u in urls):
        # opening a missing SQLite file would create it: say so instead
        return Positions([], NOT_INITIALISED)
    spool_id = _spool_id(spool)
    if spool_id is None:
        return Positions([], "no consumer positions (spool has no identity yet: connectd init?)")
    try:
        return Positions(load(settings, spool_id))
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
        return Positions([], f"{NOT_INITIALISED}: {first}")


def _check_stream(spool: Spool, name: str) -> None:
    streams = spool.streams()
    if name not in streams:
        listing = ", ".join(streams) or "none yet"
        raise click.ClickException(f"no stream {name!r} in {spool.streams_dir} "
                                   f"(streams: {listing})")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# --- status ---------------------------------------------------------------------------------


def _status_doc(spool: Spool, positions: Positions) -> dict[str, Any]:
    names = sorted(set(spool.streams()) | {s.stream for s in positions.states})
    streams = []
    for name in names:
        info = spool.info(name)
        newest = info.newest
        consumers = []
        for st in sorted(positions.for_stream(name), key=lambda s: (s.db, s.consumer)):
            records, seconds = spool.lag(name, st.position)
            consumers.append({"db": st.db, "consumer": st.consumer,
                              "position": str(st.position), "records": st.records,
                              "updated_at": _iso(st.updated_at),
                              "lag_records": records, "lag_seconds": round(seconds, 3)})
        streams.append({
            "name": name, "segments": len(info.segments), "bytes": info.bytes,
            "end": str(info.end),
            "newest": ({k: newest.get(k) for k in ("type", "ts", "id")} if newest else None),
            "consumers": consumers,
        })
    return {"spool": str(spool.root), "spool_id": _spool_id(spool), "streams": streams,
            "positions_note": positions.note}


@spool_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def status_command(as_json: bool) -> None:
    """Per stream: segments, bytes, newest record, and each consumer's position and lag."""
    settings = _settings()
    spool = _spool(settings)
    doc = _status_doc(spool, load_positions(settings, spool))
    if as_json:
        click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"spool {doc['spool']} (id {doc['spool_id'] or '-'})")
    if not doc["streams"]:
        click.echo("no streams yet")
    if doc["streams"]:
        click.echo(f"{'STREAM':<24} {'SEGMENTS':>8} {'BYTES':>11}  NEWEST (ts type id)")
    for st in doc["streams"]:
        n = st["newest"]
        newest = f"{n['ts']} {n['type']} {n['id']}" if n else "-"
        click.echo(f"{st['name']:<24} {st['segments']:>8} {_size(st['bytes']):>11}  {newest}")
        for c in st["consumers"]:
            click.echo(f"    {c['db']}/{c['consumer']}: at {c['position']}, "
                       f"{c['records']} applied, lag {c['lag_records']} records "
                       f"{c['lag_seconds']:.1f} s (updated {c['updated_at']})")
        if not st["consumers"] and not doc["positions_note"]:
            click.echo("    no consumer has read this stream")
    if doc["positions_note"]:
        click.echo(doc["positions_note"])


# --- tail -----------------------------------------------------------------------------------


def _last_lines(spool: Spool, name: str, n: int) -> tuple[list[bytes], Position]:
    """The last n complete lines of a stream, and the position just after the last complete
    line (where following goes on; never in the middle of a line being written)."""
    segs = spool.segments(name)
    if not segs:
        return [], Position(0, 0)
    found: list[bytes] = []
    follow_from: Position | None = None
    for seg in reversed(segs):
        lines, end_offset = _tail_of_segment(seg.path, seg.size, n - len(found))
        if follow_from is None:
            follow_from = Position(seg.number, end_offset)
        found = lines + found
        if len(found) >= n:
            break
    return found[-n:] if n else [], follow_from or Position(0, 0)


def _tail_of_segment(path: Path, size: int, n: int) -> tuple[list[bytes], int]:
    """Up to n last complete lines of one segment (read backwards in blocks) and the offset
    after its last newline."""
    block = 65536
    buf = b""
    end = size
    with open(path, "rb") as fh:
        while end > 0:
            start = max(0, end - block)
            fh.seek(start)
            buf = fh.read(end - start) + buf
            end = start
            if buf.count(b"\n") > n:
                break
    last_nl = buf.rfind(b"\n")
    if last_nl < 0:
        return [], size - len(buf) if end == 0 else size
    complete = buf[:last_nl]
    lines = complete.split(b"\n")
    if end > 0:
        lines = lines[1:]  # the first piece may be a cut line
    end_offset = end + last_nl + 1
    return (lines[-n:] if n > 0 else []), end_offset


def _plain(value: Any) -> str:
    if isinstance(value, str) and value and not any(c in value for c in ' "=\n\t\\'):
        return value
    return orjson.dumps(value).decode()


def human_line(line: bytes) -> str:
    """One record on one line: ts type id, then the other fields as key=value."""
    try:
        rec = decode(line)
    except BadRecord as exc:
        return f"?? not a record ({exc}): {line[:200]!r}"
    head = f"{rec.get('ts', '-')} {rec['type']} {rec['id']}"
    rest = " ".join(f"{k}={_plain(v)}" for k, v in rec.items() if k not in ("v", "ts", "type", "id"))
    return f"{head} {rest}".rstrip()


@spool_group.command("tail")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new records until Ctrl-C.")
@click.option("-n", "count", type=click.IntRange(min=0), default=10, show_default=True,
              help="How many of the last records to print first.")
@click.option("--json", "as_json", is_flag=True, help="Raw JSON lines, as stored.")
@click.argument("stream")
def tail_command(follow: bool, count: int, as_json: bool, stream: str) -> None:
    """Print the last records of STREAM (and follow it with -f)."""
    settings = _settings()
    spool = _spool(settings)
    _check_stream(spool, stream)

    def show(line: bytes) -> None:
        click.echo(line.decode("utf-8", "backslashreplace") if as_json else human_line(line))

    lines, position = _last_lines(spool, stream, count)
    for line in lines:
        show(line)
    if follow:
        _follow(spool, stream, position, show, settings.spool.poll_interval)


def _follow(spool: Spool, stream: str, position: Position, show: Any, poll: float) -> None:
    wake = threading.Event()
    stop_watch = spool.watch(wake.set)  # inotify wakes us; the poll covers dropped events
    try:
        with spool.reader(stream, position) as reader:
            while True:
                while (batch := reader.read(1000)) is not None:
                    for line in batch.lines:
                        show(line)
                    if batch.torn is not None:
                        click.echo(f"?? torn record at {batch.start}: {batch.torn[:200]!r}",
                                   err=True)
                wake.wait(poll)
                wake.clear()
    except KeyboardInterrupt:
        pass
    finally:
        stop_watch()


# --- gc -------------------------------------------------------------------------------------


def _followed(settings: Any, spool: Spool) -> set[str]:
    from connectd.consumer import all_streams

    return set(all_streams(spool, settings.profiler.streams))


RECEIVER_STREAM = "receiver.events"


def _processor_position(spool: Spool) -> Any:
    """How far the processor has read receiver.events (the start if it has read nothing)."""
    from connectd.daemons.processor import OUTPUT, resume_position
    from connectd.spool import START

    return resume_position(spool) if OUTPUT in spool.streams() else START


@spool_group.command("gc")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--retention", type=click.FloatRange(min=0), default=None,
              help="Keep consumed segments this many seconds (default: spool.retention).")
def gc_command(dry_run: bool, retention: float | None) -> None:
    """Remove segments every consumer has passed (and older than the retention)."""
    settings = _settings()
    spool = _spool(settings)
    positions = load_positions(settings, spool)
    if positions.note:
        click.echo(positions.note)
    # every consumer we know of must have said where it is in a stream the profiler follows:
    # one without a row there has read nothing of it yet
    known = {(s.db, s.consumer) for s in positions.states}
    followed = _followed(settings, spool)
    verb = "would remove" if dry_run else "removed"
    total = 0
    for name in spool.streams():
        states = positions.for_stream(name)
        if not states:
            click.echo(f"{name}: no consumer has read it; left alone")
            continue
        missing = known - {(s.db, s.consumer) for s in states} if name in followed else set()
        if missing:
            who = ", ".join(f"{db}/{c}" for db, c in sorted(missing))
            click.echo(f"{name}: {who} has not read it yet; left alone")
            continue
        held = [s.position for s in states]
        if name == RECEIVER_STREAM:
            # the processor keeps its place in receiver.events in its own output, not in a DB
            held.append(_processor_position(spool))
        removed = spool.gc(name, held, retention=retention, dry_run=dry_run)
        for seg in removed:
            click.echo(f"{name}: {verb} {seg.path.name} ({_size(seg.size)})")
        size = sum(s.size for s in removed)
        total += size
        click.echo(f"{name}: {verb} {len(removed)} segment(s), {_size(size)}")
    click.echo(f"total: {verb} {_size(total)}")


# --- replay ---------------------------------------------------------------------------------


def _replayed_keys(spool: Spool) -> set[tuple[str, str]]:
    """(original id, consumer) of everything already on the replay stream."""
    keys = set()
    for _, rec, _ in spool.reader(REPLAY).records():
        if rec and rec.get("type") == "record.replayed" and isinstance(rec.get("record"), dict):
            keys.add((rec["record"].get("id"), rec.get("consumer")))
    return keys


def _original(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The shunted record itself, if it is a record (what decode would accept)."""
    original = rec.get("record")
    if not isinstance(original, dict):
        return None
    try:
        return decode(orjson.dumps(original))
    except BadRecord:
        return None


@spool_group.command("replay")
@click.option("--stream", "only_stream", default=None, help="Only records shunted from STREAM.")
@click.option("--consumer", "only_consumer", default=None, help="Only records CONSUMER shunted.")
@click.option("--dry-run", is_flag=True, help="Say what would be replayed; write nothing.")
def replay_command(only_stream: str | None, only_consumer: str | None, dry_run: bool) -> None:
    """Put shunted records back: each goes to the replay stream for the consumer that shunted
    it (once: records already replayed are skipped)."""
    settings = _settings()
    spool = _spool(settings)
    writer = None
    if not dry_run and spool.segments(SHUNT):
        # hold the replay stream's lock before reading it: two replays at once cannot both
        # decide the same record is new
        writer = spool.writer(REPLAY, wait=True, durability="always")
    try:
        todo, skipped, refused = _plan_replay(spool, only_stream, only_consumer)
        for pos, why in refused:
            click.echo(f"cannot replay: not a record: shunt {pos} ({why})")
        for rec in todo:
            click.echo(f"{'would replay' if dry_run else 'replay'} {rec['stream']} "
                       f"{rec['record']['type']} {rec['record']['id']} for {rec['consumer']}")
        if writer is not None and todo:
            writer.write_lines(b"".join(orjson.dumps(_replay_record(r)) + b"\n" for r in todo),
                               sync=True)
    except SpoolError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if writer is not None:
            writer.close()
    verb = "would replay" if dry_run else "replayed"
    click.echo(f"{verb} {len(todo)} record(s); {skipped} already replayed; "
               f"{len(refused)} cannot be replayed")


def _replay_record(item: dict[str, Any]) -> dict[str, Any]:
    from connectd.spool import make_record

    return make_record("record.replayed", {"consumer": item["consumer"],
                                           "stream": item["stream"], "record": item["record"]})


def _plan_replay(spool: Spool, only_stream: str | None, only_consumer: str | None,
                 ) -> tuple[list[dict[str, Any]], int, list[tuple[Position, str]]]:
    done = _replayed_keys(spool)
    todo: list[dict[str, Any]] = []
    refused: list[tuple[Position, str]] = []
    skipped = 0
    for pos, rec, raw in spool.reader(SHUNT).records():
        if rec is None:
            refused.append((pos, f"shunt line is not a record: {raw[:80]!r}"))
            continue
        if rec.get("type") != "record.shunted":
            continue
        stream, consumer = rec.get("stream"), rec.get("consumer")
        if (only_stream and stream != only_stream) or (only_consumer and consumer != only_consumer):
            continue
        original = _original(rec)
        if original is None:
            refused.append((pos, f"from {stream} {rec.get('position')}, {consumer}: "
                                 f"{str(rec.get('reason'))[:120]}"))
            continue
        key = (original["id"], consumer)
        if key in done:
            skipped += 1
            continue
        done.add(key)  # the same record shunted twice by one consumer is replayed once
        todo.append({"consumer": consumer, "stream": stream, "record": original})
    return todo, skipped, refused
