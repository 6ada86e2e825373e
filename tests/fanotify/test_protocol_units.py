"""fanotify wire format, the event journal and the keeper, without a mount."""
from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fanotify.group import (FAN_ALLOW, FAN_DENY, FAN_PRE_ACCESS, FanotifyError, Group, deny_errno,
                            parse_events, probe)
from fscached.frontends.fanotify import keeper
from fscached.frontends.fanotify.journal import EventJournal

WORK_ROOT = Path("/var/tmp")


def event_bytes(fd: int, offset: int | None, count: int = 0, pid: int = 42) -> bytes:
    info = b"" if offset is None else struct.pack("<BBH4xQQ", 6, 0, 24, offset, count)
    return struct.pack("<IBBHQii", 24 + len(info), 3, 0, 24, FAN_PRE_ACCESS, fd, pid) + info


def test_parse_events_with_and_without_range() -> None:
    events = parse_events(event_bytes(7, 4096, 131072) + event_bytes(9, None))
    assert [(e.fd, e.offset, e.count, e.pid) for e in events] == [(7, 4096, 131072, 42), (9, 0, -1, 42)]
    assert events[0].mask == FAN_PRE_ACCESS


def test_parse_events_refuses_a_bad_version_and_a_cut_event() -> None:
    bad = bytearray(event_bytes(7, 0, 1))
    bad[4] = 2
    with pytest.raises(FanotifyError, match="version 2"):
        parse_events(bytes(bad))
    with pytest.raises(FanotifyError, match="length"):
        parse_events(event_bytes(7, 0, 1)[:30] + struct.pack("<I", 0))


def test_deny_errno_encoding() -> None:
    assert deny_errno() == FAN_DENY | (errno.EIO << 24)
    assert deny_errno(errno.ENOENT) == FAN_DENY | (errno.ENOENT << 24)


def test_probe_accepts_ext4_and_refuses_tmpfs() -> None:
    assert probe(WORK_ROOT) is None
    reason = probe(Path("/dev/shm"))
    assert reason is not None and "tmpfs" in reason


class MarkedBlob:
    """A plain 8 KiB file marked by a real group (on WORK_ROOT: tmpfs refuses the marks), and
    readers of its first 10 bytes in threads: each one's bytes or errno lands in `results`."""

    def __init__(self, work: Path) -> None:
        self.blob = work / "blob"
        self.blob.write_bytes(b"x" * 8192)
        self.group = Group.create()
        self.group.mark(self.blob)
        self.results: list[object] = []

    def start_reader(self) -> threading.Thread:
        def read() -> None:
            try:
                with open(self.blob, "rb") as f:
                    self.results.append(f.read(10))
            except OSError as exc:
                self.results.append(exc.errno)

        reader = threading.Thread(target=read)
        reader.start()
        return reader


@pytest.fixture
def marked_blob() -> Iterator[MarkedBlob]:
    work = Path(tempfile.mkdtemp(dir=WORK_ROOT))
    try:
        marked = MarkedBlob(work)
        try:
            yield marked
        finally:
            marked.group.close()
    finally:
        shutil.rmtree(work)


def test_real_group_allows_and_denies_by_fd_number(marked_blob: MarkedBlob) -> None:
    """The kernel path end to end on a plain file: an unanswered read waits; ALLOW lets it read,
    FAN_DENY_ERRNO(EIO) fails it with EIO; an answer for an unknown number is refused."""
    group = marked_blob.group
    for response in (FAN_ALLOW, deny_errno()):
        t = marked_blob.start_reader()
        events = []
        while not events:
            os.set_blocking(group.fd, True)
            events = group.read_events()
        t.join(0.3)
        assert t.is_alive(), "the reader did not wait for the answer"
        assert events[0].offset == 0 and events[0].count > 0
        assert group.answer(events[0].fd, response)
        os.close(events[0].fd)
        t.join(5)
    assert marked_blob.results == [b"x" * 10, errno.EIO]
    assert group.answer(1000, FAN_ALLOW) is False  # ENOENT: no such event


def test_journal_keeps_pending_events_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "events.journal"
    journal = EventJournal(path, 1024)
    journal.record(7, 1, 2, 4096, 8192)
    journal.record(9, 1, 3, 0, 4096)
    journal.clear(9)
    journal.record(70000, 1, 2, 0, 1)  # past the table: not journaled, not an error
    journal.close()
    again = EventJournal(path, 1024)
    pending = again.pending()
    assert [(o.fd, o.dev, o.ino, o.offset, o.count) for o in pending] == [(7, 1, 2, 4096, 8192)]
    again.reset()
    assert again.pending() == []
    again.close()


def test_journal_tells_a_successor_the_fd_limit_of_the_daemon_before(tmp_path: Path) -> None:
    path = tmp_path / "events.journal"
    first = EventJournal(path, 1024)
    assert first.predecessor_fd_limit == 0  # a new journal: nobody before
    first.close()
    second = EventJournal(path, 4096)
    assert second.predecessor_fd_limit == 1024
    second.reset()  # a fresh group: the records go, this daemon's limit stays
    second.close()
    assert EventJournal(path, 512).predecessor_fd_limit == 4096


def test_answer_any_reaches_an_event_whose_reader_died_before_saying_its_number(marked_blob: MarkedBlob) -> None:
    """A process reads an event and dies before it records the event's fd number (what a kill
    between read(2) and the journal store does): the reader waits. Answering every number
    below a limit reaches it; the numbers of no event are refused, not an error."""
    group = marked_blob.group
    t = marked_blob.start_reader()
    os.set_blocking(group.fd, True)
    events = group.read_events()
    os.set_blocking(group.fd, False)
    number = events[0].fd
    os.close(number)  # as a dead process's fds are: the number is now known to nobody
    t.join(0.3)
    assert t.is_alive(), "the reader did not wait"
    answered = group.answer_any(range(1024), deny_errno())
    t.join(5)
    assert answered == [number] and marked_blob.results == [errno.EIO]
    assert group.answer_any(range(1024), deny_errno()) == []  # nothing left to answer


def test_journal_survives_kill_9_of_its_writer(tmp_path: Path) -> None:
    path = tmp_path / "events.journal"
    code = (f"from fscached.frontends.fanotify.journal import EventJournal; import os, signal\n"
            f"j = EventJournal(__import__('pathlib').Path({str(path)!r}), 1024); j.record(11, 5, 6, 1 << 20, 65536)\n"
            f"os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    pending = EventJournal(path, 1024).pending()
    assert [(o.fd, o.offset, o.count) for o in pending] == [(11, 1 << 20, 65536)]


def test_keeper_holds_fds_across_its_clients_and_lets_go(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    sock = state / "keeper.sock"
    assert keeper.take(sock) is None  # nobody there
    keeper.start(sock)
    try:
        assert (sock.stat().st_mode & 0o777) == 0o600
        r, w = os.pipe()
        keeper.give(sock, {"group": w})
        os.close(w)  # only the keeper holds the write end now
        held = keeper.take(sock)
        assert held is not None and list(held) == ["group"]
        os.write(held["group"], b"alive")
        os.close(held["group"])
        assert os.read(r, 5) == b"alive"
    finally:
        keeper.dismiss(sock)
    assert keeper.take(sock) is None and not sock.exists()
    assert os.read(r, 5) == b""  # every write end is closed: the keeper let go
    os.close(r)
