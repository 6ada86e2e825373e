"""Faults on the fanotify path, on the host kernel through the real `fscached` CLI.

Whatever goes wrong (corrupt blob bytes, a failing peer or registry, a busy mount at stop, a
mount left by a dead daemon, bad input), a reader of the mount gets the right bytes or EIO,
never wrong bytes or zeros, and the daemon says what happened in one line.

Every test cleans up its daemons, mounts and keepers, pass or fail (the `work` fixture sweeps
whatever is left under its directory).
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from aiohttp import web

from daemon_proc import REPO, WORK_ROOT, FscachedProcess, drop_caches
from erofs_image.reader import Bootstrap
from erofs_image.tree import ChunkRef, lookup
from fscached.frontends.fanotify import keeper
from fscached.util import mounts

pytestmark = pytest.mark.timeout(180)

CHUNK = 64 << 10
READ_TIMEOUT = 30.0  # a read that takes longer is a hang: the test fails instead of blocking


def _fanotify_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount, fanotify pre-content marks)"
    from fanotify.group import probe

    return probe(WORK_ROOT)


@pytest.fixture(autouse=True)
def fanotify_available() -> None:
    why_not = _fanotify_unavailable()
    if why_not:
        pytest.fail(f"fanotify backend unavailable: {why_not}")


# -- fixtures and helpers (this file's own: conftest.py belongs to someone else) -----------------

def keeper_pids(cache_dir: Path) -> list[int]:
    """Pids of keepers (`python -m fscached.frontends.fanotify.keeper <cache>/.fscached/keeper.sock`) of this cache."""
    sock = cache_dir / ".fscached" / "keeper.sock"
    found = subprocess.run(["pgrep", "-f", f"fscached.frontends.fanotify.keeper {sock}"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def wait_no_keeper(cache_dir: Path, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        pids = keeper_pids(cache_dir)
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def mounted(mountpoint: Path) -> bool:
    return str(mountpoint) in mounts.erofs_mounts()


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fzf-", dir=WORK_ROOT))
    try:
        yield path
    finally:
        # the safety net under every test: no mount, keeper or directory left behind
        for mountpoint in mounts.erofs_mounts():
            if mountpoint.startswith(str(path) + "/"):
                subprocess.run(["umount", "-l", mountpoint], check=False)
        for sock in path.glob("*/.fscached/keeper.sock"):
            keeper.dismiss(sock)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spawn(work: Path) -> Iterator[Callable[..., FscachedProcess]]:
    """spawn(images, mountpoints, cache=...) -> a started FscachedProcess, cleaned up after the
    test whatever happens (killed, its mounts lazily unmounted, its keeper dismissed)."""
    started: list[tuple[FscachedProcess, list[Path]]] = []

    def start(images: list[str], mountpoints: list[Path], cache: str = "cache",
              extra: list[str] | None = None) -> FscachedProcess:
        proc = FscachedProcess(work / cache, images, extra=extra)
        started.append((proc, mountpoints))
        return proc.start()

    yield start
    for proc, mountpoints in started:
        proc.cleanup(mountpoints)


def make_tree(root: Path) -> dict[str, bytes]:
    """Several files over several 64 KiB chunks; returns relative path -> content."""
    rng = __import__("random").Random(1234)
    files = {
        "a.bin": rng.randbytes(300_000),
        "b.txt": b"".join(rng.randbytes(48).hex().encode() + b"\n" for _ in range(2_100)),  # ~200 KB, compressible
        "text.txt": b"hello fscached over fanotify\n" * 8_000,
        "small": b"x" * 100,
        "sub/c.bin": rng.randbytes(150_000),
        "sub/zeros": bytes(200_000) + b"end",
        "sub/later.bin": rng.randbytes(130_000),
    }
    files["same.bin"] = files["a.bin"]  # deduplicated
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


@pytest.fixture(scope="module")
def built() -> Iterator[dict[str, Any]]:
    """The tree and its images (uncompressed and zstd, 64 KiB chunks), built once by the CLI."""
    base = Path(tempfile.mkdtemp(prefix="fzf-img-", dir=WORK_ROOT))
    try:
        tree = base / "tree"
        tree.mkdir()
        files = make_tree(tree)
        out = {}
        for compressor in ("none", "zstd"):
            dest = base / compressor
            subprocess.run([sys.executable, "-m", "erofs_image.cli", "convert", str(tree), str(dest),
                            "--compressor", compressor, "--chunk-size", "64K", "--quiet"],
                           cwd=REPO, check=True)
            out[compressor] = dest
        yield {"files": files, "images": out}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def image_copy(built: dict[str, Any], compressor: str, dest: Path) -> tuple[Path, Path]:
    """A private copy of a built image (bootstrap, blobs): (bootstrap, blobs dir)."""
    src = built["images"][compressor]
    dest.mkdir(parents=True)
    shutil.copy(src / "image.boot", dest / "image.boot")
    shutil.copytree(src / "blobs", dest / "blobs")
    return dest / "image.boot", dest / "blobs"


def corrupt_chunk(boot_path: Path, blobs: Path, rel: str, index: int) -> tuple[ChunkRef, Path]:
    """Flip one byte inside the stored bytes of chunk `index` of file `rel`, in its blob file."""
    boot = Bootstrap.open(boot_path)
    inode = lookup(boot.image.root, b"/" + rel.encode())
    ref = inode.chunks[index]
    assert ref is not None
    blob_file = blobs / boot.blobs[ref.blob_index].blob_id
    data = bytearray(blob_file.read_bytes())
    data[ref.compressed_offset + ref.compressed_size // 2] ^= 0x5A
    blob_file.write_bytes(bytes(data))
    return ref, blob_file


def users_of_chunk(boot_path: Path, ref: ChunkRef) -> list[str]:
    """The files (relative paths) whose chunks include `ref` (dedup would make it shared)."""
    boot = Bootstrap.open(boot_path)
    found = []
    stack = [(b"", boot.image.root)]
    while stack:
        name, node = stack.pop()
        for child_name, child in node.children.items():
            path = name + b"/" + child_name
            if child.is_dir:
                stack.append((path, child))
            elif child.is_reg and any(c is not None and c.blob_index == ref.blob_index
                                      and c.uncompressed_offset == ref.uncompressed_offset for c in child.chunks):
                found.append(path.decode().lstrip("/"))
    return found


def read_path(path: Path, offset: int | None = None, length: int = 0, timeout: float = READ_TIMEOUT) -> bytes:
    """The file's content (or one pread), read on a thread: a hang fails the test (the
    cleanup then unblocks the thread) instead of blocking it. Errors are raised as OSError."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            with open(path, "rb", buffering=0) as f:
                result["data"] = f.read() if offset is None else os.pread(f.fileno(), length, offset)
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"reading {path} (offset {offset}) hung for {timeout:.0f} s")
    if "error" in result:
        raise result["error"]
    return result["data"]


