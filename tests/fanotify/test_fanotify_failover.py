"""kill -9 of the fanotify daemon while readers stream a cold file, then a successor: the keeper
holds the group (readers wait, never read holes as zeros), the successor takes it back and
answers the events the dead daemon had taken (journaled) with their bytes."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from daemon_proc import WORK_ROOT, FscachedProcess, drop_caches

SIZE = 256 << 20
READER = r"""
import hashlib, sys
h = hashlib.sha256()
try:
    with open(sys.argv[1], "rb", buffering=0) as f:
        while True:
            block = f.read(1 << 16)
            if not block:
                break
            h.update(block)
    print(h.hexdigest())
except OSError as exc:
    print(f"error {exc.errno}")
"""


@pytest.fixture
def big_image():
    work = Path(tempfile.mkdtemp(prefix="fscached-failover-", dir=WORK_ROOT))
    try:
        src = work / "src"
        src.mkdir()
        digest = hashlib.sha256()
        with open(src / "big.bin", "wb") as f:
            for _ in range(SIZE >> 20):
                block = os.urandom(1 << 20)
                digest.update(block)
                f.write(block)
        subprocess.run([sys.executable, "-m", "erofs_image.cli", "convert", str(src), str(work / "img"),
                        "--compressor", "none"], check=True, capture_output=True)
        (src / "big.bin").unlink()
        yield work, digest.hexdigest()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def start_readers(path: Path, n: int) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen([sys.executable, "-c", READER, str(path)], stdout=subprocess.PIPE, text=True)
            for _ in range(n)]


def test_kill_9_under_four_readers_then_successor(big_image) -> None:
    work, want = big_image
    mnt = work / "mnt"
    image = f"fsid=big,bootstrap={work / 'img' / 'image.boot'},mountpoint={mnt}"
    # small windows: the cold read takes long enough to be killed in the middle of it
    first = FscachedProcess(work / "cache", [image], extra=["--read-window", "64K"])
    second = FscachedProcess(work / "cache", [image], extra=["--read-window", "64K"])
    readers: list[subprocess.Popen[str]] = []
    try:
        first.start()
        drop_caches()
        readers = start_readers(mnt / "big.bin", 4)
        time.sleep(0.3)
        first.kill()
        assert str(mnt) in open("/proc/self/mountinfo").read(), "the mount must outlive the daemon"
        time.sleep(1.0)
        # the keeper holds the group: nobody finished by reading holes meanwhile
        assert all(r.poll() is None for r in readers), "a reader finished while no daemon served it"
        second.start()
        results = [r.communicate(timeout=120)[0].strip() for r in readers]
        counters = second.counters()
        eio = sum(1 for r in results if r.startswith("error"))
        assert all(r == want or r == "error 5" for r in results), f"wrong bytes: {results}"
        assert eio == 0, f"{eio} reader(s) got EIO: {results}; counters {counters}"
        assert counters.get("read_failed", 0) == 0
        assert "took the fanotify group back from the keeper" in second.log_text()
        assert second.stop() == 0
    finally:
        for r in readers:
            if r.poll() is None:
                r.kill()
        first.cleanup([mnt])
        second.cleanup([mnt])


def test_killed_twice_still_converges(big_image) -> None:
    work, want = big_image
    mnt = work / "mnt"
    image = f"fsid=big,bootstrap={work / 'img' / 'image.boot'},mountpoint={mnt}"
    daemons = [FscachedProcess(work / "cache", [image], extra=["--read-window", "64K"]) for _ in range(3)]
    readers: list[subprocess.Popen[str]] = []
    try:
        daemons[0].start()
        drop_caches()
        readers = start_readers(mnt / "big.bin", 2)
        time.sleep(0.3)
        daemons[0].kill()
        daemons[1].start()
        time.sleep(0.2)
        daemons[1].kill()  # killed while answering its predecessor's orphans, or just after
        daemons[2].start()
        results = [r.communicate(timeout=120)[0].strip() for r in readers]
        assert results == [want, want], results
        assert daemons[2].stop() == 0
    finally:
        for r in readers:
            if r.poll() is None:
                r.kill()
        for d in daemons:
            d.cleanup([mnt])


@pytest.fixture
def silent_server():
    """A loopback server that accepts connections and never answers: a fetch from it hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = False

    def accept() -> None:
        while not stop:
            try:
                conn, _ = listener.accept()
                held.append(conn)
            except OSError:
                return

    import threading

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop = True
        listener.close()
        for conn in held:
            conn.close()


