"""fscached.cache_gc on the cachefiles path, on the host: a real Daemon answering the kernel
simulator, whose device also answers `inuse` / `cull` the way fs/cachefiles does (the simulator
itself cannot: a write to its socket cannot fail with an errno, and it never sees the writer's
working directory), against files laid out where the kernel links them (cachefiles.naming).

Also: the culling thread's own working directory (the daemon's never moves), the grace for an
object the kernel links just after an unmount, the errors through the real API route, the size
budget (LRU, bound and busy objects kept), free-space culling (bcull / brun), brun/bcull/bstop
sent before `bind ondemand` in an order the kernel accepts, and the new config keys.
"""
from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest
import uvloop

from cachefiles import naming
from cachefiles.device import CachefilesDevice, CachefilesError
from erofs_image.builder import convert
from fscached import cache_gc
from fscached.api.server import ApiServer
from fscached.cli import main as cli_main
from fscached.config import Config, ImageSpec
from fscached.daemon import Daemon
from fscached.frontends.cachefiles import CachefilesFrontend
from fscached.frontends.cachefiles import cull as cachefiles_cull
from simdaemon import make_tree
from standins.kernel_simulator import KernelSimulator, _SimDevice


class CullingKernel:
    """fs/cachefiles' `inuse` / `cull`: the name is resolved in the WRITER's working directory;
    EBUSY for what the kernel holds, ENOENT for nothing; a file is unlinked, a directory moved
    to the graveyard."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.in_use: set[Path] = set()
        self.calls: list[tuple[str, str, str, str]] = []  # command, name, cwd, thread

    def command(self, cmd: str, name: str) -> None:
        cwd = os.getcwd()
        self.calls.append((cmd, name, cwd, threading.current_thread().name))
        path = Path(cwd) / name
        if "/" in name or not os.path.lexists(path):
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        if path in self.in_use:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        if cmd == "cull":
            if path.is_dir():
                grave = self.cache_dir / "graveyard"
                grave.mkdir(exist_ok=True)
                os.rename(path, grave / f"{time.monotonic_ns():016x}")
            else:
                path.unlink()


class CullingDevice(_SimDevice):
    kernel: CullingKernel

    def _command(self, text: str) -> None:
        cmd, _, name = text.partition(" ")
        if cmd in ("inuse", "cull"):
            self.kernel.command(cmd, name)
            return
        super()._command(text)


class Run:
    """A Daemon on its own uvloop thread, on the simulator, with a culling device."""

    def __init__(self, sim: KernelSimulator, config: Config) -> None:
        self.sim = sim
        device = sim.device()
        device.__class__ = CullingDevice  # the simulator's device, answering inuse/cull as well
        self.kernel = device.kernel = CullingKernel(config.cache_dir)  # type: ignore[attr-defined]
        self.daemon = Daemon(config, device=device)
        self.daemon.take_kernel_path()
        self.thread = threading.Thread(target=lambda: uvloop.run(self.daemon.run()), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.daemon.serving:
            assert time.monotonic() < deadline, "daemon did not start serving"
            time.sleep(0.01)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return self.daemon.submit(coro).result(timeout)

    def cull(self, blob_id: str) -> None:
        self.call(self.daemon.janitor.cull(blob_id))

    def unbind(self, spec: ImageSpec) -> None:
        self.call(self.daemon.unbind_image(spec.volume, spec.fsid))

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cachefiles_cull, "COMMIT_GRACE", 0.6)
    monkeypatch.setattr(cachefiles_cull, "RETRY_SECONDS", 0.05)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built")
    convert(make_tree(out / "tree"), out / "image", compressor="zstd")
    return out / "image"


@pytest.fixture
def blob_id(built: Path) -> str:
    (blob,) = [p.name for p in (built / "blobs").iterdir()]
    return blob


def spec(built: Path, fsid: str, domain: str | None = None) -> ImageSpec:
    return ImageSpec(fsid=fsid, bootstrap=built / "image.boot", blobs=built / "blobs", domain=domain)


def linked(cache: Path, volume: str, key: str, size: int = 64 << 10) -> Path:
    """An object as the kernel links it once its cookie is withdrawn (real blocks: budgets)."""
    path = naming.object_path(cache, "erofs," + volume, key.encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


@pytest.fixture
def run_factory(work: Path) -> Iterator[Any]:
    started: list[tuple[KernelSimulator, Run]] = []

    def start(images: list[ImageSpec], **config: Any) -> Run:
        sim = KernelSimulator(work / f"sim{len(started)}")
        cache = work / "cache"
        cache.mkdir(exist_ok=True)
        run = Run(sim, Config(cache_dir=cache, images=images, **config))
        started.append((sim, run))
        return run

    yield start
    for sim, run in started:
        run.stop()
        sim.shutdown()


def test_cull_in_every_volume_through_the_kernel_commands(run_factory: Any, built: Path, blob_id: str,
                                                          work: Path) -> None:
    a, b = spec(built, "a"), spec(built, "b", "dom")
    run = run_factory([a, b])
    cache = run.daemon.config.cache_dir
    run.unbind(a)
    run.unbind(b)
    in_a, in_dom = linked(cache, "a", blob_id), linked(cache, "dom", blob_id)
    boot_a = linked(cache, "a", "a")
    cwd = os.getcwd()
    run.cull(blob_id)
    assert not in_a.exists() and not in_dom.exists() and boot_a.exists()
    assert os.getcwd() == cwd  # the daemon's working directory never moved
    calls = [(c, n, d) for c, n, d, _ in run.kernel.calls]
    assert sorted(calls) == sorted([("inuse", in_a.name, str(in_a.parent)), ("cull", in_a.name, str(in_a.parent)),
                                    ("inuse", in_dom.name, str(in_dom.parent)),
                                    ("cull", in_dom.name, str(in_dom.parent))])
    assert {t for *_, t in run.kernel.calls} == {"cachefiles-cwd_0"}  # one thread of its own
    with pytest.raises(cache_gc.CullNotFound, match=f"no cache of {blob_id}"):
        run.cull(blob_id)


def test_bound_or_kernel_held_objects_stay(run_factory: Any, built: Path, blob_id: str) -> None:
    a, b = spec(built, "a"), spec(built, "b", "dom")
    run = run_factory([a, b])
    cache = run.daemon.config.cache_dir
    run.unbind(b)
    in_a, in_dom = linked(cache, "a", blob_id), linked(cache, "dom", blob_id)
    with pytest.raises(cache_gc.CullBusy) as caught:
        run.cull(blob_id)  # bound in erofs,a: stays; free in erofs,dom: culled
    assert caught.value.errno == errno.EBUSY
    assert "volume erofs,a: bound (image a)" in str(caught.value) and f"removed {in_dom}" in str(caught.value)
    assert in_a.exists() and not in_dom.exists()
    assert not any(n == in_a.name and d == str(in_a.parent) for _, n, d, _ in run.kernel.calls)
    # the kernel holds it (mounted from the linked file): its `inuse` says EBUSY
    in_dom = linked(cache, "dom", blob_id)
    run.kernel.in_use.add(in_dom)
    with pytest.raises(cache_gc.CullBusy, match="volume erofs,dom: in use by the kernel"):
        run.cull(blob_id)
    assert in_dom.exists()
    run.kernel.in_use.clear()
    with pytest.raises(cache_gc.CullBusy):  # still bound in erofs,a
        run.cull(blob_id)
    assert not in_dom.exists()


def test_an_open_object_is_busy_before_it_has_a_name(run_factory: Any, built: Path, blob_id: str) -> None:
    a = spec(built, "a")
    run = run_factory([a])
    # the kernel OPENs the blob when the image is mounted: an unnamed tmpfile until umount
    run.sim.mount("erofs,a", blob_id.encode())
    with pytest.raises(cache_gc.CullBusy, match="volume erofs,a: bound"):
        run.cull(blob_id)
    server = run.daemon.frontend
    assert isinstance(server, CachefilesFrontend) and server.open_volumes(blob_id.encode()) == {"a"}


def test_fsid_culls_its_bootstrap_then_its_empty_volume(run_factory: Any, built: Path, blob_id: str) -> None:
    fsid = "f" * 64  # a snapshotter fscache_id
    image = spec(built, fsid)
    run = run_factory([image])
    cache = run.daemon.config.cache_dir
    run.unbind(image)
    boot, blob = linked(cache, fsid, fsid), linked(cache, fsid, blob_id)
    for fan in range(3):  # the kernel makes all 256 @xx directories; a few empty ones will do
        (cache / "cache" / f"Ierofs,{fsid}" / f"@{fan:02x}").mkdir(exist_ok=True)
    run.cull(fsid)
    assert not boot.exists() and blob.exists()  # the snapshotter culls the layers on their own
    run.cull(blob_id)
    volume = cache / "cache" / f"Ierofs,{fsid}"
    assert volume.is_dir()
    run.cull(fsid)  # nothing left in the image's own volume: it goes too (graveyard, emptied)
    assert not volume.exists()
    assert list((cache / "graveyard").iterdir()) == []
    assert ("cull", volume.name, str(cache / "cache")) in [c[:3] for c in run.kernel.calls]
    with pytest.raises(cache_gc.CullNotFound):
        run.cull(fsid)


def test_a_cull_right_after_umount_waits_for_the_kernel_to_link(run_factory: Any, built: Path,
                                                                blob_id: str) -> None:
    image = spec(built, "img")
    run = run_factory([image])
    cache = run.daemon.config.cache_dir
    run.unbind(image)
    # the kernel withdraws the cookie (links the tmpfile, then lets go) in a worker after umount
    path = naming.object_path(cache, "erofs,img", b"img")
    timer = threading.Timer(0.2, lambda: linked(cache, "img", "img"))
    started = time.monotonic()
    timer.start()
    run.cull("img")
    assert time.monotonic() - started >= 0.2 and not path.exists()
    # held a moment longer by the kernel: retried until it lets go
    held = linked(cache, "img", blob_id)
    run.kernel.in_use.add(held)
    threading.Timer(0.2, run.kernel.in_use.clear).start()
    run.cull(blob_id)
    assert not held.exists()
    # an id nobody unbound is not waited for
    started = time.monotonic()
    with pytest.raises(cache_gc.CullNotFound):
        run.cull("never-bound")
    assert time.monotonic() - started < 0.5


def test_errors_through_the_api(run_factory: Any, built: Path, blob_id: str, work: Path) -> None:
    a, b = spec(built, "a"), spec(built, "b", "dom")
    run = run_factory([a, b])
    cache = run.daemon.config.cache_dir
    run.unbind(b)
    sock = work / "api" / "api.sock"
    api = ApiServer(run.daemon, sock)
    run.call(api.start())

    def delete(query: str) -> tuple[int, Any]:
        async def go() -> tuple[int, Any]:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as session:
                async with session.delete(f"http://localhost/api/v2/blobs?{query}") as resp:
                    raw = await resp.read()
                    return resp.status, json.loads(raw) if raw else None
        return asyncio.run(go())

    try:
        in_a, in_dom = linked(cache, "a", blob_id), linked(cache, "dom", blob_id)
        status, body = delete(f"blob_id={blob_id}")
        assert status == 409 and body["code"] == "BUSY" and "bound (image a)" in body["message"], body
        assert in_a.exists() and not in_dom.exists()
        status, body = delete("blob_id=b")
        assert status == 404 and "blob_cache: cache entry not found" in body["message"], body
        for bad in ("..%2Fx", "a%2Fb", "sha256:" + blob_id, "x" * 200):
            status, body = delete(f"blob_id={bad}")
            assert status == 400 and body["code"] == "BAD_REQUEST", (bad, body)
        run.unbind(a)
        assert delete(f"blob_id={blob_id}") == (204, None)
        assert not in_a.exists()
    finally:
        run.call(api.stop())


def test_the_culling_thread_has_a_working_directory_of_its_own(tmp_path: Path) -> None:
    from cachefiles import device

    inside = threading.Event()
    release = threading.Event()

    def sit_there() -> str:
        inside.set()
        assert release.wait(10)
        return os.getcwd()

    cwd = os.getcwd()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(device.in_directory, tmp_path, sit_there)
        assert inside.wait(10)
        assert os.getcwd() == cwd  # while the command's thread sits in tmp_path
        release.set()
        assert future.result(10) == str(tmp_path)
    assert device._directory_thread is not None and device._directory_thread.private  # unshare(CLONE_FS)


# -- the budget ------------------------------------------------------------------------------
def test_budget_culls_unused_objects_least_recently_used_first(run_factory: Any, built: Path, blob_id: str) -> None:
    a, b = spec(built, "a"), spec(built, "b", "dom")
    run = run_factory([a, b], cache_budget=1 << 40)  # checked by hand below
    cache = run.daemon.config.cache_dir
    run.unbind(b)
    now = time.time()
    objects = {}
    for age, key in ((500, "old"), (400, "older-busy"), (300, "mid"), (200, "new"), (100, "newest")):
        objects[key] = linked(cache, "dom", key, 256 << 10)
        os.utime(objects[key], (now - age, now - age))
    os.utime(objects["older-busy"], (now - 1000, now - 1000))
    bound = linked(cache, "a", blob_id, 256 << 10)
    os.utime(bound, (now - 5000, now - 5000))  # the oldest, but image a is bound
    run.kernel.in_use.add(objects["older-busy"])
    run.daemon.janitor.image_released("x", ["old"])  # unbound just now: counts as just used
    usage = cache_gc.allocated_bytes(cache)
    run.daemon.config.cache_budget = usage - (300 << 10)  # two objects must go
    report = run.call(run.daemon.janitor.check_budget())
    assert report["culled"] == [str(objects["mid"]), str(objects["new"])], report
    assert report["busy"] == [str(objects["older-busy"])]
    assert all(objects[k].exists() for k in ("old", "older-busy", "newest")) and bound.exists()
    assert report["usage_after"] <= run.daemon.config.cache_budget
    # within budget: nothing to do
    report = run.call(run.daemon.janitor.check_budget())
    assert report["culled"] == [] and report["to_free"] <= 0


def test_budget_pass_follows_an_unbind(run_factory: Any, built: Path, blob_id: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_gc, "UNBIND_SETTLE", 0.05)
    a = spec(built, "a")
    run = run_factory([a], cache_budget=1 << 20)
    cache = run.daemon.config.cache_dir
    boot, blob = linked(cache, "a", "a", 1 << 20), linked(cache, "a", blob_id, 1 << 20)
    time.sleep(0.2)
    assert boot.exists() and blob.exists()  # bound: never culled
    run.unbind(a)
    deadline = time.monotonic() + 10
    while (boot.exists() or blob.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not boot.exists() and not blob.exists()
    assert not (cache / "cache" / "Ierofs,a").exists()  # its empty volume went too


def test_free_space_below_bcull_culls_until_brun(run_factory: Any, built: Path, blob_id: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    a = spec(built, "a")
    # the pass an unbind brings forward must not run beside the ones called below
    monkeypatch.setattr(cache_gc, "UNBIND_SETTLE", 3600.0)
    run = run_factory([a], bcull=10, brun=20)  # no size budget: free-space limits only
    assert run.daemon.janitor.budget_wanted()
    cache = run.daemon.config.cache_dir
    run.unbind(a)
    first, second = linked(cache, "a", "first", 256 << 10), linked(cache, "a", "second", 256 << 10)
    os.utime(first, (1000, 1000))

    class Full:
        f_blocks, f_bavail, f_frsize = 10_000, 950, 4096  # 9.5 % free, below bcull 10 %

    monkeypatch.setattr(cachefiles_cull, "statvfs", lambda path: Full)
    report = run.call(run.daemon.janitor.check_budget())
    assert report["to_free"] == (2000 - 950) * 4096  # back to brun 20 %
    assert report["culled"] == [str(first), str(second)]
    Full.f_bavail = 1500  # 15 %: between bcull and brun, nothing to do
    assert run.call(run.daemon.janitor.check_budget())["culled"] == []


# -- brun / bcull / bstop ----------------------------------------------------------------------
class RecordingDevice(CachefilesDevice):
    """The kernel's range checks of cachefiles_daemon_brun/bcull/bstop, command by command."""

    def __init__(self) -> None:
        super().__init__("<recording>")
        self._fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.commands: list[str] = []
        self.limits = {"brun": 7, "bcull": 5, "bstop": 1}

    def _command(self, text: str) -> None:
        self.commands.append(text)
        cmd, _, arg = text.partition(" ")
        if cmd in self.limits:
            value = int(arg.rstrip("%"))
            ok = {"brun": lambda: self.limits["bcull"] < value < 100,
                  "bcull": lambda: self.limits["bstop"] < value < self.limits["brun"],
                  "bstop": lambda: value < self.limits["bcull"]}[cmd]()
            if not ok:
                raise OSError(errno.EINVAL, "Free space limits must be in range 0%<=stop<cull<run<100%")
            self.limits[cmd] = value


