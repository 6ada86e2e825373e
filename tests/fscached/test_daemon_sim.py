"""The daemon's request handling against the kernel simulator (same bytes as the kernel).

Images come from the real builder; the expected bytes of each blob's uncompressed address
space are rebuilt independently from the bootstrap through the reader.
"""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from erofs_image.builder import convert
from erofs_image.reader import Bootstrap
from erofs_image.tree import lookup
from fscached.core.chunkmap import chunks_by_blob, round_up
from fscached.core.fill import READAHEAD_BYTES, READAHEAD_MIN, READAHEAD_RUN
from fscached.config import ImageSpec, PrefetchSpec
from simdaemon import Running, expected_blob_space, make_tree
from standins.kernel_simulator import KernelSimulator

@pytest.fixture(params=["none", "zstd", "lz4_block"])
def image(request: pytest.FixtureRequest, work: Path) -> tuple[ImageSpec, Bootstrap]:
    out = work / "built"
    convert(make_tree(work / "tree"), out, compressor=request.param, chunk_size=64 << 10)
    spec = ImageSpec("img1", out / "image.boot", out / "blobs")
    return spec, Bootstrap.open(spec.bootstrap)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_serves_bootstrap_and_blob_bytes(image: tuple[ImageSpec, Bootstrap], work: Path) -> None:
    spec, boot = image
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [spec], work / "cache")
        try:
            meta = sim.mount("erofs,img1", b"img1")
            raw = spec.bootstrap.read_bytes()
            assert meta.copen_result == round_up(len(raw))
            assert sim.read(meta, 0, 4096) == raw[:4096]
            assert sim.read(meta, 0, meta.copen_result)[: len(raw)] == raw
            assert len(boot.blobs) == 1
            info = boot.blobs[0]
            blob = sim.mount("erofs,img1", info.blob_id.encode())
            assert blob.copen_result == info.uncompressed_size
            want = expected_blob_space(boot, spec.blobs, 0)
            # a small read in the middle first, then everything
            mid = round_up(len(want) // 2) - 4096
            assert sim.read(blob, mid, 4096) == want[mid:mid + 4096]
            assert sim.read(blob, 0, len(want)) == want
            assert daemon.stats["verify_failures"] == 0
            sim.close(blob)
            sim.close(meta)
        finally:
            assert daemon.stop() == 0
        sim.check()


def test_concurrent_reads_of_one_chunk_are_joined(work: Path) -> None:
    out = work / "built"
    convert(make_tree(work / "tree"), out, compressor="zstd", chunk_size=1 << 20)
    spec = ImageSpec("img1", out / "image.boot", out / "blobs")
    boot = Bootstrap.open(spec.bootstrap)
    want = expected_blob_space(boot, spec.blobs, 0)
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [spec], work / "cache")
        try:
            blob = sim.mount("erofs,img1", boot.blobs[0].blob_id.encode())
            size = len(want)
            pending = [sim.start_read(blob, off, 4096) for off in range(0, size, 4096)]
            for p in pending:
                assert p.result() == want[p.offset:p.offset + 4096]
            distinct = len(chunks_by_blob(boot.image)[0])
            # each chunk fetched once, however many READs asked for it
            assert daemon.stats["fetched_chunks"] == distinct
            assert daemon.stats["read"] == len(pending)
        finally:
            daemon.stop()


def test_unknown_cookie_gets_enoent_and_daemon_keeps_serving(image: tuple[ImageSpec, Bootstrap], work: Path) -> None:
    spec, _ = image
    before = open_fds()
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [spec], work / "cache")
        try:
            assert sim.mount("erofs,nope", b"nope").copen_result == -errno.ENOENT
            assert sim.mount("erofs,img1", b"0" * 64).copen_result == -errno.ENOENT
            meta = sim.mount("erofs,img1", b"img1")
            assert meta.copen_result > 0
            assert daemon.stats["open_unknown"] == 2
            sim.close(meta)
        finally:
            daemon.stop()
    assert open_fds() <= before | set(), "the daemon leaked file descriptors"


