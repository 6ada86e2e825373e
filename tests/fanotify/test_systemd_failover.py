"""fscached run by systemd (the stand-in: tests/standins/systemd.py) on the host kernel's fanotify
path: the group, the write fds and the hand-over state live in the fd store, so a daemon killed
with -9 (or by the watchdog, or restarted) leaves readers waiting, and the next process, started
with LISTEN_FDS, takes the group back, answers what the dead one took (the journal) and serves
on. Every reader must read the right bytes; the goal is no EIO at all.
"""
from __future__ import annotations

import hashlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fanotify.group import parse_events
from daemon_proc import REPO, WORK_ROOT, drop_caches
from systemd_scenario import (cleanup, finish_readers, kill_readers, make_image, recovery, standin,
                              start_readers)

SIZE = 256 << 20
SLOW = ["--read-window", "64K"]  # small windows: a cold read lasts long enough to be killed in


@pytest.fixture(scope="module")
def big_image(fanotify_host: None):
    work = Path(tempfile.mkdtemp(prefix="fsc-sd-", dir=WORK_ROOT))
    try:
        img, want = make_image(work, SIZE)
        yield img, want
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def case(fanotify_work: Path, big_image):
    """(work dir, image spec with a mountpoint, mountpoint, sha256 of big.bin); mounts and
    stand-ins cleaned up after."""
    img, want = big_image
    mnt = fanotify_work / "mnt"
    spec = f"fsid=big,bootstrap={img / 'image.boot'},mountpoint={mnt}"
    made: list = []
    yield fanotify_work, spec, mnt, want, made
    for sd in made:
        sd.close()
    cleanup(fanotify_work / "cache", [mnt])


def _log(sd) -> str:
    return sd.log.read_text(errors="replace") if sd.log.exists() else ""


def _check(results: list[str], want: str, sd) -> None:
    eio = [r for r in results if r.startswith("error")]
    assert all(r == f"sha {want}" or r.startswith("error") for r in results), f"wrong bytes: {results}"
    assert not eio, f"{len(eio)} reader(s) failed: {results}\n{sd.log_tail()}"


def test_kill_9_under_four_readers(case) -> None:
    work, spec, mnt, want, made = case
    sd = standin(work / "cache", [spec], SLOW)
    made.append(sd)
    sd.start()
    first = sd.wait_ready()
    assert sd.store_names[0] == "fanotify-group" and "state" in sd.store_names, sd.store_names
    assert not (work / "cache" / ".fscached" / "keeper.sock").exists(), "under systemd the fd store is the keeper"
    drop_caches()
    readers = start_readers(mnt / "big.bin", 4)
    try:
        time.sleep(0.4)
        sd.kill()
        killed_at = time.monotonic()
        successor = sd.wait_starts(2)
        assert successor.listen_names[0] == "fanotify-group", successor.listen_names
        sd.wait_ready()
        results = finish_readers(readers)
    finally:
        kill_readers(readers)
    _check(results, want, sd)
    log = _log(sd)
    assert "took the fanotify group back from systemd's fd store" in log
    rec = recovery(readers, killed_at, successor)
    print(f"kill -> successor started {successor.spawned - killed_at:.3f} s, ready {rec.ready - rec.spawned:.3f} s "
          f"after its start, readers progressing {rec.start_to_resume} s after its start")
    assert rec.resumed is not None
    assert first.status == -signal.SIGKILL and first.reason == "signal"
    assert sd.errors == [] and sd.rejected == []


def test_restart_keeps_the_group_while_mounts_are_busy(case) -> None:
    """`systemctl restart` under readers: the mount is busy, so the stop leaves it mounted and the
    group in the store (never dropped while mounted); the next process serves it again."""
    work, spec, mnt, want, made = case
    sd = standin(work / "cache", [spec], SLOW)
    made.append(sd)
    sd.start()
    sd.wait_ready()
    drop_caches()
    readers = start_readers(mnt / "big.bin", 4)
    try:
        time.sleep(0.4)
        old = sd.restart()
        assert old.reason == "restart" and old.status == 0, (old, sd.log_tail())
        new = sd.wait_ready()
        assert new.listen_names[0] == "fanotify-group", new.listen_names
        results = finish_readers(readers)
    finally:
        kill_readers(readers)
    _check(results, want, sd)
    log = _log(sd)
    assert "left mounted for the next fscached" in log
    assert "still mounted on" in log and "served again" in log
    # a stop with nothing mounted any more lets go: the store is emptied, the next start is fresh
    sd.kill(signal.SIGTERM)
    sd.wait_exit(new, 30)
    assert new.status == 0 and sd.store_names == [], (sd.store_names, sd.log_tail())
    assert str(mnt) not in open("/proc/self/mountinfo").read()