def assert_files_exact(mnt: Path, files: dict[str, bytes], names: list[str] | None = None) -> None:
    for rel in names if names is not None else sorted(files):
        got = read_path(mnt / rel)
        assert got == files[rel], f"{rel}: {len(got)} bytes read, not the {len(files[rel])} expected bytes"


def local_spec(boot: Path, blobs: Path, mnt: Path, fsid: str = "img") -> str:
    return f"fsid={fsid},bootstrap={boot},blobs={blobs},mountpoint={mnt}"


def counter_sum(counters: dict[str, int], prefix: str, suffix: str) -> int:
    return sum(v for k, v in counters.items() if k.startswith(prefix) and k.endswith(suffix))


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line or "error:" in line]


class LoopThread:
    """An event loop on its own thread, for the test's async servers (proxy, registry front)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class FlakyFront:
    """An HTTP server in front of the real registry that fails the FIRST request for every
    blob range (alternately HTTP 500 and a reset connection) and forwards the retries."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.seen: set[tuple[str, str]] = set()
        self.faults = 0
        self.forwarded = 0

    async def __aenter__(self) -> FlakyFront:
        import aiohttp

        self.client = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        await self.runner.cleanup()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key = (request.path, request.headers.get("Range", ""))
        if "/blobs/" in request.path and key not in self.seen:
            self.seen.add(key)
            self.faults += 1
            if self.faults % 2:
                return web.Response(status=500, text="injected")
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("range", "authorization", "accept")}
        async with self.client.request(request.method, self.upstream + request.path_qs, headers=headers,
                                       allow_redirects=False) as up:
            body = await up.read()
            keep = {k: v for k, v in up.headers.items()
                    if k in ("Content-Range", "Content-Type", "Docker-Content-Digest", "Location")}
            self.forwarded += 1
            return web.Response(status=up.status, body=body, headers=keep)