def test_corrupt_blob_is_never_written_and_read_fails_cleanly(work: Path) -> None:
    out = work / "built"
    convert(make_tree(work / "tree"), out, compressor="none", chunk_size=64 << 10)
    spec = ImageSpec("img1", out / "image.boot", out / "blobs")
    boot = Bootstrap.open(spec.bootstrap)
    info = boot.blobs[0]
    want = expected_blob_space(boot, spec.blobs, 0)
    blob_file = spec.blobs / info.blob_id
    data = bytearray(blob_file.read_bytes())
    data[10] ^= 0xFF  # inside the first chunk
    blob_file.write_bytes(bytes(data))
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [spec], work / "cache")
        try:
            blob = sim.mount("erofs,img1", info.blob_id.encode())
            with pytest.raises(OSError) as failed:
                sim.read(blob, 0, 4096)
            assert failed.value.errno == errno.EIO
            # the 1 MiB window failed as a whole, then the needed chunk alone
            assert daemon.stats["verify_failures"] == 2
            assert daemon.stats["chunk_retries"] == 1
            assert not [s for s, _ in sim.cached_extents(blob) if s == 0], "bad bytes reached the cache"
            # a good chunk in the same window is not held hostage by the bad one
            assert sim.read(blob, 64 << 10, 4096) == want[64 << 10:(64 << 10) + 4096]
            # the rest of the blob is intact and still served
            last = round_up(len(want)) - 4096
            assert sim.read(blob, last, 4096) == want[last:last + 4096]
        finally:
            assert daemon.stop() == 0


def test_missing_blob_file_fails_reads_not_the_daemon(work: Path) -> None:
    out = work / "built"
    convert(make_tree(work / "tree"), out, compressor="zstd", chunk_size=64 << 10)
    spec = ImageSpec("img1", out / "image.boot", out / "blobs")
    info = Bootstrap.open(spec.bootstrap).blobs[0]
    (spec.blobs / info.blob_id).unlink()
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [spec], work / "cache")
        try:
            blob = sim.mount("erofs,img1", info.blob_id.encode())
            with pytest.raises(OSError) as failed:
                sim.read(blob, 0, 4096)
            assert failed.value.errno == errno.EIO
            assert daemon.stats["read_failed"] == 1
            meta = sim.mount("erofs,img1", b"img1")
            assert sim.read(meta, 0, 4096) == spec.bootstrap.read_bytes()[:4096]
        finally:
            assert daemon.stop() == 0


def test_shared_domain_blob_is_one_object(work: Path) -> None:
    out = work / "built"
    convert(make_tree(work / "tree"), out, compressor="zstd")
    a = ImageSpec("a", out / "image.boot", out / "blobs", domain="dom")
    b = ImageSpec("b", out / "image.boot", out / "blobs", domain="dom")
    blob_id = Bootstrap.open(a.bootstrap).blobs[0].blob_id
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [a, b], work / "cache")
        try:
            assert sim.mount("erofs,dom", b"a").copen_result > 0
            assert sim.mount("erofs,dom", b"b").copen_result > 0
            assert sim.mount("erofs,dom", blob_id.encode()).copen_result > 0
            assert sim.mount("erofs,a", b"a").copen_result == -errno.ENOENT  # not outside its domain
            served = daemon.daemon.catalog.lookup("erofs,dom", blob_id.encode())
            assert served is not None and served.users == {"a", "b"}
        finally:
            daemon.stop()


