"""The daemon serving blobs from a REAL registry, through the stand-in Dragonfly peer, with
faults injected: the reader gets the right bytes or a clean EIO, never wrong bytes, and the
daemon keeps serving. Driven by the kernel simulator (the kernel's own bytes). The stand-in is
here for what the real peer cannot be made to do (every stream dying after its started
message, damaged pieces with matching CRCs, a proxy answering 500 on cue); the real peer's
faults are in tests/dragonfly/."""
from __future__ import annotations

import asyncio
import errno
import hashlib
import random
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web

from erofs_image.builder import convert
from erofs_image.reader import Bootstrap
from fscached.core.chunkmap import chunks_by_blob
from fscached.config import ImageSpec, ProxySpec, RegistrySpec
from registry_server import RegistryServer
from simdaemon import Running, expected_blob_space, make_tree
from standins.dfdaemon import start_standin
from standins.kernel_simulator import KernelSimulator

CHUNK = 64 << 10


@pytest.fixture
def pushed(registry: RegistryServer, work: Path) -> dict[str, Any]:
    """A zstd image whose blob is in the registry (a fresh repo per test); the bootstrap is local."""
    out = work / "built"
    convert(make_tree(work / "tree"), out, compressor="zstd", chunk_size=CHUNK)
    # a fresh repo per test; the temp dir's name may end in '_', which a repo name may not
    repo = f"faults/t{hashlib.sha256(work.name.encode()).hexdigest()[:12]}"
    boot = Bootstrap.open(out / "image.boot")
    for blob in (out / "blobs").iterdir():
        registry.push_blob(repo, blob.read_bytes())
    return {"out": out, "repo": repo, "boot": boot, "want": expected_blob_space(boot, out / "blobs", 0),
            "blob_id": boot.blobs[0].blob_id}


def spec_for(pushed: dict[str, Any], host: str, peer: Path | None = None, timeout: float = 60) -> ImageSpec:
    return ImageSpec("img", pushed["out"] / "image.boot", None,
                     registry=RegistrySpec(host, pushed["repo"], "http", timeout=timeout), dragonfly_socket=peer)


def read_all(sim: KernelSimulator, obj: Any, size: int, step: int = 1 << 20) -> bytes:
    return b"".join(sim.read(obj, off, min(step, size - off)) for off in range(0, size, step))


class FaultyFront:
    """An HTTP server in front of the registry, on its own loop thread, that fails a share of
    blob requests: 500s, reset connections, or stalls."""

    def __init__(self, upstream: str, mode: str, share: float, seed: int = 7) -> None:
        self.upstream, self.mode, self.share = upstream, mode, share
        self.rng = random.Random(seed)
        self.faults = 0
        self.override: Any = None  # async (request) -> response, instead of forwarding
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        import aiohttp

        self.client = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.override is not None and "/blobs/" in request.path:
            return await self.override(request)
        if "/blobs/" in request.path and self.rng.random() < self.share:
            self.faults += 1
            if self.mode == "500":
                return web.Response(status=500, text="injected")
            if self.mode == "reset":
                request.transport.abort()
                return web.Response(status=500)
            if self.mode == "stall":
                await asyncio.sleep(10)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("range", "authorization", "accept")}
        async with self.client.request(request.method, self.upstream + request.path_qs, headers=headers,
                                       allow_redirects=False) as up:
            body = await up.read()
            keep = {k: v for k, v in up.headers.items()
                    if k in ("Content-Range", "Content-Type", "Docker-Content-Digest", "Location")}
            return web.Response(status=up.status, body=body, headers=keep)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        async def stop() -> None:
            await self.client.close()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def peer(work: Path) -> Iterator[Any]:
    handle = start_standin(str(work / "df.sock"))
    yield handle
    handle.stop()


def test_registry_blob_read_back_exactly(pushed: dict[str, Any], registry: RegistryServer, work: Path) -> None:
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [spec_for(pushed, registry.host)], work / "cache")
        try:
            blob = sim.mount("erofs,img", pushed["blob_id"].encode())
            assert read_all(sim, blob, len(pushed["want"])) == pushed["want"]
            counters = daemon.counters()
            assert counters[f"source:registry {registry.host}/{pushed['repo']}:ok"] == counters["fetches"]
        finally:
            assert daemon.stop() == 0


def test_registry_takes_over_when_the_peer_dies_mid_stream(
        pushed: dict[str, Any], registry: RegistryServer, peer: Any, work: Path) -> None:
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [spec_for(pushed, registry.host, work / "df.sock")], work / "cache", read_window=CHUNK)
        try:
            blob = sim.mount("erofs,img", pushed["blob_id"].encode())
            want = pushed["want"]
            # every stream starts (the started response is sent), then dies before its pieces
            peer.faults.kill_after_pieces = 0
            assert read_all(sim, blob, len(want), step=CHUNK) == want
            assert peer.requests, "the ranges went to the peer first"
            assert peer.requests[0]["range"] is None, "the blob's whole task is asked for first"
            counters = daemon.counters()
            assert counters.get(f"source:dragonfly {work / 'df.sock'}:failed", 0) >= 1
            assert counters.get(f"source:registry {registry.host}/{pushed['repo']}:ok", 0) >= 1
            assert counters.get("read_failed", 0) == 0
        finally:
            assert daemon.stop() == 0


