"""Turning a READ into verified bytes in the kernel's cache file.

One chunk is the unit of work: it is fetched (raw, maybe compressed), decompressed, checked
against its blake3 digest from the bootstrap, and written whole (block padded) into the
object's anon fd. Concurrent READs that need the same chunk of the same object share one
job; a chunk already written for an object is not written again.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field

import blake3
import lz4.block
import zstandard

import native
from erofs_image.tree import BlobInfo, ChunkRef
from fscached.catalog import BlobObject, BootstrapObject
from fscached.chunkmap import BLOCK, round_up

log = logging.getLogger("fscached.fill")


class VerifyError(Exception):
    """Bytes that do not match the digest the bootstrap records: never written."""


def decode_chunk(info: BlobInfo, ref: ChunkRef, raw: bytes) -> bytes:
    """Raw blob bytes of one chunk -> its verified uncompressed bytes."""
    if ref.compressed:
        try:
            if info.compressor == "zstd":
                data = zstandard.ZstdDecompressor().decompress(
                    raw, max_output_size=ref.uncompressed_size
                )
            elif info.compressor == "lz4_block":
                data = lz4.block.decompress(raw, uncompressed_size=ref.uncompressed_size)
            else:
                raise VerifyError(f"chunk marked compressed in a blob with compressor {info.compressor}")
        except (zstandard.ZstdError, lz4.block.LZ4BlockError) as exc:
            raise VerifyError(f"chunk at {ref.uncompressed_offset}: cannot decompress: {exc}") from None
    else:
        data = raw
    if len(data) != ref.uncompressed_size:
        raise VerifyError(
            f"chunk at {ref.uncompressed_offset}: {len(data)} bytes, bootstrap says {ref.uncompressed_size}"
        )
    if blake3.blake3(data).digest() != ref.digest:
        raise VerifyError(f"chunk at {ref.uncompressed_offset}: blake3 digest mismatch")
    return data


def write_block_padded(fd: int, offset: int, data: bytes | memoryview, length: int) -> None:
    """Write `data` at `offset` as `length` bytes (a block multiple), zero padded, aligned."""
    buf = native.AlignedBuffer(length)  # zero-initialised: the padding is already there
    buf.write(data)
    native.write_aligned(fd, buf, offset, length)


@dataclass
class ObjectState:
    """Per kernel object (one anon fd): what was written, and jobs in flight."""

    anon_fd: int
    written: set[int] = field(default_factory=set)  # chunk uncompressed offsets
    jobs: dict[int, asyncio.Future[None]] = field(default_factory=dict)


class Filler:
    def __init__(self, executor: Executor, stats: dict[str, int]) -> None:
        self.executor = executor
        self.stats = stats

    async def fill_bootstrap(self, obj: BootstrapObject, state: ObjectState, offset: int, length: int) -> None:
        start = offset // BLOCK * BLOCK
        end = min(offset + length, obj.file_size)  # copy_range zero-pads the last block
        if end <= start:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._copy_bootstrap, obj, state.anon_fd, start, end - start)

    @staticmethod
    def _copy_bootstrap(obj: BootstrapObject, anon_fd: int, offset: int, length: int) -> None:
        with open(obj.path, "rb", buffering=0) as f:
            native.copy_range(f.fileno(), offset, anon_fd, offset, length)

    async def fill_blob(self, obj: BlobObject, state: ObjectState, offset: int, length: int) -> None:
        waits: list[asyncio.Future[None]] = []
        for span in obj.chunk_map.spans(offset, length):
            if span.chunk is None:
                waits.append(asyncio.ensure_future(self._write_zeros(state.anon_fd, span.offset, span.length)))
                continue
            key = span.chunk.uncompressed_offset
            if key in state.written:
                continue
            job = state.jobs.get(key)
            if job is None:
                job = asyncio.ensure_future(self._fetch_and_write(obj, state, span.chunk))
                state.jobs[key] = job
                job.add_done_callback(lambda _f, k=key: state.jobs.pop(k, None))
            else:
                self.stats["joined_chunks"] += 1
            waits.append(job)
        if waits:
            results = await asyncio.gather(*waits, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]

    async def _write_zeros(self, fd: int, offset: int, length: int) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self.executor, write_block_padded, fd, offset, b"", length
        )

    async def _fetch_and_write(self, obj: BlobObject, state: ObjectState, ref: ChunkRef) -> None:
        raw = await obj.source.read(obj.info.blob_id, ref.compressed_offset, ref.compressed_size)
        self.stats["fetched_chunks"] += 1
        self.stats["fetched_bytes"] += len(raw)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, self._decode_and_write, obj.info, ref, raw, state.anon_fd)
        except VerifyError:
            self.stats["verify_failures"] += 1
            raise
        state.written.add(ref.uncompressed_offset)

    @staticmethod
    def _decode_and_write(info: BlobInfo, ref: ChunkRef, raw: bytes, fd: int) -> None:
        data = decode_chunk(info, ref, raw)
        end = min(ref.uncompressed_offset + round_up(len(data)), info.uncompressed_size)
        write_block_padded(fd, ref.uncompressed_offset, data, end - ref.uncompressed_offset)
