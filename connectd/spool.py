"""The event logs: named streams of numbered, append-only JSON-lines segments in the spool.

Inputs: records to append (type + fields) and positions to read from.
Outputs: segment files on disk, and batches of complete lines with their positions.

This module owns every path, append, roll-over, fsync and lock of the spool (Postfix's
mail_queue.c idea: one module owns the queue). Nothing else writes under <spool>/streams.

Layout::

    <spool>/spool-id                         this spool's identity (consumers key positions by it)
    <spool>/streams/<name>/000000000001.jsonl  segments, numbered, never renamed or truncated
    <spool>/streams/<name>/writer.lock        flock held by the one writer of the stream

Rules that make it crash-safe:
- One writer per stream, enforced by flock on writer.lock (released by the kernel when the
  writer dies, so a killed writer never blocks its successor).
- One os.write() per record (or per group of records) on an O_APPEND descriptor: once append()
  returns, the record is in the kernel and survives the death of the process.
- A new writer continues the last segment only if it ends with a newline; a torn tail (writer
  killed or disk full mid-write) is left as it is and the writer starts the next segment.
  Readers only ever yield complete lines; a torn tail of a finished segment is reported to the
  consumer (who shunts it), never parsed as a record.
- A segment is finished (fsynced) before the next one is created, so a reader that sees segment
  N+1 knows N is complete, and re-reads N's end once before moving on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson

from connectd.settings import Settings, SpoolSettings

RECORD_VERSION = 1
SHUNT = "shunt"  # stream of records a consumer could not apply
REPLAY = "replay"  # stream of shunted records put back by `connectd spool replay`
SEGMENT_SUFFIX = ".jsonl"
RESERVED = frozenset(("v", "id", "ts", "type"))
_STREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")
_RECORD_TYPE = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")
_CHUNK = 1 << 20


class SpoolError(Exception):
    """A problem with the spool that the caller should report, not retry blindly."""


class Locked(SpoolError):
    """Another process holds a lock of the spool (`holder` is its pid, as it wrote it)."""

    def __init__(self, message: str, holder: str = "unknown") -> None:
        super().__init__(message)
        self.holder = holder


class StreamLocked(Locked):
    """Another process is already the writer of this stream."""


class BadRecord(SpoolError, ValueError):
    """A record that does not follow the record format (type, reserved keys, JSON)."""


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """Where a reader is: segment number and byte offset of the next unread line."""

    segment: int
    offset: int

    def __str__(self) -> str:
        return f"{self.segment}:{self.offset}"

    @classmethod
    def parse(cls, text: str) -> Position:
        seg, _, off = text.partition(":")
        return cls(int(seg), int(off or 0))


START = Position(0, 0)  # before the first segment, whatever its number


def validate_stream_name(name: str) -> str:
    # fullmatch, not match: "$" also matches before a trailing newline ("shunt\n")
    if not isinstance(name, str) or not _STREAM_NAME.fullmatch(name):
        raise SpoolError(f"bad stream name {name!r}: use lower-case letters, digits, '.', '_', '-'")
    return name


def now_ts() -> str:
    """The record timestamp format: ISO 8601, UTC, microseconds, 'Z'."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


class _Ids:
    """Globally unique, roughly time-ordered record ids: 48-bit milliseconds, 48 random bits
    drawn once per process, a 32-bit counter. Unique across processes and hosts without any
    coordination; sortable by time within a millisecond's resolution."""

    def __init__(self) -> None:
        self._reset()
        # a forked child must not repeat the parent's ids: it draws its own random bits (a
        # hook rather than a getpid() per id, which is a system call each time)
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self.node = int.from_bytes(os.urandom(6), "big")
        self.counter = itertools.count(int.from_bytes(os.urandom(2), "big"))

    def next(self) -> str:
        return f"{int(time.time() * 1000):012x}{self.node:012x}{next(self.counter) & 0xFFFFFFFF:08x}"


new_id = _Ids().next


