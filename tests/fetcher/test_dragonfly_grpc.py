"""DragonflyGrpcSource against the stand-in dfdaemon (tests/standins/dfdaemon.py), which fetches
from a real docker-registry on 127.0.0.1."""
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

pytest.importorskip("dragonfly_api")

from dragonfly_api import common_pb2
from asyncwait import wait_for
from registry_server import TEST_PASSWORD as PASSWORD, TEST_USER as USER
from standins.dfdaemon import Faults, start_standin, task_id_for

from fetcher.dragonfly_grpc import DragonflyGrpcSource, PieceCache, dragonfly_for_registry
from fetcher.registry import RegistrySource
from fetcher.source import BlobSource, SourceError

pytestmark = pytest.mark.timeout(120)

REPO = "fscached/dragonfly"
MiB = 1 << 20
PIECE = 4 * MiB
ROOT = Path(__file__).resolve().parents[2]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="df-", dir="/tmp")  # unix socket paths are short (108 bytes)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def standin(sockdir):
    handle = start_standin(os.path.join(sockdir, "dfdaemon.sock"), seed=1234)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def blob(registry):
    data = os.urandom(10 * MiB + 12345)  # three 4 MiB pieces, the last one short
    return registry.push_blob(REPO, data), data


@pytest.fixture(scope="module")
def blob2(registry):
    data = os.urandom(5 * MiB + 7)
    return registry.push_blob(REPO, data), data


def source(standin, registry, **kw) -> DragonflyGrpcSource:
    return DragonflyGrpcSource(standin.socket_path, lambda b: registry.blob_url(REPO, b), **kw)


def test_is_a_blob_source(tmp_path):
    src = DragonflyGrpcSource(str(tmp_path / "x.sock"), lambda b: b)
    assert isinstance(src, BlobSource)
    assert src.name == f"dragonfly {tmp_path / 'x.sock'}"


def test_ranged_reads_return_exact_bytes(standin, registry, blob):
    digest, data = blob
    size = len(data)
    ranges = [(0, 1), (0, 4096), (1, 4095), (PIECE - 1, 2), (PIECE - 10, PIECE + 20),  # 3 pieces
              (PIECE, PIECE), (2 * PIECE - 1, 1), (2 * PIECE, size - 2 * PIECE), (size - 1, 1),
              (size - 4096, 4096), (12345, 678), (3 * MiB, 3 * MiB), (0, size)]

    async def main():
        async with source(standin, registry) as src:
            for off, n in ranges:
                assert await src.read(digest, off, n) == data[off:off + n], (off, n)
            got = await asyncio.gather(*(src.read(digest, i * 524287, 70000) for i in range(20)))
            assert got == [data[i * 524287:i * 524287 + 70000] for i in range(20)]
            assert await src.read(digest, 10, 0) == b""
    run(main())
    assert standin.requests and all(r["need_piece_content"] for r in standin.requests)


def test_one_url_one_task_prefetch_first_only_and_priorities(standin, registry, blob, blob2):
    """What each RPC carries; the piece cache is off so that every read is an RPC."""
    digest, data = blob
    digest2, data2 = blob2

    async def main():
        async with source(standin, registry, piece_cache_bytes=0) as src:
            assert await src.read(digest, 100, 1000) == data[100:1100]
            assert await src.read(digest, 5 * MiB, 4 * MiB) == data[5 * MiB:9 * MiB]
            assert await src.read(digest, 9 * MiB, 100, prefetch=True) == data[9 * MiB:9 * MiB + 100]
            assert await src.read(digest, 0, 10) == data[:10]
            assert await src.read(digest2, 7, 7, prefetch=True) == data2[7:14]  # background first
            assert await src.read(digest2, 7, 7) == data2[7:14]
    run(main())
    reqs = standin.requests
    a = [r for r in reqs if r["url"] == registry.blob_url(REPO, digest)]
    b = [r for r in reqs if r["url"] == registry.blob_url(REPO, digest2)]
    assert len(a) == 4 and len(b) == 2
    assert len({r["task_id"] for r in a}) == 1
    assert a[0]["task_id"] == task_id_for(registry.blob_url(REPO, digest), "", "fscached")
    assert a[0]["task_id"] != b[0]["task_id"]
    assert [r["range"] for r in a] == [(100, 1000), (5 * MiB, 4 * MiB), (9 * MiB, 100), (0, 10)]
    assert [r["prefetch"] for r in a] == [True, False, False, False]
    # a prefetch read does not count as the first on-demand read
    assert [r["prefetch"] for r in b] == [False, True]
    assert [r["priority"] for r in a] == [common_pb2.LEVEL6, common_pb2.LEVEL6, common_pb2.LEVEL3,
                                          common_pb2.LEVEL6]
    assert b[0]["priority"] == common_pb2.LEVEL3
    assert all(r["application"] == "fscached" and r["tag"] == "" for r in reqs)


