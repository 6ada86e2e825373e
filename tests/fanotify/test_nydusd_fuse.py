"""`nydusd fuse` (nydus-snapshotter's fusedev driver) answered by fscached with a file-backed EROFS
mount served through fanotify, on the host kernel, driven exactly as the snapshotter drives it
(its argv, its API calls; the real snapshotter's own tests are tests/snapshotter/):

- dedicated mode: `--bootstrap --config --mountpoint`, the image there, RUNNING, nydusd's
  metrics routes answered, SIGTERM unmounts and exits;
- shared mode: POST /api/v1/mount (twice: idempotent), DELETE, blobcache metrics naming the
  cache files, errors as JSON with a line in the log;
- failover: sendfd gives the supervisor the fanotify group; kill -9 under a reader of a cold
  file; the same argv again (a stale API socket: INIT), takeover, start: the reader gets every
  byte, never a hole and never EIO;
- a kernel path that cannot serve it: one line saying what to use instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from apiclient import call
from daemon_proc import REPO, drop_caches
from erofs_image.builder import convert
from fscached.util import mounts
from standins.supervisor import Supervisor

NYDUSD = [sys.executable, "-m", "fscached.nydusd_cli"]


def daemon_config(blobs: Path, cache: Path) -> dict[str, Any]:
    """What nydus-snapshotter writes for nydusd (its FuseDaemonConfig), a localfs backend."""
    return {"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                       "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}}},
            "mode": "direct", "digest_validate": False, "enable_xattr": True, "fs_prefetch": {"enable": False}}


@pytest.fixture
def image(fanotify_work: Path) -> tuple[Path, dict[str, bytes]]:
    tree = fanotify_work / "tree"
    (tree / "etc").mkdir(parents=True)
    files = {"etc/hello": b"hello from fscached\n", "big.bin": os.urandom(24 << 20)}
    for rel, data in files.items():
        (tree / rel).write_bytes(data)
    convert(tree, fanotify_work / "img", compressor="zstd", chunk_size=1 << 20)
    return fanotify_work / "img", files


class Nydusd:
    """One `nydusd fuse` process as the snapshotter runs it (root R: socket/, logs/, cache/)."""

    def __init__(self, root: Path, did: str, argv: list[str]) -> None:
        self.root = root
        self.sock = root / "socket" / did / "api.sock"
        self.log = root / "logs" / did / "nydusd.log"
        self.argv = [*NYDUSD, "fuse", *argv, "--apisock", str(self.sock), "--log-level", "info",
                     "--log-rotation-size", "100", "--log-file", str(self.log), "--failover-policy", "resend"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, state: str = "RUNNING", timeout: float = 30) -> Nydusd:
        self.sock.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.argv, cwd=REPO)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"nydusd exited {self.proc.returncode}:\n{self.log_text()}"
            if self.sock.exists():
                try:
                    if call(self.sock, "GET", "/api/v1/daemon")[1]["state"] == state:
                        return self
                except OSError:
                    pass
            assert time.monotonic() < deadline, f"not {state} within {timeout} s:\n{self.log_text()}"
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def nydusds(fanotify_work: Path) -> Iterator[list[Nydusd]]:
    started: list[Nydusd] = []
    try:
        yield started
    finally:
        for n in started:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.kill()
                n.proc.wait(10)
        for mp in sorted(mounts.mounts_under(fanotify_work), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], check=False)
        for keeper_sock in fanotify_work.rglob("keeper.sock"):
            from fscached.frontends.fanotify import keeper

            keeper.dismiss(keeper_sock)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_dedicated_mode_serves_one_image_and_nydusd_metrics(fanotify_work: Path, image: tuple[Path, dict[str, bytes]],
                                                            nydusds: list[Nydusd]) -> None:
    img, files = image
    root, mnt = fanotify_work / "R", fanotify_work / "R" / "snapshots" / "2" / "mnt"
    mnt.mkdir(parents=True)
    config = root / "config" / "d1" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps(daemon_config(img / "blobs", root / "cache")))
    n = Nydusd(root, "d1", ["--config", str(config), "--bootstrap", str(img / "image.boot"), "--mountpoint", str(mnt)])
    nydusds.append(n.start())
    assert (mnt / "etc" / "hello").read_bytes() == files["etc/hello"]
    drop_caches()
    assert sha((mnt / "big.bin").read_bytes()) == sha(files["big.bin"])
    status, metrics = call(n.sock, "GET", "/api/v1/metrics")
    # the reads the daemon answered (once a blob is complete its mark goes: reads go straight to it)
    assert status == 200 and 0 < metrics["data_read"] <= 2 * len(files["big.bin"]) and metrics["fop_hits"][4] > 0, metrics
    assert metrics["fop_errors"][4] == 0 and sum(metrics["read_latency_dist"]) == metrics["fop_hits"][4] + 0
    status, cache = call(n.sock, "GET", "/api/v1/metrics/blobcache")
    assert status == 200 and cache["underlying_files"] and all(
        Path(f).is_file() and Path(f).is_relative_to(root / "cache" / "fscached" / "d1") for f in cache["underlying_files"])
    assert call(n.sock, "GET", "/api/v1/metrics/inflight")[0] == 204  # nothing being filled now
    status, backend = call(n.sock, "GET", "/api/v1/metrics/backend")
    assert status == 200 and backend["read_count"] > 0 and backend["read_errors"] == 0, backend
    assert call(n.sock, "GET", "/api/v1/metrics/files") == (200, [])
    assert n.stop() == 0, n.log_text()
    assert not mounts.is_mountpoint(mnt), "SIGTERM unmounts --mountpoint"


def test_shared_mode_mounts_by_the_api(fanotify_work: Path, image: tuple[Path, dict[str, bytes]],
                                       nydusds: list[Nydusd]) -> None:
    img, files = image
    root = fanotify_work / "R"
    n = Nydusd(root, "d2", ["--mountpoint", str(root / "mnt")])
    nydusds.append(n.start())
    body = {"source": str(img / "image.boot"), "fs_type": "rafs",
            "config": json.dumps(daemon_config(img / "blobs", root / "cache"))}
    for _ in range(2):  # the restart policy and a hot upgrade send the mounts again: no second mount
        assert call(n.sock, "POST", "/api/v1/mount?mountpoint=/2", body) == (204, None)
    assert mounts.mounts_under(root / "mnt") == [str(root / "mnt" / "2")]
    assert (root / "mnt" / "2" / "etc" / "hello").read_bytes() == files["etc/hello"]
    status, cache = call(n.sock, "GET", "/api/v1/metrics/blobcache?id=/2")
    assert status == 200 and cache["id"] == "2" and len(cache["underlying_files"]) == 1, cache
    # a second image with the same blobs shares their cache file (one domain)
    assert call(n.sock, "POST", "/api/v1/mount?mountpoint=/3", body) == (204, None)
    status, cache3 = call(n.sock, "GET", "/api/v1/metrics/blobcache?id=/3")
    assert cache3["underlying_files"] == cache["underlying_files"]
    # errors: JSON and a line in the log (the snapshotter logs nothing of a failed mount)
    status, err = call(n.sock, "POST", "/api/v1/mount?mountpoint=/4", {**body, "config": "{\"device\": {}}"})
    assert status == 400 and err["code"] == "BAD_REQUEST" and "device" in err["message"], err
    assert "mount of image 4" in n.log_text()
    status, err = call(n.sock, "POST", "/api/v1/mount?mountpoint=/a/b", body)
    assert status == 400, err
    assert call(n.sock, "DELETE", "/api/v1/mount?mountpoint=/2") == (204, None)
    assert not mounts.is_mountpoint(root / "mnt" / "2")
    assert call(n.sock, "DELETE", "/api/v1/mount?mountpoint=/2")[0] == 404
    assert (root / "mnt" / "3" / "etc" / "hello").read_bytes() == files["etc/hello"]
    assert n.stop() == 0, n.log_text()
    assert mounts.mounts_under(root / "mnt") == []


HOLDING_READER = """
import hashlib, sys
f = open(sys.argv[1], "rb", buffering=0)
h = hashlib.sha256(f.read(1 << 20))
print("holding", flush=True)
sys.stdin.readline()
try:
    while block := f.read(1 << 16):
        h.update(block)
    print(h.hexdigest(), flush=True)