def test_space_limits_are_sent_in_an_order_the_kernel_accepts() -> None:
    for run in range(1, 100):
        for cull in range(1, run):
            for stop in (0, cull // 2, cull - 1):
                device = RecordingDevice()
                device.set_space_limits("b", run, cull, stop)
                assert device.limits == {"brun": run, "bcull": cull, "bstop": stop}
                device.close()
    device = RecordingDevice()
    with pytest.raises(CachefilesError, match="0 <= bstop < bcull < brun < 100"):
        device.set_space_limits("b", None, 10, None)  # bcull 10 above the default brun 7
    assert device.commands == []
    device.close()


def test_daemon_sends_the_limits_before_bind_ondemand(tmp_path: Path, built: Path) -> None:
    cache = Path("/var/tmp") / f"fscached-limits-{os.getpid()}"
    cache.mkdir(exist_ok=True)
    try:
        device = RecordingDevice()
        daemon = Daemon(Config(cache_dir=cache, brun=20, bcull=10, bstop=5), device=device)
        daemon.take_kernel_path()
        assert device.commands == [f"dir {cache}", "brun 99%", "bstop 0%", "bcull 10%", "bstop 5%", "brun 20%",
                                   "bind ondemand"]
        device = RecordingDevice()
        Daemon(Config(cache_dir=cache), device=device).take_kernel_path()  # none configured: the kernel's own
        assert device.commands == [f"dir {cache}", "bind ondemand"]
    finally:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.parametrize("line, error", [
    ('cache_budget = "1K"', "cache_budget '1K' is below 1M"),
    ("cache_budget = -1", "cache_budget must be a size of 0 or more"),
    ('cache_budget = "lots"', "cache_budget must be a size like"),
    ("brun = 100", "brun must be a whole percentage 0-99"),
    ("bstop = 1.5", "bstop must be a whole percentage 0-99"),
    ("bcull = true", "bcull must be a whole percentage 0-99"),
    ("bcull = 10", "brun/bcull/bstop 7/10/1%"),
    ("brun = 20\nbcull = 5\nbstop = 5", "0 <= bstop < bcull < brun < 100"),
])
def test_config_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str,
                                           error: str) -> None:
    config = tmp_path / "fscached.toml"
    config.write_text(f'cache_dir = "{tmp_path}"\n{line}\n')
    assert cli_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and error in err, err


def test_config_keys_accepted(tmp_path: Path) -> None:
    from fscached.config import build_config, load_toml

    config = tmp_path / "fscached.toml"
    config.write_text(f'cache_dir = "{tmp_path}"\ncache_budget = "10G"\nbrun = "30%"\nbcull = 20\n')
    built_config = build_config(load_toml(config), None, None, None, [], None, None, None)
    assert built_config.cache_budget == 10 << 30
    assert (built_config.brun, built_config.bcull, built_config.bstop) == (30, 20, None)
    config.write_text(f'cache_dir = "{tmp_path}"\ncache_budget = 0\n')
    assert build_config(load_toml(config), None, None, None, [], None, None, None).cache_budget is None
