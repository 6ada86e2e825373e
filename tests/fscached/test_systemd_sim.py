"""fscached on the cachefiles path run by the systemd stand-in, against the kernel simulator in
this process (tests/fscached/remote_sim.py): the bound device fd lives in the stand-in's fd
store; a daemon killed with -9 (or restarted, or killed by the watchdog) is started again with
it in LISTEN_FDS, writes `restore` (no dir/bind again), the simulator re-opens the objects whose
anon fds died (new object ids) and sends the READs again, and they are answered with data.

Blob bytes come from a loopback HTTP server that can be held: a READ is then taken by the daemon
and left unanswered when it dies, the case `restore` exists for.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from erofs_image.builder import convert
from erofs_image.reader import Bootstrap
from remote_sim import remote_simulator_class
from simdaemon import WORK_ROOT, expected_blob_space
from standins.systemd import SystemdStandin

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).resolve().parent / "remote_sim.py"
FSID = "img"
VOLUME = f"erofs,{FSID}"
BLOCK = 4096


class HeldBlobServer:
    """GET /v2/<repo>/blobs/sha256:<id> with Range from a directory; `hold()` makes requests
    wait until `release()`."""

    def __init__(self, blobs: Path) -> None:
        self.blobs = blobs
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = 0
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                m = re.fullmatch(r"/v2/.+/blobs/sha256:([0-9a-f]{64})", self.path)
                if m is None:
                    self.send_response(200 if self.path == "/v2/" else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                outer.requests += 1
                outer.waiting += 1
                outer.gate.wait(60)
                outer.waiting -= 1
                data = (outer.blobs / m.group(1)).read_bytes()
                start, end = 0, len(data) - 1
                r = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
                if r:
                    start, end = int(r.group(1)), min(int(r.group(2)), len(data) - 1)
                body = data[start:end + 1]
                self.send_response(206 if r else 200)
                self.send_header("Content-Length", str(len(body)))
                if r:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def setup() -> Iterator[dict]:
    work = Path(tempfile.mkdtemp(prefix="fsc-sdsim-", dir=WORK_ROOT))
    src = work / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(3 << 20))
    convert(src, work / "img", compressor="none")
    boot = Bootstrap.open(work / "img" / "image.boot")
    server = HeldBlobServer(work / "img" / "blobs")
    made: list = []
    try:
        yield {"work": work, "boot": boot, "server": server, "made": made}
    finally:
        for thing in reversed(made):
            thing.shutdown() if hasattr(thing, "shutdown") else thing.close()
        server.close()
        shutil.rmtree(work, ignore_errors=True)


def start(setup: dict, *, failover: bool = True, watchdog_sec: float | None = 10.0, **kwargs):
    """The simulator and the stand-in running fscached --backend cachefiles on it."""
    work = setup["work"]
    sd_box: list[SystemdStandin] = []

    def pids() -> list[int]:
        pid = sd_box[0].pid if sd_box else None
        return [pid] if pid else []

    sim = remote_simulator_class()(work / "sim", pids=pids, failover=failover)
    setup["made"].append(sim)
    (work / "cache").mkdir(exist_ok=True)
    image = (f"fsid={FSID},bootstrap={work / 'img' / 'image.boot'},"
             f"registry=127.0.0.1:{setup['server'].port}/test/img,scheme=http")
    env = dict(os.environ, FSCACHED_SIM_DEVICE_FD="3", PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    if not failover:
        env["FSCACHED_SIM_NO_FAILOVER"] = "1"
    argv = [sys.executable, str(HELPER), "daemon", "--backend", "cachefiles", "--cache-dir", str(work / "cache"),
            "--work-dir", str(work / "state"), "--image", image, "--read-window", "64K"]
    sd = SystemdStandin(argv, env=env, cwd=REPO, log=work / "log.txt", watchdog_sec=watchdog_sec,
                        first_fds={3: sim.daemon_fd}, **kwargs)
    sim._daemon_fd_given = True  # the stand-in passes it on; the test's copy is closed below
    sd_box.append(sd)
    setup["made"].append(sd)
    sd.start()
    os.close(sim.daemon_fd)  # from now on only the daemon and the fd store hold the device
    return sim, sd


def _blob(setup: dict) -> tuple[bytes, bytes]:
    boot = setup["boot"]
    info = boot.blobs[0]
    return info.blob_id.encode(), expected_blob_space(boot, setup["work"] / "img" / "blobs", 0)


def _wait(predicate, timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_kill_9_restore_resends_the_reads_the_dead_daemon_took(setup) -> None:
    sim, sd = start(setup)
    first = sd.wait_ready()
    assert sd.store_names[:1] == ["cachefiles"] and "state" in sd.store_names, sd.store_names
    boot = sim.mount(VOLUME, FSID.encode())
    assert boot.size == setup["work"].joinpath("img", "image.boot").stat().st_size
    assert sim.read(boot, 0, BLOCK) == (setup["work"] / "img" / "image.boot").read_bytes()[:BLOCK]
    cookie, space = _blob(setup)
    blob = sim.mount(VOLUME, cookie)
    old_id = blob.object_id
    assert sim.read(blob, 0, 64 << 10) == space[:64 << 10]
    server = setup["server"]
    server.hold()
    pending = sim.start_read(blob, 1 << 20, 128 << 10)
    _wait(lambda: server.waiting > 0, what="the daemon to take the READ and fetch")
    sd.kill()
    server.release()
    second = sd.wait_ready()
    assert second.listen_names[:1] == ["cachefiles"], second.listen_names
    assert pending.result(30) == space[1 << 20:(1 << 20) + (128 << 10)]
    assert blob.reopens >= 1 and blob.object_id != old_id, "the object must be re-opened with a new id"
    assert sim.read(blob, 2 << 20, 64 << 10) == space[2 << 20:(2 << 20) + (64 << 10)]
    assert sim.read(boot, 0, BLOCK)[:BLOCK]  # the bootstrap's object is re-opened too
    assert sim.commands.count("dir " + str(setup["work"] / "cache")) == 1, "dir/bind only once, by the first"
    assert sim.commands.count("restore") >= 2  # the first one's probe, the second one's restore
    sim.check()
    log = sd.log.read_text()
    assert "back from systemd's fd store" in log
    assert first.reason == "signal" and sd.errors == [] and sd.rejected == []


def test_restart_keeps_the_device_while_objects_are_open(setup) -> None:
    """`systemctl restart` with a READ in flight: the stop leaves it unanswered (never completed
    without data), the device stays in the store, the next process gets the READ again."""
    sim, sd = start(setup)
    sd.wait_ready()
    cookie, space = _blob(setup)
    blob = sim.mount(VOLUME, cookie)
    server = setup["server"]
    server.hold()
    pending = sim.start_read(blob, 512 << 10, 64 << 10)
    _wait(lambda: server.waiting > 0, what="the fetch")
    threading.Timer(3.0, server.release).start()  # after the stop's short drain
    old = sd.restart()
    assert old.reason == "restart" and old.status == 0, sd.log_tail()
    new = sd.wait_ready()
    assert new.listen_names[:1] == ["cachefiles"], (new.listen_names, sd.log_tail())
    assert pending.result(30) == space[512 << 10:(512 << 10) + (64 << 10)]
    sim.check()
    # nothing open any more: a stop lets the device go and empties the store
    sim.close(blob)
    sd.kill(signal.SIGTERM)
    sd.wait_exit(new, 30)
    assert sd.store_names == [], (sd.store_names, sd.log_tail())


def test_killed_during_start_then_again_converges(setup) -> None:
    sim, sd = start(setup)
    sd.wait_ready()
    cookie, space = _blob(setup)
    blob = sim.mount(VOLUME, cookie)
    server = setup["server"]
    server.hold()
    pending = sim.start_read(blob, 0, 64 << 10)
    _wait(lambda: server.waiting > 0, what="the fetch")
    sd.kill()
    second = sd.wait_starts(2)
    time.sleep(0.1)
    assert second.ready is None
    os.kill(second.pid, signal.SIGKILL)  # during its start-up
    sd.wait_starts(3)
    sd.wait_ready()
    server.release()
    time.sleep(0.2)
    sd.kill()  # and once more, serving
    sd.wait_starts(4)
    sd.wait_ready()
    assert pending.result(30) == space[:64 << 10]
    assert sim.read(blob, 1 << 20, 64 << 10) == space[1 << 20:(1 << 20) + (64 << 10)]
    sim.check()


def test_stuck_loop_is_killed_by_the_watchdog(setup) -> None:
    sim, sd = start(setup, watchdog_sec=1.5, abort_timeout=0.5)
    first = sd.wait_ready()
    cookie, space = _blob(setup)
    blob = sim.mount(VOLUME, cookie)
    os.kill(first.pid, signal.SIGSTOP)
    sd.wait_starts(2, timeout=15)
    sd.wait_ready()
    assert first.reason == "watchdog"
    assert sim.read(blob, 0, 64 << 10) == space[:64 << 10]  # re-opened by the new process
    sim.check()


def test_a_kernel_without_restore_is_said_at_start(setup) -> None:
    _, sd = start(setup, failover=False)
    sd.wait_ready()
    assert "cachefiles" not in sd.store_names, sd.store_names
    assert "failover needs a newer kernel" in sd.log.read_text()


# -- the protocol pieces, without a daemon -----------------------------------------------------------
def test_notify_with_fds_over_an_abstract_socket_and_the_store_rules() -> None:
    script = """