except OSError as exc:
    print(f"error {exc.errno}", flush=True)
"""


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_failover_through_the_supervisor_under_a_cold_reader(
        fanotify_work: Path, image: tuple[Path, dict[str, bytes]], nydusds: list[Nydusd], mode: str) -> None:
    img, files = image
    root = fanotify_work / "R"
    supervisor = Supervisor(root / "supervisor" / "d3.sock")
    if mode == "dedicated":
        mnt = root / "snapshots" / "2" / "mnt"
        mnt.mkdir(parents=True)
        config = root / "config" / "d3" / "config.json"
        config.parent.mkdir(parents=True)
        config.write_text(json.dumps(daemon_config(img / "blobs", root / "cache")))
        argv = ["--id", "d3", "--config", str(config), "--bootstrap", str(img / "image.boot"), "--mountpoint", str(mnt)]
    else:
        mnt = root / "mnt" / "2"
        argv = ["--id", "d3", "--mountpoint", str(root / "mnt")]
    argv += ["--supervisor", str(supervisor.path)]
    first = Nydusd(root, "d3", argv)
    nydusds.append(first.start())
    if mode == "shared":
        body = {"source": str(img / "image.boot"), "fs_type": "rafs",
                "config": json.dumps(daemon_config(img / "blobs", root / "cache"))}
        assert call(first.sock, "POST", "/api/v1/mount?mountpoint=/2", body) == (204, None)
    supervisor.fetch_states(lambda: call(first.sock, "PUT", "/api/v1/daemon/fuse/sendfd"))
    assert supervisor.received == 1, "sendfd gave the supervisor the group"
    drop_caches()
    reader = subprocess.Popen([sys.executable, "-c", HOLDING_READER, str(mnt / "big.bin")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "holding"
        first.kill()
        assert mounts.is_mountpoint(mnt), "the mount outlives its daemon"
        supervisor.send_states(10.0)
        second = Nydusd(root, "d3", argv)
        nydusds.append(second.start(state="INIT"))  # the same argv, a stale socket: a failover restart
        assert reader.stdin is not None
        reader.stdin.write("go\n")  # cold reads while no daemon serves: they wait, never holes
        reader.stdin.flush()
        assert call(second.sock, "PUT", "/api/v1/daemon/fuse/takeover")[0] == 204, second.log_text()
        supervisor.wait_sent()
        assert call(second.sock, "GET", "/api/v1/daemon")[1]["state"] == "READY"
        assert call(second.sock, "PUT", "/api/v1/daemon/start")[0] == 204
        got = reader.stdout.readline().strip()
        assert got == sha(files["big.bin"]), f"the reader got {got!r}:\n{second.log_text()[-2000:]}"
    finally:
        reader.kill()
        reader.wait(10)
    assert "took the fanotify group back from the supervisor" in second.log_text()
    assert call(second.sock, "GET", "/api/v1/daemon")[1]["state"] == "RUNNING"
    if mode == "shared":  # the snapshotter sends no mount again: the state brought it back
        assert call(second.sock, "GET", "/api/v1/metrics/blobcache?id=/2")[0] == 200
    assert second.stop() == 0, second.log_text()
    supervisor.close()


def test_a_kernel_path_that_cannot_serve_fusedev_says_so(fanotify_work: Path, image: tuple[Path, dict[str, bytes]]) -> None:
    _ = image
    shm = Path(f"/dev/shm/fscached-fuse-{os.getpid()}")  # tmpfs refuses pre-content marks
    try:
        done = subprocess.run([*NYDUSD, "fuse", "--mountpoint", str(fanotify_work / "mnt"), "--apisock",
                               str(fanotify_work / "s" / "api.sock"), "--fscache", str(shm)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        if shm.exists():
            shm.rmdir()
    err = done.stderr.strip()
    assert done.returncode == 1 and "\n" not in err, err
    assert "fanotify" in err and "fs_driver = \"fscache\"" in err and "tmpfs" in err, err
    assert not (fanotify_work / "s" / "api.sock").exists()
