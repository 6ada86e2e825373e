"""The supervisor protocol (fscached.lifecycle.supervisor) through the kernel simulator and the
supervisor stand-in (tests/standins/supervisor.py), as nydus-snapshotter drives it:
sendfd -> the daemon dies -> a new daemon waits in INIT -> takeover (state and fd back from the
supervisor, binds re-added, `restore`) -> start; the READs the dead daemon had taken come again
on re-opened objects (new object ids) and are answered with data, never completed empty.

A "kill" in one process: the daemon's device fd and anon fds are replaced by /dev/null (as if
its process had gone: its anon fds no longer name the objects, its commands reach no kernel),
then its thread is stopped. The supervisor's copy of the device keeps the simulated cache alive,
as the real supervisor's does.
"""
from __future__ import annotations

import array
import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import uvloop

from cachefiles.device import CachefilesDevice
from erofs_image.builder import convert
from erofs_image.reader import Bootstrap
from fetcher.local import LocalDirectorySource
from fetcher.source import LocalRange
from fscached.api.server import ApiServer
from fscached.config import Config, ImageSpec
from fscached.daemon import Daemon
from fscached.frontends.cachefiles.frontend import NEEDS_NEWER_KERNEL
from fscached.lifecycle.state import encode_specs
from fscached.frontends.cachefiles import CachefilesFrontend
from simdaemon import expected_blob_space, make_tree
from standins.kernel_simulator import KernelSimulator, PendingRead, _SimDevice
from standins.supervisor import Supervisor, call

VOLUME = "erofs,img"


def sim_device(sim: KernelSimulator, fd: int) -> CachefilesDevice:
    """A device on a received copy of the simulator's daemon end (completions go to the sim)."""
    dev = _SimDevice.from_fd(fd, path="<simulator>", completer=sim.complete)
    assert isinstance(dev, _SimDevice)
    dev.sim = sim
    return dev


class Node:
    """One daemon with its API on a uvloop thread: bound to the simulator itself (the first
    daemon), or waiting in INIT for a takeover (a restarted daemon, or an --upgrade one)."""

    def __init__(self, sim: KernelSimulator, work: Path, name: str, supervisor: Path, *, bound: bool,
                 upgrade: bool = False) -> None:
        self.sock = work / "run" / f"{name}.sock"
        self.daemon = Daemon(Config(cache_dir=work / "cache", work_dir=work / "state"),
                             device=sim.device() if bound else None)
        self.daemon.upgrade = upgrade
        self.daemon.device_factory = lambda fd: sim_device(sim, fd)
        self.api = ApiServer(self.daemon, self.sock, daemon_id="d1", supervisor=str(supervisor), autostart=bound,
                             on_exit=self._leave)
        self.bound = bound
        self.loop: asyncio.AbstractEventLoop | None = None
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"node-{name}", daemon=True)
        self.thread.start()
        assert self.started.wait(30), "API did not start"
        if self.error is not None:
            raise self.error

    def _leave(self) -> None:
        self.daemon.stop()

    def _run(self) -> None:
        async def main() -> int:
            self.loop = asyncio.get_running_loop()
            try:
                await self.api.start()
                if self.bound:
                    self.daemon.take_kernel_path()
                    self.daemon.check_failover_support()
            except BaseException as exc:
                self.error = exc
                self.started.set()
                return 1
            self.started.set()
            try:
                if not self.bound and not await self.daemon.wait_for_takeover():
                    return 0
                return await self.daemon.run()
            finally:
                await self.api.stop()

        self.exit_code = uvloop.run(main())

    def state(self) -> str:
        status, body = call(self.sock, "GET", "/api/v1/daemon")
        assert status == 200, body
        return str(body["state"])

    def wait_serving(self) -> None:
        deadline = time.monotonic() + 30
        while not self.daemon.serving:
            assert time.monotonic() < deadline, "daemon did not start serving"
            time.sleep(0.01)

    @property
    def server(self) -> CachefilesFrontend:
        server = self.daemon.frontend
        assert isinstance(server, CachefilesFrontend)
        return server

    def crash(self) -> None:
        """kill -9, in one process: no READ_COMPLETE, no command reaches the kernel any more,
        the anon fds no longer name their objects (the kernel closes them at death)."""
        server = self.server
        loop = self.loop
        assert loop is not None
        device_fd = server.device.fileno()
        removed = threading.Event()

        def unwatch() -> None:
            loop.remove_reader(device_fd)
            removed.set()

        loop.call_soon_threadsafe(unwatch)
        assert removed.wait(10)
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            for fd in [device_fd, *(entry.anon_fd for entry in server.objects.entries())]:
                os.dup2(devnull, fd, inheritable=False)
        finally:
            os.close(devnull)
        self.stop()

    def stop(self) -> int | None:
        if self.thread.is_alive():
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self._leave)  # an asyncio.Event is set on its own loop
            self.thread.join(30)
        assert not self.thread.is_alive(), "daemon did not stop"
        return self.exit_code