def test_small_read_fills_its_window_with_one_fetch(work: Path) -> None:
    tree = work / "tree"
    tree.mkdir()
    for i in range(64):  # 64 small files: 64 chunks laid out one after the other
        (tree / f"f{i:02}").write_bytes(os.urandom(5000 + i))
    out = work / "built"
    convert(tree, out, compressor="zstd", chunk_size=64 << 10)
    spec = ImageSpec("img1", out / "image.boot", out / "blobs")
    boot = Bootstrap.open(spec.bootstrap)
    want = expected_blob_space(boot, spec.blobs, 0)
    chunks = sorted(chunks_by_blob(boot.image)[0], key=lambda c: c.uncompressed_offset)
    window = 128 << 10
    in_first_window = [c for c in chunks if c.uncompressed_offset < window]
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [spec], work / "cache", read_window=window)
        try:
            blob = sim.mount("erofs,img1", boot.blobs[0].blob_id.encode())
            assert sim.read(blob, 8192, 4096) == want[8192:12288]
            assert daemon.stats["fetches"] == 1, "one ranged fetch for the whole window"
            assert daemon.stats["fetched_chunks"] == len(in_first_window) > 10
            for c in in_first_window:  # the next reads in the window hit what is there
                assert sim.read(blob, c.uncompressed_offset, 4096) == want[c.uncompressed_offset:c.uncompressed_offset + 4096]
            assert daemon.stats["fetches"] == 1
            last = chunks[-1].uncompressed_offset
            assert sim.read(blob, last, 4096) == want[last:last + 4096]
            assert daemon.stats["fetches"] == 2
        finally:
            daemon.stop()


