"""connectd.spool.InboundStore: the receiver's message store on a real directory. Bytes are kept
exactly, names are unique, new/ never holds a half-written file, and a failing disk leaves
nothing behind."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from connectd import spool as sp
from connectd.settings import Settings
from connectd.spool import InboundStore, inbound_store


@pytest.fixture
def store(tmp_path: Path) -> InboundStore:
    s = InboundStore(tmp_path / "inbound")
    s.create()
    return s


def test_store_keeps_bytes_exactly(store: InboundStore) -> None:
    """A stored message reads back byte for byte, CRLF and 8-bit included, with its sha256."""
    data = b"From: a@x\r\nSubject: \xe9t\xe9\r\n\r\nline\r\n.dot\r\n\x00end"
    name, digest = store.store(data)
    assert store.read(name) == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.path(name).parent == store.new_dir
    assert os.listdir(store.tmp_dir) == []


def test_create_is_idempotent(store: InboundStore) -> None:
    """create() twice keeps what is stored."""
    name, _ = store.store(b"x")
    store.create()
    assert store.names() == [name]


def test_names_unique_across_threads(store: InboundStore) -> None:
    """Concurrent stores from many threads each get their own name and file."""
    results: list[str] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        for j in range(50):
            name, _ = store.store(f"{i}-{j}".encode())
            with lock:
                results.append(name)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 400
    assert sorted(store.names()) == sorted(results)
    assert {store.read(n) for n in results} == {f"{i}-{j}".encode() for i in range(8) for j in range(50)}


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "..", ".hidden", "a\0b"])
def test_path_refuses_escaping_names(store: InboundStore, bad: str) -> None:
    """Names with a slash, '..', NUL or a leading dot are refused with ValueError."""
    with pytest.raises(ValueError):
        store.path(bad)


def test_read_missing_raises(store: InboundStore) -> None:
    """Reading a message that is not there raises FileNotFoundError."""
    with pytest.raises(FileNotFoundError):
        store.read("1.000000.1q1abc.host")


def test_failed_file_fsync_leaves_nothing(store: InboundStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fsync of the message that fails raises OSError and leaves tmp/ and new/ empty."""
    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sp.os, "fsync", broken)
    with pytest.raises(OSError):
        store.store(b"lost")
    assert os.listdir(store.tmp_dir) == [] and os.listdir(store.new_dir) == []


def test_failed_rename_leaves_nothing(store: InboundStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename into new/ that fails raises OSError and leaves tmp/ and new/ empty."""
    def broken(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sp.os, "rename", broken)
    with pytest.raises(OSError):
        store.store(b"lost")
    assert os.listdir(store.tmp_dir) == [] and os.listdir(store.new_dir) == []


def test_failed_dir_fsync_unpublishes_the_batch(store: InboundStore,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """When the fsync of new/ fails, every message of the batch is taken out of new/ again."""
    names = [store.write_tmp(f"m{i}".encode())[0] for i in range(3)]

    def broken(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sp, "fsync_dir", broken)
    with pytest.raises(OSError):
        store.publish(names)
    assert os.listdir(store.tmp_dir) == [] and os.listdir(store.new_dir) == []


def test_full_disk_refuses_and_leaves_nothing(tmp_path: Path, mount_tmpfs) -> None:
    """On a full filesystem store() raises OSError and new/ stays empty."""
    store = InboundStore(mount_tmpfs("64k") / "inbound")
    store.create()
    with pytest.raises(OSError):
        store.store(b"x" * 200_000)
    assert store.names() == []
    assert os.listdir(store.tmp_dir) == []


def test_clean_tmp_removes_leftovers(store: InboundStore) -> None:
    """clean_tmp() removes what a dead writer left in tmp/ and keeps new/."""
    kept, _ = store.store(b"kept")
    store.write_tmp(b"half")
    assert store.clean_tmp() == 1
    assert os.listdir(store.tmp_dir) == []
    assert store.names() == [kept]


def test_pending_journal_roundtrip(store: InboundStore) -> None:
    """A pending batch is listed with its bytes until it is removed."""
    store.write_pending("b1", b'{"id":"1"}\n')
    [(batch, data, _mtime)] = store.pending()
    assert (batch, data) == ("b1", b'{"id":"1"}\n')
    store.remove_pending("b1")
    assert store.pending() == []


def test_inbound_store_lives_in_the_spool(settings: Settings) -> None:
    """inbound_store(settings) is <spool>/inbound."""
    assert inbound_store(settings).root == settings.paths.spool / "inbound"
