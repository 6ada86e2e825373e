"""ChunkStore: cut file data into chunks, dedup them by blake3 and write nydus data blobs.

Blob file layout (as nydus): chunk data, then the v1 chunk-info table (uncompressed), then the
4 KiB compression-context header (magic 0xb10bb10b at both ends). Uncompressed blobs put each
chunk at its 4 KiB aligned uncompressed offset, so the blob file is the device image the kernel
reads at blkaddr * 4096; compressed blobs pack chunks back to back. The file is written to a
temporary name and renamed to the sha256 hex of its bytes (the blob id) by `finish_blob`.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import blake3
import lz4.block
import zstandard

from erofs_image.layout import BLOCK_SIZE
from erofs_image.rafs import BLOB_FEATURE_ALIGNED, BlobChunkEntry, BlobMetaHeader
from erofs_image.tree import COMPRESSORS, BlobInfo, ChunkRef

MAX_CHUNK_SIZE = 1 << 24  # v1 chunk-info entries hold 24-bit sizes
MAX_CHUNKS_PER_BLOB = 1 << 24  # chunk index: 16 bits in advise + 8 in device_id's high byte
ZSTD_LEVEL = 3


def _align(n: int, a: int = BLOCK_SIZE) -> int:
    return (n + a - 1) // a * a


def compress(compressor: str, data: bytes) -> bytes:
    if compressor == "zstd":
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    if compressor == "lz4_block":
        return lz4.block.compress(data, store_size=False)
    if compressor == "none":
        return data
    raise ValueError(f"unknown compressor {compressor!r}")


def decompress(compressor: str, data: bytes | memoryview, size: int) -> bytes:
    if compressor == "zstd":
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    if compressor == "lz4_block":
        return lz4.block.decompress(data, uncompressed_size=size)
    if compressor == "none":
        return bytes(data)  # no copy when it is bytes already
    raise ValueError(f"unknown compressor {compressor!r}")


@dataclass
class ChunkStats:
    chunks: int = 0  # chunks seen (holes excluded)
    deduped: int = 0  # of which already stored
    holes: int = 0
    bytes: int = 0  # uncompressed bytes seen (holes excluded)
    stored_bytes: int = 0  # bytes written as chunk data


class _OpenBlob:
    def __init__(self, blobs_dir: Path, index: int) -> None:
        fd, name = tempfile.mkstemp(prefix=".blob-", dir=blobs_dir)
        self.path = Path(name)
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self.sha = hashlib.sha256()
        self.index = index
        self.pos = 0  # bytes written to the file
        self.uncompressed_end = 0  # next 4 KiB aligned uncompressed offset
        self.entries: list[bytes] = []  # packed v1 ci entries (16 B each)

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.pos += len(data)

    def pad_to(self, offset: int) -> None:
        if offset > self.pos:
            self.write(bytes(offset - self.pos))


class ChunkStore:
    def __init__(self, blobs_dir: Path, chunk_size: int = 1 << 20, compressor: str = "zstd") -> None:
        if chunk_size < BLOCK_SIZE or chunk_size & (chunk_size - 1) or chunk_size > MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size {chunk_size} must be a power of two in [4 KiB, 16 MiB]")
        if compressor not in COMPRESSORS:
            raise ValueError(f"unknown compressor {compressor!r}; choose one of {COMPRESSORS}")
        self.blobs_dir = Path(blobs_dir)
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.chunk_size = chunk_size
        self.compressor = compressor
        self.blobs: list[BlobInfo] = []
        self.stats = ChunkStats()
        self._dedup: dict[bytes, ChunkRef] = {}
        self._open: _OpenBlob | None = None
        self._written: list[Path] = []
        if compressor == "zstd":
            self._zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)

    # -- blobs
    def start_blob(self) -> None:
        """Subsequent new chunks go to a new blob (finishing the current one, if any)."""
        if self._open is not None:
            self.finish_blob()

    def _blob(self) -> _OpenBlob:
        if self._open is None:
            self._open = _OpenBlob(self.blobs_dir, len(self.blobs))
        return self._open

    def finish_blob(self) -> BlobInfo | None:
        ob, self._open = self._open, None
        if ob is None:
            return None
        if not ob.entries:
            ob.file.close()
            ob.path.unlink(missing_ok=True)
            return None
        try:
            if self.compressor == "none":
                ob.pad_to(ob.uncompressed_end)  # the blob is the device image: whole blocks
            data_end = ob.pos
            ci = b"".join(ob.entries)
            ob.write(ci)
            header = BlobMetaHeader(features=BLOB_FEATURE_ALIGNED, ci_compressor=0,
                                    ci_entries=len(ob.entries), ci_offset=data_end,
                                    ci_compressed_size=len(ci), ci_uncompressed_size=len(ci))
            ob.write(header.pack())
            ob.file.flush()
            os.fsync(ob.file.fileno())
            ob.file.close()
            blob_id = ob.sha.hexdigest()
            final = self.blobs_dir / blob_id
            os.replace(ob.path, final)
            os.chmod(final, 0o644)
        except BaseException:
            ob.file.close()
            ob.path.unlink(missing_ok=True)
            raise
        self._written.append(final)
        info = BlobInfo(blob_id=blob_id, compressor=self.compressor, chunk_size=self.chunk_size,
                        chunk_count=len(ob.entries), compressed_size=data_end,
                        uncompressed_size=ob.uncompressed_end, ci_offset=data_end,
                        ci_compressed_size=len(ci), ci_uncompressed_size=len(ci),
                        features=BLOB_FEATURE_ALIGNED)
        self.blobs.append(info)
        return info

    # -- chunks
    def add_chunk(self, data: bytes) -> ChunkRef:
        if not data or len(data) > self.chunk_size:
            raise ValueError(f"chunk of {len(data)} bytes (chunk size {self.chunk_size})")
        digest = blake3.blake3(data).digest()
        self.stats.chunks += 1
        self.stats.bytes += len(data)
        ref = self._dedup.get(digest)
        if ref is not None:
            self.stats.deduped += 1
            return ref
        ob = self._blob()
        if len(ob.entries) >= MAX_CHUNKS_PER_BLOB:
            self.finish_blob()
            ob = self._blob()
        if ob.index >= 255:
            raise ValueError("more than 255 blobs: the device table cannot hold them")
        uoff = ob.uncompressed_end
        if self.compressor == "none":
            stored, compressed = data, False
            ob.pad_to(uoff)
        else:
            packed = self._zc.compress(data) if self.compressor == "zstd" else compress(self.compressor, data)
            if len(packed) < len(data):
                stored, compressed = packed, True
            else:
                stored, compressed = data, False
        coff = ob.pos
        ob.write(stored)
        ob.uncompressed_end = _align(uoff + len(data))
        ref = ChunkRef(blob_index=ob.index, uncompressed_offset=uoff, uncompressed_size=len(data),
                       compressed_offset=coff, compressed_size=len(stored), compressed=compressed,
                       digest=digest, index=len(ob.entries))
        ob.entries.append(BlobChunkEntry(coff, len(stored), uoff, len(data)).pack())
        self.stats.stored_bytes += len(stored)
        self._dedup[digest] = ref
        return ref

    def add_stream(self, read: Callable[[int], bytes], size: int) -> list[ChunkRef | None]:
        refs: list[ChunkRef | None] = []
        left = size
        while left > 0:
            want = min(self.chunk_size, left)
            data = read(want)
            if len(data) < want:
                parts = [data]
                got = len(data)
                while got < want:
                    more = read(want - got)
                    if not more:
                        raise ValueError(f"stream ended {left - got} bytes early (expected {size})")
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
            if data.count(0) == len(data):
                refs.append(None)
                self.stats.holes += 1
            else:
                refs.append(self.add_chunk(data))
            left -= want
        return refs

    def abort(self) -> None:
        """Remove everything this store wrote (finished blobs and the open temp file)."""
        ob, self._open = self._open, None
        if ob is not None:
            ob.file.close()
            ob.path.unlink(missing_ok=True)
        for p in self._written:
            p.unlink(missing_ok=True)
        self._written.clear()
        self.blobs.clear()
        self._dedup.clear()