def legacy_entry(fsid: str, built: Path, work: Path) -> dict[str, Any]:
    """What nydus-snapshotter binds (legacy "config" form), localfs backend."""
    return {"type": "bootstrap", "id": fsid, "domain_id": fsid,
            "config": {"id": fsid, "backend_type": "localfs",
                       "backend_config": {"dir": str(built / "blobs"), "readahead": False},
                       "cache_type": "fscache", "cache_config": {"work_dir": str(work)},
                       "prefetch_config": {"enable": False}, "metadata_path": str(built / "image.boot")}}


@pytest.fixture
def built(work: Path) -> Path:
    tree = make_tree(work / "tree")
    (tree / "big.bin").write_bytes(os.urandom(6 << 20))  # room for READs far from each other's windows
    convert(tree, work / "built", compressor="zstd", chunk_size=64 << 10)
    return work / "built"


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """While set, reads from local blob directories wait (a READ stays in flight)."""
    hold = threading.Event()
    original = LocalDirectorySource.read

    async def read(self: LocalDirectorySource, blob_id: str, offset: int, length: int, *,
                   prefetch: bool = False) -> bytes:
        while hold.is_set():  # noqa: ASYNC110  (set and cleared from the test's own thread)
            await asyncio.sleep(0.005)
        return await original(self, blob_id, offset, length, prefetch=prefetch)

    original_range = LocalDirectorySource.local_range

    async def local_range(self: LocalDirectorySource, blob_id: str, offset: int, length: int) -> LocalRange:
        while hold.is_set():  # noqa: ASYNC110  (the fill core's reads of local blobs: the same hold)
            await asyncio.sleep(0.005)
        return await original_range(self, blob_id, offset, length)

    monkeypatch.setattr(LocalDirectorySource, "read", read)
    monkeypatch.setattr(LocalDirectorySource, "local_range", local_range)
    return hold


@pytest.fixture
def world(work: Path) -> Iterator[tuple[KernelSimulator, Supervisor]]:
    with KernelSimulator(work / "kernel") as sim:
        supervisor = Supervisor(work / "supervisor" / "d1.sock")
        try:
            yield sim, supervisor
        finally:
            supervisor.close()


def first_daemon(sim: KernelSimulator, work: Path, supervisor: Supervisor, built: Path) -> Node:
    """The snapshotter's start: RUNNING, bind, mount, sendfd."""
    node = Node(sim, work, "a", supervisor.path, bound=True)
    node.wait_serving()
    assert node.state() == "RUNNING"
    assert call(node.sock, "PUT", "/api/v2/blobs", legacy_entry("img", built, work))[0] == 204
    supervisor.fetch_states(lambda: call(node.sock, "PUT", "/api/v1/daemon/fuse/sendfd"))
    assert supervisor.received == 1 and supervisor.fd >= 0
    assert node.daemon.handing_over, "once the supervisor holds the device, a stop is a hand-over"
    return node


