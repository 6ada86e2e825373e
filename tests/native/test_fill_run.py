"""native.fill_run: one run of chunks read, decoded, checked against blake3 and written in one C
call; a bad chunk writes nothing; the C blake3 is the digest the bootstraps record."""
from __future__ import annotations

import errno
import os

import blake3
import lz4.block
import pytest
import zstandard

import native

BLOCK = 4096


def digest(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def test_blake3_matches_the_python_package() -> None:
    for size in (0, 1, 1023, 1024, 4096, 65537, 1 << 20):
        data = os.urandom(size)
        assert native.blake3(data) == digest(data)


def stored(datas: list[bytes], compressor: str) -> tuple[bytes, list[tuple[int, int, int, int, bool, bytes]]]:
    """(the run's stored bytes, its chunks), each chunk at a 4 KiB aligned uncompressed offset."""
    raw = b""
    chunks = []
    dst = 0
    for data in datas:
        if compressor == "zstd":
            packed = zstandard.ZstdCompressor().compress(data)
        elif compressor == "lz4_block":
            packed = lz4.block.compress(data, store_size=False)
        else:
            packed = data
        chunks.append((len(raw), dst, len(packed), len(data), compressor != "none", digest(data)))
        raw += packed
        dst += (len(data) + BLOCK - 1) // BLOCK * BLOCK
    return raw, chunks


@pytest.mark.parametrize("compressor", ["none", "zstd", "lz4_block"])
def test_a_run_is_written_where_its_chunks_belong(tmp_path, compressor: str) -> None:
    datas = [os.urandom(8192), b"x" * 5000, os.urandom(1 << 20)]
    raw, chunks = stored(datas, compressor)
    size = chunks[-1][1] + len(datas[-1])
    path = tmp_path / "cache"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        result = native.fill_run(chunks, compressor, fd, src=raw, dst_size=size)
        assert result.error == 0, result
        got = path.read_bytes()
        for (_, dst, _, length, _, _), data in zip(chunks, datas):
            assert got[dst:dst + length] == data
        assert got[8192 + 5000:16384] == bytes(16384 - 8192 - 5000)  # the block tail: zeros
        assert len(got) == size  # never written past the file's end
    finally:
        os.close(fd)


def test_a_run_read_from_a_local_file(tmp_path) -> None:
    datas = [os.urandom(BLOCK * 3), os.urandom(BLOCK)]
    raw, chunks = stored(datas, "none")
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(BLOCK) + raw)  # the run starts one block into the blob
    dst = tmp_path / "cache"
    fd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
    src = os.open(blob, os.O_RDONLY)
    try:
        assert native.fill_run(chunks, "none", fd, src_fd=src, src_base=BLOCK, src_len=len(raw)).error == 0
        assert dst.read_bytes() == b"".join(datas)
        # the file ends inside the run: the source's failure, nothing written
        short = native.fill_run(chunks, "none", fd, src_fd=src, src_base=2 * BLOCK, src_len=len(raw))
        assert short.error == -errno.ENODATA
    finally:
        os.close(fd)
        os.close(src)


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_one_bad_chunk_writes_nothing_of_the_run(tmp_path, compressor: str) -> None:
    datas = [os.urandom(BLOCK), os.urandom(BLOCK), os.urandom(BLOCK)]
    raw, chunks = stored(datas, compressor)
    off, dst, slen, dlen, comp, _ = chunks[1]
    chunks[1] = (off, dst, slen, dlen, comp, digest(b"something else"))
    path = tmp_path / "cache"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 3 * BLOCK)
        result = native.fill_run(chunks, compressor, fd, src=raw, dst_size=3 * BLOCK)
        assert (result.error, result.failed) == (-errno.EBADMSG, 1)
        assert os.pread(fd, 3 * BLOCK, 0) == bytes(3 * BLOCK)  # not even the good first chunk
        # bytes that do not decompress are bad bytes too
        if compressor == "zstd":
            broken = bytearray(raw)
            broken[chunks[0][0] + 4:chunks[0][0] + 12] = b"\xff" * 8
            result = native.fill_run(stored(datas, compressor)[1], compressor, fd, src=bytes(broken), dst_size=3 * BLOCK)
            assert (result.error, result.failed) == (-errno.EBADMSG, 0)
            assert os.pread(fd, 3 * BLOCK, 0) == bytes(3 * BLOCK)
    finally:
        os.close(fd)


def test_direct_writes_are_whole_aligned_blocks(tmp_path) -> None:
    if native.fs_type(tmp_path) == 0x01021994:
        pytest.fail("tmp_path is tmpfs: no O_DIRECT (set TMPDIR to a disk filesystem)")
    datas = [os.urandom(BLOCK * 2), os.urandom(100)]
    raw, chunks = stored(datas, "zstd")
    path = tmp_path / "direct"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        result = native.fill_run(chunks, "zstd", fd, src=raw, direct=True, dst_size=3 * BLOCK)
        assert result.error == 0 and result.written == 3 * BLOCK
    finally:
        os.close(fd)
    got = path.read_bytes()
    assert got[:2 * BLOCK] == datas[0] and got[2 * BLOCK:2 * BLOCK + 100] == datas[1]
    assert got[2 * BLOCK + 100:] == bytes(BLOCK - 100)
