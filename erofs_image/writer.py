"""Write an `Image` as a RAFS v6 bootstrap (an EROFS image whose file data lives in blobs).

Layout (as nydus): block 0 holds the superblock at 1024, the RAFS extended superblock at 1152
and the device table at 1408 (one slot per blob); then, 4 KiB aligned, the blob table, the
chunk table (one 80-byte entry per unique chunk, ordered by (blob, chunk index)) and the
prefetch table (u32 nids); then the inode area one block past meta_blkaddr (root first, so
root nid 128, as nydus-image writes it), then the directory / symlink blocks that are not inlined.
No superblock checksum and a 4 KiB aligned chunk table: nydusd refuses anything else.
"""
from __future__ import annotations

import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from erofs_image import layout as L
from erofs_image import rafs as R
from erofs_image.tree import ChunkRef, Image, Inode, lookup

BS = L.BLOCK_SIZE
U32 = 1 << 32


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(slots=True)
class _Plan:
    inode: Inode
    ino: int
    parent: Inode  # a directory's ".." (the root's own)
    nlink: int = 0
    extended: bool = False
    layout: int = L.LAYOUT_FLAT_PLAIN
    size: int = 0
    xattr_body: bytes = b""
    xattr_icount: int = 0
    record: int = 0  # bytes in the inode area: inode + xattrs (+ chunk indexes | inline tail)
    data_blocks: int = 0  # separate blocks after the inode area
    blkaddr: int = 0
    nid: int = 0
    dir_blocks: list[list[tuple[bytes, Inode]]] | None = None


def _check_name(name: bytes) -> None:
    if not isinstance(name, bytes):
        raise ValueError(f"directory entry name {name!r} is not bytes")
    if not name or len(name) > L.NAME_MAX:
        raise ValueError(f"name {name[:40]!r}... has {len(name)} bytes (must be 1..255)")
    if b"/" in name or b"\0" in name or name in (b".", b".."):
        raise ValueError(f"invalid directory entry name {name!r}")


def _partition_dir(entries: list[tuple[bytes, Inode]]) -> tuple[list[list[tuple[bytes, Inode]]], int]:
    """Split sorted entries into blocks; return (blocks, directory size in bytes)."""
    blocks: list[list[tuple[bytes, Inode]]] = [[]]
    used = 0
    for ent in entries:
        cost = L.DIRENT_SIZE + len(ent[0])
        if used + cost > BS:
            blocks.append([])
            used = 0
        blocks[-1].append(ent)
        used += cost
    return blocks, (len(blocks) - 1) * BS + used


def _dir_block(ents: list[tuple[bytes, Inode]], nids: dict[int, int]) -> bytes:
    buf = bytearray(L.DIRENT_SIZE * len(ents) + sum(len(n) for n, _ in ents))
    nameoff = L.DIRENT_SIZE * len(ents)
    for i, (name, node) in enumerate(ents):
        L.pack_dirent(buf, i * L.DIRENT_SIZE, nids[id(node)], nameoff, L.file_type(node.mode))
        buf[nameoff:nameoff + len(name)] = name
        nameoff += len(name)
    return bytes(buf)


def _collect(image: Image) -> list[_Plan]:
    root = image.root
    if not root.is_dir:
        raise ValueError("the image root must be a directory")
    plans: dict[int, _Plan] = {id(root): _Plan(root, 1, parent=root)}
    order = [plans[id(root)]]
    queue = [root]
    qi = 0
    while qi < len(queue):
        d = queue[qi]
        qi += 1
        subdirs = 0
        for name, child in d.children.items():
            _check_name(name)
            p = plans.get(id(child))
            if child.is_dir:
                if p is not None:
                    raise ValueError(f"directory {name!r} is linked twice (hard-linked directory or cycle)")
                subdirs += 1
                queue.append(child)
            if p is None:
                p = _Plan(child, len(order) + 1, parent=d)
                plans[id(child)] = p
                order.append(p)
            if not child.is_dir:
                p.nlink += 1
        plans[id(d)].nlink = 2 + subdirs
    return order


