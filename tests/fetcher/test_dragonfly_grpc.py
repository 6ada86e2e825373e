"""DragonflyGrpcSource against the REAL dfdaemon (dragonfly-client 1.5.10, with the real
scheduler: the `dragonfly_peer` fixture, one node, no seed, a registry with basic auth), and
against the stand-in dfdaemon (tests/standins/dfdaemon.py) only for what the real peer cannot be
made to do: send damaged pieces, hang mid-stream, refuse for overload."""
import asyncio
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dragonfly_api import common_pb2
from registry_server import TEST_PASSWORD as PASSWORD, TEST_USER as USER
from standins.dfdaemon import Faults, start_standin

from fetcher.dragonfly_grpc import DragonflyGrpcSource, PieceCache, dragonfly_for_registry
from fetcher.registry import RegistrySource
from fetcher.source import BlobSource, SourceError

pytestmark = pytest.mark.timeout(180)

REPO = "fscached/dragonfly"
MiB = 1 << 20
PIECE = 4 * MiB
ROOT = Path(__file__).resolve().parents[2]


def run(coro):
    return asyncio.run(coro)


def task_id(url: str, tag: str = "", application: str = "fscached", piece_length: int | None = None) -> str:
    """Dragonfly's task id of a gRPC download (no blob-digest ids): sha256 over url, tag,
    application, the piece length when set, and the task type."""
    h = hashlib.sha256((url + tag + application).encode())
    if piece_length is not None:
        h.update(str(piece_length).encode())
    h.update(b"STANDARD")
    return h.hexdigest()


class Peer:
    """A DragonflyGrpcSource on the real peer's node, with the registry's credentials."""

    def __init__(self, cluster, **kw) -> None:
        self.cluster = cluster
        self.registry = RegistrySource(cluster.registry_host, REPO, scheme="http", username=USER, password=PASSWORD)
        self.src = dragonfly_for_registry(self.registry, str(cluster.socket("node1")), **kw)

    async def __aenter__(self) -> DragonflyGrpcSource:
        return self.src

    async def __aexit__(self, *exc) -> None:
        await self.src.close()
        await self.registry.close()


def push(cluster, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    return cluster.push_blob(REPO, data), data


async def finished(src: DragonflyGrpcSource, url: str, timeout: float = 60) -> None:
    """Until the source's whole-task download of `url` has ended."""
    deadline = time.monotonic() + timeout
    while not (src._whole.get(url) and (src._whole[url].finished or src._whole[url].error)):
        assert time.monotonic() < deadline, f"the whole-task download of {url} did not end in {timeout} s"
        await asyncio.sleep(0.05)


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="df-", dir="/tmp")  # unix socket paths are short (108 bytes)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def standin(sockdir, registry):
    handle = start_standin(os.path.join(sockdir, "dfdaemon.sock"), seed=1234)
    yield handle
    handle.stop()


# ------------------------------------------------------------------ the real dfdaemon


def test_is_a_blob_source(tmp_path):
    src = DragonflyGrpcSource(str(tmp_path / "x.sock"), lambda b: b)
    assert isinstance(src, BlobSource)
    assert src.name == f"dragonfly {tmp_path / 'x.sock'}"


def test_ranged_reads_return_exact_bytes(dragonfly_peer):
    digest, data = push(dragonfly_peer, 10 * MiB + 12345)  # three 4 MiB pieces, the last one short
    size = len(data)
    ranges = [(0, 1), (0, 4096), (1, 4095), (PIECE - 1, 2), (PIECE - 10, PIECE + 20), (PIECE, PIECE),
              (2 * PIECE - 1, 1), (2 * PIECE, size - 2 * PIECE), (size - 1, 1), (size - 4096, 4096),
              (12345, 678), (3 * MiB, 3 * MiB), (0, size)]

    async def main():
        async with Peer(dragonfly_peer) as src:
            for off, n in ranges:
                assert await src.read(digest, off, n) == data[off:off + n], (off, n)
            got = await asyncio.gather(*(src.read(digest, i * 524287, 70000) for i in range(20)))
            assert got == [data[i * 524287:i * 524287 + 70000] for i in range(20)]
            assert await src.read(digest, 10, 0) == b""
            assert src.stats["whole_tasks"] == 1 and src.stats["errors"] == 0, src.stats
            return src.task_ids
    ids = run(main())
    url = dragonfly_peer.blob_url(REPO, digest)
    assert ids == {url: digest}  # the blob's digest: one task whatever the registry's name or the range