def wait_for(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def in_flight(node: Node, pending: PendingRead) -> None:
    wait_for(lambda: pending.msg_id in node.server.reading, "the daemon never took the READ")


def test_sendfd_kill_takeover_restore_start_serves_the_reads_again(
        world: tuple[KernelSimulator, Supervisor], work: Path, built: Path, held: threading.Event) -> None:
    sim, supervisor = world
    boot = Bootstrap.open(built / "image.boot")
    blob_id = boot.blobs[0].blob_id
    want = expected_blob_space(boot, built / "blobs", 0)
    a = first_daemon(sim, work, supervisor, built)
    meta = sim.mount(VOLUME, b"img")
    blob = sim.mount(VOLUME, blob_id.encode())
    assert len(want) > 5 << 20
    assert sim.read(blob, len(want) - 4096, 4096) == want[-4096:]
    old_ids = (meta.object_id, blob.object_id)

    held.set()  # the next READ stays in the dead daemon's hands
    pending = sim.start_read(blob, 1 << 20, 8192)
    in_flight(a, pending)
    a.crash()
    assert pending.msg_id not in sim.completed, "a dying daemon completed a READ"
    assert a.server.stats["read_failed"] == 0

    # the snapshotter: listen, start the daemon again (INIT), takeover, start
    supervisor.send_states(10.0)
    b = Node(sim, work, "b", supervisor.path, bound=False)
    try:
        assert b.state() == "INIT"
        status, body = call(b.sock, "PUT", "/api/v1/daemon/start")
        assert status == 503 and "takeover" in body["message"], body
        held.clear()
        restores = sim.commands.count("restore")
        # asked twice at once (two failovers of one daemon, when the one between them died in its
        # takeover): the second waits for the first, then has nothing to do
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: call(b.sock, "PUT", "/api/v1/daemon/fuse/takeover"), range(2)))
        assert answers == [(204, None), (204, None)], answers
        supervisor.wait_sent()
        assert supervisor.sent == 1
        # the simulator takes the daemon's commands in a thread of its own: wait for it to see it
        wait_for(lambda: sim.commands.count("restore") == restores + 1, "takeover writes restore")
        # the READ the dead daemon had taken comes again, on a re-opened object, answered with data
        assert pending.result(10) == want[1 << 20:(1 << 20) + 8192]
        assert blob.reopens == 1 and blob.object_id not in old_ids
        assert b.state() == "READY"
        # asked again (two failovers of one daemon, when the one between them died in its
        # takeover): done already, nothing more taken from the supervisor
        assert call(b.sock, "PUT", "/api/v1/daemon/fuse/takeover") == (204, None)
        assert supervisor.sent == 1 and sim.commands.count("restore") == restores + 1
        assert call(b.sock, "PUT", "/api/v1/daemon/start")[0] == 204
        wait_for(lambda: b.state() == "RUNNING", "RUNNING after start")
        # the bootstrap object died with the daemon too: its next READ re-opens it
        assert sim.read(meta, 8192, 4096) == (built / "image.boot").read_bytes()[8192:8192 + 4096].ljust(4096, b"\0")
        assert meta.reopens == 1 and meta.object_id not in old_ids
        assert sim.read(blob, 2 << 20, 4096) == want[2 << 20:(2 << 20) + 4096]
        # what the dead daemon had written (the tail's window) is not fetched again: the new
        # daemon found it in the cache file when the object was re-opened (counted once the
        # fetches the READ above started in the background have landed)
        wait_for(lambda: b.daemon.frontend.filler.jobs_in_flight == 0, "the fetches in flight to land")
        fetched = b.daemon.counters().get("fetched_chunks", 0)
        assert sim.read(blob, len(want) - 8192, 4096) == want[-8192:-4096]
        assert b.daemon.counters().get("fetched_chunks", 0) == fetched
        assert sim.completed.count(pending.msg_id) == 1, "completed once, by the new daemon"
        counters = b.daemon.counters()
        assert counters.get("read_failed", 0) == 0 and counters["open"] == 2, counters
        # the new daemon serves the same binds, and hands over in turn
        assert [fsid for _, fsid in b.daemon.catalog.images] == ["img"]
        supervisor.fetch_states(lambda: call(b.sock, "PUT", "/api/v1/daemon/fuse/sendfd"))
        assert supervisor.received == 2
        sim.check()
    finally:
        assert b.stop() == 0