def test_prefetch_all_fills_the_blob_in_the_background(work: Path) -> None:
    out = work / "built"
    convert(make_tree(work / "tree"), out, compressor="lz4_block", chunk_size=64 << 10)
    spec = ImageSpec("img1", out / "image.boot", out / "blobs", prefetch=PrefetchSpec("all"))
    boot = Bootstrap.open(spec.bootstrap)
    want = expected_blob_space(boot, spec.blobs, 0)
    distinct = len(chunks_by_blob(boot.image)[0])
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [spec], work / "cache")
        try:
            blob = sim.mount("erofs,img1", boot.blobs[0].blob_id.encode())
            deadline = time.monotonic() + 30
            while daemon.stats["prefetch_done"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert daemon.stats["prefetch_done"] == 1
            assert daemon.stats["prefetched_chunks"] == distinct
            fetches = daemon.stats["fetches"]
            assert sim.read(blob, 0, len(want)) == want
            assert daemon.stats["fetches"] == fetches, "everything was already in the cache"
        finally:
            daemon.stop()


def test_prefetch_table_fetches_the_listed_files_only(work: Path) -> None:
    out = work / "built"
    convert(make_tree(work / "tree"), out, compressor="zstd", chunk_size=64 << 10, prefetch=["/text.txt"])
    spec = ImageSpec("img1", out / "image.boot", out / "blobs", prefetch=PrefetchSpec("table"))
    boot = Bootstrap.open(spec.bootstrap)
    listed = {c.uncompressed_offset for c in lookup(boot.image.root, b"/text.txt").chunks if c is not None}
    assert boot.prefetch_nids == [lookup(boot.image.root, b"/text.txt").nid]
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [spec], work / "cache", read_window=64 << 10)  # one chunk per window
        try:
            sim.mount("erofs,img1", boot.blobs[0].blob_id.encode())
            deadline = time.monotonic() + 30
            while daemon.stats["prefetch_done"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert daemon.stats["prefetch_done"] == 1
            written = daemon.daemon.frontend.objects.entries()[0].payload.target.written
            assert listed <= written, "every chunk of the listed file was prefetched"
            assert daemon.stats["prefetched_chunks"] < len(chunks_by_blob(boot.image)[0]), "and not the whole blob"
        finally:
            daemon.stop()


def test_sequential_reader_gets_the_next_window_fetched_ahead(work: Path) -> None:
    tree = work / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(16 << 20))
    out = work / "built"
    convert(tree, out, compressor="none", chunk_size=64 << 10)
    spec = ImageSpec("img1", out / "image.boot", out / "blobs")
    boot = Bootstrap.open(spec.bootstrap)
    want = expected_blob_space(boot, spec.blobs, 0)
    window = 64 << 10
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [spec], work / "cache", read_window=window)
        try:
            blob = sim.mount("erofs,img1", boot.blobs[0].blob_id.encode())
            # jumping around: no read-ahead
            for off in (5 * window, 2 * window, 9 * window):
                assert sim.read(blob, off, 4096) == want[off:off + 4096]
            assert daemon.stats["readahead_windows"] == 0
            # then sequential (window 10 follows 9): the read-ahead span after it is fetched in
            # a few large runs, topped up once half of it has been read
            for off in range(10 * window, 14 * window, 16 << 10):
                assert sim.read(blob, off, 16 << 10) == want[off:off + (16 << 10)]
            assert daemon.stats["readahead_windows"] >= 1
            reach = min(14 * window + READAHEAD_BYTES, len(want))  # at most this far ahead
            deadline = time.monotonic() + 10  # let the fetches ahead land
            chunks = -1
            while chunks != daemon.stats["fetched_chunks"] and time.monotonic() < deadline:
                chunks = daemon.stats["fetched_chunks"]
                time.sleep(0.3)
            fetched_windows = chunks  # one 64 KiB chunk per window
            assert 3 + 4 <= fetched_windows <= reach // window, daemon.stats
            # far fewer requests than chunks: the first read-ahead's runs are a quarter of its
            # distance (larger ones come as the reader goes on), each chunk fetched once
            run = max(window, min(READAHEAD_RUN, READAHEAD_MIN // 4))
            assert daemon.stats["fetches"] <= 3 + 1 + fetched_windows // (run // window) + 2, daemon.stats
            assert sum(e - s for s, e in sim.cached_extents(blob)) == chunks * window
        finally:
            daemon.stop()


def test_bind_and_unbind_at_run_time_on_the_cachefiles_path(work: Path) -> None:
    """An image added while another is served gets its OPENs answered; unbinding it closes its
    objects (their fds), and an unknown unbind says what the snapshotter matches on."""
    from fscached.core.catalog import CatalogError

    convert(make_tree(work / "tree1"), work / "built1", compressor="zstd")
    second_tree = work / "tree2"
    second_tree.mkdir()
    (second_tree / "only.bin").write_bytes(os.urandom(200_000))
    convert(second_tree, work / "built2", compressor="none")
    spec1 = ImageSpec("img1", work / "built1" / "image.boot", work / "built1" / "blobs")
    spec2 = ImageSpec("img2", work / "built2" / "image.boot", work / "built2" / "blobs")
    boot2 = Bootstrap.open(spec2.bootstrap)
    with KernelSimulator(work / "kernel") as sim:
        daemon = Running(sim, [spec1], work / "cache")
        try:
            assert sim.mount("erofs,img2", b"img2").copen_result == -errno.ENOENT  # not bound yet
            daemon.daemon.submit(daemon.daemon.bind_image(spec2)).result(30)
            meta = sim.mount("erofs,img2", b"img2")
            blob = sim.mount("erofs,img2", boot2.blobs[0].blob_id.encode())
            want = expected_blob_space(boot2, spec2.blobs, 0)
            assert sim.read(blob, 0, 65536) == want[:65536]
            assert sim.anon_fd_open(blob) and sim.anon_fd_open(meta)
            daemon.daemon.submit(daemon.daemon.unbind_image("img2", "img2")).result(30)
            assert not sim.anon_fd_open(blob) and not sim.anon_fd_open(meta), "unbind closes the objects"
            with pytest.raises(CatalogError, match="blob_cache: cache entry not found"):
                daemon.daemon.submit(daemon.daemon.unbind_image("img2", "img2")).result(30)
            # the first image is untouched
            boot1 = Bootstrap.open(spec1.bootstrap)
            blob1 = sim.mount("erofs,img1", boot1.blobs[0].blob_id.encode())
            assert sim.read(blob1, 0, 4096) == expected_blob_space(boot1, spec1.blobs, 0)[:4096]
        finally:
            daemon.stop()