def test_the_first_request_is_the_whole_blob_and_ranges_are_served_locally(dragonfly_peer):
    """One registration at the scheduler per node and blob, for the whole task: a first
    request for a range would make that range all the seed peer fetches."""
    digest, data = push(dragonfly_peer, 3 * PIECE + 999)
    url = dragonfly_peer.blob_url(REPO, digest)

    async def main():
        async with Peer(dragonfly_peer) as src:
            assert await src.read(digest, PIECE + 5, 100) == data[PIECE + 5:PIECE + 105]
            await finished(src, url)
            for off in (0, 2 * PIECE, 3 * PIECE, 77):
                assert await src.read(digest, off, 999) == data[off:off + 999]
            assert src.stats["whole_tasks"] == 1 and src.stats["requests"] >= 3, src.stats
    run(main())
    asked = dragonfly_peer.downloads("node1", url)
    assert asked[0]["range"] is None and not asked[0]["prefetch"], asked[0]  # the whole task, first
    assert all(a["range"] is not None for a in asked[1:]) and len(asked) >= 4, asked
    assert len({a["task_id"] for a in asked}) == 1
    (task,) = [t for tid, t in dragonfly_peer.tasks().items() if tid == digest]
    assert task["peers"] == 1 and task["ranges"] == {None}, task  # the ranges never reached the scheduler


def test_small_ranges_reach_the_scheduler_only_with_scheduling_policy_always(dragonfly_peer):
    """dfdaemon 1.4.9+ fetches a range of <= 4 MiB from the origin itself, unless the request
    says ALWAYS (without the whole-task download, each read is a request of its own)."""
    digest, data = push(dragonfly_peer, 2 * PIECE)
    url = dragonfly_peer.blob_url(REPO, digest)

    async def main():
        for tag, policy in (("auto", common_pb2.AUTO), ("always", common_pb2.ALWAYS)):
            async with Peer(dragonfly_peer, tag=tag, scheduling_policy=policy, whole_task=False,
                            blob_digest_task_id=False) as src:
                assert await src.read(digest, MiB, MiB) == data[MiB:2 * MiB]
    run(main())
    tasks = dragonfly_peer.tasks()
    # the first read asks dfdaemon to prefetch the blob (whole: range None) in both cases; the
    # 1 MiB range itself reaches the scheduler only with ALWAYS
    assert tasks[task_id(url, "auto")]["ranges"] == {None}, tasks[task_id(url, "auto")]
    assert tasks[task_id(url, "always")]["ranges"] == {(MiB, MiB), None}, tasks[task_id(url, "always")]
    firsts = [next(a for a in dragonfly_peer.downloads("node1", url) if a["task_id"] == task_id(url, tag))
              for tag in ("auto", "always")]
    assert all(a["prefetch"] and a["range"] == (MiB, MiB) for a in firsts), firsts


def test_url_based_task_ids_hash_url_tag_application_and_piece_length(dragonfly_peer):
    """Without blob-digest task ids (field 30): dfdaemon's id of the url, tag, application and
    piece length, never the range."""
    digest, data = push(dragonfly_peer, 10 * MiB)
    url = dragonfly_peer.blob_url(REPO, digest)

    async def main():
        ids = []
        for kw in ({}, {"tag": "t1", "piece_length": 8 * MiB}):
            async with Peer(dragonfly_peer, blob_digest_task_id=False, **kw) as src:
                assert await src.read(digest, PIECE - 5, 10) == data[PIECE - 5:PIECE + 5]
                if kw:
                    assert src._piece_length[url] == 8 * MiB  # dfdaemon cut the task into 8 MiB pieces
                ids.append(src.task_ids[url])
        return ids
    plain, tagged = run(main())
    assert plain == task_id(url) and tagged == task_id(url, "t1", piece_length=8 * MiB) != plain