def test_upgrade_old_daemon_leaves_its_reads_for_the_new_one(
        world: tuple[KernelSimulator, Supervisor], work: Path, built: Path, held: threading.Event) -> None:
    """Hot upgrade: the new process takes over while the old one still serves; the old one's
    exit is a hand-over (no READ completed empty, its anon fds closed, `restore` written), the
    new one reads the device from start on."""
    sim, supervisor = world
    boot = Bootstrap.open(built / "image.boot")
    want = expected_blob_space(boot, built / "blobs", 0)
    a = first_daemon(sim, work, supervisor, built)
    sim.mount(VOLUME, b"img")
    blob = sim.mount(VOLUME, boot.blobs[0].blob_id.encode())
    supervisor.send_states(10.0)
    b = Node(sim, work, "b", supervisor.path, bound=False, upgrade=True)
    try:
        assert b.state() == "INIT"
        restores = sim.commands.count("restore")
        assert call(b.sock, "PUT", "/api/v1/daemon/fuse/takeover")[0] == 204
        assert b.state() == "READY" and not b.daemon.serving, "an upgrade waits for start to read the device"
        assert sim.commands.count("restore") == restores, "the old daemon still serves: no restore yet"
        held.set()
        pending = sim.start_read(blob, 0, 4096)
        in_flight(a, pending)
        status, _ = call(a.sock, "PUT", "/api/v1/daemon/exit")  # "let the older daemon exit without umount"
        assert status == 204
        a.thread.join(30)
        assert not a.thread.is_alive() and a.exit_code == 0
        assert a.server.stats["read_left"] == 1 and a.server.stats["read_failed"] == 0
        assert pending.msg_id not in sim.completed, "the old daemon completed a READ on its way out"
        held.clear()
        assert call(b.sock, "PUT", "/api/v1/daemon/start")[0] == 204
        assert pending.result(10) == want[:4096]
        assert blob.reopens == 1
        wait_for(lambda: b.state() == "RUNNING", "RUNNING after start")
        assert b.daemon.counters().get("read_failed", 0) == 0
        # then nydus-snapshotter binds every image again (RecoverRafsInstances), and takes an
        # error for a failed upgrade: exactly the image the state gave back is accepted, once
        other = legacy_entry("img", built, work)
        other["config"]["backend_config"]["dir"] = str(work)
        status, body = call(b.sock, "PUT", "/api/v2/blobs", other)
        assert status == 400 and body["code"] == "ALREADY_EXISTS", body
        assert call(b.sock, "PUT", "/api/v2/blobs", legacy_entry("img", built, work)) == (204, None)
        status, body = call(b.sock, "PUT", "/api/v2/blobs", legacy_entry("img", built, work))
        assert status == 400 and body["code"] == "ALREADY_EXISTS", body
        assert [fsid for _, fsid in b.daemon.catalog.images] == ["img"]
        assert sim.read(blob, 4096, 4096) == want[4096:8192]
        sim.check()
    finally:
        a.stop()
        assert b.stop() == 0


def test_a_restore_while_serving_sends_a_read_twice_and_it_is_answered_once(
        world: tuple[KernelSimulator, Supervisor], work: Path, built: Path, held: threading.Event) -> None:
    sim, supervisor = world
    boot = Bootstrap.open(built / "image.boot")
    want = expected_blob_space(boot, built / "blobs", 0)
    a = Node(sim, work, "a", supervisor.path, bound=True)
    try:
        a.wait_serving()
        assert call(a.sock, "PUT", "/api/v2/blobs", legacy_entry("img", built, work))[0] == 204
        blob = sim.mount(VOLUME, boot.blobs[0].blob_id.encode())
        held.set()
        pending = sim.start_read(blob, 0, 4096)
        in_flight(a, pending)
        a.server.device.restore()  # as a successor's takeover, or a hand-over's last word, does
        wait_for(lambda: a.daemon.counters().get("read_duplicate", 0) == 1, "the READ was not sent again")
        held.clear()
        assert pending.result(10) == want[:4096]
        assert sim.completed.count(pending.msg_id) == 1
        sim.check()
    finally:
        assert a.stop() == 0


