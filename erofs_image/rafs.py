"""RAFS v6 (nydus) additions to EROFS: extended superblock, blob table, bootstrap chunk table,
and the blob-side chunk-info (compression context) table with its 4 KiB header.

Layouts follow nydus (rafs/src/metadata/layout/v6.rs, storage/src/meta/). No I/O here.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from erofs_image.tree import BlobInfo

EXT_SUPER_OFFSET = 1152
EXT_SUPER_SIZE = 256
DEVT_SLOTOFF = 11  # device table at 11 * 128 = 1408
DEVICE_TABLE_OFFSET = DEVT_SLOTOFF * 128
BLOB_ENTRY_SIZE = 256
CHUNK_INFO_SIZE = 80  # RafsV5ChunkInfo in the bootstrap chunk table
CI_V1_SIZE = 16
CI_HEADER_SIZE = 4096
CI_MAGIC = 0xB10BB10B
MAX_BLOBS = 255  # device_id low byte = blob_index + 1

# ext superblock flags (RafsSuperFlags)
FLAG_COMPRESSION_NONE = 0x1
FLAG_COMPRESSION_LZ4 = 0x2
FLAG_HASH_BLAKE3 = 0x4
FLAG_HASH_SHA256 = 0x8
FLAG_EXPLICIT_UID_GID = 0x10
FLAG_HAS_XATTR = 0x20
FLAG_COMPRESSION_GZIP = 0x40
FLAG_COMPRESSION_ZSTD = 0x80
FLAG_INLINED_CHUNK_DIGEST = 0x100

# blob features (BlobFeatures)
BLOB_FEATURE_ALIGNED = 0x1
BLOB_FEATURE_INLINED_FS_META = 0x2
BLOB_FEATURE_CHUNK_INFO_V2 = 0x4
BLOB_FEATURE_ZRAN = 0x8
BLOB_FEATURE_SEPARATE = 0x10
BLOB_FEATURE_INLINED_CHUNK_DIGEST = 0x20
BLOB_FEATURE_HAS_TAR_HEADER = 0x10000000
BLOB_FEATURE_HAS_TOC = 0x20000000
BLOB_FEATURE_CAP_TAR_TOC = 0x40000000

# chunk flags (BlobChunkFlags)
CHUNK_FLAG_COMPRESSED = 0x1

COMPRESSOR_IDS = {"none": 0, "lz4_block": 1, "gzip": 2, "zstd": 3}
COMPRESSOR_NAMES = {v: k for k, v in COMPRESSOR_IDS.items()}
DIGEST_IDS = {"blake3": 0, "sha256": 1}
DIGEST_NAMES = {v: k for k, v in DIGEST_IDS.items()}
COMPRESSION_FLAGS = {"none": FLAG_COMPRESSION_NONE, "lz4_block": FLAG_COMPRESSION_LZ4,
                     "gzip": FLAG_COMPRESSION_GZIP, "zstd": FLAG_COMPRESSION_ZSTD}


def compressor_id(name: str) -> int:
    try:
        return COMPRESSOR_IDS[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}") from None


def compressor_name(algo: int) -> str:
    try:
        return COMPRESSOR_NAMES[algo]
    except KeyError:
        raise ValueError(f"unknown compression algorithm id {algo}") from None


# ---------------------------------------------------------------------------- ext superblock
_EXT = struct.Struct("<QQIIQQQII200x")
assert _EXT.size == EXT_SUPER_SIZE


@dataclass
class RafsSuperExt:
    flags: int = 0
    blob_table_offset: int = 0
    blob_table_size: int = 0
    chunk_size: int = 0
    chunk_table_offset: int = 0
    chunk_table_size: int = 0
    prefetch_table_offset: int = 0
    prefetch_table_size: int = 0

    def pack(self) -> bytes:
        return _EXT.pack(self.flags, self.blob_table_offset, self.blob_table_size, self.chunk_size,
                         self.chunk_table_offset, self.chunk_table_size,
                         self.prefetch_table_offset, self.prefetch_table_size, 0)

    @classmethod
    def unpack(cls, buf: bytes, off: int = EXT_SUPER_OFFSET) -> RafsSuperExt:
        vals = _EXT.unpack_from(buf, off)
        return cls(*vals[:8])


# ---------------------------------------------------------------------------- blob table
# blob_id[64] index chunk_size chunk_count compression digest features | compressed_size
# uncompressed_size | toc_size ci_compressor | ci_offset ci_compressed_size ci_uncompressed_size
# | toc_digest[32] meta_digest[32] meta_size | reserved / cipher fields
_BLOB = struct.Struct("<64sIIIIIIQQIIQQQ32s32sQ48x")
assert _BLOB.size == BLOB_ENTRY_SIZE


@dataclass
class BlobTableEntry:
    blob_id: str
    blob_index: int
    chunk_size: int
    chunk_count: int
    compression_algo: int
    digest_algo: int
    features: int
    compressed_size: int
    uncompressed_size: int
    blob_toc_size: int = 0
    ci_compressor: int = 0
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    blob_toc_digest: bytes = bytes(32)
    blob_meta_digest: bytes = bytes(32)
    blob_meta_size: int = 0

    def pack(self) -> bytes:
        bid = self.blob_id.encode()
        if len(bid) > 64:
            raise ValueError(f"blob id {self.blob_id!r} longer than 64 bytes")
        return _BLOB.pack(bid, self.blob_index, self.chunk_size, self.chunk_count,
                          self.compression_algo, self.digest_algo, self.features,
                          self.compressed_size, self.uncompressed_size, self.blob_toc_size,
                          self.ci_compressor, self.ci_offset, self.ci_compressed_size,
                          self.ci_uncompressed_size, self.blob_toc_digest,
                          self.blob_meta_digest, self.blob_meta_size)

    @classmethod
    def unpack(cls, buf: bytes, off: int = 0) -> BlobTableEntry:
        v = list(_BLOB.unpack_from(buf, off))
        v[0] = v[0].rstrip(b"\0").decode("ascii", errors="replace")
        return cls(*v)

    @classmethod
    def from_blob(cls, blob: BlobInfo, index: int) -> BlobTableEntry:
        return cls(blob.blob_id, index, blob.chunk_size, blob.chunk_count,
                   compressor_id(blob.compressor), DIGEST_IDS[blob.digest_algo], blob.features,
                   blob.compressed_size, blob.uncompressed_size, 0, 0, blob.ci_offset,
                   blob.ci_compressed_size, blob.ci_uncompressed_size)

    def to_blob(self) -> BlobInfo:
        return BlobInfo(
            blob_id=self.blob_id, compressor=compressor_name(self.compression_algo),
            chunk_size=self.chunk_size, chunk_count=self.chunk_count,
            compressed_size=self.compressed_size, uncompressed_size=self.uncompressed_size,
            ci_offset=self.ci_offset, ci_compressed_size=self.ci_compressed_size,
            ci_uncompressed_size=self.ci_uncompressed_size, features=self.features,
            digest_algo=DIGEST_NAMES.get(self.digest_algo, str(self.digest_algo)))


# ---------------------------------------------------------------------------- chunk table
_CHUNK = struct.Struct("<32sIIIIQQQII")
assert _CHUNK.size == CHUNK_INFO_SIZE


@dataclass
class ChunkInfo:
    """RafsV5ChunkInfo: one entry of the bootstrap chunk table (80 bytes)."""

    digest: bytes
    blob_index: int
    flags: int
    compressed_size: int
    uncompressed_size: int
    compressed_offset: int
    uncompressed_offset: int
    file_offset: int
    index: int  # the chunk's position in its blob's chunk-info table

    @property
    def compressed(self) -> bool:
        return bool(self.flags & CHUNK_FLAG_COMPRESSED)

    def pack(self) -> bytes:
        return _CHUNK.pack(self.digest, self.blob_index, self.flags, self.compressed_size,
                           self.uncompressed_size, self.compressed_offset,
                           self.uncompressed_offset, self.file_offset, self.index, 0)

    @classmethod
    def unpack(cls, buf: bytes, off: int = 0) -> ChunkInfo:
        return cls(*_CHUNK.unpack_from(buf, off)[:9])


def unpack_chunk_table(buf: bytes) -> list[ChunkInfo]:
    if len(buf) % CHUNK_INFO_SIZE:
        raise ValueError(f"chunk table size {len(buf)} is not a multiple of {CHUNK_INFO_SIZE}")
    return [ChunkInfo.unpack(buf, o) for o in range(0, len(buf), CHUNK_INFO_SIZE)]


# ---------------------------------------------------------------------------- blob ci table (v1)
_CI = struct.Struct("<QQ")
_MAX_CI_SIZE = 1 << 24
_MAX_COMP_OFFSET = (1 << 40) - 1
_MAX_UNCOMP_OFFSET = 0xFFF_FFFF_F000


@dataclass(frozen=True)
class BlobChunkEntry:
    """One v1 chunk-info entry of a data blob."""

    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int

    @property
    def compressed(self) -> bool:
        return self.compressed_size != self.uncompressed_size

    def pack(self) -> bytes:
        cs, us = self.compressed_size - 1, self.uncompressed_size - 1
        if not (0 <= cs < _MAX_CI_SIZE and 0 <= us < _MAX_CI_SIZE):
            raise ValueError("chunk size does not fit a v1 chunk-info entry (max 16 MiB)")
        if self.compressed_offset > _MAX_COMP_OFFSET:
            raise ValueError("compressed offset too large for a v1 chunk-info entry")
        if self.uncompressed_offset & ~_MAX_UNCOMP_OFFSET:
            raise ValueError("uncompressed offset unaligned or too large for v1 chunk-info")
        comp = self.compressed_offset | ((cs & 0xF_FFFF) << 44) | ((cs >> 20) << 40)
        uncomp = self.uncompressed_offset | ((us & 0xF_FFFF) << 44) | ((us >> 20) << 8)
        return _CI.pack(uncomp, comp)

    @classmethod
    def unpack(cls, buf: bytes, off: int = 0) -> BlobChunkEntry:
        uncomp, comp = _CI.unpack_from(buf, off)
        return cls(
            compressed_offset=comp & 0xFF_FFFF_FFFF,
            compressed_size=((comp >> 44) | ((comp & 0xF00_0000_0000) >> 20)) + 1,
            uncompressed_offset=uncomp & _MAX_UNCOMP_OFFSET,
            uncompressed_size=((uncomp >> 44) | ((uncomp & 0xF00) << 12)) + 1,
        )


def unpack_ci_table(buf: bytes) -> list[BlobChunkEntry]:
    if len(buf) % CI_V1_SIZE:
        raise ValueError(f"chunk-info table size {len(buf)} is not a multiple of 16")
    return [BlobChunkEntry.unpack(buf, o) for o in range(0, len(buf), CI_V1_SIZE)]


# magic features ci_compressor ci_entries ci_offset ci_compressed ci_uncompressed zran_offset
# zran_size zran_count ... magic2 (BlobCompressionContextHeader)
_CIH = struct.Struct("<IIIIQQQQQI")


@dataclass
class BlobMetaHeader:
    features: int
    ci_compressor: int
    ci_entries: int
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    zran_offset: int = 0
    zran_size: int = 0
    zran_count: int = 0

    def pack(self) -> bytes:
        buf = bytearray(CI_HEADER_SIZE)
        _CIH.pack_into(buf, 0, CI_MAGIC, self.features, self.ci_compressor, self.ci_entries,
                       self.ci_offset, self.ci_compressed_size, self.ci_uncompressed_size,
                       self.zran_offset, self.zran_size, self.zran_count)
        struct.pack_into("<I", buf, CI_HEADER_SIZE - 4, CI_MAGIC)
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes, off: int = 0) -> BlobMetaHeader:
        if len(buf) - off < CI_HEADER_SIZE:
            raise ValueError("blob meta header truncated")
        v = _CIH.unpack_from(buf, off)
        (magic2,) = struct.unpack_from("<I", buf, off + CI_HEADER_SIZE - 4)
        if v[0] != CI_MAGIC or magic2 != CI_MAGIC:
            raise ValueError(f"bad blob meta header magic {v[0]:#x}/{magic2:#x}")
        return cls(*v[1:])
