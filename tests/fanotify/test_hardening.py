"""What a bad-input probe of the fanotify daemon found, each as a test (issue 14's hardening), on
the host kernel through the real command line: a mount detached with `umount -l`, another
daemon's mount of the same bootstrap, a full cache disk, a mountpoint that is already a mount, a
stop with a busy mount, malformed API traffic, unwritable output files, misleading errors, a
keeper left by a killed daemon."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from apiclient import call, entry
from daemon_proc import REPO, FscachedProcess, drop_caches
from erofs_image.builder import convert
from fscached.util import mounts


def build(work: Path, name: str = "img", big: int = 8 << 20) -> tuple[Path, dict[str, bytes]]:
    tree = work / f"tree-{name}"
    tree.mkdir()
    files = {"big.bin": os.urandom(big), "small.txt": b"small file\n" * 100}
    for rel, data in files.items():
        (tree / rel).write_bytes(data)
    out = work / f"built-{name}"
    convert(tree, out, compressor="none", chunk_size=64 << 10)
    return out, files


def spec(built: Path, mountpoint: Path | None, fsid: str = "img") -> str:
    text = f"fsid={fsid},bootstrap={built / 'image.boot'},blobs={built / 'blobs'}"
    return text + (f",mountpoint={mountpoint}" if mountpoint is not None else "")


def keepers_of(cache: Path) -> list[int]:
    """Pids of keeper processes serving this cache dir."""
    sock = str(cache / ".fscached" / "keeper.sock")
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fscached.frontends.fanotify.keeper" in cmd and sock.encode() in cmd:
            found.append(int(pid))
    return found


def wait_until(check: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:g} s: {what}")
        time.sleep(0.05)


HOLDING_READER = """
import hashlib, sys
f = open(sys.argv[1], "rb", buffering=0)
first = f.read(65536)
print("holding", flush=True)
sys.stdin.readline()
rest = b""
try:
    while True:
        block = f.read(1 << 16)
        if not block:
            break
        rest += block
    print(hashlib.sha256(first + rest).hexdigest(), flush=True)
except OSError as exc:
    print(f"error {exc.errno}", flush=True)
"""


def holding_reader(path: Path) -> subprocess.Popen[str]:
    reader = subprocess.Popen([sys.executable, "-c", HOLDING_READER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdout is not None and reader.stdout.readline().strip() == "holding"
    return reader


# -- a mount detached with umount -l is still a mount ---------------------------------------------
def test_a_stop_after_a_lazy_unmount_keeps_serving_its_reader(fanotify_work: Path,
                                                              fscached_daemons: Callable[..., FscachedProcess]) -> None:
    """A reader holds a file of the mount, the mount is detached (`umount -l`, as container
    runtimes and test suites do), then the daemon is stopped: it must go on serving that reader
    (never let the kernel read its holes as zeros), and stop by itself once the reader is gone."""
    built, files = build(fanotify_work)
    mnt = fanotify_work / "mnt"
    daemon = fscached_daemons(fanotify_work / "cache", [spec(built, mnt)], extra=["--read-window", "64K"])
    drop_caches()
    reader = holding_reader(mnt / "big.bin")
    try:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
        assert str(mnt) not in mounts.erofs_mounts()
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "still serving" in daemon.log_text(), 10, "the daemon says it still serves")
        time.sleep(1.0)
        assert daemon.proc.poll() is None, f"the daemon stopped under a detached mount's reader:\n{daemon.log_text()}"
        assert reader.stdin is not None and reader.stdout is not None
        reader.stdin.write("go\n")
        reader.stdin.flush()
        got = reader.stdout.readline().strip()
        assert got == hashlib.sha256(files["big.bin"]).hexdigest(), f"the reader got {got!r}, not the file's bytes"
    finally:
        reader.kill()
        reader.wait(10)
    assert daemon.proc.wait(30) == 0, daemon.log_text()
    assert wait_until(lambda: not keepers_of(daemon.cache_dir), 15, "the keeper lets go")


def test_another_daemons_mount_of_the_same_bootstrap_is_not_ours(fanotify_work: Path,
                                                                 fscached_daemons: Callable[..., FscachedProcess]) -> None:
    """Two daemons, two cache dirs, one bootstrap. The second one's mount holds ITS cache files,
    not the first one's: the first stops cleanly and lets its keeper go (deciding by the
    bootstrap's path, it kept the keeper for good), while the second goes on serving."""
    built, files = build(fanotify_work)
    mnt_a, mnt_b = fanotify_work / "mnt-a", fanotify_work / "mnt-b"
    first = fscached_daemons(fanotify_work / "cache-a", [spec(built, mnt_a)])
    second = fscached_daemons(fanotify_work / "cache-b", [spec(built, mnt_b)])
    assert first.stop(timeout=30) == 0, first.log_text()
    assert str(mnt_a) not in mounts.erofs_mounts()
    assert wait_until(lambda: not keepers_of(first.cache_dir), 15, "the first daemon's keeper lets go")
    drop_caches()
    assert (mnt_b / "big.bin").read_bytes() == files["big.bin"]
    assert second.counters().get("read_failed", 0) == 0
    assert second.stop(timeout=30) == 0