def resetting_proxy_class() -> type:
    from standins.http_proxy import ProxyStandIn

    class ResettingProxy(ProxyStandIn):
        """The stand-in Dragonfly proxy, but every proxied request gets its connection closed."""

        resets = 0

        async def _answer(self, request: web.Request, target: Any, rec: Any) -> web.Response:
            self.resets += 1
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)

    return ResettingProxy


def push_image(registry: Any, blobs: Path, name: str) -> str:
    """Push every blob of `blobs` to a fresh repository; its name."""
    repo = f"fanotify-faults/t{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    for blob in blobs.iterdir():
        assert registry.push_blob(repo, blob.read_bytes()) == blob.name
    return repo


# -- 1. corrupt blob bytes: EIO for that file only ------------------------------------------------

def test_corrupt_chunk_gives_eio_for_its_file_only(built: dict[str, Any], work: Path, spawn: Any) -> None:
    files: dict[str, bytes] = built["files"]
    boot, blobs = image_copy(built, "none", work / "image")
    victim = "b.txt"
    ref, _ = corrupt_chunk(boot, blobs, victim, 1)  # the second 64 KiB chunk of b.txt
    assert users_of_chunk(boot, ref) == [victim], "the damaged chunk must belong to one file only"
    bad_start, bad_end = CHUNK, min(2 * CHUNK, len(files[victim]))
    mnt = work / "mnt"
    daemon = spawn([local_spec(boot, blobs, mnt)], [mnt])
    assert mounted(mnt)

    # the good files first: the 1 MiB window holding the bad chunk fails whole, then each
    # read's own chunks are fetched alone
    good = [rel for rel in sorted(files) if rel not in (victim, "sub/later.bin")]
    assert_files_exact(mnt, files, good)

    with pytest.raises(OSError) as failed:
        read_path(mnt / victim)
    assert failed.value.errno == errno.EIO, failed.value

    # block by block: the damaged chunk's blocks fail with EIO, every block around it reads
    # right; no block ever reads wrong bytes or zeros
    want = files[victim]
    for off in range(0, len(want), 4096):
        n = min(4096, len(want) - off)
        try:
            got = read_path(mnt / victim, off, n)
        except OSError as exc:
            assert exc.errno == errno.EIO, f"block at {off}: {exc}"
            assert bad_start <= off < bad_end, f"block at {off}, outside the damaged chunk, failed: {exc}"
            continue
        assert bad_start > off or off >= bad_end, f"block at {off}, in the damaged chunk, read without error"
        assert got == want[off:off + n], f"block at {off}: wrong bytes"

    counters = daemon.counters()
    assert counters.get("verify_failures", 0) > 0, counters
    assert counters.get("read_failed", 0) > 0, counters

    # still serving: a file never read before (a real fill), and the damaged one still fails
    # from a cold page cache (its cache-file hole must never read as zeros)
    assert_files_exact(mnt, files, ["sub/later.bin"])
    drop_caches()
    with pytest.raises(OSError) as again:
        read_path(mnt / victim)
    assert again.value.errno == errno.EIO
    assert_files_exact(mnt, files, ["a.bin", "sub/c.bin"])
    assert daemon.proc is not None and daemon.proc.poll() is None

    assert daemon.stop() == 0
    assert not mounted(mnt)
    final = daemon.final_counters()
    assert final.get("read_failed", 0) >= counters["read_failed"] + 1
    log = daemon.log_text()
    assert "fails its blake3 digest check" in log or "verification" in log, log[-3000:]