def make_record(type_: str, fields: dict[str, Any] | None = None, *, id: str | None = None,
                ts: str | None = None) -> dict[str, Any]:
    """A record dict: version, unique id, timestamp, `noun.verb` type, then the fields."""
    if not isinstance(type_, str) or not _RECORD_TYPE.fullmatch(type_):
        raise BadRecord(f"record type {type_!r} is not a past-tense noun.verb such as link.clicked")
    rec: dict[str, Any] = {"v": RECORD_VERSION, "id": id or new_id(), "ts": ts or now_ts(),
                           "type": type_}
    if fields:
        clash = RESERVED.intersection(fields)
        if clash:
            raise BadRecord(f"record fields may not use the reserved keys {sorted(clash)}")
        rec.update(fields)
    return rec


def encode(rec: dict[str, Any]) -> bytes:
    """One record as one line of JSON (no newline inside: JSON escapes them)."""
    try:
        return orjson.dumps(rec) + b"\n"
    except TypeError as exc:
        raise BadRecord(f"record not JSON-serialisable: {exc}") from None


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line; raise BadRecord with the reason if it is not a valid record."""
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise BadRecord(f"not valid JSON: {exc}") from None
    if not isinstance(rec, dict):
        raise BadRecord("not a JSON object")
    if not isinstance(rec.get("type"), str) or not isinstance(rec.get("id"), str):
        raise BadRecord("record lacks a string 'type' or 'id'")
    return rec


def fsync_dir(path: Path) -> None:
    """fsync a directory: the names created, renamed or removed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_file_once(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Create `path` holding `data` unless it exists; True if this call created it.
    Atomic create-if-absent: two racing creators agree on one file, a crash leaves either no
    file or the whole file, and the file has `mode` from its first byte on."""
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crashed creator that had our pid
    # O_EXCL: never write through a file or symlink someone else planted
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask could only narrow it, but be explicit
        os.write(fd, data)
        os.fsync(fd)  # the data is on disk before the name points at it (no empty file after a crash)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # link, not replace: a concurrent creator's file is never overwritten
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)  # the new name survives a crash
    return True


def lock_file(path: Path, wait: bool = False) -> int:
    """Take an exclusive flock on `path` (created if missing) and write our pid into it;
    returns the descriptor (closing it releases the lock, and so does our death: the kernel
    drops a dead process's flocks, so a killed holder never blocks its successor). Without
    `wait`, raises Locked naming the holder's pid when another process has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise Locked(f"{path} is locked by pid {holder}", holder) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _segment_name(number: int) -> str:
    return f"{number:012d}{SEGMENT_SUFFIX}"


@dataclass(frozen=True)
class SegmentInfo:
    number: int
    path: Path
    size: int
    mtime: float


@dataclass(frozen=True)
class StreamInfo:
    name: str
    segments: list[SegmentInfo]
    newest: dict[str, Any] | None  # the last complete record, decoded (None if empty/corrupt)

    @property
    def bytes(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def end(self) -> Position:
        if not self.segments:
            return START
        last = self.segments[-1]
        return Position(last.number, last.size)


class Spool:
    """A spool directory and its streams."""

    def __init__(self, root: Path, settings: SpoolSettings | None = None) -> None:
        self.root = Path(root)
        self.settings = settings or SpoolSettings()
        self.streams_dir = self.root / "streams"

    # -- identity -------------------------------------------------------------------------
    def create(self) -> bool:
        """Create the spool directories and identity if missing; True if anything was made."""
        made = not self.streams_dir.is_dir()
        self.streams_dir.mkdir(parents=True, exist_ok=True)
        created = create_file_once(self.root / "spool-id", (os.urandom(8).hex() + "\n").encode())
        return made or created

    @property
    def spool_id(self) -> str:
        id_path = self.root / "spool-id"
        if not id_path.exists():
            self.create()
        return id_path.read_text(encoding="ascii").strip()

    # -- streams --------------------------------------------------------------------------
    def stream_dir(self, name: str) -> Path:
        return self.streams_dir / validate_stream_name(name)

    def streams(self) -> list[str]:
        if not self.streams_dir.is_dir():
            return []
        return sorted(p.name for p in self.streams_dir.iterdir()
                      if p.is_dir() and _STREAM_NAME.fullmatch(p.name))

    def segments(self, name: str) -> list[SegmentInfo]:
        d = self.stream_dir(name)
        out = []
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            return []
        for e in entries:
            if e.name.endswith(SEGMENT_SUFFIX) and e.name[:-len(SEGMENT_SUFFIX)].isdigit():
                try:
                    st = e.stat()
                except FileNotFoundError:  # removed by gc while we looked
                    continue
                out.append(SegmentInfo(int(e.name[:-len(SEGMENT_SUFFIX)]), Path(e.path),
                                       st.st_size, st.st_mtime))
        out.sort(key=lambda s: s.number)
        return out

    def info(self, name: str) -> StreamInfo:
        segs = self.segments(name)
        newest = None
        for seg in reversed(segs):
            line = _last_complete_line(seg.path, seg.size)
            if line is not None:
                try:
                    newest = decode(line)
                except BadRecord:
                    newest = None
                break
        return StreamInfo(name, segs, newest)

    def lock(self, name: str, wait: bool = False) -> int:
        """An exclusive lock named `name` in <spool>/locks (see lock_file): e.g. one profiler
        per spool and database, so two never apply the same records."""
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        return lock_file(locks / f"{validate_stream_name(name)}.lock", wait)

    def writer(self, name: str, *, wait: bool = False, **overrides: Any) -> StreamWriter:
        return StreamWriter(self, name, wait=wait, **overrides)

    def reader(self, name: str, position: Position = START) -> StreamReader:
        return StreamReader(self, name, position)

    # -- shunt / lag / gc -----------------------------------------------------------------
    def shunt(self, stream: str, position: Position, consumer: str, reason: str,
              raw: bytes) -> None:
        """Put a record that `consumer` could not apply on the shunt stream, durably, with the
        reason and where it was. Any process may call this: it waits for the shunt lock."""
        try:
            original: Any = decode(raw)
        except BadRecord:
            original = raw.decode("utf-8", "backslashreplace")
        with self.writer(SHUNT, wait=True, durability="always") as w:
            w.append("record.shunted", {"stream": stream, "position": str(position),
                                        "consumer": consumer, "reason": reason[:2000],
                                        "record": original})

    def lag(self, name: str, position: Position, now: float | None = None) -> tuple[int, float]:
        """(records, seconds) a consumer at `position` is behind the end of the stream:
        complete lines after it, and the age of the first of them (0 when caught up)."""
        records = 0
        first_ts: str | None = None
        for seg in self.segments(name):
            if seg.number < position.segment:
                continue
            start = position.offset if seg.number == position.segment else 0
            if start >= seg.size:
                continue
            with open(seg.path, "rb") as fh:
                fh.seek(start)
                while chunk := fh.read(_CHUNK):
                    if first_ts is None:
                        nl = chunk.find(b"\n")
                        if nl >= 0:
                            try:
                                first_ts = decode(chunk[:nl]).get("ts")
                            except BadRecord:
                                first_ts = None
                    records += chunk.count(b"\n")
        seconds = 0.0
        if records and isinstance(first_ts, str):
            try:
                seconds = max(0.0, (now or time.time()) - parse_ts(first_ts).timestamp())
            except ValueError:
                seconds = 0.0
        return records, seconds

    def gc(self, name: str, positions: list[Position], retention: float | None = None,
           now: float | None = None, dry_run: bool = False) -> list[SegmentInfo]:
        """Remove the segments of `name` that every consumer in `positions` has passed and
        that are older than the retention. The live (last) segment is never removed, nor is
        anything when no consumer is known (nobody has said what they read)."""
        retention = self.settings.retention if retention is None else retention
        now = time.time() if now is None else now
        segs = self.segments(name)
        if not positions or len(segs) < 2:
            return []
        removed = []
        for seg in segs[:-1]:
            passed = all(p.segment > seg.number or (p.segment == seg.number and p.offset >= seg.size)
                         for p in positions)
            if not passed or now - seg.mtime < retention:
                break  # keep order: never leave a hole before an unpassed segment
            if not dry_run:
                os.unlink(seg.path)
            removed.append(seg)
        if removed and not dry_run:
            fsync_dir(self.stream_dir(name))  # gc is not data: a crash here only re-keeps files
        return removed

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from a watchdog thread) whenever a stream file changes; returns a
        function that stops watching. Readers still poll: inotify can drop events."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                callback()

        self.streams_dir.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(_Handler(), str(self.streams_dir), recursive=True)
        observer.daemon = True
        observer.start()

        def stop() -> None:
            observer.stop()
            observer.join(timeout=5)

        return stop


def _segment_numbers(d: Path) -> list[int]:
    """The numbers of the segments in stream directory `d` (names only: no stat)."""
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    n = len(SEGMENT_SUFFIX)
    return [int(x[:-n]) for x in names if x.endswith(SEGMENT_SUFFIX) and x[:-n].isdigit()]


def _last_complete_line(path: Path, size: int) -> bytes | None:
    """The last newline-terminated line of a file, read from its end."""
    if size == 0:
        return None
    with open(path, "rb") as fh:
        block = 65536
        end = size
        buf = b""
        while end > 0:
            start = max(0, end - block)
            fh.seek(start)
            buf = fh.read(end - start) + buf
            end = start
            last_nl = buf.rfind(b"\n")
            if last_nl < 0:
                continue
            prev_nl = buf.rfind(b"\n", 0, last_nl)
            if prev_nl >= 0 or start == 0:
                return buf[prev_nl + 1:last_nl]
        return None


class StreamWriter:
    """The one writer of a stream. Thread-safe. Use as a context manager or close() it."""

    def __init__(self, spool: Spool, name: str, *, wait: bool = False,
                 durability: str | None = None, segment_max_bytes: int | None = None,
                 segment_max_age: float | None = None, group_commit_ms: int | None = None) -> None:
        s = spool.settings
        self.spool = spool
        self.name = validate_stream_name(name)
        self.dir = spool.stream_dir(name)
        self.durability = durability or s.durability
        self.max_bytes = segment_max_bytes or s.segment_max_bytes
        self.max_age = segment_max_age if segment_max_age is not None else s.segment_max_age
        self.group_commit = (group_commit_ms if group_commit_ms is not None else s.group_commit_ms) / 1000
        self._lock = threading.Lock()
        self._fd = -1
        self._closed = False
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._acquire(wait)
        try:
            self._open_segment()
        except BaseException:
            os.close(self._lock_fd)
            raise
        # group commit state: writes are numbered; the flusher fsyncs and publishes `synced`
        self._written = 0
        self._synced = 0
        self._cond = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None
        if self.durability == "group":
            self._flusher = threading.Thread(target=self._flush_loop, name=f"fsync-{name}",
                                             daemon=True)
            self._flusher.start()

    # -- lock and segments ----------------------------------------------------------------
    def _acquire(self, wait: bool) -> int:
        try:
            return lock_file(self.dir / "writer.lock", wait)
        except Locked as exc:
            raise StreamLocked(f"stream {self.name!r} already has a writer (pid {exc.holder}); "
                               "only one process may append to a stream", exc.holder) from None

    def _open_segment(self) -> None:
        segs = self.spool.segments(self.name)
        if segs:
            last = segs[-1]
            if self._can_continue(last):
                self._segment = last.number
                self._fd = os.open(last.path, os.O_WRONLY | os.O_APPEND)
                self._size = last.size
                self._started = self._segment_start(last)
                self._torn = False
                return
            self._create(last.number + 1)
        else:
            self._create(1)

    def _can_continue(self, seg: SegmentInfo) -> bool:
        if seg.size == 0:
            return True
        if seg.size >= self.max_bytes:
            return False
        with open(seg.path, "rb") as fh:
            fh.seek(seg.size - 1)
            return fh.read(1) == b"\n"  # a torn tail stays as it is; we start a new segment

    def _segment_start(self, seg: SegmentInfo) -> float:
        try:
            with open(seg.path, "rb") as fh:
                first = fh.readline()
            return parse_ts(decode(first)["ts"]).timestamp()
        except (BadRecord, KeyError, ValueError, TypeError):
            return seg.mtime

    def _create(self, number: int) -> None:
        path = self.dir / _segment_name(number)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolError(f"stream {self.name!r}: disk full; cannot start segment "
                                 f"{number}") from exc
            raise
        fsync_dir(self.dir)  # the new segment's name survives a crash, with what we put in it
        self._segment = number
        self._size = 0
        self._started = time.time()
        self._torn = False

    def _roll(self) -> None:
        # finish the old segment before the next exists: a reader that sees N+1 may rely on N
        # being complete, even after a machine crash
        os.fsync(self._fd)
        old = self._fd
        # keep the old descriptor until the new segment exists: if creating it fails (disk
        # full), the writer stays consistent (still torn or full) and the next append retries
        self._create(self._segment + 1)
        os.close(old)

    @property
    def position(self) -> Position:
        """The end of what this writer has written."""
        return Position(self._segment, self._size)

    # -- appends --------------------------------------------------------------------------
    def append(self, type_: str, fields: dict[str, Any] | None = None, *, sync: bool = False,
               id: str | None = None, ts: str | None = None) -> dict[str, Any]:
        """Append one record; returns it (with its id and ts). When this returns, the record
        is in the kernel (safe from the death of this process); with sync=True also on disk."""
        rec = make_record(type_, fields, id=id, ts=ts)
        self.write_lines(encode(rec), sync=sync)
        return rec

    def append_many(self, items: list[tuple[str, dict[str, Any] | None]], *,
                    sync: bool = False) -> list[dict[str, Any]]:
        """Append several records with one write (they land together or, if the process dies
        mid-write, the tail is torn and never read as a record)."""
        recs = [make_record(t, f) for t, f in items]
        self.write_lines(b"".join(encode(r) for r in recs), sync=sync)
        return recs

    def write_lines(self, data: bytes, *, sync: bool = False) -> None:
        """Append already-encoded, newline-terminated records (for producers that batch)."""
        if not data.endswith(b"\n"):
            raise BadRecord("encoded records must end with a newline")
        with self._lock:
            if self._closed:
                raise SpoolError(f"writer of {self.name!r} is closed")
            self._maybe_roll(len(data))
            self._write_all(data)
            self._written += 1
            ticket = self._written
            if self.durability == "always" or (sync and self.durability == "none"):
                os.fdatasync(self._fd)
                self._synced = ticket
            elif sync:  # group: wait for the flusher's next fsync to cover this write
                self._cond.notify_all()
                while self._synced < ticket and not self._closed:
                    self._cond.wait(1.0)

    def _maybe_roll(self, incoming: int) -> None:
        if self._torn:
            self._roll()
        elif self._size > 0 and (self._size + incoming > self.max_bytes
                                 or time.time() - self._started >= self.max_age):
            self._roll()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                n = os.write(self._fd, view[written:])
                written += n
                self._size += n
        except OSError as exc:
            if written:
                # part of a record is in the file: never append after it again
                self._torn = True
            if exc.errno == errno.ENOSPC:
                raise SpoolError(f"stream {self.name!r}: disk full; record not written") from exc
            raise

    def tick(self) -> None:
        """Roll an idle segment that has grown too old (daemons call this periodically)."""
        with self._lock:
            if not self._closed and self._size > 0 and time.time() - self._started >= self.max_age:
                self._roll()

    def sync(self) -> None:
        """fsync now: everything appended so far is on disk when this returns."""
        with self._lock:
            if self._fd >= 0:
                os.fdatasync(self._fd)
                self._synced = self._written
                self._cond.notify_all()

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                while self._synced == self._written and not self._closed:
                    self._cond.wait(self.group_commit or 0.005)
                if self._closed:
                    return
                target = self._written
                fd = self._fd
            # fsync outside the lock so appends go on meanwhile (group commit)
            try:
                os.fdatasync(fd)
            except OSError:
                continue  # the fd was rolled away (already fsynced by _roll); next round
            with self._lock:
                if self._synced < target:
                    self._synced = target
                self._cond.notify_all()
            time.sleep(self.group_commit)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._fd >= 0:
                os.fsync(self._fd)  # a clean stop leaves everything on disk
                os.close(self._fd)
                self._fd = -1
            self._closed = True
            self._synced = self._written
            self._cond.notify_all()
        if self._flusher:
            self._flusher.join(timeout=5)
        os.close(self._lock_fd)  # releases the flock: the next writer may start

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class Batch:
    """Complete lines read from one segment, starting at `start`; `end` is the position after
    the last of them. `raw` holds the lines as they are in the file (each ending in a newline:
    consumers may decode it whole), `count` how many there are. `torn` is an incomplete tail
    of a finished segment (writer died or disk filled mid-write): not a record; the consumer
    shunts it and moves on."""

    start: Position
    end: Position
    raw: bytes = b""
    count: int = 0
    torn: bytes | None = None

    @cached_property
    def lines(self) -> list[bytes]:
        """The lines without their newlines (split on first use)."""
        return self.raw[:-1].split(b"\n") if self.raw else []

    def positions(self) -> list[Position]:
        """The position of each line (computed on demand: only needed to shunt)."""
        out = []
        off = self.start.offset
        for line in self.lines:
            out.append(Position(self.start.segment, off))
            off += len(line) + 1
        return out

    def __len__(self) -> int:
        return self.count


class StreamReader:
    """Reads complete lines of a stream from a position, following roll-overs."""

    def __init__(self, spool: Spool, name: str, position: Position = START) -> None:
        self.spool = spool
        self.name = validate_stream_name(name)
        self.position = position
        self._fh: Any = None
        self._fh_segment = -1

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None

    def _open(self, number: int) -> bool:
        if self._fh_segment == number and self._fh:
            return True
        self.close()
        try:
            self._fh = open(self.spool.stream_dir(self.name) / _segment_name(number), "rb")
        except FileNotFoundError:
            return False
        self._fh_segment = number
        return True

    def _next_segment(self, after: int) -> int | None:
        d = self.spool.stream_dir(self.name)
        # the writer numbers segments consecutively: one stat finds the next in the common
        # case (a full scan per roll-over made following a stream quadratic in its segments)
        if after > 0 and os.path.exists(d / _segment_name(after + 1)):
            return after + 1
        later = [n for n in _segment_numbers(d) if n > after]
        if not later:
            return None
        first = min(later)
        # readdir promises nothing about entries created while it runs: a listing taken as the
        # writer rolls can show N+2 but not N+1 (found by the roll-over-under-load test). The
        # writer creates segments in order, so anything listed implies its predecessors exist:
        # step back over those the listing missed, so no segment is ever skipped.
        while first - 1 > after and os.path.exists(d / _segment_name(first - 1)):
            first -= 1
        return first

    def read(self, max_records: int = 1000) -> Batch | None:
        """The next batch of at most max_records complete lines (from one segment), or None
        when there is nothing new. Advances self.position past what it returns."""
        while True:
            pos = self.position
            if pos.segment == 0 or not self._open(pos.segment):
                nxt = self._next_segment(pos.segment)
                if nxt is None:
                    return None
                self.position = Position(nxt, 0)
                continue
            batch = self._read_from(pos, max_records)
            if batch is not None:
                return batch
            # nothing complete after pos in this segment: is the segment finished?
            nxt = self._next_segment(pos.segment)
            if nxt is None:
                return None
            # N+1 exists, so N was complete before it was created: read N's end once more
            batch = self._read_from(pos, max_records)
            if batch is not None:
                return batch
            self._fh.seek(pos.offset)
            tail = self._fh.read()
            self.position = Position(nxt, 0)
            if tail:
                return Batch(pos, Position(nxt, 0), torn=tail)

    def _read_from(self, pos: Position, max_records: int) -> Batch | None:
        fh = self._fh
        fh.seek(pos.offset)
        pieces: list[bytes] = []
        count = size = 0
        buf = b""
        while count < max_records:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            buf += chunk
            last_nl = buf.rfind(b"\n")
            if last_nl < 0:
                continue
            complete, buf = buf[:last_nl + 1], buf[last_nl + 1:]
            n = complete.count(b"\n")
            room = max_records - count
            if n > room:  # cut after the room-th line (at most one chunk's lines to step over)
                cut = -1
                for _ in range(room):
                    cut = complete.find(b"\n", cut + 1)
                complete, n = complete[:cut + 1], room
            pieces.append(complete)
            count += n
            size += len(complete)
        if not count:
            return None
        end = Position(pos.segment, pos.offset + size)
        self.position = end
        return Batch(pos, end, b"".join(pieces), count)

    def records(self) -> Iterator[tuple[Position, dict[str, Any] | None, bytes]]:
        """(position, record or None if undecodable, raw line) for everything there is now."""
        while (batch := self.read(1000)) is not None:
            for pos, line in zip(batch.positions(), batch.lines, strict=True):
                try:
                    yield pos, decode(line), line
                except BadRecord:
                    yield pos, None, line
            if batch.torn:
                yield batch.start, None, batch.torn

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- the inbound message store ------------------------------------------------------------


_INBOUND_SUBDIRS = ("tmp", "new", "pending")
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class InboundStore:
    """The receiver's message store: a maildir-like directory of whole messages, each file
    holding one message's bytes exactly as received (CRLF line ends, no headers added).

    Layout (root = <spool>/inbound)::

        tmp/<name>        being written (a name here is never a finished message)
        new/<name>        stored messages, complete and fsynced; mail.received names them
        pending/<batch>   the receiver's intent journal (records of a batch being committed)

    A message reaches new/ only by rename after its bytes were fsynced, so new/ never holds a
    half-written file, even after a crash. Thread-safe: the receiver writes from a thread pool.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.new_dir = self.root / "new"
        self.pending_dir = self.root / "pending"
        self._counter = itertools.count(1)
        self._counter_lock = threading.Lock()
        self._node = os.urandom(3).hex()
        self._host = _HOST_UNSAFE.sub("_", os.uname().nodename)[:64] or "localhost"

    def create(self) -> None:
        """Make tmp/ new/ pending/ (idempotent)."""
        for sub in _INBOUND_SUBDIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        fsync_dir(self.root)  # the subdirectories survive a crash before the first message
        if self.root.parent.exists():
            fsync_dir(self.root.parent)  # and so does inbound/ itself

    def new_name(self) -> str:
        """A fresh, unique message name: time, microseconds, pid, counter, random, host."""
        with self._counter_lock:
            n = next(self._counter)
        now = time.time()
        return f"{int(now)}.{int(now % 1 * 1e6):06d}.{os.getpid():x}q{n:x}{self._node}.{self._host}"

    # -- writing --------------------------------------------------------------------------
    def write_tmp(self, data: bytes) -> tuple[str, str]:
        """Write `data` to tmp/<new name> and fsync it; returns (name, sha256 hex). The
        message is not stored until publish(). Raises OSError, leaving nothing behind."""
        name = self.new_name()
        path = self.tmp_dir / name
        digest = hashlib.sha256(data).hexdigest()
        try:
            write_synced(path, data)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return name, digest

    def publish(self, names: list[str]) -> None:
        """Move written messages from tmp/ into new/ with one directory fsync for all of them
        (group commit). Raises OSError after removing every one of them from tmp/ and new/:
        the caller answers 451 for all, so none may stay behind to be delivered twice."""
        moved: list[str] = []
        try:
            for name in names:
                # rename is atomic: a reader of new/ (or a crash) sees the whole message or nothing
                os.rename(self.tmp_dir / name, self.new_dir / name)
                moved.append(name)
            fsync_dir(self.new_dir)  # the names in new/ survive a crash once we answer 250
        except BaseException:
            self.discard(names)
            raise

    def discard(self, names: list[str]) -> None:
        """Remove messages (from tmp/ and new/) that will not be acknowledged."""
        for name in names:
            for d in (self.tmp_dir, self.new_dir):
                with contextlib.suppress(OSError):
                    (d / self._checked(name)).unlink(missing_ok=True)

    def store(self, data: bytes) -> tuple[str, str]:
        """Store one message durably: tmp/ write, fsync, rename into new/, fsync new/.
        Returns (name, sha256 hex); raises OSError (leaving nothing in new/) on a disk failure."""
        name, digest = self.write_tmp(data)
        self.publish([name])
        return name, digest

    # -- reading --------------------------------------------------------------------------
    @staticmethod
    def _checked(name: str) -> str:
        if (not isinstance(name, str) or not name or "/" in name or "\0" in name
                or ".." in name or name.startswith(".")):
            raise ValueError(f"bad inbound message name {name!r}")
        return name

    def path(self, name: str) -> Path:
        """The stored message's file (ValueError for a name that could leave new/)."""
        return self.new_dir / self._checked(name)

    def read(self, name: str) -> bytes:
        """The stored bytes; FileNotFoundError if the message is gone."""
        return self.path(name).read_bytes()

    def names(self) -> list[str]:
        """The names of the stored messages in new/ (unordered)."""
        try:
            return [n for n in os.listdir(self.new_dir) if not n.startswith(".")]
        except FileNotFoundError:
            return []

    def clean_tmp(self) -> int:
        """Remove what a crashed writer left in tmp/ (never acknowledged); returns how many.
        Only the one writer of the store may call this, before it starts writing."""
        removed = 0
        try:
            entries = os.listdir(self.tmp_dir)
        except FileNotFoundError:
            return 0
        for n in entries:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp_dir / n)
                removed += 1
        return removed

    # -- the writer's intent journal (see connectd.daemons.receiver) ------------------------
    def write_pending(self, batch: str, data: bytes) -> None:
        """Record what a batch is about to commit (encoded records) in pending/<batch>. Not
        fsynced: it guards against the death of the process between the rename into new/
        and the append of the records; a power cut keeps it as ext4/xfs order metadata."""
        path = self.pending_dir / self._checked(batch)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def remove_pending(self, batch: str) -> None:
        """The batch is committed (or refused): its journal entry is no longer needed. An
        unlink lost in a crash only makes the next start check a committed batch again."""
        (self.pending_dir / self._checked(batch)).unlink(missing_ok=True)

    def pending(self) -> list[tuple[str, bytes, float]]:
        """(batch, journal bytes, mtime) of every batch whose commit may not have finished."""
        out = []
        try:
            entries = os.listdir(self.pending_dir)
        except FileNotFoundError:
            return []
        for n in sorted(entries):
            p = self.pending_dir / n
            try:
                out.append((n, p.read_bytes(), p.stat().st_mtime))
            except FileNotFoundError:
                continue
        return out


def write_synced(path: Path, data: bytes) -> None:
    """Create `path` (never existing before) holding `data`, fsynced, mode 0600."""
    # O_EXCL: a name is written once; never through a file or symlink someone else planted
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)  # the bytes are on disk before new/ names them (no empty file after a crash)
    finally:
        os.close(fd)


def inbound_store(settings: Settings) -> InboundStore:
    """The inbound store of this spool: <spool>/inbound."""
    return InboundStore(settings.paths.spool / "inbound")