# -- a full cache disk -----------------------------------------------------------------------------
@pytest.fixture
def small_fs(fanotify_work: Path) -> Any:
    """A 64 MiB ext4 filesystem of its own (a loop mount), to be filled up."""
    image, root = fanotify_work / "fs.img", fanotify_work / "fs"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    root.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def fill_up(root: Path) -> None:
    with open(root / "filler", "wb") as f:
        block = b"\xff" * (1 << 20)
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError:
            pass
        try:
            while True:  # the last blocks, one by one
                f.write(b"\xff" * 4096)
                f.flush()
        except OSError:
            pass
    assert os.statvfs(root).f_bavail == 0


def test_a_daemon_starts_on_a_full_cache_disk_and_serves_what_is_cached(
        fanotify_work: Path, small_fs: Path, fscached_daemons: Callable[..., FscachedProcess]) -> None:
    built, files = build(fanotify_work, big=20 << 20)
    mnt = fanotify_work / "mnt"
    cache = small_fs / "cache"
    first = fscached_daemons(cache, [spec(built, mnt)])
    assert (mnt / "small.txt").read_bytes() == files["small.txt"]  # cached now
    assert first.stop(timeout=30) == 0
    fill_up(small_fs)
    second = fscached_daemons(cache, [spec(built, mnt)])  # it starts: no error about a state file
    full = [line for line in second.log_text().splitlines() if "is full" in line]
    assert full and str(cache) in full[0], second.log_text()
    drop_caches()
    assert (mnt / "small.txt").read_bytes() == files["small.txt"], "what is cached is served"
    got = subprocess.run([sys.executable, "-c", f"open({str(mnt / 'big.bin')!r}, 'rb').read()"],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode != 0 and "Input/output error" in got.stderr, "no room to fill it: EIO, never zeros"
    assert second.stop(timeout=30) == 0
    leftovers = [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == [], f"half-written state files: {leftovers}"


# -- mountpoints and output files --------------------------------------------------------------------
def test_a_mountpoint_that_is_already_a_mount_is_refused(fanotify_work: Path,
                                                         fscached_daemons: Callable[..., FscachedProcess]) -> None:
    built, _ = build(fanotify_work, big=1 << 20)
    taken = fanotify_work / "taken"
    taken.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(taken)], check=True)
    try:
        proc = FscachedProcess(fanotify_work / "cache", [spec(built, taken)])
        done = subprocess.run(proc.args, cwd=REPO, capture_output=True, text=True, timeout=60)
        errors = [line for line in done.stderr.splitlines() + done.stdout.splitlines() if "error" in line.lower()]
        assert done.returncode == 1 and len(errors) == 1 and str(taken) in errors[0] \
            and "already a mount point" in errors[0], (done.stdout, done.stderr)
        assert str(taken) not in mounts.erofs_mounts(), "an image was stacked on the tmpfs"
        sock = fanotify_work / "api" / "api.sock"
        daemon = fscached_daemons(fanotify_work / "cache2", [], extra=["--apisock", str(sock)])
        status, body = call(sock, "PUT", "/api/v2/blobs", entry("img", built, fanotify_work, taken))
        assert status == 400 and "already a mount point" in body["message"], body
        assert str(taken) not in mounts.erofs_mounts()
        assert daemon.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(taken)], check=False)