@pytest.mark.parametrize("what", ["garbage", "fanotify", "two fds", "a file"])
def test_takeover_of_a_bad_state_is_refused_and_the_daemon_stays_in_init(
        world: tuple[KernelSimulator, Supervisor], work: Path, built: Path, what: str) -> None:
    sim, supervisor = world
    a = first_daemon(sim, work, supervisor, built)
    good, held_fd = supervisor.load()
    good_fd = os.dup(held_fd)  # saving another state closes the supervisor's copy
    a.crash()
    spare = socket.socketpair()
    bad_fd = os.dup(good_fd)
    if what == "garbage":
        supervisor.save(os.urandom(200), bad_fd)
        text = "not an fscached hand-over state"
    elif what == "fanotify":
        supervisor.save(encode_specs("fanotify", [], cache_dir=work / "cache", fd_names=["fanotify-group"]), bad_fd)
        text = "fanotify"
    elif what == "a file":
        os.close(bad_fd)
        bad_fd = os.open(built / "image.boot", os.O_RDONLY | os.O_CLOEXEC)
        supervisor.save(good, bad_fd)
        text = "not /dev/cachefiles"
    else:
        supervisor.save(good, bad_fd)
        text = "exactly one fd"
    b = Node(sim, work, "b", supervisor.path, bound=False)
    try:
        fds_before = len(os.listdir("/proc/self/fd"))
        if what == "two fds":  # the supervisor sends two (pkg/supervisor never does)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            supervisor.path.parent.mkdir(parents=True, exist_ok=True)
            supervisor.path.unlink(missing_ok=True)
            listener.bind(str(supervisor.path))
            listener.listen(1)

            def give_two() -> None:
                conn, _ = listener.accept()
                with conn:
                    conn.sendmsg([good], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", [bad_fd, spare[0].fileno()]))])
                listener.close()
                supervisor.path.unlink(missing_ok=True)

            giver = threading.Thread(target=give_two, daemon=True)
            giver.start()
        else:
            supervisor.send_states(10.0)
        status, body = call(b.sock, "PUT", "/api/v1/daemon/fuse/takeover")
        assert status == 400 and body["code"] == "BAD_REQUEST", body
        assert text in body["message"] and body["message"].count("\n") == 0, body
        assert b.state() == "INIT" and b.daemon.frontend is None and not b.daemon.catalog.images
        supervisor.wait_sent()
        time.sleep(0.1)
        assert len(os.listdir("/proc/self/fd")) <= fds_before, "a refused takeover leaked the fds it received"
        # the supervisor is given a good state: the same daemon takes over
        supervisor.save(good, good_fd)
        supervisor.send_states(10.0)
        status, body = call(b.sock, "PUT", "/api/v1/daemon/fuse/takeover")
        assert status == 204, body
        assert b.state() == "READY"
    finally:
        spare[0].close()
        spare[1].close()
        assert b.stop() == 0


def test_a_kernel_without_restore_is_told_at_start_and_refuses_failover(
        work: Path, built: Path, caplog: pytest.LogCaptureFixture) -> None:
    with KernelSimulator(work / "kernel", failover=False) as sim:
        supervisor = Supervisor(work / "supervisor" / "d1.sock")
        caplog.set_level(logging.INFO, logger="fscached.supervisor")
        a = Node(sim, work, "a", supervisor.path, bound=True)
        try:
            a.wait_serving()
            said = [r.getMessage() for r in caplog.records if r.name == "fscached.supervisor"]
            assert NEEDS_NEWER_KERNEL in said, said
            assert "6.8" in NEEDS_NEWER_KERNEL and "6.1.95" in NEEDS_NEWER_KERNEL
            assert a.server.device.restore_supported is False
            status, body = call(a.sock, "PUT", "/api/v1/daemon/fuse/sendfd")
            assert status == 501 and body["code"] == "UNSUPPORTED" and "newer kernel" in body["message"], body
            assert supervisor.received == 0 and not a.daemon.handing_over
        finally:
            assert a.stop() == 0
            supervisor.close()


def test_takeover_on_a_kernel_without_restore_is_refused(work: Path, built: Path) -> None:
    """A supervisor holding a device of a kernel without `restore` (given by an older daemon):
    the takeover says why and the daemon stays in INIT."""
    with KernelSimulator(work / "kernel", failover=False) as sim:
        supervisor = Supervisor(work / "supervisor" / "d1.sock")
        spec = ImageSpec(fsid="img", bootstrap=built / "image.boot", blobs=built / "blobs")
        supervisor.save(encode_specs("cachefiles", [spec], cache_dir=work / "cache", fd_names=["cachefiles"]),
                        os.dup(sim.daemon_fd))
        b = Node(sim, work, "b", supervisor.path, bound=False)
        try:
            supervisor.send_states(10.0)
            status, body = call(b.sock, "PUT", "/api/v1/daemon/fuse/takeover")
            assert status == 501 and "newer kernel" in body["message"], body
            assert b.state() == "INIT" and b.daemon.frontend is None and not b.daemon.catalog.images
        finally:
            assert b.stop() == 0
            supervisor.close()


def test_sendfd_without_a_listening_supervisor_and_takeover_errors(work: Path, built: Path) -> None:
    with KernelSimulator(work / "kernel") as sim:
        supervisor = Supervisor(work / "supervisor" / "d1.sock")
        a = Node(sim, work, "a", supervisor.path, bound=True)
        try:
            a.wait_serving()
            status, body = call(a.sock, "PUT", "/api/v1/daemon/fuse/sendfd")
            assert status == 500 and str(supervisor.path) in body["message"], body
            assert not a.daemon.handing_over, "nothing was handed over: a stop is a clean stop"
            status, body = call(a.sock, "PUT", "/api/v1/daemon/fuse/takeover")
            assert status == 400 and "not waiting" in body["message"], body
        finally:
            assert a.stop() == 0
        b = Node(sim, work, "b", supervisor.path, bound=False)
        try:  # INIT, and the supervisor does not listen: the error names the socket, still INIT
            status, body = call(b.sock, "PUT", "/api/v1/daemon/fuse/takeover")
            assert status == 500 and str(supervisor.path) in body["message"], body
            assert b.state() == "INIT"
            status, body = call(b.sock, "PUT", "/api/v1/daemon/fuse/sendfd")
            assert status == 503, body
        finally:
            assert b.stop() == 0
            supervisor.close()


def test_supervisor_standin_keeps_state_and_fd_across_takeovers(tmp_path: Path) -> None:
    """pkg/supervisor's contract: one connection each way, read until EOF, exactly one fd kept
    (a newer one replaces it), the kept copy is not consumed by a takeover."""
    from fscached.lifecycle.supervisor import receive_states, send_states

    supervisor = Supervisor(tmp_path / "sup" / "x.sock")
    r, w = os.pipe()
    try:
        big = os.urandom(3 << 20)  # more than one message each way
        supervisor.fetch_states(lambda: send_states(str(supervisor.path), big, w))
        assert supervisor.data == big and supervisor.fd >= 0 and not supervisor.path.exists()
        for _ in range(2):
            supervisor.send_states(5.0)
            data, fds = receive_states(str(supervisor.path))
            assert data == big and len(fds) == 1
            os.write(fds[0], b"x")  # the same pipe
            assert os.read(r, 1) == b"x"
            os.close(fds[0])
            supervisor.wait_sent()
        with pytest.raises(Exception, match=r"x\.sock"):
            receive_states(str(supervisor.path), timeout=1)  # nobody listens now
    finally:
        supervisor.close()
        os.close(r)
        os.close(w)


def test_a_supervisor_socket_served_by_another_user_is_refused(work: Path) -> None:
    """The device fd goes to the supervisor and the state it gives back is trusted: a socket at
    the supervisor's path served by a user other than root or the daemon's own is refused."""
    assert os.geteuid() == 0 and os.access("/usr/bin/python3", os.X_OK), \
        "needs root (and a system python3) to listen as another user"
    import subprocess

    from fscached.lifecycle.supervisor import FailoverError, receive_states, send_states

    where = work / "open"  # under /var/tmp: a path "nobody" can reach
    where.mkdir()
    os.chmod(work, 0o755)
    os.chmod(where, 0o777)
    path = where / "sup.sock"
    listener = subprocess.Popen(
        ["/usr/bin/python3", "-c", "import socket, sys, time\n"
         "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(4); print('up', flush=True)\n"
         "time.sleep(30)\n", str(path)],
        preexec_fn=lambda: os.setuid(65534), stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "up"
        with pytest.raises(FailoverError, match="uid 65534"):
            receive_states(str(path), timeout=5)
        r, w = os.pipe()
        try:
            with pytest.raises(FailoverError, match="neither root"):
                send_states(str(path), b"state", w, timeout=5)
        finally:
            os.close(r)
            os.close(w)
    finally:
        listener.kill()
        listener.wait()