import os, time
from fscached.lifecycle.systemd import notify
r, w = os.pipe()
r2, w2 = os.pipe()
assert notify("FDSTORE=1\\nFDNAME=a\\nFDPOLL=0", [r])
assert notify("FDSTORE=1\\nFDNAME=again\\nFDPOLL=0", [r])  # the same open file: stored once
assert notify("FDSTORE=1\\nFDNAME=b\\nFDPOLL=0", [w])
assert notify("FDSTORE=1\\nFDNAME=c\\nFDPOLL=0", [r2])  # the store is full (2)
assert notify("FDSTOREREMOVE=1\\nFDNAME=b")
assert notify("READY=1\\nSTATUS=done")
time.sleep(30)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    sd = SystemdStandin([sys.executable, "-c", script], env=env, abstract=True, fdstore_max=2, restart="no")
    try:
        assert sd.notify_socket.startswith("@")
        sd.start()
        start = sd.wait_ready(timeout=20)
        assert start.notes == ["done"]
        assert sd.store_names == ["a"], (sd.store_names, sd.errors, sd.log_tail())
        assert any("full" in e for e in sd.errors), sd.errors
        assert sd.rejected == []
    finally:
        sd.close()
    from fscached.lifecycle import systemd

    assert not systemd.notify("READY=1", env={})  # no NOTIFY_SOCKET: nothing sent