def test_corrupt_bytes_from_the_peer_are_refetched_from_the_registry(
        pushed: dict[str, Any], registry: RegistryServer, peer: Any, work: Path) -> None:
    # damaged content with a MATCHING crc: only the chunk digests from the bootstrap catch it
    peer.faults.corrupt_pieces = {0}
    peer.faults.corrupt_digest = "matching"
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [spec_for(pushed, registry.host, work / "df.sock")], work / "cache")
        try:
            blob = sim.mount("erofs,img", pushed["blob_id"].encode())
            assert read_all(sim, blob, len(pushed["want"])) == pushed["want"]
            counters = daemon.counters()
            assert counters["verify_failures"] >= 1
            assert counters[f"source:dragonfly {work / 'df.sock'}:integrity"] >= 1
        finally:
            assert daemon.stop() == 0


@pytest.mark.parametrize("mode", ["500", "reset", "stall"])
def test_flaky_registry_gives_right_bytes_or_clean_eio(mode: str, pushed: dict[str, Any],
                                                        registry: RegistryServer, work: Path) -> None:
    front = FaultyFront(registry.url, mode, share=0.3)
    spec = spec_for(pushed, front.host, timeout=1.0)  # a stalled request fails after 1 s
    try:
        with KernelSimulator(work / "kernel") as sim:
            daemon = Running(sim, [spec], work / "cache", read_window=CHUNK)
            try:
                blob = sim.mount("erofs,img", pushed["blob_id"].encode())
                want = pushed["want"]
                good = failed = 0
                for off in range(0, len(want), CHUNK):
                    n = min(CHUNK, len(want) - off)
                    try:
                        got = sim.read(blob, off, n, timeout=120)
                    except OSError as exc:
                        assert exc.errno == errno.EIO
                        failed += 1
                        continue
                    assert got == want[off:off + n], f"wrong bytes at {off}"
                    good += 1
                assert front.faults > 0, "the fault injector never fired"
                assert good > 0
                # bounded retries with backoff absorb a 30% fault rate for most ranges
                assert good >= failed
                # the daemon still serves: a final full read-back after the faults stop
                front.share = 0.0
                assert read_all(sim, blob, len(want)) == want
            finally:
                assert daemon.stop() == 0
    finally:
        front.close()


def test_wrong_blob_in_the_registry_never_reaches_the_cache(pushed: dict[str, Any], registry: RegistryServer,
                                                             work: Path) -> None:
    # whatever the registry (or something between) sends for this blob id is not its content
    bad = bytearray((pushed["out"] / "blobs" / pushed["blob_id"]).read_bytes())
    bad[100] ^= 0xFF
    evil = FaultyFront(registry.url, "none", share=0.0)

    async def tamper(request: web.Request) -> web.StreamResponse:  # serve corrupted blob bytes
        rng = request.headers.get("Range", "bytes=0-").removeprefix("bytes=")
        start, _, end = rng.partition("-")
        lo, hi = int(start), (int(end) if end else len(bad) - 1)
        return web.Response(status=206, body=bytes(bad[lo:hi + 1]),
                            headers={"Content-Range": f"bytes {lo}-{hi}/{len(bad)}"})

    evil.override = tamper
    try:
        with KernelSimulator(work / "kernel") as sim:
            daemon = Running(sim, [spec_for(pushed, evil.host)], work / "cache", read_window=CHUNK)
            try:
                blob = sim.mount("erofs,img", pushed["blob_id"].encode())
                hit = next(c for c in chunks_by_blob(pushed["boot"].image)[0]
                           if c.compressed_offset <= 100 < c.compressed_offset + c.compressed_size)
                with pytest.raises(OSError) as failed:
                    sim.read(blob, hit.uncompressed_offset, 4096)
                assert failed.value.errno == errno.EIO
                assert not [s for s, e in sim.cached_extents(blob) if s <= hit.uncompressed_offset < e], \
                    "unverified bytes were cached"
                assert daemon.counters()["verify_failures"] >= 1
            finally:
                assert daemon.stop() == 0
    finally:
        evil.close()


class LoopThread:
    """An event loop on its own thread, for async test servers next to the daemon's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_dragonfly_http_proxy_then_registry_fallback(pushed: dict[str, Any], registry: RegistryServer,
                                                     work: Path) -> None:
    from standins.http_proxy import ProxyStandIn

    loop = LoopThread()
    proxy = ProxyStandIn()
    loop.run(proxy.__aenter__())
    try:
        spec = ImageSpec("img", pushed["out"] / "image.boot", None,
                         registry=RegistrySpec(registry.host, pushed["repo"], "http"),
                         proxy=ProxySpec(proxy.url, proxy.ping_url, check_interval=0.2))
        with KernelSimulator(work / "kernel") as sim:
            daemon = Running(sim, [spec], work / "cache", read_window=CHUNK)
            try:
                blob = sim.mount("erofs,img", pushed["blob_id"].encode())
                want = pushed["want"]
                half = len(want) // 2 // 4096 * 4096
                assert sim.read(blob, 0, half) == want[:half]
                via_proxy = list(proxy.blob_requests())
                assert via_proxy, "on-demand ranges went through the proxy"
                assert "Range" not in via_proxy[0].headers, "the whole blob is asked for first"
                assert all(r.dragonfly.get("X-Dragonfly-Scheduling-Policy") == "always" for r in via_proxy)
                proxy.fail(500)  # the proxy breaks: the registry serves the rest
                assert sim.read(blob, half, len(want) - half) == want[half:]
                counters = daemon.counters()
                assert counters[f"source:dragonfly proxy {proxy.url}:ok"] >= 1
                assert counters[f"source:registry {registry.host}/{pushed['repo']}:ok"] >= 1
                assert counters.get("read_failed", 0) == 0
            finally:
                assert daemon.stop() == 0
    finally:
        loop.run(proxy.__aexit__(None, None, None))
        loop.close()