# -- 2. a failing first source: the registry takes over --------------------------------------------

@pytest.mark.parametrize("mode", ["proxy-500", "proxy-reset", "registry-flaky"])
def test_failing_first_source_falls_back_to_the_registry(mode: str, built: dict[str, Any], registry: Any,
                                                         work: Path, spawn: Any) -> None:
    from standins.http_proxy import ProxyStandIn

    files: dict[str, bytes] = built["files"]
    boot, blobs = image_copy(built, "zstd", work / "image")
    repo = push_image(registry, blobs, work.name)
    shutil.rmtree(blobs)  # no local copy: the bytes must come over the network
    loop = LoopThread()
    proxy = resetting_proxy_class()() if mode == "proxy-reset" else ProxyStandIn()
    front = FlakyFront(registry.url) if mode == "registry-flaky" else None
    loop.run(proxy.__aenter__())
    try:
        if front is not None:
            loop.run(front.__aenter__())
        if mode in ("proxy-500", "registry-flaky"):
            proxy.fail(500)
        registry_host = front.host if front is not None else registry.host
        mnt = work / "mnt"
        spec = (f"fsid=img,bootstrap={boot},registry={registry_host}/{repo},scheme=http,"
                f"proxy={proxy.url},check_interval=0.05,mountpoint={mnt}")
        # 64 KiB windows: many ranged requests, each one tried on the proxy first (it is marked
        # unhealthy for only 50 ms after each failure)
        daemon = spawn([spec], [mnt], extra=["--read-window", "64K"])
        assert_files_exact(mnt, files)
        counters = daemon.counters()
        assert counters.get("read_failed", 0) == 0, counters
        assert counters.get("verify_failures", 0) == 0, counters
        assert counters.get("fetches", 0) > 3, counters
        proxy_failed = counter_sum(counters, "source:dragonfly proxy", ":failed")
        registry_ok = counter_sum(counters, "source:registry ", ":ok")
        assert proxy_failed > 0, counters
        assert registry_ok == counters["fetches"], counters  # every fetch, from the registry
        assert proxy.blob_requests() or getattr(proxy, "resets", 0), "the proxy was never asked"
        if front is not None:  # every range failed once there, then its retry went through
            assert front.faults >= counters["fetches"] and front.forwarded >= counters["fetches"], \
                (front.faults, front.forwarded, counters)
        # the fills are complete and correct: from a cold page cache, the same bytes again
        drop_caches()
        assert_files_exact(mnt, files, ["a.bin", "b.txt", "sub/later.bin"])
        assert daemon.stop() == 0
        assert not mounted(mnt)
    finally:
        if front is not None:
            loop.run(front.__aexit__(None, None, None))
        loop.run(proxy.__aexit__(None, None, None))
        loop.close()


# -- 3. a corrupt local blob, the right one in the registry -----------------------------------------

def test_corrupt_local_blob_is_refetched_from_the_registry(built: dict[str, Any], registry: Any,
                                                           work: Path, spawn: Any) -> None:
    files: dict[str, bytes] = built["files"]
    boot, blobs = image_copy(built, "zstd", work / "image")
    repo = push_image(registry, blobs, work.name)  # the good blob
    corrupt_chunk(boot, blobs, "b.txt", 1)
    corrupt_chunk(boot, blobs, "sub/c.bin", 0)
    mnt = work / "mnt"
    spec = f"fsid=img,bootstrap={boot},blobs={blobs},registry={registry.host}/{repo},scheme=http,mountpoint={mnt}"
    daemon = spawn([spec], [mnt], extra=["--read-window", "64K"])
    assert_files_exact(mnt, files)
    counters = daemon.counters()
    assert counters.get("verify_failures", 0) > 0, counters
    assert counters.get("read_failed", 0) == 0, counters
    assert counter_sum(counters, "source:local ", ":integrity") > 0, counters
    assert counter_sum(counters, "source:local ", ":ok") > 0, counters  # the good windows stay local
    assert counter_sum(counters, "source:local ", ":ok") + counter_sum(counters, "source:registry ", ":ok") \
        == counters["fetches"], counters
    assert counter_sum(counters, "source:registry ", ":ok") > 0, counters
    drop_caches()
    assert_files_exact(mnt, files, ["b.txt", "sub/c.bin"])
    assert daemon.stop() == 0
    assert not mounted(mnt)