def test_range_inside_a_delivered_piece_makes_no_rpc(dragonfly_peer):
    digest, data = push(dragonfly_peer, 10 * MiB + 4321)
    url = dragonfly_peer.blob_url(REPO, digest)

    async def main():
        async with Peer(dragonfly_peer) as src:
            assert await src.read(digest, 100, 1000) == data[100:1100]  # piece 0 arrives whole
            assert src.stats["requests"] == 1
            for off, n in [(0, 1), (1 * MiB, MiB), (2 * MiB, MiB), (PIECE - 7, 7), (0, PIECE), (12345, 678)]:
                assert await src.read(digest, off, n) == data[off:off + n], (off, n)
            assert src.stats["requests"] == 1, src.stats
            assert src.stats["piece_cache_hits"] == 6 and src.stats["piece_cache_misses"] == 1
            # sequential 1 MiB windows over the whole blob: one RPC per piece, not per window
            got = b"".join([await src.read(digest, off, min(MiB, len(data) - off))
                            for off in range(0, len(data), MiB)])
            assert got == data
            assert src.stats["requests"] == 3, src.stats
    run(main())
    ranges = [a["range"] for a in dragonfly_peer.downloads("node1", url)]
    assert ranges == [None, (100, 1000), (PIECE, MiB), (2 * PIECE, MiB)], ranges


def test_partly_cached_range_asks_only_for_the_missing_span(dragonfly_peer):
    digest, data = push(dragonfly_peer, 10 * MiB + 5)
    url = dragonfly_peer.blob_url(REPO, digest)

    async def main():
        async with Peer(dragonfly_peer) as src:
            assert await src.read(digest, 10, 10) == data[10:20]  # piece 0
            assert await src.read(digest, PIECE - 100, 200) == data[PIECE - 100:PIECE + 100]
            assert await src.read(digest, PIECE - 100, len(data) - PIECE + 100) == data[PIECE - 100:]
            assert await src.read(digest, 0, len(data)) == data
    run(main())
    ranges = [a["range"] for a in dragonfly_peer.downloads("node1", url)]
    # piece 0's part of the second read came from the cache; the third asked only for piece 2
    assert ranges == [None, (10, 10), (PIECE, 100), (2 * PIECE, len(data) - 2 * PIECE)], ranges


def test_a_cached_piece_is_never_served_for_another_blob(dragonfly_peer):
    (d1, data1), (d2, data2) = push(dragonfly_peer, 5 * MiB), push(dragonfly_peer, 5 * MiB)

    async def main():
        async with Peer(dragonfly_peer) as src:
            assert await src.read(d1, 0, MiB) == data1[:MiB]
            assert await src.read(d2, 0, MiB) == data2[:MiB]  # same offsets, other blob
            assert await src.read(d1, 5, 5) == data1[5:10]
            assert await src.read(d2, 5, 5) == data2[5:10]
            assert src.stats["piece_cache_hits"] == 2 and src.stats["piece_cache_misses"] == 2
    run(main())