def test_tag_and_piece_length_change_the_task_id(standin, registry, blob):
    digest, data = blob

    async def main():
        async with source(standin, registry, tag="t1", piece_length=8 * MiB) as src:
            assert await src.read(digest, PIECE - 5, 10) == data[PIECE - 5:PIECE + 5]
    run(main())
    (req,) = standin.requests
    url = registry.blob_url(REPO, digest)
    assert req["task_id"] == task_id_for(url, "t1", "fscached", 8 * MiB)
    assert req["task_id"] != task_id_for(url, "", "fscached")
    assert req["piece_length"] == 8 * MiB


def test_failed_first_read_asks_for_prefetch_again(standin, registry, blob):
    digest, data = blob
    standin.faults = Faults(resource_exhausted=1)

    async def main():
        async with source(standin, registry, piece_cache_bytes=0) as src:
            with pytest.raises(SourceError):
                await src.read(digest, 0, 10)
            assert await src.read(digest, 0, 10) == data[:10]
            assert await src.read(digest, 10, 10) == data[10:20]
    run(main())
    assert [r["prefetch"] for r in standin.requests] == [True, True, False]


def test_second_range_is_served_from_the_peers_pieces(sockdir, registry, blob):
    digest, data = blob
    with start_standin(os.path.join(sockdir, "d.sock"), honour_prefetch=False) as standin:
        async def main():
            async with source(standin, registry) as src:
                assert await src.read(digest, PIECE - 100, 200) == data[PIECE - 100:PIECE + 100]
                tid = standin.requests[0]["task_id"]
                assert standin.origin_fetch_count(tid) == 2  # pieces 0 and 1
                assert await src.read(digest, 10, 2 * PIECE - 20) == data[10:2 * PIECE - 10]
                assert await src.read(digest, 3 * MiB, 100) == data[3 * MiB:3 * MiB + 100]
                assert standin.origin_fetch_count(tid) == 2  # nothing new from the origin
                assert await src.read(digest, 2 * PIECE, 10) == data[2 * PIECE:2 * PIECE + 10]
                assert standin.origin_fetch_count(tid) == 3
                assert set(standin.origin_fetches.values()) == {1}
        run(main())


def test_range_inside_a_delivered_piece_makes_no_rpc(standin, registry, blob):
    digest, data = blob

    async def main():
        async with source(standin, registry) as src:
            assert await src.read(digest, 100, 1000) == data[100:1100]  # piece 0 arrives whole
            assert len(standin.requests) == 1
            for off, n in [(0, 1), (1 * MiB, MiB), (2 * MiB, MiB), (PIECE - 7, 7), (0, PIECE), (12345, 678)]:
                assert await src.read(digest, off, n) == data[off:off + n], (off, n)
            assert len(standin.requests) == 1  # the stand-in saw no new request
            assert src.stats["piece_cache_hits"] == 6 and src.stats["piece_cache_misses"] == 1
            assert src.stats["requests"] == 1
            # sequential 1 MiB windows over the whole blob: one RPC per piece, not per window
            got = b"".join([await src.read(digest, off, min(MiB, len(data) - off))
                            for off in range(0, len(data), MiB)])
            assert got == data
            assert len(standin.requests) == 3
            assert [r["range"][0] for r in standin.requests[1:]] == [PIECE, 2 * PIECE]
    run(main())


