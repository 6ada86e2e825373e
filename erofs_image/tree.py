"""The in-memory image model shared by the builder, the writer and the reader.

A tree of `Inode`s (a hard link is the same `Inode` object under two names), the blobs the
regular files' chunks live in, and the image-wide chunk size. Nothing here knows the on-disk
format: `writer` turns an `Image` into a bootstrap, `reader` turns a bootstrap back into one.
"""
from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import Iterator

# Compression algorithm names, as used on the command line and in BlobInfo.compressor.
COMPRESSORS = ("none", "lz4_block", "zstd")

@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a regular file: where its bytes live in which blob.

    `uncompressed_offset` is the chunk's address in the blob's uncompressed space (4 KiB
    aligned; the kernel reads `blkaddr * 4096` of the blob device). For an uncompressed blob
    `compressed_offset == uncompressed_offset` and the sizes are equal.
    """

    blob_index: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed_offset: int
    compressed_size: int
    compressed: bool
    digest: bytes  # blake3 of the uncompressed bytes, 32 bytes
    index: int = 0  # position in the blob's chunk-info table / bootstrap chunk table


@dataclass
class BlobInfo:
    """One data blob (one device slot, one cachefiles cookie)."""

    blob_id: str  # 64 hex chars: sha256 of the blob file = device tag
    compressor: str  # one of COMPRESSORS
    chunk_size: int
    chunk_count: int
    compressed_size: int  # bytes of chunk data in the blob file (before the chunk-info table)
    uncompressed_size: int  # size of the uncompressed address space, multiple of 4096
    ci_offset: int = 0  # chunk-info table inside the blob file
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    features: int = 0
    digest_algo: str = "blake3"


@dataclass(eq=False)
class Inode:
    """A file of any type. Identity (not equality) matters: hard links share one object."""

    mode: int  # full st_mode, type bits included
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)  # full names, e.g. b"user.a"
    size: int = 0  # regular files: data size; symlinks: len(target); dirs: set by the writer
    chunks: list[ChunkRef | None] = field(default_factory=list)  # regular files; None = hole
    target: bytes = b""  # symlinks
    rdev: int = 0  # char/block devices (os.makedev encoding)
    children: dict[bytes, Inode] = field(default_factory=dict)  # directories
    nid: int = 0  # filled by the writer / reader

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_device(self) -> bool:
        return stat.S_ISCHR(self.mode) or stat.S_ISBLK(self.mode)


@dataclass
class Image:
    root: Inode
    blobs: list[BlobInfo] = field(default_factory=list)
    chunk_size: int = 1 << 20
    prefetch: list[bytes] = field(default_factory=list)  # paths (b"/usr/bin/sh") read first
    build_time: int = 0


def walk(root: Inode, prefix: bytes = b"") -> Iterator[tuple[bytes, Inode]]:
    """Yield (path, inode) depth-first in byte order; the root is b"/"."""
    yield (prefix or b"/"), root
    for name in sorted(root.children):
        child = root.children[name]
        path = prefix + b"/" + name
        if child.is_dir:
            yield from walk(child, path)
        else:
            yield path, child


def lookup(root: Inode, path: bytes) -> Inode:
    """The inode at an absolute path (symlinks are not followed)."""
    node = root
    for part in path.strip(b"/").split(b"/"):
        if not part:
            continue
        if not node.is_dir or part not in node.children:
            raise FileNotFoundError(path.decode(errors="replace"))
        node = node.children[part]
    return node
