"""Object and job lifetimes at daemon level, driven by the kernel simulator (the kernel's bytes).

CLOSE cancels fetches in flight (the anon fd is not kept until a source timeout); a reused
object id never receives an old fetch's bytes; a failed copen forgets its object; shutdown
completes every READ and leaks no fd; CLOSE stops a prefetch; the prefetch bandwidth counts
only what it fetched; images share their sources. Remote blobs come from `BlobFront`, a small
registry stand-in whose blob answers can be stalled or delayed per blob.
"""
from __future__ import annotations

import asyncio
import errno
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
import uvloop
from aiohttp import web

import fscached.daemon
from erofs_image.builder import convert
from erofs_image.reader import Bootstrap
from fetcher.dragonfly_grpc import DragonflyGrpcSource
from fetcher.registry import RegistrySource
from fscached.core.chunkmap import chunks_by_blob
from fscached.config import Config, ImageSpec, PrefetchSpec, RegistrySpec
from fscached.daemon import Daemon
from simdaemon import Running, expected_blob_space
from standins.kernel_simulator import KernelSimulator

CHUNK = 64 << 10
REPO = "lifetimes/app"


@dataclass
class Built:
    boot_path: Path
    blobs: Path
    blob_id: str
    want: bytes  # the blob's uncompressed address space

    @property
    def size(self) -> int:
        return len(self.want)


