"""Read a RAFS v6 bootstrap back into an `Image`, and read verified file data from blobs.

Reads our own bootstraps and nydus-built ones. Chunk indexes are resolved through the
bootstrap chunk table by (blob index, chunk index), the chunk index being nydus's split
encoding (bits 0-15 in `advise`, bits 16-23 in the high byte of `device_id`).

A bootstrap is untrusted input: `Bootstrap.open` / `Bootstrap.parse` either return a fully
parsed, internally consistent image or raise `BootstrapError` (one line: the path and what is
wrong). Every offset is checked against the file before it is read, every count against what
the file can hold before anything is allocated, and the tree walk is iterative and visits each
inode once (a directory reachable twice is an error), so time and memory stay proportional to
the file's size.
"""
from __future__ import annotations

import os
import re
import stat
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import blake3

from erofs_image import layout as L
from erofs_image import rafs as R
from erofs_image.chunks import decompress
from erofs_image.tree import BlobInfo, ChunkRef, Image, Inode

BS = L.BLOCK_SIZE

# Limits of what a bootstrap may claim (each is a format limit or far beyond any real image).
MAX_BOOTSTRAP_SIZE = 1 << 32  # bytes of bootstrap read into memory
MIN_CHUNK_SIZE = BS
MAX_CHUNK_SIZE = 16 << 20  # nydus and our CLI: 4 KiB .. 16 MiB; v1 chunk-info sizes are 24 bits
MAX_BLOB_SIZE = 1 << 44  # 2^32 blocks of 4 KiB: a device slot's u32 block count
MAX_CHUNKS_PER_BLOB = 1 << 24  # chunk indexes are 24 bits (advise + device_id's high byte)
MAX_PREFETCH_PATH_BYTES = 64 << 20  # the prefetch table's paths, all together
_BLOB_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used as a file name: no "/", no ".."
_FILE_TYPES = {stat.S_IFREG: "regular file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink",
               stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFIFO: "FIFO",
               stat.S_IFSOCK: "socket"}


class BootstrapError(ValueError):
    """The bootstrap is not a readable RAFS v6 / EROFS image (message: path and reason)."""


class BootstrapNotFoundError(BootstrapError, FileNotFoundError):
    """The bootstrap path does not exist (also a FileNotFoundError, for callers that ask)."""


class ChunkVerifyError(ValueError):
    """Chunk bytes in a blob do not match the digest recorded in the bootstrap."""


def _file_type(mode: int) -> str:
    return _FILE_TYPES.get(stat.S_IFMT(mode), f"file type {stat.S_IFMT(mode):#o}")


