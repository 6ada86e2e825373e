"""What the daemon needs of a bootstrap to serve its blobs, without parsing its directory tree.

The daemon maps the kernel's blob offsets to chunks (which stored bytes, which digest); the
kernel walks the tree itself. So a bind reads the superblocks, the device table, the blob table
and the chunk table (and nothing else of the file: a bootstrap of millions of inodes costs a
few preads and a mapping of the chunk table), checks each the way `erofs_image.reader` checks them, and indexes the chunk table
in C (native.chunk_index: every entry checked, sorted by blob and offset, duplicates dropped,
overlaps refused). A chunk's `ChunkRef` is made when something asks for it.

A bootstrap without a chunk table (a plain EROFS image) has no digests to verify bytes against:
`BootstrapIndex.open` answers None and the caller parses the whole image instead.
"""
from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import native
from erofs_image import layout as L
from erofs_image import rafs as R
from erofs_image.reader import (MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, Bootstrap, BootstrapError, _valid_chunk_size,
                                check_superblock, opened_bootstrap, read_blob_table)
from erofs_image.tree import BlobInfo, ChunkRef

BS = L.BLOCK_SIZE
HEAD = 2 * BS  # the superblock's block and the extended superblock: all a bind reads at once


@dataclass
class BlobChunks:
    """One blob's chunks, in uncompressed offset order: their starts and sizes as arrays, each
    ChunkRef made on first use."""

    blob_index: int
    starts: array
    sizes: array
    _table: bytes | memoryview
    _order: array
    _mapping: native.MappedRange | None
    _first: int
    _made: dict[int, ChunkRef] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.starts)

    def ref(self, i: int) -> ChunkRef:
        found = self._made.get(i)
        if found is None:
            at = self._order[self._first + i] * R.CHUNK_INFO_SIZE
            digest, blob_index, flags, csize, usize, coff, uoff, _file, index, _ = R._CHUNK.unpack_from(self._table, at)
            found = self._made[i] = ChunkRef(blob_index, uoff, usize, coff, csize, bool(flags & R.CHUNK_FLAG_COMPRESSED),
                                             digest, index)
        return found


@dataclass
class BootstrapIndex:
    path: Path
    file_size: int
    blobs: list[BlobInfo]
    chunk_size: int
    prefetch_nids: list[int]
    chunks: list[BlobChunks]  # per blob, in blob-table order

    @classmethod
    def open(cls, path: Path) -> BootstrapIndex | None:
        """Read and check what serving needs; None when the bootstrap has no chunk table (the
        caller parses the whole image), BootstrapError (one line) when it is not usable."""
        path = Path(path)
        with opened_bootstrap(path) as (fd, st):
            try:
                return _index(cls, fd, st.st_size, path)
            except BootstrapError:
                raise
            except ValueError as e:
                raise BootstrapError(f"{path}: {e}") from e
            except (LookupError, struct.error, ArithmeticError, UnicodeError) as e:
                raise BootstrapError(f"{path}: corrupt bootstrap ({type(e).__name__}: {e})") from e
            except OSError as e:
                raise BootstrapError(f"{path}: cannot read: {e.strerror or e}") from None


def _index(cls: type[BootstrapIndex], fd: int, n: int, path: Path) -> BootstrapIndex | None:
    def err(msg: str) -> BootstrapError:
        return BootstrapError(f"{path}: {msg}")

    def region(off: int, size: int, what: str) -> bytes:
        if off < 0 or size < 0 or off + size > n:
            raise err(f"{what} at offset {off} (+{size} bytes) is past the end of the file ({n} bytes)")
        data = os.pread(fd, size, off)
        if len(data) != size:
            raise err(f"{what}: the file shrank while being read")
        return data

    head = os.pread(fd, HEAD, 0)
    sb = check_superblock(err, head, n)
    if not sb.feature_compat & L.FEATURE_COMPAT_RAFS_V6:
        return None  # plain EROFS: no chunk table, no digests
    if sb.dirblkbits:
        raise err(f"directory block size 2^{L.BLKSZ_BITS + sb.dirblkbits} unsupported (need 4096)")
    meta = sb.meta_blkaddr * BS
    if meta >= n:
        raise err(f"inode area at block {sb.meta_blkaddr} (offset {meta}) is past the end of the file ({n} bytes)")
    if meta + (sb.root_nid + 1) * L.ISLOT_SIZE > n:
        raise err(f"root inode nid {sb.root_nid} is past the end of the file ({n} bytes)")
    if len(head) < R.EXT_SUPER_OFFSET + R.EXT_SUPER_SIZE:
        raise err(f"truncated: {n} bytes is too short for the RAFS extended superblock")
    ext = R.RafsSuperExt.unpack(head)
    if ext.chunk_size and not _valid_chunk_size(ext.chunk_size):
        raise err(f"chunk size {ext.chunk_size} in the extended superblock is not a power of two "
                  f"in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    if not ext.chunk_table_size:
        return None
    _, blobs = read_blob_table(err, region, sb, ext)
    if ext.chunk_table_size % R.CHUNK_INFO_SIZE:
        raise err(f"chunk table size {ext.chunk_table_size} is not a multiple of {R.CHUNK_INFO_SIZE}")
    if ext.chunk_table_offset + ext.chunk_table_size > n:
        raise err(f"chunk table at offset {ext.chunk_table_offset} (+{ext.chunk_table_size} bytes) is past the "
                  f"end of the file ({n} bytes)")
    # mapped, not read: its pages are the page cache's (dropped under pressure, read again when
    # a chunk is first asked for), so a huge image costs the daemon its index arrays only; the
    # mapping holds no fd (a bound image keeps no bootstrap fd open)
    mapping = native.MappedRange(fd, ext.chunk_table_offset, ext.chunk_table_size)
    table = mapping.view
    try:
        index = native.chunk_index(table, [(b.uncompressed_size, b.compressed_size, b.chunk_size) for b in blobs])
    except ValueError as e:
        raise err(str(e)) from None
    mapping.drop_resident()  # checked: out of our RSS again (clean file pages)
    prefetch: list[int] = []
    if ext.prefetch_table_size:  # in bytes (nydus-image writes 4 * entries)
        entries = ext.prefetch_table_size // 4
        pt = region(ext.prefetch_table_offset, 4 * entries, "prefetch table")
        prefetch = list(dict.fromkeys(struct.unpack(f"<{entries}I", pt)))
    chunks = []
    for i in range(len(blobs)):
        first, last = index.blob_first[i], index.blob_first[i + 1]
        chunks.append(BlobChunks(i, index.starts[first:last], index.sizes[first:last], table, index.order,
                                 mapping, first))
    chunk_size = ext.chunk_size or (blobs[0].chunk_size if blobs else 0) or 1 << 20
    return cls(path, n, blobs, chunk_size, prefetch, chunks)


def open_served(path: Path) -> BootstrapIndex | Bootstrap:
    """What a daemon serves a bootstrap from: its index, or (no chunk table) the whole image
    parsed. BootstrapError (one line) when it is not usable."""
    index = BootstrapIndex.open(path)
    return index if index is not None else Bootstrap.open(path)