# -- 4. a busy mount at stop -------------------------------------------------------------------------

def test_busy_mount_at_stop_keeps_serving_until_released(built: dict[str, Any], work: Path, spawn: Any) -> None:
    files: dict[str, bytes] = built["files"]
    boot, blobs = image_copy(built, "none", work / "image")
    mnt = work / "mnt"
    daemon = spawn([local_spec(boot, blobs, mnt)], [mnt])
    assert daemon.proc is not None
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nf = open('small', 'rb')\nf.read()\nprint('holding', flush=True)\ntime.sleep(600)\n"],
        cwd=mnt, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        daemon.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "busy" not in daemon.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        busy = [line for line in daemon.log_text().splitlines() if "busy" in line]
        assert busy and str(mnt) in busy[0], daemon.log_text()
        time.sleep(2)
        assert daemon.proc.poll() is None, f"the daemon exited with a busy mount:\n{daemon.log_text()}"
        assert mounted(mnt)
        # still serving: files not read before need fills
        assert_files_exact(mnt, files, ["a.bin", "sub/later.bin", "text.txt"])
        assert daemon.counters().get("read_failed", 0) == 0
    finally:
        holder.kill()
        holder.wait(10)
    assert daemon.stop() == 0, daemon.log_text()
    assert not mounted(mnt)
    assert wait_no_keeper(daemon.cache_dir) == [], "a keeper outlived a clean stop"
    assert "unmounted" in daemon.log_text()


# -- 5. a mount left by a daemon whose group is gone ---------------------------------------------

def leave_mount_of_a_dead_group(built: dict[str, Any], work: Path, spawn: Any) -> tuple[str, Path, Path]:
    """A daemon mounts the image, then it and its keeper are killed -9: the mount stays, its
    fanotify group is gone. (image spec, mountpoint, cache dir)"""
    boot, blobs = image_copy(built, "none", work / "image")
    mnt = work / "mnt"
    spec = local_spec(boot, blobs, mnt)
    first = spawn([spec], [mnt])
    keepers = keeper_pids(first.cache_dir)
    assert len(keepers) == 1, keepers
    first.kill()
    for pid in keepers:
        os.kill(pid, signal.SIGKILL)
    assert wait_no_keeper(first.cache_dir) == []
    assert mounted(mnt), "the mount outlives its daemon and keeper"
    first.ready.unlink(missing_ok=True)
    return spec, mnt, first.cache_dir


def start_refused(spec: str, mnt: Path, cache_dir: Path, out_file: Path) -> FscachedProcess:
    """Start `fscached` on a mount of a dead group; assert it exits 1 with one line saying to
    unmount. Output goes to a file, not a pipe: a keeper the failed daemon leaves behind
    inherits its stderr, so a pipe would stay open after the daemon has exited."""
    proc = FscachedProcess(cache_dir, [spec])
    with open(out_file, "w") as out:
        done = subprocess.run(proc.args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=60)
    output = out_file.read_text()
    assert done.returncode == 1, output
    errors = error_lines(output)
    assert len(errors) == 1, output
    assert str(mnt) in errors[0] and "unmount" in errors[0], errors[0]
    assert not proc.ready.exists(), "a daemon that failed its start said it was ready"
    assert mounted(mnt)
    return proc