@contextmanager
def opened_bootstrap(path: Path) -> Iterator[tuple[int, os.stat_result]]:
    """A bootstrap file opened for reading, (its fd, its fstat), closed on exit: refusing
    anything but a regular file without opening it first (a FIFO would block, a device could be
    huge or have side effects on open), and anything over MAX_BOOTSTRAP_SIZE."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BootstrapNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        raise BootstrapError(f"{path}: cannot stat: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BootstrapError(f"{path}: not a regular file ({_file_type(st.st_mode)})")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise BootstrapNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        raise BootstrapError(f"{path}: cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)  # the file opened may not be the one stat()ed
        if not stat.S_ISREG(st.st_mode):
            raise BootstrapError(f"{path}: not a regular file ({_file_type(st.st_mode)})")
        if st.st_size > MAX_BOOTSTRAP_SIZE:
            raise BootstrapError(f"{path}: {st.st_size} bytes is too large for a bootstrap "
                                 f"(at most {MAX_BOOTSTRAP_SIZE})")
        yield fd, st
    finally:
        os.close(fd)


def read_bootstrap_file(path: Path) -> bytes:
    """The bytes of a bootstrap file (opened_bootstrap's checks)."""
    with opened_bootstrap(path) as (fd, st):
        try:
            parts = []
            left = MAX_BOOTSTRAP_SIZE + 1
            step = min(max(st.st_size + 1, 1 << 16), 1 << 24)  # os.read allocates what it is asked
            while left > 0:
                part = os.read(fd, min(left, step))
                if not part:
                    break
                parts.append(part)
                left -= len(part)
        except OSError as e:
            raise BootstrapError(f"{path}: cannot read: {e.strerror or e}") from None
        if left <= 0:
            raise BootstrapError(f"{path}: grew past {MAX_BOOTSTRAP_SIZE} bytes while being read")
        return b"".join(parts)


@dataclass
class Bootstrap:
    path: Path
    superblock: L.Superblock
    ext: R.RafsSuperExt
    image: Image
    blobs: list[BlobInfo]
    devices: list[L.DeviceSlot]
    chunk_table: list[R.ChunkInfo] = field(default_factory=list)
    prefetch_nids: list[int] = field(default_factory=list)

    @property
    def chunk_size(self) -> int:
        return self.image.chunk_size

    # ------------------------------------------------------------------ parsing
    @classmethod
    def open(cls, path: Path) -> Bootstrap:
        """Read and validate a bootstrap file; BootstrapError (one line) if it is not one."""
        path = Path(path)
        return cls.parse(read_bootstrap_file(path), path)

    @classmethod
    def parse(cls, data: bytes, path: Path = Path("<memory>")) -> Bootstrap:
        if not isinstance(data, bytes):
            data = bytes(data)
        try:
            return _parse(cls, data, path)
        except BootstrapError:
            raise
        except ValueError as e:  # a layout / rafs helper's own check
            raise BootstrapError(f"{path}: {e}") from e
        except (LookupError, struct.error, ArithmeticError, UnicodeError, RecursionError,
                MemoryError) as e:  # a check missing here: still one error type for callers
            raise BootstrapError(f"{path}: corrupt bootstrap ({type(e).__name__}: {e})") from e

    # ------------------------------------------------------------------ data
    def read_chunk(self, ref: ChunkRef, blob_file: Path) -> bytes:
        """The chunk's uncompressed bytes, verified against its blake3 digest."""
        blob = self.blobs[ref.blob_index]
        with open(blob_file, "rb") as f:
            f.seek(ref.compressed_offset)
            raw = f.read(ref.compressed_size)
        if len(raw) != ref.compressed_size:
            raise ChunkVerifyError(f"blob {blob_file}: chunk at {ref.compressed_offset} truncated")
        return verify_chunk(ref, blob.compressor, raw, f"blob {blob_file}: ")

    def read_file(self, inode: Inode, blobs_dir: Path) -> bytes:
        """A regular file's content: chunks concatenated, holes zero-filled, cut to size."""
        if not inode.is_reg:
            raise ValueError("read_file needs a regular file")
        cs = self.image.chunk_size
        parts = []
        for i, ref in enumerate(inode.chunks):
            want = min(cs, inode.size - i * cs)
            if ref is None:
                parts.append(bytes(want))
                continue
            data = self.read_chunk(ref, Path(blobs_dir) / self.blobs[ref.blob_index].blob_id)
            parts.append(data[:want].ljust(want, b"\0"))
        return b"".join(parts)


def _valid_chunk_size(cs: int) -> bool:
    return MIN_CHUNK_SIZE <= cs <= MAX_CHUNK_SIZE and cs & (cs - 1) == 0


def _parse(cls: type[Bootstrap], data: bytes, path: Path) -> Bootstrap:
    n = len(data)

    def err(msg: str) -> BootstrapError:
        return BootstrapError(f"{path}: {msg}")

    sb = check_superblock(err, data[:BS], n)
    rafs = bool(sb.feature_compat & L.FEATURE_COMPAT_RAFS_V6)
    if sb.blocks and not rafs and n < sb.blocks * BS:
        raise err(f"truncated: {n} bytes, superblock says {sb.blocks} blocks")
    if sb.dirblkbits:
        raise err(f"directory block size 2^{L.BLKSZ_BITS + sb.dirblkbits} unsupported (need 4096)")
    meta = sb.meta_blkaddr * BS
    if meta >= n:
        raise err(f"inode area at block {sb.meta_blkaddr} (offset {meta}) is past the end of the file ({n} bytes)")
    if meta + (sb.root_nid + 1) * L.ISLOT_SIZE > n:
        raise err(f"root inode nid {sb.root_nid} is past the end of the file ({n} bytes)")
    if sb.xattr_blkaddr and sb.xattr_blkaddr * BS >= n:
        raise err(f"shared xattr area at block {sb.xattr_blkaddr} is past the end of the file ({n} bytes)")
    max_inodes = (n - meta) // L.ISLOT_SIZE
    if sb.inos > max_inodes:
        raise err(f"superblock claims {sb.inos} inodes, the inode area holds at most {max_inodes}")
    ext = R.RafsSuperExt.unpack(data) if rafs else R.RafsSuperExt()
    if ext.chunk_size and not _valid_chunk_size(ext.chunk_size):
        raise err(f"chunk size {ext.chunk_size} in the extended superblock is not a power of two "
                  f"in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")

    def region(off: int, size: int, what: str) -> bytes:
        if off + size > n:
            raise err(f"{what} at offset {off} (+{size} bytes) is past the end of the file ({n} bytes)")
        return data[off:off + size]

    devices, blobs = read_blob_table(err, region, sb, ext)
    chunk_table: list[R.ChunkInfo] = []
    if ext.chunk_table_size:
        if ext.chunk_table_size % R.CHUNK_INFO_SIZE:
            raise err(f"chunk table size {ext.chunk_table_size} is not a multiple of {R.CHUNK_INFO_SIZE}")
        raw = region(ext.chunk_table_offset, ext.chunk_table_size, "chunk table")
        chunk_table = R.unpack_chunk_table(raw)
        for i, ci in enumerate(chunk_table):
            _check_chunk_info(err, i, ci, blobs)
    prefetch: list[int] = []
    if ext.prefetch_table_size:  # in bytes (nydus-image writes 4 * entries)
        entries = ext.prefetch_table_size // 4
        pt = region(ext.prefetch_table_offset, 4 * entries, "prefetch table")
        prefetch = list(dict.fromkeys(struct.unpack(f"<{entries}I", pt)))  # unique, in order
    parser = _TreeParser(data, sb, chunk_table, blobs, path)
    root = parser.parse_root()
    chunk_size = ext.chunk_size or (blobs[0].chunk_size if blobs else 0) or parser.chunk_size or 1 << 20
    image = Image(root=root, blobs=blobs, chunk_size=chunk_size, build_time=sb.build_time)
    image.prefetch = parser.prefetch_paths(prefetch)
    return cls(path, sb, ext, image, blobs, devices, chunk_table, prefetch)


def check_superblock(err: Callable[[str], BootstrapError], head: bytes, n: int) -> L.Superblock:
    """The EROFS superblock of a file of `n` bytes whose first block (or less) is `head`: its
    magic, block size, incompat features and checksum (where it has one) checked."""
    if len(head) < L.SUPER_OFFSET + L.SUPER_SIZE:
        raise err(f"truncated: {n} bytes is too short for an EROFS superblock")
    sb = L.Superblock.unpack(head[L.SUPER_OFFSET:L.SUPER_OFFSET + L.SUPER_SIZE])
    if sb.magic != L.EROFS_MAGIC:
        raise err(f"bad superblock magic {sb.magic:#x} (not an EROFS image)")
    if sb.blkszbits != L.BLKSZ_BITS:
        raise err(f"block size 2^{sb.blkszbits} unsupported (need 4096)")
    unknown = sb.feature_incompat & ~L.SUPPORTED_INCOMPAT
    if unknown:
        raise err(f"unknown incompat features {unknown:#x}")
    if n < BS:
        raise err(f"truncated: {n} bytes, block 0 incomplete")
    if sb.feature_compat & L.FEATURE_COMPAT_SB_CHKSUM:
        want = L.superblock_checksum(head[:BS])
        if want != sb.checksum:
            raise err(f"superblock checksum {sb.checksum:#x} != {want:#x}")
    return sb


def read_blob_table(err: Callable[[str], BootstrapError], region: Callable[[int, int, str], bytes],
                    sb: L.Superblock, ext: R.RafsSuperExt) -> tuple[list[L.DeviceSlot], list[BlobInfo]]:
    """The device table and the blob table (checked against the devices' tags), or for plain
    EROFS with a device table and no blob table, the devices as blobs (only their tags known)."""
    devices = []
    if sb.extra_devices:
        devt = region(sb.devt_slotoff * 128, L.DEVICE_SLOT_SIZE * sb.extra_devices,
                      f"device table ({sb.extra_devices} slots)")
        devices = [L.DeviceSlot.unpack(devt, i * L.DEVICE_SLOT_SIZE) for i in range(sb.extra_devices)]
    blobs: list[BlobInfo] = []
    if ext.blob_table_size:
        if ext.blob_table_size % R.BLOB_ENTRY_SIZE:
            raise err(f"blob table size {ext.blob_table_size} is not a multiple of {R.BLOB_ENTRY_SIZE}")
        count = ext.blob_table_size // R.BLOB_ENTRY_SIZE
        if count > R.MAX_BLOBS:
            raise err(f"blob table claims {count} blobs (at most {R.MAX_BLOBS})")
        bt = region(ext.blob_table_offset, ext.blob_table_size, "blob table")
        blobs = [_blob_entry(err, bt, i) for i in range(count)]
        if devices and len(devices) != len(blobs):
            raise err(f"device table has {len(devices)} slots but the blob table {len(blobs)} entries")
        for i, (dev, blob) in enumerate(zip(devices, blobs)):
            if dev.tag != blob.blob_id.encode():
                raise err(f"device slot {i} tag {dev.tag[:64]!r} differs from blob {i} id {blob.blob_id!r}")
    elif devices:  # plain EROFS with a device table: only the tags are known
        if len(devices) > R.MAX_BLOBS:
            raise err(f"device table claims {len(devices)} devices (at most {R.MAX_BLOBS})")
        for i, d in enumerate(devices):
            if not _BLOB_ID.fullmatch(d.tag):
                raise err(f"device slot {i}: tag {d.tag[:64]!r} is not a usable blob id")
        blobs = [BlobInfo(d.tag.decode("ascii"), "none", 0, 0, 0, d.blocks * BS) for d in devices]
    return devices, blobs


def _blob_entry(err, table: bytes, i: int) -> BlobInfo:
    e = R.BlobTableEntry.unpack(table, i * R.BLOB_ENTRY_SIZE)
    raw_id = table[i * R.BLOB_ENTRY_SIZE:i * R.BLOB_ENTRY_SIZE + 64].rstrip(b"\0")
    if not _BLOB_ID.fullmatch(raw_id):
        raise err(f"blob {i}: id {raw_id!r} is not a usable blob id")
    what = f"blob {i} ({e.blob_id[:16]}...)"
    if e.compression_algo not in R.COMPRESSOR_NAMES:
        raise err(f"{what}: unknown compression algorithm id {e.compression_algo}")
    if not _valid_chunk_size(e.chunk_size):
        raise err(f"{what}: chunk size {e.chunk_size} is not a power of two in "
                  f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    if e.uncompressed_size > MAX_BLOB_SIZE:
        raise err(f"{what}: impossible uncompressed size {e.uncompressed_size}")
    if e.compressed_size > MAX_BLOB_SIZE:
        raise err(f"{what}: impossible compressed size {e.compressed_size}")
    if e.chunk_count > MAX_CHUNKS_PER_BLOB or e.chunk_count > -(-e.uncompressed_size // BS):
        raise err(f"{what}: impossible chunk count {e.chunk_count} for {e.uncompressed_size} "
                  "uncompressed bytes")
    if e.ci_offset > MAX_BLOB_SIZE or e.ci_compressed_size > MAX_BLOB_SIZE or e.ci_uncompressed_size > MAX_BLOB_SIZE:
        raise err(f"{what}: impossible chunk-info table offset/size "
                  f"{e.ci_offset}/{e.ci_compressed_size}/{e.ci_uncompressed_size}")
    return e.to_blob()


def _check_chunk_info(err, i: int, ci: R.ChunkInfo, blobs: list[BlobInfo]) -> None:
    what = f"chunk table entry {i}"
    if not 0 <= ci.blob_index < len(blobs):
        raise err(f"{what}: blob index {ci.blob_index} past the blob table ({len(blobs)} blobs)")
    blob = blobs[ci.blob_index]
    if ci.index >= MAX_CHUNKS_PER_BLOB:
        raise err(f"{what}: chunk index {ci.index} does not fit 24 bits")
    limit = blob.chunk_size or MAX_CHUNK_SIZE
    if not 0 < ci.uncompressed_size <= limit:
        raise err(f"{what}: impossible uncompressed size {ci.uncompressed_size} (chunk size {limit})")
    if not 0 < ci.compressed_size <= MAX_CHUNK_SIZE:
        raise err(f"{what}: impossible compressed size {ci.compressed_size}")
    if not ci.compressed and ci.compressed_size != ci.uncompressed_size:
        raise err(f"{what}: stored uncompressed, but {ci.compressed_size} bytes stored for "
                  f"{ci.uncompressed_size}")
    if ci.uncompressed_offset % BS:
        raise err(f"{what}: uncompressed offset {ci.uncompressed_offset} is not 4 KiB aligned")
    if ci.uncompressed_offset + ci.uncompressed_size > blob.uncompressed_size:
        raise err(f"{what}: uncompressed bytes {ci.uncompressed_offset}+{ci.uncompressed_size} past "
                  f"the end of blob {ci.blob_index} ({blob.uncompressed_size} bytes)")
    if blob.compressed_size and ci.compressed_offset + ci.compressed_size > blob.compressed_size:
        raise err(f"{what}: stored bytes {ci.compressed_offset}+{ci.compressed_size} past the end "
                  f"of blob {ci.blob_index} ({blob.compressed_size} bytes)")


def digest_matches(ref: ChunkRef, data: bytes | memoryview) -> bool:
    """True when `data` is the chunk's uncompressed bytes: right size and blake3 digest (a chunk
    whose bootstrap records no digest never matches: nothing unverifiable is trusted)."""
    return bool(ref.digest) and len(data) == ref.uncompressed_size and blake3.blake3(data).digest() == ref.digest


def verify_chunk(ref: ChunkRef, compressor: str, raw: bytes | memoryview, where: str = "") -> bytes:
    """A chunk's stored bytes -> its uncompressed bytes, checked against the size and blake3
    digest the bootstrap records (ChunkVerifyError otherwise). The one check for every reader:
    the image tools and the daemon's cache fills."""
    if ref.compressed:
        try:
            data = decompress(compressor, raw, ref.uncompressed_size)
        except Exception as e:  # zstd / lz4 errors
            raise ChunkVerifyError(f"{where}chunk {ref.index} does not decompress: {e}") from e
    else:
        data = bytes(raw)
    if len(data) != ref.uncompressed_size:
        raise ChunkVerifyError(f"{where}chunk {ref.index} is {len(data)} bytes, "
                               f"expected {ref.uncompressed_size}")
    if ref.digest and not digest_matches(ref, data):
        raise ChunkVerifyError(f"{where}chunk {ref.index} at {ref.compressed_offset} "
                               "fails its blake3 digest check")
    return data


def read_blob_ci_table(blob_file: Path, blob: BlobInfo | None = None) -> tuple[R.BlobMetaHeader, list[R.BlobChunkEntry]]:
    """Parse a data blob's own chunk-info table and its 4 KiB header.

    With `blob` (from a blob table) the header is found right after the table at
    ci_offset + ci_compressed_size; without it, in the last 4 KiB of the file.
    """
    with open(blob_file, "rb") as f:
        if blob is not None and blob.ci_compressed_size:
            f.seek(blob.ci_offset + blob.ci_compressed_size)
        else:
            f.seek(0, 2)
            end = f.tell()
            if end < R.CI_HEADER_SIZE:
                raise ValueError(f"{blob_file}: too small for a blob meta header")
            f.seek(end - R.CI_HEADER_SIZE)
        header = R.BlobMetaHeader.unpack(f.read(R.CI_HEADER_SIZE))
        f.seek(header.ci_offset)
        raw = f.read(header.ci_compressed_size)
    if len(raw) != header.ci_compressed_size:
        raise ValueError(f"{blob_file}: chunk-info table truncated")
    if header.ci_compressor:
        raw = decompress(R.compressor_name(header.ci_compressor), raw, header.ci_uncompressed_size)
    if header.features & R.BLOB_FEATURE_CHUNK_INFO_V2:
        raise ValueError(f"{blob_file}: chunk-info v2 tables are not supported")
    entries = R.unpack_ci_table(raw)
    if len(entries) != header.ci_entries:
        raise ValueError(f"{blob_file}: header says {header.ci_entries} entries, table has {len(entries)}")
    return header, entries


class _TreeParser:
    """Walks the directory tree from the root, iteratively, each inode once.

    Every byte an inode uses (the inode, its xattrs, its chunk indexes, its directory or symlink
    data) is charged against a budget of the file's size: in a valid image those ranges are
    disjoint, so a corrupt one that makes many inodes share the same bytes (a huge directory
    listed by a thousand directory inodes) is refused instead of multiplying time and memory.
    """

    def __init__(self, data: bytes, sb: L.Superblock, chunk_table: list[R.ChunkInfo],
                 blobs: list[BlobInfo], path: Path) -> None:
        self.data = data
        self.sb = sb
        self.meta = sb.meta_blkaddr * BS
        self.max_nid = (len(data) - self.meta) // L.ISLOT_SIZE - 1
        self.path = path
        self.by_nid: dict[int, Inode] = {}
        self.parent: dict[int, tuple[int, bytes]] = {}  # nid -> (parent nid, name) of its first link
        self.path_len: dict[int, int] = {}  # nid -> length of that path
        self.chunk_map = {(c.blob_index, c.index): c for c in chunk_table}
        self.refs: dict[tuple[int, int], ChunkRef] = {}  # one ChunkRef per chunk-table entry
        self.blobs = blobs
        self.budget = len(data)
        self.chunk_size = 0  # the largest chunk size a chunk-based inode uses

    def err(self, msg: str) -> BootstrapError:
        return BootstrapError(f"{self.path}: {msg}")

    def _charge(self, nid: int, nbytes: int, what: str) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise self.err(f"nid {nid}: {what} overlaps other metadata: the inodes claim more "
                           f"bytes than the file holds ({len(self.data)})")

    def _name(self, nid: int) -> str:
        if nid == self.sb.root_nid:
            return "/"
        return self._path(nid).decode(errors="replace") if nid in self.parent else f"nid {nid}"

    def _path(self, nid: int) -> bytes:
        parts = []
        while nid in self.parent:
            nid, name = self.parent[nid]
            parts.append(name)
        return b"/" + b"/".join(reversed(parts))

    def parse_root(self) -> Inode:
        root_nid = self.sb.root_nid
        root, di = self._inode(root_nid)
        if not root.is_dir:
            raise self.err(f"root inode nid {root_nid} is not a directory")
        self.path_len[root_nid] = 1
        stack = [(root_nid, root, di)]
        while stack:
            nid, node, di = stack.pop()
            for name, cnid, _ft in self._dirents(nid, di):
                if name in (b".", b".."):
                    continue
                if name in node.children:
                    raise self.err(f"directory {self._name(nid)}: duplicate entry {name!r}")
                where = f"directory {self._name(nid)}: entry {name[:64]!r}"
                if cnid > self.max_nid:
                    raise self.err(f"{where} names nid {cnid}, outside the file "
                                   f"(the inode area holds nids up to {self.max_nid})")
                if cnid in self.by_nid:
                    child = self.by_nid[cnid]
                    if child.is_dir:
                        if cnid == nid or self._is_ancestor(cnid, nid):
                            raise self.err(f"{where}: directory loop (nid {cnid}, {self._name(cnid)}, "
                                           "contains this directory)")
                        raise self.err(f"{where}: directory nid {cnid} ({self._name(cnid)}) linked twice")
                    node.children[name] = child
                    continue
                try:
                    child, cdi = self._inode(cnid)
                except BootstrapError as e:
                    raise BootstrapError(f"{e} (at {where})") from None
                node.children[name] = child
                self.parent[cnid] = (nid, name)
                self.path_len[cnid] = self.path_len[nid] + 1 + len(name)
                if child.is_dir:
                    stack.append((cnid, child, cdi))
        return root

    def _is_ancestor(self, anc: int, nid: int) -> bool:
        while nid in self.parent:
            nid = self.parent[nid][0]
            if nid == anc:
                return True
        return nid == anc

    def prefetch_paths(self, nids: list[int]) -> list[bytes]:
        """Paths of the prefetch table's nids that are in the tree (in table order)."""
        listed = [nid for nid in nids if nid in self.path_len]
        total = sum(self.path_len[nid] for nid in listed)
        if total > MAX_PREFETCH_PATH_BYTES:
            raise self.err(f"prefetch table names {len(listed)} files with {total} bytes of paths "
                           f"(more than {MAX_PREFETCH_PATH_BYTES})")
        return [self._path(nid) for nid in listed]

    def _inode(self, nid: int) -> tuple[Inode, L.DiskInode]:
        off = self.meta + nid * L.ISLOT_SIZE
        try:
            di = L.DiskInode.unpack(self.data, off, self.sb.build_time, self.sb.build_time_nsec)
            xattr_size = di.xattr_size
        except ValueError as e:
            raise self.err(f"nid {nid}: {e}") from None
        fmt = stat.S_IFMT(di.mode)
        if fmt not in _FILE_TYPES:
            raise self.err(f"nid {nid}: unknown file type in mode {di.mode:#o}")
        self._charge(nid, di.isize + xattr_size, "inode")
        node = Inode(mode=di.mode, uid=di.uid, gid=di.gid, mtime=di.mtime, mtime_nsec=di.mtime_nsec,
                     size=di.size, nid=nid)
        xoff = off + di.isize
        try:
            node.xattrs = L.decode_xattrs(self.data, xoff, di.xattr_icount)
        except ValueError as e:
            raise self.err(f"nid {nid}: {e}") from None
        if fmt == stat.S_IFREG:
            node.chunks = self._chunks(nid, di, xoff + xattr_size)
        elif fmt == stat.S_IFLNK:
            node.target = self._data(nid, di)
            node.size = len(node.target)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = L.decode_rdev(di.i_u)
        self.by_nid[nid] = node
        return node, di

    def _data(self, nid: int, di: L.DiskInode) -> bytes:
        size = di.size
        n = len(self.data)
        what = "directory" if stat.S_ISDIR(di.mode) else "symlink"
        if di.layout == L.LAYOUT_FLAT_PLAIN:
            start = di.i_u * BS
            if start + size > n:
                raise self.err(f"nid {nid}: {what} data at block {di.i_u} (+{size} bytes) is past "
                               f"the end of the file ({n} bytes)")
            self._charge(nid, size, f"{what} data")
            return self.data[start:start + size]
        if di.layout == L.LAYOUT_FLAT_INLINE:
            full = size // BS * BS
            start = di.i_u * BS
            tail_at = self.meta + nid * L.ISLOT_SIZE + di.isize + di.xattr_size
            if (tail_at % BS) + (size - full) > BS:
                raise self.err(f"nid {nid}: inline {what} data crosses a block boundary")
            if start + full > n or tail_at + size - full > n:
                raise self.err(f"nid {nid}: {what} data ({size} bytes) is past the end of the file "
                               f"({n} bytes)")
            self._charge(nid, size, f"{what} data")
            return self.data[start:start + full] + self.data[tail_at:tail_at + size - full]
        raise self.err(f"nid {nid}: unsupported data layout {di.layout} for a {what}")

    def _dirents(self, nid: int, di: L.DiskInode) -> list[tuple[bytes, int, int]]:
        data = self._data(nid, di)
        out = []
        for o in range(0, len(data), BS):
            try:
                ents = L.unpack_dirents(data[o:o + BS])
            except ValueError as e:
                raise self.err(f"directory {self._name(nid)} (nid {nid}), block {o // BS}: {e}") from None
            for name, _cnid, _ft in ents:
                if not name or len(name) > L.NAME_MAX or b"/" in name or b"\0" in name:
                    raise self.err(f"directory {self._name(nid)} (nid {nid}): bad entry name "
                                   f"{name[:64]!r} ({len(name)} bytes)")
            out.extend(ents)
        return out

    def _chunks(self, nid: int, di: L.DiskInode, after_xattrs: int) -> list[ChunkRef | None]:
        if di.size == 0:
            return []
        if di.layout != L.LAYOUT_CHUNK_BASED:
            raise self.err(f"nid {nid}: regular file layout {di.layout} unsupported (need chunk-based)")
        cf = di.i_u & 0xFFFF
        if not cf & L.CHUNK_FORMAT_INDEXES:
            raise self.err(f"nid {nid}: 4-byte block-map chunks unsupported")
        csize = 1 << (L.BLKSZ_BITS + (cf & L.CHUNK_FORMAT_BLKBITS_MASK))
        n = -(-di.size // csize)
        pos = (after_xattrs + 7) // 8 * 8
        if pos + 8 * n > len(self.data):
            raise self.err(f"nid {nid}: {n} chunk indexes ({di.size} bytes in {csize}-byte chunks) "
                           f"at offset {pos} are past the end of the file ({len(self.data)} bytes)")
        self._charge(nid, 8 * n, "chunk index array")
        self.chunk_size = max(self.chunk_size, csize)
        refs: list[ChunkRef | None] = []
        nblobs = len(self.blobs)
        for i, (advise, dev, blkaddr) in enumerate(struct.iter_unpack("<HHI", self.data[pos:pos + 8 * n])):
            if blkaddr == L.NULL_ADDR:
                refs.append(None)
                continue
            blob_index = (dev & 0xFF) - 1
            if not 0 <= blob_index < nblobs:
                raise self.err(f"nid {nid}: chunk {i} on device {dev & 0xFF}, past the device/blob "
                               f"table ({nblobs} blobs)")
            ci_index = advise | ((dev >> 8) << 16)
            if self.chunk_map:
                key = (blob_index, ci_index)
                ref = self.refs.get(key)
                if ref is None:
                    ci = self.chunk_map.get(key)
                    if ci is None:
                        raise self.err(f"nid {nid}: chunk {i} (blob {blob_index} index {ci_index}) "
                                       "not in the chunk table")
                    ref = self.refs[key] = ChunkRef(
                        ci.blob_index, ci.uncompressed_offset, ci.uncompressed_size,
                        ci.compressed_offset, ci.compressed_size, ci.compressed, ci.digest, ci.index)
                if ref.uncompressed_offset != blkaddr * BS:
                    raise self.err(f"nid {nid}: chunk {i} blkaddr {blkaddr} disagrees with the chunk table")
                refs.append(ref)
            else:
                size = min(csize, di.size - i * csize)
                blob = self.blobs[blob_index]
                if blob.compressor != "none":
                    raise self.err(f"nid {nid}: chunk {i} is in {blob.compressor}-compressed blob "
                                   f"{blob_index}, but the bootstrap has no chunk table to find it")
                end = blkaddr * BS + size
                if end > blob.uncompressed_size or (blob.compressed_size and end > blob.compressed_size):
                    raise self.err(f"nid {nid}: chunk {i} at block {blkaddr} (+{size} bytes) is past "
                                   f"the end of blob {blob_index} ({blob.uncompressed_size} bytes)")
                refs.append(ChunkRef(blob_index, blkaddr * BS, size, blkaddr * BS, size, False,
                                     b"", ci_index))
        return refs