def test_orphans_a_dead_daemon_took_are_answered_with_their_bytes(big_image, silent_server) -> None:
    """The first daemon takes the read's event and hangs on a registry that never answers; it is
    killed with the event unanswered. The successor (local blobs) finds the event in the journal
    and answers it by its fd number after filling its range: the reader gets the right bytes."""
    work, _ = big_image
    mnt = work / "mnt"
    boot = work / "img" / "image.boot"
    hanging = (f"fsid=big,bootstrap={boot},registry=127.0.0.1:{silent_server}/test/repo,scheme=http,mountpoint={mnt},"
               "profile=none")  # no profile lookup: that registry never answers
    local = f"fsid=big,bootstrap={boot},blobs={work / 'img' / 'blobs'},mountpoint={mnt}"
    first = FscachedProcess(work / "cache", [hanging])
    second = FscachedProcess(work / "cache", [local])
    offset = 100 << 20
    code = (f"import os,sys; fd=os.open({str(mnt / 'big.bin')!r}, os.O_RDONLY); "
            f"d=os.pread(fd, 1 << 20, {offset}); sys.stdout.buffer.write(d)")
    reader: subprocess.Popen[bytes] | None = None
    try:
        first.start()
        drop_caches()
        reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while first.counters().get("read", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert reader.poll() is None, "the read must be waiting on the hanging fetch"
        first.kill()
        time.sleep(0.5)
        assert reader.poll() is None, "with the keeper holding the group the reader waits, it never reads holes"
        second.start()
        data, _ = reader.communicate(timeout=60)
        with open(work / "img" / "blobs" / next(iter(os.listdir(work / "img" / "blobs"))), "rb") as blob:
            blob.seek(offset)
            assert data == blob.read(1 << 20), "the orphan was answered without its bytes"
        counters = second.counters()
        assert counters.get("orphans_answered", 0) >= 1, counters
        assert counters.get("orphans_eio", 0) == 0, counters
        assert "left unanswered" in second.log_text()
        assert second.stop() == 0
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
        first.cleanup([mnt])
        second.cleanup([mnt])


def test_a_registry_silent_to_the_profile_lookup_does_not_hold_the_mount(big_image, silent_server) -> None:
    """profile=auto (the default) asks the image's registry for a start-up profile before the
    mount; a registry that accepts the connection and never answers costs the bind
    PROFILE_LOOKUP_SECONDS, then the image is mounted and served without a profile (its blobs
    are local here), with one warning saying why."""
    from fscached.daemon import PROFILE_LOOKUP_SECONDS

    work, _ = big_image
    mnt = work / "mnt"
    boot = work / "img" / "image.boot"
    spec = (f"fsid=big,bootstrap={boot},blobs={work / 'img' / 'blobs'},"
            f"registry=127.0.0.1:{silent_server}/test/repo,scheme=http,mountpoint={mnt}")
    daemon = FscachedProcess(work / "cache", [spec])
    try:
        daemon.start()
        assert "big.bin" in os.listdir(mnt), "the image is mounted"
        assert f"did not answer the profile lookup within {PROFILE_LOOKUP_SECONDS:g} s" in daemon.log_text()
        with open(mnt / "big.bin", "rb") as f:
            f.seek(100 << 20)
            assert len(f.read(1 << 20)) == 1 << 20
        assert daemon.stop() == 0
    finally:
        daemon.cleanup([mnt])