def test_mount_of_a_dead_group_is_refused_with_one_line(built: dict[str, Any], work: Path, spawn: Any) -> None:
    spec, mnt, cache_dir = leave_mount_of_a_dead_group(built, work, spawn)
    second = FscachedProcess(cache_dir, [spec])
    try:
        start_refused(spec, mnt, cache_dir, work / "second.log")
    finally:
        second.cleanup([])  # dismisses a keeper the failed start may have left
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert not mounted(mnt)
    assert wait_no_keeper(cache_dir) == []


def test_mount_of_a_dead_group_is_refused_again_on_retry(built: dict[str, Any], work: Path, spawn: Any) -> None:
    """The refusal must not flip on a retry (systemd's Restart=, an operator trying again): the
    mount's reads went unwatched while no group existed, so its page cache may hold zeros."""
    files: dict[str, bytes] = built["files"]
    spec, mnt, cache_dir = leave_mount_of_a_dead_group(built, work, spawn)
    # a reader in the gap: no group watches the blob, the kernel reads its holes (zeros) into
    # the mount's page cache (the documented trap of a killed daemon AND keeper)
    in_gap = read_path(mnt / "a.bin", 0, 8192)
    third = FscachedProcess(cache_dir, [spec])
    try:
        start_refused(spec, mnt, cache_dir, work / "second.log")
        third.ready.unlink(missing_ok=True)
        try:
            third.start(timeout=20)
        except AssertionError as refused:  # it exited before it was ready: what should happen
            assert third.proc is not None and third.proc.returncode == 1, str(refused)
            errors = error_lines(third.log_text())
            assert errors and str(mnt) in errors[-1] and "unmount" in errors[-1], third.log_text()
        else:
            got = read_path(mnt / "a.bin")
            served = ("byte-exact" if got == files["a.bin"] else
                      f"WRONG bytes (first 8 KiB zeros: {got[:8192] == bytes(8192)}; "
                      f"read in the gap was zeros: {in_gap == bytes(8192)})")
            pytest.fail(f"a retry after the refused start came up serving {mnt}, which the start before it "
                        f"refused; a.bin read through it: {served}; counters {third.counters()}\n"
                        f"{third.log_text()[-1500:]}")
    finally:
        third.cleanup([])
        keeper.dismiss(cache_dir / ".fscached" / "keeper.sock")
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert not mounted(mnt)
    assert wait_no_keeper(cache_dir) == []


# -- 6. bad input --------------------------------------------------------------------------------

def test_mountpoint_that_is_a_file_is_refused(built: dict[str, Any], work: Path) -> None:
    boot, blobs = image_copy(built, "none", work / "image")
    not_a_dir = work / "regular-file"
    not_a_dir.write_text("x")
    proc = FscachedProcess(work / "cache", [local_spec(boot, blobs, not_a_dir)])
    done = subprocess.run(proc.args, cwd=REPO, capture_output=True, text=True, timeout=60)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output
    assert len(output.splitlines()) == 1, output
    assert "mountpoint" in output and str(not_a_dir) in output, output
    assert not mounted(not_a_dir)
    assert keeper_pids(work / "cache") == []


def test_cache_dir_on_tmpfs_is_refused(built: dict[str, Any], work: Path) -> None:
    boot, blobs = image_copy(built, "none", work / "image")
    shm = Path(tempfile.mkdtemp(prefix="fzf-", dir="/dev/shm"))
    mnt = work / "mnt"
    try:
        args = [sys.executable, "-m", "fscached.cli", "--backend", "fanotify", "--cache-dir", str(shm / "cache"),
                "--work-dir", str(work / "work"), "--image", local_spec(boot, blobs, mnt)]
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
        output = (done.stdout + done.stderr).strip()
        assert done.returncode == 1, output
        assert len(output.splitlines()) == 1, output
        assert "tmpfs" in output, output
        assert not mounted(mnt)
        assert keeper_pids(shm / "cache") == []
    finally:
        for sock in shm.glob("*/.fscached/keeper.sock"):
            keeper.dismiss(sock)
        if mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(shm, ignore_errors=True)