def test_listen_fds_are_only_for_the_pid_they_name() -> None:
    from fscached.lifecycle import systemd

    r, w = os.pipe()
    try:
        env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
        assert systemd.listen_fds(env) == [] and "LISTEN_FDS" not in env
        assert systemd.watchdog_seconds({"WATCHDOG_USEC": "3000000"}) == 3.0
        assert systemd.watchdog_seconds({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    finally:
        os.close(r)
        os.close(w)
    assert systemd.blob_from_store_name(systemd.blob_store_name("dom:a%b", "f" * 64) or "") == "dom:a%b/" + "f" * 64
    assert ":" not in (systemd.blob_store_name("dom:a", "f" * 64) or ":")
    assert systemd.blob_store_name("v" * 200, "f" * 64) is None  # too long for FDNAME: not stored


def test_state_memfd_survives_a_torn_write() -> None:
    from fscached.lifecycle.state_memfd import StateMemfd

    memfd = StateMemfd(capacity=4096)
    try:
        memfd.write(b"first state")
        memfd.write(b"second state")
        assert StateMemfd.read(memfd.fd) == (2, b"second state")
        # killed while writing the next one into the other slot: the header still names the second
        os.pwrite(memfd.fd, b"third, torn", 4096)
        assert StateMemfd.read(memfd.fd) == (2, b"second state")
        # a header pointing at bytes that do not match (torn the other way): the one before
        memfd.write(b"third state")
        os.pwrite(memfd.fd, b"XX", 4096)  # the slot the third went into
        assert StateMemfd.read(memfd.fd) == (2, b"second state")
    finally:
        memfd.close()


def test_the_unit_file() -> None:
    """contrib/fscached.service: Type=notify, the watchdog, the fd store, restarts, and no option
    that would give it a mount namespace of its own (its mounts must reach the host)."""
    import shutil as _shutil
    import subprocess

    unit = REPO / "contrib" / "fscached.service"
    lines = [line.strip() for line in unit.read_text().splitlines() if line.strip() and not line.startswith("#")]
    keys = dict(line.split("=", 1) for line in lines if "=" in line)
    assert keys["Type"] == "notify" and keys["Restart"] == "on-failure"
    assert int(keys["FileDescriptorStoreMax"]) > 0 and keys["WatchdogSec"]
    for namespacing in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
                        "ReadOnlyPaths", "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                        "ProtectProc", "TemporaryFileSystem", "InaccessiblePaths", "MountFlags", "DevicePolicy"):
        assert namespacing not in keys, f"{namespacing}= would keep fscached's mounts from the host"
    assert "CAP_SYS_ADMIN" in keys["CapabilityBoundingSet"]
    analyze = _shutil.which("systemd-analyze")
    if analyze is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "fscached.service"
        copy.write_text(unit.read_text().replace("/opt/fscached/.venv/bin/fscached", sys.executable))
        result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.strip() and "FileDescriptorStorePreserve" not in line]  # systemd < 254 only
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