def build(work: Path, name: str, size: int, compressor: str = "none") -> Built:
    """An image with one file of `size` random bytes: one blob, size / 64 KiB chunks."""
    tree = work / f"tree-{name}"
    tree.mkdir()
    (tree / "data").write_bytes(os.urandom(size))
    out = work / f"built-{name}"
    convert(tree, out, compressor=compressor, chunk_size=CHUNK)
    boot = Bootstrap.open(out / "image.boot")
    assert len(boot.blobs) == 1
    return Built(out / "image.boot", out / "blobs", boot.blobs[0].blob_id,
                 expected_blob_space(boot, out / "blobs", 0))


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class BlobFront:
    """A registry stand-in on its own loop thread: `GET /v2/` and ranged blob GETs, from memory.

    Knobs: `stalled` (blob ids whose answers hang until the id is removed), `delays` (blob id ->
    seconds before answering), `max_range` (longer ranges get 416, which a registry source does
    not retry). A client that hangs up on a stalled or delayed answer is counted in `hung_up`;
    `in_flight` is the number of blob requests not answered yet; `requests` lists
    (blob id, Range)."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.stalled: set[str] = set()
        self.delays: dict[str, float] = {}
        self.max_range: int | None = None
        self.requests: list[tuple[str, str]] = []
        self.in_flight = 0
        self.hung_up = 0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10), "blob front did not start"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        started.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v2/", self._ping)
        app.router.add_get(r"/v2/{repo:.+}/blobs/sha256:{blob_id:[0-9a-f]{64}}", self._blob)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _ping(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        blob_id = request.match_info["blob_id"]
        data = self.blobs.get(blob_id)
        if data is None:
            return web.Response(status=404)
        header = request.headers.get("Range", "")
        self.requests.append((blob_id, header))
        m = _RANGE.match(header)
        lo, hi = 0, len(data) - 1
        if m is not None:
            lo = int(m.group(1))
            hi = min(int(m.group(2)) if m.group(2) else hi, hi)
        if self.max_range is not None and hi + 1 - lo > self.max_range:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        self.in_flight += 1
        try:
            answer_at = time.monotonic() + self.delays.get(blob_id, 0.0)
            while blob_id in self.stalled or time.monotonic() < answer_at:
                transport = request.transport
                if transport is None or transport.is_closing():  # the client gave up
                    self.hung_up += 1
                    return web.Response(status=500)
                await asyncio.sleep(0.01)
        finally:
            self.in_flight -= 1
        if m is None:
            return web.Response(body=data)
        return web.Response(status=206, body=data[lo:hi + 1],
                            headers={"Content-Range": f"bytes {lo}-{hi}/{len(data)}"})

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def registry(self) -> RegistrySpec:
        return RegistrySpec(self.host, REPO, "http", timeout=60.0)  # a stall never times out here

    def close(self) -> None:
        self.stalled.clear()
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def two_remote(work: Path) -> Iterator[tuple[Built, Built, BlobFront]]:
    """Two images ("a", "b"), each with one 512 KiB blob, served from one BlobFront."""
    a, b = build(work, "a", 512 << 10, "zstd"), build(work, "b", 512 << 10, "zstd")
    front = BlobFront({x.blob_id: (x.blobs / x.blob_id).read_bytes() for x in (a, b)})
    try:
        yield a, b, front
    finally:
        front.close()


def remote_specs(a: Built, b: Built, front: BlobFront) -> list[ImageSpec]:
    return [ImageSpec("a", a.boot_path, None, registry=front.registry()),
            ImageSpec("b", b.boot_path, None, registry=front.registry())]


def test_close_cancels_a_read_whose_source_hangs(two_remote: tuple[Built, Built, BlobFront], work: Path) -> None:
    a, b, front = two_remote
    front.stalled.add(a.blob_id)  # the registry never answers for blob a (its timeout: 60 s)
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, remote_specs(a, b, front), work / "cache")
        try:
            blob = sim.mount("erofs,a", a.blob_id.encode())
            pending = sim.start_read(blob, 0, 4096)
            assert wait_for(lambda: front.in_flight == 1, 10), "the READ's fetch never reached the source"
            closed_at = time.monotonic()
            sim.close(blob, wait=False)
            assert wait_for(lambda: not sim.anon_fd_open(blob), 2.0), \
                "the anon fd stayed open after CLOSE: the fetch was not cancelled"
            with pytest.raises(OSError) as failed:
                pending.result(timeout=2.0)
            assert failed.value.errno == errno.EIO
            assert pending.msg_id in sim.completed, "the READ was answered by the daemon, without data"
            assert time.monotonic() - closed_at < 3.0
            assert wait_for(lambda: front.hung_up == 1, 2.0), "the source request was left to time out"
            assert daemon.stats["read_failed"] == 1
            # the daemon keeps serving: another blob, and a's bootstrap
            other = sim.mount("erofs,b", b.blob_id.encode())
            assert sim.read(other, 0, b.size) == b.want
            meta = sim.mount("erofs,a", b"a")
            raw = a.boot_path.read_bytes()
            assert sim.read(meta, 0, 4096) == raw[:4096]
        finally:
            assert daemon.stop() == 0
        sim.check()


def test_reused_object_id_never_gets_the_old_fetchs_bytes(two_remote: tuple[Built, Built, BlobFront],
                                                          work: Path) -> None:
    a, b, front = two_remote
    front.stalled.add(a.blob_id)
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, remote_specs(a, b, front), work / "cache")
        try:
            old = sim.mount("erofs,a", a.blob_id.encode())
            pending = sim.start_read(old, 0, 4096)
            assert wait_for(lambda: front.in_flight == 1, 10)
            sim.close(old, timeout=3.0)  # the daemon releases the anon fd: the kernel may reuse the id
            with pytest.raises(OSError):
                pending.result(timeout=2.0)
            new = sim.mount("erofs,b", b.blob_id.encode(), object_id=old.object_id)
            assert new.object_id == old.object_id and new.copen_result == b.size
            front.stalled.clear()  # blob a's source answers now, to whoever still listens
            time.sleep(0.5)
            assert sim.cached_extents(new) == [], "the old object's fetch wrote into the new object's file"
            assert sim.read(new, 0, b.size) == b.want
            assert sim.cached_extents(old) == [], "a closed object's fetch still wrote"
        finally:
            assert daemon.stop() == 0
        sim.check()


def test_failed_copen_forgets_the_object_and_starts_no_prefetch(work: Path) -> None:
    a = build(work, "a", 1 << 20)
    spec = ImageSpec("a", a.boot_path, a.blobs, prefetch=PrefetchSpec("all"))
    before = open_fds()
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [spec], work / "cache")
        server = daemon.daemon.frontend
        assert server is not None
        try:
            sim.fail_copen(errno.EINVAL)  # the kernel dropped the OPEN before the copen came
            failed = sim.mount("erofs,a", a.blob_id.encode())
            assert failed.copen_result == -errno.EINVAL
            assert wait_for(lambda: not sim.anon_fd_open(failed), 2.0), "the failed object's anon fd stayed open"
            assert wait_for(lambda: len(server.objects) == 0, 2.0), "the failed object is still in the table"
            time.sleep(0.3)  # a prefetch (from a local directory) would have fetched by now
            assert daemon.stats["fetches"] == 0 and daemon.stats["prefetched_chunks"] == 0
            assert not server.tasks, "a prefetch task runs for an object the kernel does not have"
            # the next OPEN of the same blob is served and prefetched as usual
            blob = sim.mount("erofs,a", a.blob_id.encode())
            assert blob.copen_result == a.size
            assert wait_for(lambda: daemon.stats["prefetch_done"] == 1, 10)
            assert sim.read(blob, 0, a.size) == a.want
            sim.close(blob)
        finally:
            assert daemon.stop() == 0
        sim.check()
    assert open_fds() <= before, "the daemon leaked file descriptors"


class Watched(Running):
    """Running, also noting the tasks still pending on the daemon's loop when run() returns."""

    leftover: list[str] | None = None

    def _run(self) -> None:
        async def main() -> int:
            code = await self.daemon.run()
            me = asyncio.current_task()
            self.leftover = [repr(t) for t in asyncio.all_tasks() if t is not me and not t.done()]
            return code

        self.exit_code = uvloop.run(main())