def test_killed_during_start_and_twice_in_a_row_converges(case) -> None:
    work, spec, mnt, want, made = case
    sd = standin(work / "cache", [spec], SLOW)
    made.append(sd)
    sd.start()
    sd.wait_ready()
    drop_caches()
    readers = start_readers(mnt / "big.bin", 2)
    try:
        time.sleep(0.3)
        sd.kill()
        second = sd.wait_starts(2)
        time.sleep(0.15)  # during its start-up: importing, taking the fds, marking
        assert second.ready is None, "started too fast to be killed during its start-up"
        os.kill(second.pid, signal.SIGKILL)
        sd.wait_starts(3)
        third = sd.wait_ready()
        time.sleep(0.2)
        sd.kill()  # killed again, once serving
        sd.wait_starts(4)
        sd.wait_ready()
        results = finish_readers(readers)
    finally:
        kill_readers(readers)
    _check(results, want, sd)
    assert [s.reason for s in sd.starts[:3]] == ["signal", "signal", "signal"], sd.starts
    assert third.listen_names and third.listen_names[0] == "fanotify-group"


def test_stuck_loop_is_killed_by_the_watchdog_and_restarted(case) -> None:
    work, spec, mnt, want, made = case
    sd = standin(work / "cache", [spec], SLOW, watchdog_sec=2.0, abort_timeout=1.0)
    made.append(sd)
    sd.start()
    first = sd.wait_ready()
    pings = [m for m in sd.messages if m[2] == "WATCHDOG=1"]
    time.sleep(1.5)
    assert len([m for m in sd.messages if m[2] == "WATCHDOG=1"]) > len(pings), "no WATCHDOG=1 from the loop"
    drop_caches()
    readers = start_readers(mnt / "big.bin", 2)
    try:
        time.sleep(0.3)
        os.kill(first.pid, signal.SIGSTOP)  # the loop answers nothing any more
        sd.wait_starts(2, timeout=20)
        sd.wait_ready()
        results = finish_readers(readers)
    finally:
        kill_readers(readers)
    _check(results, want, sd)
    assert first.reason == "watchdog", first
    assert any("watchdog timeout" in e for e in sd.errors)


def test_events_the_dead_daemon_read_but_never_journaled_are_answered(case) -> None:
    """A kill (or the watchdog's) can land between the daemon's read(2) of its events and the
    store that journals them: their numbers died with it, and the successor has no record of
    them. Made certain here: the daemon is stopped, this test reads the reader's event from the
    group in the fd store (as the daemon's read would have) and forgets its number, then the
    daemon is killed. The successor answers every number the journal does not name, before it
    reads an event of its own: the denied read-ahead is read again, and served."""
    work, spec, mnt, want, made = case
    sd = standin(work / "cache", [spec], SLOW)
    made.append(sd)
    sd.start()
    first = sd.wait_ready()
    group_fd = next(entry.fd for entry in sd.store if entry.name == "fanotify-group")
    drop_caches()
    os.kill(first.pid, signal.SIGSTOP)  # its fast-path thread reads nothing more
    readers = start_readers(mnt / "big.bin", 1)
    try:
        ready, _, _ = select.select([group_fd], [], [], 30)
        assert ready, "the reader raised no event"
        events = parse_events(os.read(group_fd, 65536))
        assert events, "no event to take"
        for event in events:
            os.close(event.fd)  # its number is known to nobody now
        time.sleep(0.3)
        assert readers[0].proc.poll() is None, "the reader did not wait for its event"
        sd.kill()
        sd.wait_starts(2)
        sd.wait_ready()
        results = finish_readers(readers, 60)
    finally:
        kill_readers(readers)
    _check(results, want, sd)
    assert f"answered EIO {len(events)} event(s) the previous daemon had read but not journaled" in _log(sd), \
        sd.log_tail()


def test_run_time_binds_come_back_after_a_kill(case) -> None:
    """An image bound through the API is in the state in the fd store: a restarted daemon binds
    it again (and serves its mount); once unbound, a restart leaves it out."""
    work, spec, _mnt, want, made = case
    img = Path(spec.split("bootstrap=")[1].split(",")[0]).parent
    sock = work / "api" / "api.sock"
    late_mnt = work / "late"
    sd = standin(work / "cache", [spec], ["--apisock", str(sock)])
    made.append(sd)
    sd.start()
    sd.wait_ready()
    ctl = [sys.executable, "-m", "fscached.ctl", "--sock", str(sock)]
    try:
        shutil.copy(img / "image.boot", work / "late.boot")  # its own bootstrap: its own mounts
        subprocess.run(ctl + ["bind", "--id", "late", "--bootstrap", str(work / "late.boot"), "--blobs",
                              str(img / "blobs"), "--mountpoint", str(late_mnt)],
                       check=True, cwd=REPO, capture_output=True, timeout=60)
        sd.kill()
        sd.wait_starts(2)
        sd.wait_ready()
        listed = subprocess.run(ctl + ["list", "--json"], check=True, cwd=REPO, capture_output=True, text=True,
                                timeout=60).stdout
        assert '"late"' in listed, listed
        drop_caches()
        got = hashlib.sha256((late_mnt / "big.bin").read_bytes()).hexdigest()
        assert got == want
        assert "bound again 1 image(s) bound at run time before the restart: late" in _log(sd)
        unbind = subprocess.run(ctl + ["unbind", "--id", "late"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert unbind.returncode == 0, (unbind.stderr, sd.log_tail())
        sd.kill()
        sd.wait_starts(3)
        sd.wait_ready()
        listed = subprocess.run(ctl + ["list", "--json"], check=True, cwd=REPO, capture_output=True, text=True,
                                timeout=60).stdout
        assert '"late"' not in listed, listed
    finally:
        cleanup(work / "cache", [late_mnt])