def test_partly_cached_range_asks_only_for_the_missing_span(standin, registry, blob):
    digest, data = blob

    async def main():
        async with source(standin, registry) as src:
            assert await src.read(digest, 10, 10) == data[10:20]  # piece 0
            assert await src.read(digest, PIECE - 100, 200) == data[PIECE - 100:PIECE + 100]
            assert standin.requests[-1]["range"] == (PIECE, 100)  # piece 0's part came from the cache
            assert await src.read(digest, PIECE - 100, len(data) - PIECE + 100) == data[PIECE - 100:]
            assert standin.requests[-1]["range"] == (2 * PIECE, len(data) - 2 * PIECE)
            assert await src.read(digest, 0, len(data)) == data
            assert len(standin.requests) == 3
    run(main())


def test_cached_reads_keep_the_first_rpc_read_prefetch_rule(standin, registry, blob, blob2):
    digest, data = blob
    digest2, data2 = blob2

    async def main():
        async with source(standin, registry) as src:
            # a background read first: piece 0 cached, no prefetch asked
            assert await src.read(digest, 0, 10, prefetch=True) == data[:10]
            # an on-demand read from the cache is no RPC: it does not use up the flag...
            assert await src.read(digest, 100, 10) == data[100:110]
            # ...so the first on-demand RPC still asks for the prefetch, and only that one
            assert await src.read(digest, PIECE, 10) == data[PIECE:PIECE + 10]
            assert await src.read(digest, 2 * PIECE, 10) == data[2 * PIECE:2 * PIECE + 10]
            # on-demand first: the flag goes with it, cached reads change nothing
            assert await src.read(digest2, 0, 10) == data2[:10]
            assert await src.read(digest2, 20, 10) == data2[20:30]
            assert await src.read(digest2, PIECE, 10) == data2[PIECE:PIECE + 10]
    run(main())
    url, url2 = registry.blob_url(REPO, digest), registry.blob_url(REPO, digest2)
    assert [(r["range"], r["prefetch"]) for r in standin.requests if r["url"] == url] == [
        ((0, 10), False), ((PIECE, 10), True), ((2 * PIECE, 10), False)]
    assert [(r["range"], r["prefetch"]) for r in standin.requests if r["url"] == url2] == [
        ((0, 10), True), ((PIECE, 10), False)]


def test_a_cached_piece_is_never_served_for_another_blob(standin, registry, blob, blob2):
    digest, data = blob
    digest2, data2 = blob2

    async def main():
        async with source(standin, registry) as src:
            assert await src.read(digest, 0, MiB) == data[:MiB]
            assert await src.read(digest2, 0, MiB) == data2[:MiB]  # same offsets, other blob
            assert await src.read(digest, 5, 5) == data[5:10]
            assert await src.read(digest2, 5, 5) == data2[5:10]
            assert src.stats["piece_cache_hits"] == 2 and src.stats["piece_cache_misses"] == 2
    run(main())
    assert [r["url"] for r in standin.requests] == [registry.blob_url(REPO, digest),
                                                    registry.blob_url(REPO, digest2)]


def test_piece_cache_stays_within_its_bound_over_many_blobs(standin, registry):
    piece, limit = 256 << 10, 1 * MiB + 1000  # room for four 256 KiB pieces
    blobs = [os.urandom(700 << 10 | i) for i in range(8)]  # three pieces each, the last short
    digests = [registry.push_blob(REPO, b) for b in blobs]
    rng = random.Random(7)

    async def main():
        async with source(standin, registry, piece_length=piece, piece_cache_bytes=limit) as src:
            cache = src.piece_cache
            for _ in range(150):
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
            before = len(standin.requests)
            assert await src.read(digests[0], 5, 5) == blobs[0][5:10]
            assert len(standin.requests) == before  # still cached
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