@pytest.mark.parametrize("which", ["--ready-file", "--stats-file"])
def test_an_unwritable_output_file_is_refused_before_anything_is_mounted(fanotify_work: Path, which: str) -> None:
    built, _ = build(fanotify_work, big=1 << 20)
    mnt = fanotify_work / "mnt"
    proc = FscachedProcess(fanotify_work / "cache", [spec(built, mnt)])
    bad = str(fanotify_work / "no-such-dir" / "file")
    args = [a if a != str(proc.ready if which == "--ready-file" else proc.stats_file) else bad for a in proc.args]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
    out = done.stderr + done.stdout
    assert done.returncode == 1 and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and which in errors[0] and "no-such-dir" in errors[0], out
    assert str(mnt) not in mounts.erofs_mounts()
    assert wait_until(lambda: not keepers_of(proc.cache_dir), 15, "no keeper left by a refused start")


def test_errors_that_used_to_mislead(fanotify_work: Path, fscached_daemons: Callable[..., FscachedProcess]) -> None:
    built, _ = build(fanotify_work, big=1 << 20)

    def run(*args: str) -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-m", "fscached.cli", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        return done.returncode, (done.stderr + done.stdout).strip()

    image = spec(built, None)
    code, out = run("--cache-dir", "/etc/passwd", "--image", image)
    assert code == 1 and "/etc/passwd" in out and "not a directory" in out and "\n" not in out, out
    code, out = run("--cache-dir", str(fanotify_work / "c1"), "--image", f"fsid=x,bootstrap={built / 'image.boot'},"
                    "blobs=/etc/passwd")
    assert code != 0 and "/etc/passwd" in out and "not a directory" in out, out
    code, out = run("--cache-dir", str(fanotify_work / "c2"), "--image", image, "--apisock", "")
    assert code == 2 and "apisock" in out and "\n" not in out, out
    long_dir = fanotify_work / ("d" * 60) / ("e" * 60)
    code, out = run("--cache-dir", str(fanotify_work / "c3"), "--image", image, "--apisock", str(long_dir / "api.sock"))
    assert code == 1 and "shorter than" in out, out
    assert not (fanotify_work / ("d" * 60)).exists(), "a refused socket path left its directory behind"
    # through the API: a mountpoint below a file is a 400, and a failed bind leaves no cache dir
    sock = fanotify_work / "api" / "api.sock"
    cache = fanotify_work / "cache"
    daemon = fscached_daemons(cache, [], extra=["--apisock", str(sock)])
    (fanotify_work / "a-file").write_text("x")
    status, body = call(sock, "PUT", "/api/v2/blobs", entry("below", built, fanotify_work, fanotify_work / "a-file" / "mnt"))
    assert status == 400 and "a-file" in body["message"], body
    assert not (cache / "blobs" / "below").exists(), "a failed bind left its cache directory"
    assert daemon.stop() == 0


