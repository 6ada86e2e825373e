"""Read a RAFS v6 bootstrap back into an `Image`, and read verified file data from blobs.

Reads our own bootstraps and nydus-built ones. Chunk indexes are resolved through the
bootstrap chunk table by (blob index, chunk index), the chunk index being nydus's split
encoding (bits 0-15 in `advise`, bits 16-23 in the high byte of `device_id`).
"""
from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from erofs_image import layout as L
from erofs_image import rafs as R
from erofs_image.chunks import decompress
from erofs_image.tree import BlobInfo, ChunkRef, Image, Inode

BS = L.BLOCK_SIZE


class BootstrapError(ValueError):
    """The bootstrap is not a readable RAFS v6 / EROFS image."""


class ChunkVerifyError(ValueError):
    """Chunk bytes in a blob do not match the digest recorded in the bootstrap."""


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
    def open(cls, path: Path) -> "Bootstrap":
        path = Path(path)
        data = path.read_bytes()
        return cls.parse(data, path)

    @classmethod
    def parse(cls, data: bytes, path: Path = Path("<memory>")) -> "Bootstrap":
        if len(data) < L.SUPER_OFFSET + L.SUPER_SIZE:
            raise BootstrapError(f"{path}: truncated ({len(data)} bytes): no EROFS superblock")
        sb = L.Superblock.unpack(data[L.SUPER_OFFSET:])
        if sb.magic != L.EROFS_MAGIC:
            raise BootstrapError(f"{path}: bad magic {sb.magic:#x} (not an EROFS image)")
        if sb.blkszbits != L.BLKSZ_BITS:
            raise BootstrapError(f"{path}: block size 2^{sb.blkszbits} unsupported (need 4096)")
        unknown = sb.feature_incompat & ~L.SUPPORTED_INCOMPAT
        if unknown:
            raise BootstrapError(f"{path}: unknown incompat features {unknown:#x}")
        if len(data) < BS:
            raise BootstrapError(f"{path}: truncated: block 0 incomplete")
        if sb.feature_compat & L.FEATURE_COMPAT_SB_CHKSUM:
            want = L.superblock_checksum(data[:BS])
            if want != sb.checksum:
                raise BootstrapError(f"{path}: superblock checksum {sb.checksum:#x} != {want:#x}")
        if sb.blocks and sb.feature_compat & L.FEATURE_COMPAT_RAFS_V6 == 0 and len(data) < sb.blocks * BS:
            raise BootstrapError(f"{path}: truncated: {len(data)} bytes, superblock says {sb.blocks} blocks")
        ext = R.RafsSuperExt.unpack(data) if sb.feature_compat & L.FEATURE_COMPAT_RAFS_V6 else R.RafsSuperExt()

        def region(off: int, size: int, what: str) -> bytes:
            if off + size > len(data):
                raise BootstrapError(f"{path}: truncated: {what} at {off}+{size} past end ({len(data)})")
            return data[off:off + size]

        devices = []
        if sb.extra_devices:
            devt = region(sb.devt_slotoff * 128, L.DEVICE_SLOT_SIZE * sb.extra_devices, "device table")
            devices = [L.DeviceSlot.unpack(devt, i * L.DEVICE_SLOT_SIZE) for i in range(sb.extra_devices)]
        blobs: list[BlobInfo] = []
        if ext.blob_table_size:
            bt = region(ext.blob_table_offset, ext.blob_table_size, "blob table")
            blobs = [R.BlobTableEntry.unpack(bt, o).to_blob()
                     for o in range(0, len(bt) - R.BLOB_ENTRY_SIZE + 1, R.BLOB_ENTRY_SIZE)]
        elif devices:  # plain EROFS with a device table: only the tags are known
            blobs = [BlobInfo(d.tag.decode(errors="replace"), "none", 0, 0, 0, d.blocks * BS) for d in devices]
        chunk_table: list[R.ChunkInfo] = []
        if ext.chunk_table_size:
            chunk_table = R.unpack_chunk_table(region(ext.chunk_table_offset, ext.chunk_table_size, "chunk table"))
        prefetch: list[int] = []
        if ext.prefetch_table_size:  # in bytes (nydus-image writes 4 * entries)
            entries = ext.prefetch_table_size // 4
            pt = region(ext.prefetch_table_offset, 4 * entries, "prefetch table")
            prefetch = list(struct.unpack(f"<{entries}I", pt))
        chunk_size = ext.chunk_size or (blobs[0].chunk_size if blobs else 1 << 20)
        parser = _TreeParser(data, sb, chunk_table, blobs, path)
        root = parser.parse_root()
        image = Image(root=root, blobs=blobs, chunk_size=chunk_size, build_time=sb.build_time)
        by_nid = parser.by_nid
        paths = parser.paths
        image.prefetch = [paths[n] for n in prefetch if n in paths and n in by_nid]
        return cls(path, sb, ext, image, blobs, devices, chunk_table, prefetch)

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
    def __init__(self, data: bytes, sb: L.Superblock, chunk_table: list[R.ChunkInfo],
                 blobs: list[BlobInfo], path: Path) -> None:
        self.data = data
        self.sb = sb
        self.meta = sb.meta_blkaddr * BS
        self.path = path
        self.by_nid: dict[int, Inode] = {}
        self.paths: dict[int, bytes] = {}
        self.chunk_map = {(c.blob_index, c.index): c for c in chunk_table}
        self.nblobs = len(blobs)

    def err(self, msg: str) -> BootstrapError:
        return BootstrapError(f"{self.path}: {msg}")

    def parse_root(self) -> Inode:
        root_nid = self.sb.root_nid
        root, di = self._inode(root_nid)
        if not root.is_dir:
            raise self.err("root inode is not a directory")
        self.paths[root_nid] = b"/"
        stack = [(root_nid, root, di, b"")]
        while stack:
            nid, node, di, prefix = stack.pop()
            for name, cnid, _ft in self._dirents(nid, di):
                if name in (b".", b".."):
                    continue
                if cnid in self.by_nid:
                    child = self.by_nid[cnid]
                    if child.is_dir:
                        raise self.err(f"directory nid {cnid} linked twice")
                    node.children[name] = child
                    continue
                child, cdi = self._inode(cnid)
                node.children[name] = child
                self.paths[cnid] = prefix + b"/" + name
                if child.is_dir:
                    stack.append((cnid, child, cdi, prefix + b"/" + name))
        return root

    def _inode(self, nid: int) -> tuple[Inode, L.DiskInode]:
        off = self.meta + nid * L.ISLOT_SIZE
        try:
            di = L.DiskInode.unpack(self.data, off, self.sb.build_time, self.sb.build_time_nsec)
        except ValueError as e:
            raise self.err(f"nid {nid}: {e}") from None
        node = Inode(mode=di.mode, uid=di.uid, gid=di.gid, mtime=di.mtime, mtime_nsec=di.mtime_nsec,
                     size=di.size, nid=nid)
        xoff = off + di.isize
        try:
            node.xattrs = L.decode_xattrs(self.data, xoff, di.xattr_icount)
        except ValueError as e:
            raise self.err(f"nid {nid}: {e}") from None
        fmt = stat.S_IFMT(di.mode)
        if fmt == stat.S_IFREG:
            node.chunks = self._chunks(nid, di, xoff + di.xattr_size)
        elif fmt == stat.S_IFLNK:
            node.target = self._data(nid, di)
            node.size = len(node.target)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = L.decode_rdev(di.i_u)
        self.by_nid[nid] = node
        return node, di

    def _data(self, nid: int, di: L.DiskInode) -> bytes:
        size = di.size
        if di.layout == L.LAYOUT_FLAT_PLAIN:
            start = di.i_u * BS
            out = self.data[start:start + size]
        elif di.layout == L.LAYOUT_FLAT_INLINE:
            full = size // BS * BS
            start = di.i_u * BS
            tail_at = self.meta + nid * L.ISLOT_SIZE + di.isize + di.xattr_size
            if (tail_at % BS) + (size - full) > BS:
                raise self.err(f"nid {nid}: inline data crosses a block boundary")
            out = self.data[start:start + full] + self.data[tail_at:tail_at + size - full]
        else:
            raise self.err(f"nid {nid}: unsupported data layout {di.layout} for inline data")
        if len(out) != size:
            raise self.err(f"nid {nid}: data past the end of the image")
        return out

    def _dirents(self, nid: int, di: L.DiskInode) -> list[tuple[bytes, int, int]]:
        data = self._data(nid, di)
        out = []
        for o in range(0, len(data), BS):
            try:
                out.extend(L.unpack_dirents(data[o:o + BS]))
            except ValueError as e:
                raise self.err(f"directory nid {nid}: {e}") from None
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
            raise self.err(f"nid {nid}: chunk indexes past the end of the image")
        refs: list[ChunkRef | None] = []
        for i in range(n):
            advise, dev, blkaddr = L.unpack_chunk_index(self.data, pos + 8 * i)
            if blkaddr == L.NULL_ADDR:
                refs.append(None)
                continue
            blob_index = (dev & 0xFF) - 1
            if not 0 <= blob_index < self.nblobs:
                raise self.err(f"nid {nid}: chunk {i} on device {dev & 0xFF} (no such blob)")
            ci_index = advise | ((dev >> 8) << 16)
            if self.chunk_map:
                ci = self.chunk_map.get((blob_index, ci_index))
                if ci is None:
                    raise self.err(f"nid {nid}: chunk {i} (blob {blob_index} index {ci_index}) "
                                   "not in the chunk table")
                if ci.uncompressed_offset != blkaddr * BS:
                    raise self.err(f"nid {nid}: chunk {i} blkaddr {blkaddr} disagrees with the chunk table")
                refs.append(ChunkRef(ci.blob_index, ci.uncompressed_offset, ci.uncompressed_size,
                                     ci.compressed_offset, ci.compressed_size, ci.compressed,
                                     ci.digest, ci.index))
            else:
                size = min(csize, di.size - i * csize)
                refs.append(ChunkRef(blob_index, blkaddr * BS, size, blkaddr * BS, size, False,
                                     b"", ci_index))
        return refs