def test_piece_cache_off(standin, registry, blob):
    digest, data = blob

    async def main():
        async with source(standin, registry, piece_cache_bytes=0) as src:
            for _ in range(3):
                assert await src.read(digest, 0, 10) == data[:10]
            assert src.piece_cache.bytes == 0 and src.stats["piece_cache_hits"] == 0
    run(main())
    assert len(standin.requests) == 3


def test_prefetch_pulls_the_whole_blob_in_the_background(standin, registry, blob):
    digest, data = blob

    async def main():
        async with source(standin, registry) as src:
            assert await src.read(digest, 0, 100) == data[:100]
            tid = standin.requests[0]["task_id"]
            await wait_for(lambda: standin.origin_fetch_count(tid) >= 3, 20, "the background prefetch of 3 pieces")
            assert standin.origin_fetch_count(tid) == 3
            assert await src.read(digest, 0, len(data)) == data
            assert standin.origin_fetch_count(tid) == 3
            assert set(standin.origin_fetches.values()) == {1}  # no piece fetched twice
    run(main())


def test_corrupt_piece_with_wrong_digest_is_refused(standin, registry, blob):
    digest, data = blob
    standin.faults = Faults(corrupt_pieces={1}, corrupt_digest="wrong")

    async def main():
        async with source(standin, registry) as src:
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
        async with source(standin, registry) as src:
            got = await src.read(digest, 0, PIECE)
            assert len(got) == PIECE and got != data[:PIECE]
    run(main())


def test_origin_404(standin, registry):
    missing = hashlib.sha256(b"no such blob").hexdigest()

    async def main():
        async with source(standin, registry) as src:
            with pytest.raises(SourceError, match=r"origin answered HTTP 404"):
                await src.read(missing, 0, 10)
    run(main())


def test_read_past_end(standin, registry, blob):
    digest, data = blob

    async def main():
        async with source(standin, registry) as src:
            with pytest.raises(SourceError, match=r"FAILED_PRECONDITION"):
                await src.read(digest, len(data) - 5, 10)
    run(main())


@pytest.mark.parametrize("mode", ["abort", "stop"])
def test_killed_mid_stream_fails_promptly(standin, registry, blob, mode):
    digest, data = blob
    standin.faults = Faults(kill_after_pieces=1, kill_mode=mode)

    async def main():
        async with source(standin, registry, timeout=30) as src:
            t0 = time.monotonic()
            with pytest.raises(SourceError, match=r"blob [0-9a-f]{64} \[0\+"):
                await src.read(digest, 0, len(data))
            assert time.monotonic() - t0 < 5
    run(main())


def test_hung_stream_times_out(standin, registry, blob):
    digest, data = blob
    standin.faults = Faults(kill_after_pieces=1, kill_mode="hang")

    async def main():
        async with source(standin, registry, timeout=1.5) as src:
            t0 = time.monotonic()
            with pytest.raises(SourceError, match=r"timed out after 1.5s"):
                await src.read(digest, 0, len(data))
            assert time.monotonic() - t0 < 5
    run(main())


def test_resource_exhausted(standin, registry, blob):
    digest, data = blob
    standin.faults = Faults(resource_exhausted=2)

    async def main():
        async with source(standin, registry) as src:
            for _ in range(2):
                with pytest.raises(SourceError, match="RESOURCE_EXHAUSTED"):
                    await src.read(digest, 0, 10)
            assert await src.read(digest, 0, 10) == data[:10]
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