def _plan_inode(p: _Plan, image: Image, chunk_fmt: int) -> None:
    node = p.inode
    mode = node.mode
    body, icount = L.encode_xattrs(node.xattrs) if node.xattrs else (b"", 0)
    p.xattr_body, p.xattr_icount = body, icount
    fmt = stat.S_IFMT(mode)
    if fmt == stat.S_IFDIR:
        entries = [(b".", node), (b"..", p.parent)] + list(node.children.items())
        entries.sort(key=lambda e: e[0])
        p.dir_blocks, p.size = _partition_dir(entries)
    elif fmt == stat.S_IFLNK:
        p.size = len(node.target)
        if not node.target:
            raise ValueError("symlink with an empty target")
    elif fmt == stat.S_IFREG:
        p.size = node.size
        nchunks = -(-node.size // image.chunk_size)
        if len(node.chunks) != nchunks:
            raise ValueError(f"regular file of {node.size} bytes has {len(node.chunks)} chunks, "
                             f"expected {nchunks} (chunk size {image.chunk_size})")
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
        p.size = 0
    else:
        raise ValueError(f"unsupported file type in mode {mode:#o}")
    if mode > 0xFFFF:
        raise ValueError(f"mode {mode:#o} does not fit 16 bits")
    if not (0 <= node.uid < U32 and 0 <= node.gid < U32):
        raise ValueError(f"uid/gid {node.uid}/{node.gid} out of range")
    if not 0 <= node.mtime < 1 << 64 or not 0 <= node.mtime_nsec < 10**9:
        raise ValueError(f"mtime {node.mtime}.{node.mtime_nsec} out of range")
    p.extended = (node.uid > 0xFFFF or node.gid > 0xFFFF or p.nlink > 0xFFFF or p.size >= U32
                  or node.mtime != image.build_time or node.mtime_nsec != 0)
    head = (L.EXTENDED_INODE_SIZE if p.extended else L.COMPACT_INODE_SIZE) + len(body)
    if fmt == stat.S_IFREG and p.size:
        p.layout = L.LAYOUT_CHUNK_BASED
        p.record = _align(head, L.CHUNK_INDEX_SIZE) + L.CHUNK_INDEX_SIZE * len(node.chunks)
    elif fmt in (stat.S_IFDIR, stat.S_IFLNK):
        tail = p.size % BS
        if tail and head + tail <= BS:
            p.layout = L.LAYOUT_FLAT_INLINE
            p.data_blocks = p.size // BS
            p.record = head + tail
        else:
            p.layout = L.LAYOUT_FLAT_PLAIN
            p.data_blocks = -(-p.size // BS)
            p.record = head
    else:
        p.layout = L.LAYOUT_FLAT_PLAIN
        p.record = head
    del chunk_fmt


def build_bootstrap(image: Image) -> bytes:
    """The whole bootstrap as bytes (see the module docstring for the layout)."""
    nblobs = len(image.blobs)
    if nblobs > R.MAX_BLOBS:
        raise ValueError(f"{nblobs} blobs: RAFS v6 holds at most {R.MAX_BLOBS}")
    chunk_fmt = L.chunk_format(image.chunk_size)
    if image.chunk_size >= U32:
        raise ValueError("chunk size does not fit the extended superblock")
    if not 0 <= image.build_time < 1 << 64:
        raise ValueError("build_time out of range")

    plans = _collect(image)
    for p in plans:
        _plan_inode(p, image, chunk_fmt)

    # chunk table: unique chunks ordered by (blob, index)
    chunk_table: dict[tuple[int, int], tuple[ChunkRef, int]] = {}
    for p in plans:
        if p.layout != L.LAYOUT_CHUNK_BASED:
            continue
        for i, ref in enumerate(p.inode.chunks):
            if ref is None:
                continue
            key = (ref.blob_index, ref.index)
            if key not in chunk_table:
                if not 0 <= ref.blob_index < nblobs:
                    raise ValueError(f"chunk refers to blob {ref.blob_index} but the image has {nblobs} blobs")
                if not 0 <= ref.index < 1 << 24:
                    raise ValueError(f"chunk index {ref.index} does not fit 24 bits")
                if ref.uncompressed_offset % BS or ref.uncompressed_offset // BS >= L.NULL_ADDR:
                    raise ValueError(f"chunk uncompressed offset {ref.uncompressed_offset} unaligned or too large")
                chunk_table[key] = (ref, i * image.chunk_size)
            elif chunk_table[key][0] != ref:
                raise ValueError(f"two different chunks claim blob {key[0]} index {key[1]}")
    chunk_keys = sorted(chunk_table)

    # header region
    devt_end = R.DEVICE_TABLE_OFFSET + L.DEVICE_SLOT_SIZE * nblobs
    blob_table_off = _align(devt_end, BS)
    # 4 KiB aligned: nydusd refuses a chunk table that is not ("invalid chunk table offset")
    chunk_table_off = _align(blob_table_off + R.BLOB_ENTRY_SIZE * nblobs, BS)
    prefetch_off = chunk_table_off + R.CHUNK_INFO_SIZE * len(chunk_keys)
    prefetch_nodes = [lookup(image.root, path) for path in image.prefetch]
    meta_start = _align(prefetch_off + 4 * len(prefetch_nodes), BS)

    # inode area: root first, inline tails never cross a block boundary. As nydus-image does,
    # meta_blkaddr is one block before the area, so no inode has nid 0: nydusd takes the nid for
    # the inode number and aborts on 0 (an assertion in RAFS v6's `ino()`), and readdir hides ino 0.
    nid_bias = BS >> L.ISLOT_BITS
    pos = 0
    nids: dict[int, int] = {}
    for p in plans:
        pos = _align(pos, L.ISLOT_SIZE)
        if p.layout == L.LAYOUT_FLAT_INLINE and pos % BS + p.record > BS:
            pos = _align(pos, BS)
        p.nid = nid_bias + (pos >> L.ISLOT_BITS)
        nids[id(p.inode)] = p.nid
        pos += p.record
    if plans[0].nid >= 1 << 16:
        raise ValueError("root nid does not fit 16 bits")
    meta_blkaddr = meta_start // BS - 1
    blk = meta_start // BS + _align(pos, BS) // BS
    for p in plans:
        if p.data_blocks:
            p.blkaddr = blk
            blk += p.data_blocks
    total_blocks = blk
    if total_blocks >= U32:
        raise ValueError("image too large for 32-bit block addresses")

    buf = bytearray(total_blocks * BS)
    # inodes and data
    for p in plans:
        node = p.inode
        off = meta_blkaddr * BS + p.nid * L.ISLOT_SIZE
        fmt = stat.S_IFMT(node.mode)
        i_u = 0
        if p.layout == L.LAYOUT_CHUNK_BASED:
            i_u = chunk_fmt
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            i_u = L.encode_rdev(node.rdev)
        elif p.data_blocks:
            i_u = p.blkaddr
        di = L.DiskInode(p.extended, p.layout, p.xattr_icount, node.mode, p.nlink, p.size, i_u,
                         p.ino, node.uid, node.gid, node.mtime, node.mtime_nsec)
        di.pack_into(buf, off)
        head = off + di.isize
        if p.xattr_body:
            buf[head:head + len(p.xattr_body)] = p.xattr_body
            head += len(p.xattr_body)
        if p.layout == L.LAYOUT_CHUNK_BASED:
            ipos = _align(head, L.CHUNK_INDEX_SIZE)
            for ref in node.chunks:
                if ref is None:
                    L.pack_chunk_index(buf, ipos, 0, 0, L.NULL_ADDR)
                else:
                    # nydus convention: chunk index bits 0-15 in advise, 16-23 in the high
                    # byte of device_id; the low byte is the device (blob_index + 1)
                    L.pack_chunk_index(buf, ipos, ref.index & 0xFFFF,
                                       (ref.blob_index + 1) | ((ref.index >> 16) << 8),
                                       ref.uncompressed_offset // BS)
                ipos += L.CHUNK_INDEX_SIZE
            continue
        if fmt == stat.S_IFDIR:
            assert p.dir_blocks is not None
            data = b"".join(
                _dir_block(ents, nids).ljust(BS, b"\0") if i + 1 < len(p.dir_blocks)
                else _dir_block(ents, nids)
                for i, ents in enumerate(p.dir_blocks))
        elif fmt == stat.S_IFLNK:
            data = node.target
        else:
            continue
        assert len(data) == p.size
        full = p.data_blocks * BS if p.layout == L.LAYOUT_FLAT_INLINE else len(data)
        if p.data_blocks:
            start = p.blkaddr * BS
            buf[start:start + min(full, len(data))] = data[:full]
        if p.layout == L.LAYOUT_FLAT_INLINE:
            tail = data[full:]
            buf[head:head + len(tail)] = tail

    # device table, blob table, chunk table, prefetch table
    for i, blob in enumerate(image.blobs):
        if len(blob.blob_id) != 64:
            raise ValueError(f"blob id {blob.blob_id!r} is not 64 hex characters")
        if blob.uncompressed_size % BS or blob.uncompressed_size == 0:
            raise ValueError(f"blob {blob.blob_id}: uncompressed size {blob.uncompressed_size} "
                             "is not a non-zero multiple of 4096")
        slot = L.DeviceSlot(blob.blob_id.encode(), blob.uncompressed_size // BS, 0).pack()
        o = R.DEVICE_TABLE_OFFSET + i * L.DEVICE_SLOT_SIZE
        buf[o:o + len(slot)] = slot
        ent = R.BlobTableEntry.from_blob(blob, i).pack()
        o = blob_table_off + i * R.BLOB_ENTRY_SIZE
        buf[o:o + len(ent)] = ent
    o = chunk_table_off
    for key in chunk_keys:
        ref, file_offset = chunk_table[key]
        ci = R.ChunkInfo(ref.digest.ljust(32, b"\0")[:32], ref.blob_index,
                         R.CHUNK_FLAG_COMPRESSED if ref.compressed else 0, ref.compressed_size,
                         ref.uncompressed_size, ref.compressed_offset, ref.uncompressed_offset,
                         file_offset, ref.index).pack()
        buf[o:o + R.CHUNK_INFO_SIZE] = ci
        o += R.CHUNK_INFO_SIZE
    for i, node in enumerate(prefetch_nodes):
        nid = nids[id(node)]
        if nid >= U32:
            raise ValueError("prefetch nid does not fit 32 bits")
        struct.pack_into("<I", buf, prefetch_off + 4 * i, nid)

    flags = R.FLAG_HASH_BLAKE3 | R.FLAG_EXPLICIT_UID_GID
    if any(p.xattr_icount for p in plans):
        flags |= R.FLAG_HAS_XATTR
    for blob in image.blobs:
        flags |= R.COMPRESSION_FLAGS.get(blob.compressor, 0)
    if not image.blobs:
        flags |= R.FLAG_COMPRESSION_NONE
    ext = R.RafsSuperExt(flags, blob_table_off, R.BLOB_ENTRY_SIZE * nblobs, image.chunk_size,
                         chunk_table_off, R.CHUNK_INFO_SIZE * len(chunk_keys),
                         prefetch_off if prefetch_nodes else 0, 4 * len(prefetch_nodes))  # bytes, as nydus
    buf[R.EXT_SUPER_OFFSET:R.EXT_SUPER_OFFSET + R.EXT_SUPER_SIZE] = ext.pack()
    # No SB_CHKSUM: every nydusd (2.2 to 2.4) refuses a RAFS v6 superblock whose checksum field
    # is not 0 ("invalid checksum ... in Rafsv6 superblock"); nydus-image never sets it either.
    # The readers here still check it in bootstraps that have it.
    sb = L.Superblock(
        feature_compat=L.FEATURE_COMPAT_RAFS_V6,
        root_nid=plans[0].nid, inos=len(plans), build_time=image.build_time,
        # with no blob nydusd wants 0 (or 4096) blocks: "invalid extra device count"; the kernel
        # only reports it in statfs, and nydus-image writes the blobs' block count there
        blocks=total_blocks if nblobs else 0, meta_blkaddr=meta_blkaddr,
        feature_incompat=L.FEATURE_INCOMPAT_CHUNKED_FILE | L.FEATURE_INCOMPAT_DEVICE_TABLE,
        extra_devices=nblobs, devt_slotoff=R.DEVT_SLOTOFF)
    buf[L.SUPER_OFFSET:L.SUPER_OFFSET + L.SUPER_SIZE] = sb.pack()
    for p in plans:  # nids for callers (the tree model has a slot for them)
        p.inode.nid = p.nid
    return bytes(buf)


def write_bootstrap(image: Image, path: Path) -> None:
    """Write the bootstrap atomically: a temp file in the same directory, fsync, rename."""
    path = Path(path)
    data = build_bootstrap(image)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