def test_stop_completes_every_read_in_flight_and_leaks_nothing(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drain = 2.0
    monkeypatch.setattr(fscached.daemon, "DRAIN_SECONDS", drain)
    a, b = build(work, "a", 512 << 10, "zstd"), build(work, "b", 512 << 10, "zstd")
    before = open_fds()
    front = BlobFront({x.blob_id: (x.blobs / x.blob_id).read_bytes() for x in (a, b)})
    try:
        front.stalled.add(a.blob_id)  # never answers
        front.delays[b.blob_id] = 0.5  # answers, slowly
        with KernelSimulator(work / "kernel") as sim:
            daemon = Watched(sim, remote_specs(a, b, front), work / "cache", read_window=CHUNK)
            blob_a = sim.mount("erofs,a", a.blob_id.encode())
            blob_b = sim.mount("erofs,b", b.blob_id.encode())
            stalled = [sim.start_read(blob_a, off, 4096) for off in (0, 4 * CHUNK)]  # two windows
            slow = sim.start_read(blob_b, CHUNK, 4096)
            assert wait_for(lambda: front.in_flight == 3, 10), "the READs' fetches never reached the source"
            started = time.monotonic()
            assert daemon.stop() == 0
            took = time.monotonic() - started
            assert took < drain + 3.0, f"the daemon took {took:.1f}s to stop (drain {drain}s)"
            assert daemon.leftover == [], "fetch jobs outlived the daemon"
            for pending in stalled + [slow]:  # answered by the daemon, not failed by the device's end
                assert pending.msg_id in sim.completed, f"READ {pending.msg_id} was never completed"
            assert slow.result(timeout=1) == b.want[CHUNK:CHUNK + 4096], "a READ that could finish got its data"
            for pending in stalled:
                with pytest.raises(OSError) as failed:
                    pending.result(timeout=1)
                assert failed.value.errno == errno.EIO
            assert not sim.anon_fd_open(blob_a) and not sim.anon_fd_open(blob_b)
            sim.check()
    finally:
        front.close()
    assert open_fds() <= before, "the daemon leaked file descriptors"


def test_close_stops_a_bandwidth_limited_prefetch(work: Path) -> None:
    a = build(work, "a", 4 << 20)  # 64 chunks, 32 windows: 16 s from the slow source below
    total = len(chunks_by_blob(Bootstrap.open(a.boot_path).image)[0])
    front = BlobFront({a.blob_id: (a.blobs / a.blob_id).read_bytes()})
    front.delays[a.blob_id] = 0.5  # per request
    spec = ImageSpec("a", a.boot_path, None, registry=front.registry(),
                     prefetch=PrefetchSpec("all", bandwidth=512 << 10))
    try:
        with KernelSimulator(work / "kernel") as sim:
            daemon = Running(sim, [spec], work / "cache", read_window=2 * CHUNK)
            server = daemon.daemon.frontend
            assert server is not None
            try:
                blob = sim.mount("erofs,a", a.blob_id.encode())
                # two windows prefetched and the third on its way
                assert wait_for(lambda: daemon.stats["prefetched_chunks"] >= 4 and front.in_flight == 1, 10), \
                    "the prefetch never got going"
                sim.close(blob, timeout=2.0)  # fails unless the anon fd is closed
                stopped_at = daemon.stats["prefetched_chunks"]
                cached = sum(e - s for s, e in sim.cached_extents(blob))
                time.sleep(1.0)  # two more requests' time, had it kept going
                assert daemon.stats["prefetched_chunks"] == stopped_at, "the prefetch went on after CLOSE"
                assert sum(e - s for s, e in sim.cached_extents(blob)) == cached
                assert front.hung_up == 1 and front.in_flight == 0, "the fetch in flight was not cancelled"
                assert stopped_at < total
                assert daemon.stats["prefetch_done"] == 0
                assert not server.tasks, "the prefetch task outlived its object"
            finally:
                assert daemon.stop() == 0
            sim.check()
    finally:
        front.close()


def test_images_of_one_repository_share_one_source_and_one_piece_cache(work: Path) -> None:
    a = build(work, "a", 128 << 10)
    socket = work / "dfdaemon.sock"  # never connected to: load builds sources, it fetches nothing
    app = RegistrySpec("127.0.0.1:9", "team/app", "http")
    other = RegistrySpec("127.0.0.1:9", "team/other", "http")
    specs = [ImageSpec(f"app{i}", a.boot_path, None, registry=app, dragonfly_socket=socket) for i in range(20)]
    specs += [ImageSpec(f"other{i}", a.boot_path, None, registry=other, dragonfly_socket=socket) for i in range(3)]
    daemon = Daemon(Config(cache_dir=work / "cache", images=specs))

    async def load() -> None:
        try:
            await daemon.load()
        finally:
            await daemon.pool.close()

    try:
        asyncio.run(load())
    finally:
        daemon.executor.shutdown()
    # what each image's blob reads through
    chains = {volume: obj.source for volume, obj in daemon.catalog.blobs()}
    assert len(chains) == 23
    used = {id(s): s for chain in chains.values() for s in chain.sources}.values()
    registries = [s for s in used if isinstance(s, RegistrySource)]
    peers = [s for s in used if isinstance(s, DragonflyGrpcSource)]
    app_registries = [s for s in registries if s.repo == "team/app"]
    app_peers = [p for p in peers if p.url_for == app_registries[0].blob_url]
    assert len(app_registries) == 1, f"20 images of one repository: {len(app_registries)} RegistrySources"
    assert len(app_peers) == 1, f"20 images of one repository: {len(app_peers)} Dragonfly sources"
    assert len(registries) == 2 and len(peers) == 2, "one per repository"
    assert len({id(p.piece_cache) for p in peers}) == 1, "one piece cache per dfdaemon socket"
    for volume, chain in chains.items():
        if volume.startswith("app"):  # peer first, then the registry: the same two objects
            assert chain.sources[0] is app_peers[0] and chain.sources[-1] is app_registries[0]
    assert sorted(map(id, daemon.pool.sources())) == sorted(map(id, used)), "the pool holds what the images use"


def test_prefetch_bandwidth_counts_only_what_it_fetches(work: Path) -> None:
    a = build(work, "a", 2 << 20)  # 32 chunks of 64 KiB, stored uncompressed
    window = 2 * CHUNK
    bandwidth = 448 << 10
    whole = a.size / bandwidth  # 4.6 s for the whole blob
    # The source serves one chunk per request: a READ's window fetch fails and the READ then
    # fetches only the chunk it needs. One READ per window leaves every window half filled,
    # so the prefetch (window by window) must count only the chunks it asks for.
    front = BlobFront({a.blob_id: (a.blobs / a.blob_id).read_bytes()})
    front.max_range = CHUNK
    spec = ImageSpec("a", a.boot_path, None, registry=front.registry(),
                     prefetch=PrefetchSpec("all", bandwidth=bandwidth))
    try:
        with KernelSimulator(work / "kernel") as sim:
            daemon = Running(sim, [spec], work / "cache", read_window=window)
            try:
                blob = sim.mount("erofs,a", a.blob_id.encode())
                opened = time.monotonic()
                # backwards: a sequential reader would get the next windows fetched ahead
                reads = [sim.start_read(blob, off, 4096) for off in reversed(range(0, a.size, window))]
                for r in reads:
                    assert r.result() == a.want[r.offset:r.offset + 4096]
                assert daemon.stats["readahead_windows"] == 0
                assert wait_for(lambda: daemon.stats["prefetch_done"] == 1, 3 * whole), "the prefetch never finished"
                took = time.monotonic() - opened
                # it fetched the other chunk of each window (but the first window's, which it
                # tried whole before the READs came), and waited for about that: 0.53 * whole
                assert daemon.stats["prefetched_chunks"] <= a.size // window
                assert took < 0.8 * whole, f"prefetch took {took:.1f}s: it paid for chunks already filled"
                assert took > 0.35 * whole, f"prefetch took {took:.1f}s: the bandwidth limit did not apply"
                front.max_range = None
                assert sim.read(blob, 0, a.size) == a.want
            finally:
                assert daemon.stop() == 0
            sim.check()
    finally:
        front.close()


def test_a_failed_prefetch_window_is_not_asked_again_for_each_chunk(work: Path) -> None:
    a = build(work, "a", 1 << 20)  # 16 chunks of 64 KiB, stored uncompressed
    window = 8 * CHUNK  # two windows of 8 chunks
    front = BlobFront({a.blob_id: (a.blobs / a.blob_id).read_bytes()})
    front.max_range = CHUNK  # every multi-chunk range is refused (416, not retried)
    spec = ImageSpec("a", a.boot_path, None, registry=front.registry(), prefetch=PrefetchSpec("all"))
    try:
        with KernelSimulator(work / "kernel") as sim:
            daemon = Running(sim, [spec], work / "cache", read_window=window)
            try:
                sim.mount("erofs,a", a.blob_id.encode())
                assert wait_for(lambda: daemon.stats["prefetch_done"] == 1, 20), "the prefetch never finished"
                # one try per window, not one per chunk of it
                assert daemon.stats["prefetch_failed"] == 2, daemon.stats
                assert len(front.requests) == 2, front.requests
            finally:
                daemon.stop()
    finally:
        front.close()