def test_registry_auth_reaches_the_origin(standin, auth_registry):
    data = os.urandom(PIECE + 999)
    digest = auth_registry.push_blob(REPO, data)

    async def main():
        reg = RegistrySource(auth_registry.host, REPO, scheme="http", username=USER, password=PASSWORD)
        async with reg, dragonfly_for_registry(reg, standin.socket_path) as src:
            assert await src.read(digest, PIECE - 3, 1000) == data[PIECE - 3:PIECE + 997]
        # without credentials the origin says 401, and that is what we are told (another tag:
        # the pieces of the first task are cached at the peer, whoever asks for them)
        async with DragonflyGrpcSource(standin.socket_path, lambda b: auth_registry.blob_url(REPO, b),
                                       tag="anonymous") as anon:
            with pytest.raises(SourceError, match="HTTP 401"):
                await anon.read(digest, 0, 10)
    run(main())
    first = standin.requests[0]
    assert first["url"] == auth_registry.blob_url(REPO, digest)
    assert first["headers"]["Authorization"].startswith("Basic ")
    authed = [o for o in standin.origin_log if o["task_id"] == first["task_id"] and o["status"] in (200, 206)]
    assert authed and all(o["headers"].get("Authorization") == first["headers"]["Authorization"]
                          for o in authed)
    assert PASSWORD not in repr(standin.requests[-1]["headers"])  # the anonymous one carried nothing


def test_standin_runs_as_a_process(sockdir, registry, blob):
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


def test_standin_speaks_like_dfdaemon(standin, registry, blob):
    """The stand-in itself, through the raw generated stub: started first, then whole pieces in
    completion (not sorted) order with crc32 digests; the documented error codes."""
    import json
    import zlib

    import grpc
    from dragonfly_api import dfdaemon_pb2, dfdaemon_pb2_grpc

    digest, data = blob
    url = registry.blob_url(REPO, digest)

    async def main():
        async with grpc.aio.insecure_channel(standin.address,
                                             options=[("grpc.max_receive_message_length", -1)]) as ch:
            stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(ch)
            orders = []
            for _ in range(6):
                req = dfdaemon_pb2.DownloadTaskRequest(download=common_pb2.Download(
                    url=url, range=common_pb2.Range(start=PIECE - 1, length=PIECE + 2),
                    need_piece_content=True))
                msgs = [m async for m in stub.DownloadTask(req)]
                assert msgs[0].WhichOneof("response") == "download_task_started_response"
                assert msgs[0].download_task_started_response.content_length == len(data)
                pieces = [m.download_piece_finished_response.piece for m in msgs[1:]]
                assert sorted(p.number for p in pieces) == [0, 1, 2]
                for p in pieces:
                    assert p.offset == p.number * PIECE
                    assert p.content == data[p.offset:p.offset + p.length]
                    assert p.length == min(PIECE, len(data) - p.offset)
                    assert p.digest == f"crc32:{zlib.crc32(p.content)}"
                orders.append([p.number for p in pieces])
            assert any(o != sorted(o) for o in orders)

            with pytest.raises(grpc.aio.AioRpcError) as e:
                [m async for m in stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest())]
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            bad = common_pb2.Download(url=url, range=common_pb2.Range(start=len(data), length=1))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [m async for m in stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=bad))]
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            gone = common_pb2.Download(url=registry.blob_url(REPO, "0" * 64),
                                       range=common_pb2.Range(start=0, length=1))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [m async for m in stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=gone))]
            assert e.value.code() == grpc.StatusCode.INTERNAL
            details = dict(e.value.trailing_metadata())["grpc-status-details-bin"]
            body = json.loads(details)
            assert body["status_code"] == 404 and body["message"] and isinstance(body["header"], dict)
    run(main())


def test_concurrent_reads_of_pieces_in_flight_are_joined(standin, registry, blob):
    digest, data = blob

    async def main():
        async with source(standin, registry) as src:
            assert await src.read(digest, 0, 10) == data[:10]  # learn the piece length (piece 0)
            first = len(standin.requests)
            # six 1 MiB reads inside pieces 1 and 2, all at once: each piece is asked for once
            offs = [PIECE + i * MiB for i in range(6)]
            got = await asyncio.gather(*(src.read(digest, off, MiB) for off in offs))
            assert got == [data[off:off + MiB] for off in offs]
            asked = standin.requests[first:]
            assert len(asked) <= 2, [r["range"] for r in asked]
            assert src.stats["piece_cache_joined"] >= 4
    run(main())