# -- a stop with a busy mount --------------------------------------------------------------------------
def test_a_stopping_daemon_says_so_and_refuses_binds(fanotify_work: Path,
                                                     fscached_daemons: Callable[..., FscachedProcess]) -> None:
    built, files = build(fanotify_work, big=1 << 20)
    mnt = fanotify_work / "mnt"
    sock = fanotify_work / "api" / "api.sock"
    daemon = fscached_daemons(fanotify_work / "cache", [spec(built, mnt)], extra=["--apisock", str(sock)])
    holder = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1]); print('held', flush=True); "
                               "sys.stdin.readline()", str(mnt / "small.txt")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: call(sock, "GET", "/api/v1/daemon")[1]["state"] == "STOPPING", 10, "state STOPPING")
        status, body = call(sock, "PUT", "/api/v2/blobs", entry("late", built, fanotify_work, None))
        assert status == 503 and body["code"] == "NOT_READY" and "STOPPING" in body["message"], body
        assert daemon.proc.poll() is None
        assert (mnt / "small.txt").read_bytes() == files["small.txt"]  # still served
    finally:
        holder.kill()
        holder.wait(10)
    assert daemon.proc.wait(30) == 0, daemon.log_text()
    assert str(mnt) not in mounts.erofs_mounts()


# -- the API under malformed traffic --------------------------------------------------------------------
def raw(sock: Path, data: bytes, *, read: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(data)
        if not read:
            return b""
        out = b""  # read until the server closes (Connection: close, or after a 400)
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_malformed_api_traffic_gets_400s_and_no_tracebacks(fanotify_work: Path,
                                                           fscached_daemons: Callable[..., FscachedProcess]) -> None:
    sock = fanotify_work / "api" / "api.sock"
    daemon = fscached_daemons(fanotify_work / "cache", [], extra=["--apisock", str(sock)])
    deep = b"[" * 100_000
    answer = raw(sock, b"PUT /api/v2/blobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(deep) + deep)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert raw(sock, b"NONSENSE \x00\x01 HTTP/9\r\n\r\n").split(b" ", 2)[1] == b"400"  # HTTP/1.0 400 from the parser
    for _ in range(50):  # half-open connections: a body announced, a little sent, then gone
        raw(sock, b"PUT /api/v2/blobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"id\"", read=False)
    assert call(sock, "GET", "/api/v1/daemon")[0] == 200
    time.sleep(0.5)
    log = daemon.log_text()
    assert "Traceback" not in log, log
    assert [line for line in log.splitlines() if " ERROR " in line] == [], log
    assert daemon.stop() == 0


# -- a keeper nobody needs ---------------------------------------------------------------------------------
def test_the_keeper_of_a_killed_daemon_with_nothing_mounted_leaves(fanotify_work: Path,
                                                                   fscached_daemons: Callable[..., FscachedProcess]) -> None:
    built, _ = build(fanotify_work, big=1 << 20)
    daemon = fscached_daemons(fanotify_work / "cache", [spec(built, None)])
    assert keepers_of(daemon.cache_dir), "the daemon started a keeper"
    daemon.kill()
    assert wait_until(lambda: not keepers_of(daemon.cache_dir), 30, "the keeper leaves once nothing needs it")


def test_the_keeper_of_a_killed_daemon_stays_while_its_mount_is_read(
        fanotify_work: Path, fscached_daemons: Callable[..., FscachedProcess]) -> None:
    """...but not while a mount of its files is still there: then it keeps the group (readers
    wait for the next daemon, never read holes)."""
    built, files = build(fanotify_work, big=1 << 20)
    mnt = fanotify_work / "mnt"
    daemon = fscached_daemons(fanotify_work / "cache", [spec(built, mnt)])
    daemon.kill()
    time.sleep(10)  # longer than the keeper's quiet time and a few of its looks
    assert keepers_of(daemon.cache_dir), "the keeper left a mount of its files to the kernel's allow-all"
    second = fscached_daemons(daemon.cache_dir, [spec(built, mnt)])
    drop_caches()
    assert (mnt / "big.bin").read_bytes() == files["big.bin"]
    assert second.stop() == 0
    assert wait_until(lambda: not keepers_of(daemon.cache_dir), 15, "a clean stop lets the keeper go")