def test_piece_cache_stays_within_its_bound_over_many_blobs(dragonfly_peer):
    """dfdaemon takes a gRPC piece_length as given (only its proxy refuses < 4 MiB): 256 KiB
    pieces let eight small blobs overflow a 1 MiB cache."""
    piece, limit = 256 << 10, 1 * MiB + 1000  # room for four 256 KiB pieces
    blobs = [os.urandom(700 << 10 | i) for i in range(8)]  # three pieces each, the last short
    digests = [dragonfly_peer.push_blob(REPO, b) for b in blobs]
    rng = random.Random(7)

    async def main():
        async with Peer(dragonfly_peer, piece_length=piece, piece_cache_bytes=limit) as src:
            cache = src.piece_cache
            for _ in range(60):
                i = rng.randrange(len(blobs))
                off = rng.randrange(len(blobs[i]))
                n = rng.randint(1, min(300 << 10, len(blobs[i]) - off))
                assert await src.read(digests[i], off, n) == blobs[i][off:off + n]
                assert cache.bytes <= limit
                assert cache.bytes == sum(len(v) for v in cache._lru.values())
            assert src.stats["piece_cache_hits"] > 0 and src.stats["piece_cache_misses"] > 0
            # least recently used goes first: touch blob 0's piece 0, then pull 3 pieces of blob 1
            await src.read(digests[0], 0, 10)
            await src.read(digests[1], 0, len(blobs[1]))
            before = src.stats["requests"]
            assert await src.read(digests[0], 5, 5) == blobs[0][5:10]
            assert src.stats["requests"] == before  # still cached
    run(main())


def test_piece_cache_unit():
    c = PieceCache(10)
    c.put("a", 0, b"01234")
    c.put("b", 0, b"abcde")
    buf = bytearray(5)
    assert c.copy_into("a", 0, 5, buf) == [(0, 5)] and buf == b"01234"
    c.put("a", 5, b"56789")  # evicts b (least recently used), not a's first piece
    assert c.bytes == 10 and c.copy_into("b", 0, 5, bytearray(5)) == []
    buf = bytearray(6)
    assert c.copy_into("a", 2, 8, buf) == [(2, 5), (5, 8)] and buf == b"234567"
    c.put("a", 20, b"x" * 11)  # larger than the whole cache: not kept, nothing evicted
    assert c.bytes == 10 and len(c) == 2
    c.put("a", 0, b"0123")  # another length at the same offset replaces the piece
    assert c.bytes == 9 and len(c) == 2
    off = PieceCache(0)
    off.put("a", 0, b"x")
    assert off.bytes == 0 and len(off) == 0
    with pytest.raises(ValueError):
        PieceCache(-1)


def test_piece_cache_off(dragonfly_peer):
    digest, data = push(dragonfly_peer, MiB)

    async def main():
        async with Peer(dragonfly_peer, piece_cache_bytes=0) as src:
            for _ in range(3):
                assert await src.read(digest, 0, 10) == data[:10]
            assert src.piece_cache.bytes == 0 and src.stats["piece_cache_hits"] == 0
            assert src.stats["requests"] == 3
    run(main())


def test_concurrent_reads_of_pieces_in_flight_are_joined(dragonfly_peer):
    digest, data = push(dragonfly_peer, 3 * PIECE)

    async def main():
        async with Peer(dragonfly_peer) as src:
            assert await src.read(digest, 0, 10) == data[:10]  # learn the piece length (piece 0)
            first = src.stats["requests"]
            # six 1 MiB reads inside pieces 1 and 2, all at once: each piece is asked for once
            offs = [PIECE + i * MiB for i in range(6)]
            got = await asyncio.gather(*(src.read(digest, off, MiB) for off in offs))
            assert got == [data[off:off + MiB] for off in offs]
            assert src.stats["requests"] - first <= 2, src.stats
            assert src.stats["piece_cache_joined"] >= 4
    run(main())


def test_origin_404(dragonfly_peer):
    missing = hashlib.sha256(b"no such blob").hexdigest()

    async def main():
        async with Peer(dragonfly_peer) as src:
            with pytest.raises(SourceError, match=r"origin answered HTTP 404"):
                await src.read(missing, 0, 10)
            assert src.stats["whole_tasks_failed"] == 1
    run(main())


def test_read_past_end(dragonfly_peer):
    digest, data = push(dragonfly_peer, 3 * MiB)

    async def main():
        async with Peer(dragonfly_peer) as src:
            with pytest.raises(SourceError, match=r"read past end: the blob has 3145728 bytes"):
                await src.read(digest, len(data) - 5, 10)
        # without the whole-task download: dfdaemon's started message says how long the blob is
        async with Peer(dragonfly_peer, whole_task=False) as src:
            with pytest.raises(SourceError, match=r"read past end: the blob has 3145728 bytes"):
                await src.read(digest, len(data) - 5, 10)
    run(main())


def test_no_dfdaemon_fails_promptly(sockdir):
    async def main():
        async with DragonflyGrpcSource(os.path.join(sockdir, "nobody.sock"), lambda b: "http://x/" + b,
                                       timeout=30) as src:
            t0 = time.monotonic()
            with pytest.raises(SourceError, match="UNAVAILABLE"):
                await src.read("ab" * 32, 0, 10)
            assert time.monotonic() - t0 < 5
    run(main())


def test_registry_auth_reaches_the_origin(dragonfly_peer):
    digest, data = push(dragonfly_peer, PIECE + 999)

    async def main():
        async with Peer(dragonfly_peer) as src:
            assert await src.read(digest, PIECE - 3, 1000) == data[PIECE - 3:PIECE + 997]
        # without credentials the origin says 401, and that is what we are told (another task,
        # which the peer has to fetch for itself: by url and tag, not by the blob's digest)
        async with DragonflyGrpcSource(str(dragonfly_peer.socket("node1")),
                                       lambda b: dragonfly_peer.blob_url(REPO, b), tag="anonymous",
                                       blob_digest_task_id=False) as anon:
            with pytest.raises(SourceError, match="HTTP 401"):
                await anon.read(digest, 0, 10)
    run(main())


def test_a_killed_dfdaemon_fails_reads_promptly_and_is_used_again_once_restarted(dragonfly_peer):
    """kill -9 of the peer while a read streams its pieces: the read fails at once (the chain
    then goes to the registry); the same source uses the restarted peer (whose start is retried
    while its storage port is still held: EADDRINUSE). The restart runs in this thread, between
    two turns of the source's loop: the cluster's processes die with the thread that started
    them."""
    digest, data = push(dragonfly_peer, 96 * MiB)
    url = dragonfly_peer.blob_url(REPO, digest)
    peer = Peer(dragonfly_peer, timeout=60)
    src = peer.src

    async def read_and_kill():
        read = asyncio.ensure_future(src.read(digest, 0, len(data)))
        deadline = time.monotonic() + 30
        while not (src._whole.get(url) and src._whole[url].local):
            assert time.monotonic() < deadline and not read.done(), "no piece arrived"
            await asyncio.sleep(0.005)
        await asyncio.to_thread(dragonfly_peer.kill_dfdaemon, "node1", signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(SourceError, match=r"UNAVAILABLE|did not have the pieces|INTERNAL"):
            await read
        assert time.monotonic() - t0 < 5, "a dead peer must not hold a read"

    async def read_again():
        deadline = time.monotonic() + 30
        while True:  # the channel reconnects within its capped backoff
            try:
                return await src.read(digest, 50 * MiB, MiB)
            except SourceError:
                assert time.monotonic() < deadline, "the restarted peer was not used again"
                await asyncio.sleep(0.5)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(read_and_kill())
        started = dragonfly_peer.start_dfdaemon("node1")
        assert loop.run_until_complete(read_again()) == data[50 * MiB:51 * MiB]
        assert src.stats["whole_tasks"] >= 2  # the failed one(s), and the one on the restarted peer
    finally:
        loop.run_until_complete(peer.__aexit__(None, None, None))
        loop.close()
    assert started["attempts"] >= 1 and dragonfly_peer.dfdaemon_running("node1")


# ------------------------------------------------------------------ the stand-in: lies and stalls


def standin_source(standin, registry, **kw) -> DragonflyGrpcSource:
    return DragonflyGrpcSource(standin.socket_path, lambda b: registry.blob_url(REPO, b), **kw)


@pytest.fixture(scope="module")
def blob(registry):
    data = os.urandom(10 * MiB + 12345)
    return registry.push_blob(REPO, data), data


def test_corrupt_piece_with_wrong_digest_is_refused(standin, registry, blob):
    digest, data = blob
    standin.faults = Faults(corrupt_pieces={1}, corrupt_digest="wrong")

    async def main():
        async with standin_source(standin, registry, whole_task=False) as src:
            with pytest.raises(SourceError, match=r"piece 1 \(bytes 4194304\+4194304\) failed its digest"):
                await src.read(digest, PIECE - 10, 20)
            assert await src.read(digest, 0, 100) == data[:100]  # piece 0 is fine
    run(main())


def test_corrupt_piece_with_matching_digest_gets_through(standin, registry, blob):
    """The CRC only catches damage between dfdaemon and us; bytes that are wrong at the peer
    are caught above, by the chunk digests of the blob reader."""
    digest, data = blob
    standin.faults = Faults(corrupt_pieces={0}, corrupt_digest="matching")

    async def main():
        async with standin_source(standin, registry) as src:
            got = await src.read(digest, 0, PIECE)
            assert len(got) == PIECE and got != data[:PIECE]
    run(main())


def test_hung_stream_times_out(standin, registry, blob):
    digest, data = blob
    standin.faults = Faults(kill_after_pieces=1, kill_mode="hang")

    async def main():
        async with standin_source(standin, registry, timeout=1.5, whole_task=False) as src:
            t0 = time.monotonic()
            with pytest.raises(SourceError, match=r"timed out after 1.5s"):
                await src.read(digest, 0, len(data))
            assert time.monotonic() - t0 < 5
    run(main())


def test_a_stalled_whole_task_download_times_the_read_out(standin, registry, blob):
    """The whole-task download hangs after one piece: a read of a later piece waits at most
    `timeout`, then fails (the chain goes to the registry)."""
    digest, data = blob
    standin.faults = Faults(kill_after_pieces=1, kill_mode="hang")

    async def main():
        async with standin_source(standin, registry, timeout=1.5) as src:
            t0 = time.monotonic()
            with pytest.raises(SourceError, match=r"did not have the pieces within 1.5s \(the blob's P2P download: "
                                                  r"1 of 3 pieces local"):
                await src.read(digest, 0, len(data))
            assert time.monotonic() - t0 < 5
    run(main())


def test_resource_exhausted(standin, registry, blob):
    digest, data = blob
    standin.faults = Faults(resource_exhausted=2)

    async def main():
        async with standin_source(standin, registry, whole_task=False) as src:
            for _ in range(2):
                with pytest.raises(SourceError, match="RESOURCE_EXHAUSTED"):
                    await src.read(digest, 0, 10)
            assert await src.read(digest, 0, 10) == data[:10]
    run(main())


def test_requests_the_source_sends(standin, registry, blob):
    """What every request carries (the stand-in records it): the whole task first, at LEVEL6,
    without content; ranges after it, with content; ALWAYS on all; one url, one task."""
    digest, data = blob

    async def main():
        async with standin_source(standin, registry, piece_cache_bytes=0) as src:
            assert await src.read(digest, 100, 1000) == data[100:1100]
            assert await src.read(digest, 9 * MiB, 100, prefetch=True) == data[9 * MiB:9 * MiB + 100]
    run(main())
    reqs = standin.requests
    whole, *ranges = reqs
    assert whole["range"] is None and not whole["need_piece_content"] and whole["priority"] == common_pb2.LEVEL6
    assert [r["range"] for r in ranges] == [(100, 1000), (9 * MiB, 100)]
    assert all(r["need_piece_content"] for r in ranges)
    assert [r["priority"] for r in ranges] == [common_pb2.LEVEL6, common_pb2.LEVEL3]
    assert all(r["scheduling_policy"] == common_pb2.ALWAYS and not r["prefetch"] for r in reqs)
    assert len({r["task_id"] for r in reqs}) == 1


def test_standin_runs_as_a_process(sockdir, registry, blob):
    """The VM tests run the stand-in as a process in the guest."""
    digest, data = blob
    sock = os.path.join(sockdir, "proc.sock")
    proc = subprocess.Popen([sys.executable, "-m", "tests.standins.dfdaemon", "--socket", sock],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on unix:" in line, line

        async def main():
            async with DragonflyGrpcSource(sock, lambda b: registry.blob_url(REPO, b)) as src:
                assert await src.read(digest, PIECE - 1, 2) == data[PIECE - 1:PIECE + 1]
        run(main())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not os.path.exists(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("which", ["real", "standin"])
def test_the_standin_answers_like_the_real_dfdaemon(which, request, registry):
    """The same raw requests to both (the stand-in is only worth its lies if the rest of what it
    says is what dfdaemon says): started first, whole pieces with crc32 digests, in completion
    order; a missing download, a range past the end and an origin 404 refused the same ways."""
    import json
    import zlib

    import grpc
    from dragonfly_api import dfdaemon_pb2, dfdaemon_pb2_grpc

    if which == "real":
        peer = request.getfixturevalue("dragonfly_peer")
        digest, _data = push(peer, 10 * MiB + 12345)
        url, address = peer.blob_url(REPO, digest), f"unix:{peer.socket('node1')}"
        header = peer.registry.auth_header()
        gone_url = peer.blob_url(REPO, "0" * 64)
        handle = None
    else:
        d = tempfile.mkdtemp(prefix="df-", dir="/tmp")
        handle = start_standin(os.path.join(d, "s.sock"), seed=5)
        digest = registry.push_blob(REPO, os.urandom(10 * MiB + 12345))
        url, address, header = registry.blob_url(REPO, digest), handle.address, {}
        gone_url = registry.blob_url(REPO, "0" * 64)

    async def main():
        options = [("grpc.max_receive_message_length", -1), ("grpc.default_authority", "localhost")]
        async with grpc.aio.insecure_channel(address, options=options) as ch:
            stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(ch)
            # a range past the end of a blob not yet in the peer's storage (later, the real one
            # answers from what it has: a started message, no piece)
            bad = common_pb2.Download(url=url, range=common_pb2.Range(start=12 * MiB, length=MiB),
                                      request_header=header, need_piece_content=True)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [m async for m in stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=bad))]
            assert e.value.code() == grpc.StatusCode.INTERNAL and "invalid parameter" in e.value.details()
            orders = []
            for _ in range(4):
                req = dfdaemon_pb2.DownloadTaskRequest(download=common_pb2.Download(
                    url=url, range=common_pb2.Range(start=PIECE - 1, length=PIECE + 2), request_header=header,
                    need_piece_content=True, scheduling_policy=common_pb2.ALWAYS))
                msgs = [m async for m in stub.DownloadTask(req)]
                assert msgs[0].WhichOneof("response") == "download_task_started_response"
                size = msgs[0].download_task_started_response.content_length
                assert size == 10 * MiB + 12345
                pieces = [m.download_piece_finished_response.piece for m in msgs[1:]]
                assert sorted(p.number for p in pieces) == [0, 1, 2]
                for p in pieces:
                    assert p.offset == p.number * PIECE
                    assert p.length == min(PIECE, size - p.offset) == len(p.content)
                    assert p.digest == f"crc32:{zlib.crc32(p.content)}"
                orders.append([p.number for p in pieces])
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [m async for m in stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest())]
            assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL)
            gone = common_pb2.Download(url=gone_url, range=common_pb2.Range(start=0, length=1),
                                       request_header=header, need_piece_content=True)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [m async for m in stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=gone))]
            assert e.value.code() == grpc.StatusCode.INTERNAL
            body = json.loads(dict(e.value.trailing_metadata())["grpc-status-details-bin"])
            assert body["status_code"] == 404 and body["message"] and isinstance(body["header"], dict)
            return orders
    try:
        orders = run(main())
    finally:
        if handle is not None:
            handle.stop()
            shutil.rmtree(d, ignore_errors=True)
    if which == "standin":
        assert any(o != sorted(o) for o in orders), orders  # the stand-in shuffles: completion order
