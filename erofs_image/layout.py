"""EROFS on-disk structures: constants and pack/unpack helpers (little-endian throughout).

Authority: Linux fs/erofs/erofs_fs.h. Only what a RAFS v6 / chunk-based image needs:
superblock, compact and extended inodes, dirents, device slots, chunk indexes, inline
xattrs and the rdev encoding. No I/O here.
"""
from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

EROFS_MAGIC = 0xE0F5E1E2
SUPER_OFFSET = 1024
SUPER_SIZE = 128
BLKSZ_BITS = 12
BLOCK_SIZE = 1 << BLKSZ_BITS
ISLOT_BITS = 5  # inodes are addressed in 32-byte slots
ISLOT_SIZE = 1 << ISLOT_BITS

# feature_compat
FEATURE_COMPAT_SB_CHKSUM = 0x1
FEATURE_COMPAT_MTIME = 0x2
FEATURE_COMPAT_XATTR_FILTER = 0x4
FEATURE_COMPAT_RAFS_V6 = 0x40000000  # nydus marker
# feature_incompat
FEATURE_INCOMPAT_ZERO_PADDING = 0x1
FEATURE_INCOMPAT_COMPR_CFGS = 0x2
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8
# what this package can read (all of them only change data layouts we do not produce, except
# the two we use; the reader refuses anything else)
SUPPORTED_INCOMPAT = FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE | FEATURE_INCOMPAT_ZERO_PADDING

# inode data layouts
LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4

COMPACT_INODE_SIZE = 32
EXTENDED_INODE_SIZE = 64

# chunk format bits (low 16 bits of i_u for CHUNK_BASED)
CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
CHUNK_INDEX_SIZE = 8
NULL_ADDR = 0xFFFFFFFF

DIRENT_SIZE = 12
FT_UNKNOWN, FT_REG, FT_DIR, FT_CHRDEV, FT_BLKDEV, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)

DEVICE_SLOT_SIZE = 128
NAME_MAX = 255

# ---------------------------------------------------------------------------- crc32c
_CRC32C_TABLE: list[int] = []


def _crc32c_table() -> list[int]:
    if not _CRC32C_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC32C_TABLE.append(c)
    return _CRC32C_TABLE


def crc32c(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """Raw CRC32C (Castagnoli) as the kernel's crc32c(seed, ...): no final xor."""
    table = _crc32c_table()
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def superblock_checksum(block0: bytes) -> int:
    """The SB_CHKSUM value for block 0 (bytes 1024..end of block, checksum field zeroed)."""
    area = bytearray(block0[SUPER_OFFSET:BLOCK_SIZE])
    area[4:8] = b"\0\0\0\0"
    return crc32c(bytes(area))


# ---------------------------------------------------------------------------- superblock
_SB = struct.Struct("<IIIBBHQQIIII16s16sIHHHB37x")
assert _SB.size == SUPER_SIZE


@dataclass
class Superblock:
    magic: int = EROFS_MAGIC
    checksum: int = 0
    feature_compat: int = 0
    blkszbits: int = BLKSZ_BITS
    sb_extslots: int = 0
    root_nid: int = 0
    inos: int = 0
    build_time: int = 0
    build_time_nsec: int = 0
    blocks: int = 0
    meta_blkaddr: int = 0
    xattr_blkaddr: int = 0
    uuid: bytes = bytes(16)
    volume_name: bytes = bytes(16)
    feature_incompat: int = 0
    u1: int = 0
    extra_devices: int = 0
    devt_slotoff: int = 0
    dirblkbits: int = 0

    def pack(self) -> bytes:
        return _SB.pack(
            self.magic, self.checksum, self.feature_compat, self.blkszbits, self.sb_extslots,
            self.root_nid, self.inos, self.build_time, self.build_time_nsec, self.blocks,
            self.meta_blkaddr, self.xattr_blkaddr, self.uuid, self.volume_name,
            self.feature_incompat, self.u1, self.extra_devices, self.devt_slotoff,
            self.dirblkbits,
        )

    @classmethod
    def unpack(cls, buf: bytes) -> Superblock:
        return cls(*_SB.unpack_from(buf, 0))


# ---------------------------------------------------------------------------- inodes
_COMPACT = struct.Struct("<HHHHIIIIHHI")
_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")
assert _COMPACT.size == COMPACT_INODE_SIZE and _EXTENDED.size == EXTENDED_INODE_SIZE


@dataclass
class DiskInode:
    """Either inode form; `extended` selects which one `pack` writes."""

    extended: bool
    layout: int
    xattr_icount: int
    mode: int
    nlink: int
    size: int
    i_u: int
    ino: int
    uid: int
    gid: int
    mtime: int = 0
    mtime_nsec: int = 0

    @property
    def isize(self) -> int:
        return EXTENDED_INODE_SIZE if self.extended else COMPACT_INODE_SIZE

    @property
    def xattr_size(self) -> int:
        return xattr_ibody_size(self.xattr_icount)

    def pack(self) -> bytes:
        fmt = (self.layout << 1) | int(self.extended)
        if self.extended:
            return _EXTENDED.pack(fmt, self.xattr_icount, self.mode, 0, self.size, self.i_u,
                                  self.ino, self.uid, self.gid, self.mtime, self.mtime_nsec,
                                  self.nlink)
        return _COMPACT.pack(fmt, self.xattr_icount, self.mode, self.nlink, self.size, 0,
                             self.i_u, self.ino, self.uid, self.gid, 0)

    def pack_into(self, buf: bytearray, off: int) -> None:
        fmt = (self.layout << 1) | int(self.extended)
        if self.extended:
            _EXTENDED.pack_into(buf, off, fmt, self.xattr_icount, self.mode, 0, self.size,
                                self.i_u, self.ino, self.uid, self.gid, self.mtime,
                                self.mtime_nsec, self.nlink)
        else:
            _COMPACT.pack_into(buf, off, fmt, self.xattr_icount, self.mode, self.nlink,
                               self.size, 0, self.i_u, self.ino, self.uid, self.gid, 0)

    @classmethod
    def unpack(cls, buf: bytes, off: int, build_time: int = 0, build_time_nsec: int = 0) -> DiskInode:
        if off + 2 > len(buf):
            raise ValueError(f"inode at {off} is past the end of the image")
        (fmt,) = struct.unpack_from("<H", buf, off)
        extended = bool(fmt & 1)
        layout = (fmt >> 1) & 0x7
        if fmt & ~0xF:
            raise ValueError(f"inode at {off}: unsupported i_format {fmt:#x}")
        if off + (EXTENDED_INODE_SIZE if extended else COMPACT_INODE_SIZE) > len(buf):
            raise ValueError(f"inode at {off} is truncated")
        if extended:
            (_, icount, mode, _r, size, i_u, ino, uid, gid, mtime, nsec,
             nlink) = _EXTENDED.unpack_from(buf, off)
            return cls(True, layout, icount, mode, nlink, size, i_u, ino, uid, gid, mtime, nsec)
        (_, icount, mode, nlink, size, _r, i_u, ino, uid, gid, _r2) = _COMPACT.unpack_from(buf, off)
        return cls(False, layout, icount, mode, nlink, size, i_u, ino, uid, gid,
                   build_time, build_time_nsec)


def xattr_ibody_size(icount: int) -> int:
    if icount == 0:
        return 0
    if icount == 1:
        raise ValueError("xattr_icount 1 is invalid")
    return 12 + 4 * (icount - 1)


# ---------------------------------------------------------------------------- rdev
def encode_rdev(rdev: int) -> int:
    """Linux new_encode_dev of an os.makedev value: (minor & 0xff) | major << 8 | (minor & ~0xff) << 12."""
    major, minor = os.major(rdev), os.minor(rdev)
    if major > 0xFFF or minor > 0xFFFFF:
        raise ValueError(f"device number {major}:{minor} does not fit the 32-bit encoding")
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_rdev(v: int) -> int:
    return os.makedev((v & 0xFFF00) >> 8, (v & 0xFF) | ((v >> 12) & 0xFFF00))


# ---------------------------------------------------------------------------- dirents
_DIRENT = struct.Struct("<QHBx")

_FT_BY_MODE = {
    stat.S_IFREG: FT_REG, stat.S_IFDIR: FT_DIR, stat.S_IFCHR: FT_CHRDEV, stat.S_IFBLK: FT_BLKDEV,
    stat.S_IFIFO: FT_FIFO, stat.S_IFSOCK: FT_SOCK, stat.S_IFLNK: FT_SYMLINK,
}


def file_type(mode: int) -> int:
    try:
        return _FT_BY_MODE[stat.S_IFMT(mode)]
    except KeyError:
        raise ValueError(f"unsupported file type in mode {mode:#o}") from None


def pack_dirent(buf: bytearray, off: int, nid: int, nameoff: int, ftype: int) -> None:
    _DIRENT.pack_into(buf, off, nid, nameoff, ftype)


def unpack_dirents(block: bytes) -> list[tuple[bytes, int, int]]:
    """[(name, nid, file_type)] of one directory block (`block` trimmed to its used length).

    ValueError (naming the entry) for a nameoff outside the block or inside the entry table,
    nameoffs out of order, or a name longer than NAME_MAX."""
    size = len(block)
    if size < DIRENT_SIZE:
        raise ValueError(f"directory block of {size} bytes is too short for an entry")
    _, first_off, _ = _DIRENT.unpack_from(block, 0)
    if first_off % DIRENT_SIZE or first_off == 0 or first_off > size:
        raise ValueError(f"bad first nameoff {first_off} in a directory block of {size} bytes")
    count = first_off // DIRENT_SIZE
    ents = [_DIRENT.unpack_from(block, i * DIRENT_SIZE) for i in range(count)]
    for i, (_, nameoff, _) in enumerate(ents):
        if nameoff < first_off:
            raise ValueError(f"entry {i}: nameoff {nameoff} points into the entry table (ends at {first_off})")
        if nameoff > size:
            raise ValueError(f"entry {i}: name at {nameoff} runs past the end of its block ({size} bytes)")
    out = []
    for i, (nid, nameoff, ft) in enumerate(ents):
        end = ents[i + 1][1] if i + 1 < count else size
        if end < nameoff:
            raise ValueError(f"entry {i}: nameoff {nameoff} after the next entry's ({end})")
        name = block[nameoff:end]
        if i + 1 == count:
            nul = name.find(b"\0")
            if nul >= 0:
                name = name[:nul]
        if len(name) > NAME_MAX:
            raise ValueError(f"entry {i}: name of {len(name)} bytes at {nameoff} (longer than {NAME_MAX})")
        out.append((bytes(name), nid, ft))
    return out


# ---------------------------------------------------------------------------- device slots
_DEVSLOT = struct.Struct("<64sII56x")
assert _DEVSLOT.size == DEVICE_SLOT_SIZE


@dataclass
class DeviceSlot:
    tag: bytes
    blocks: int
    mapped_blkaddr: int = 0

    def pack(self) -> bytes:
        if len(self.tag) > 64:
            raise ValueError("device tag longer than 64 bytes")
        return _DEVSLOT.pack(self.tag, self.blocks, self.mapped_blkaddr)

    @classmethod
    def unpack(cls, buf: bytes, off: int = 0) -> DeviceSlot:
        tag, blocks, mapped = _DEVSLOT.unpack_from(buf, off)
        return cls(tag.rstrip(b"\0"), blocks, mapped)


# ---------------------------------------------------------------------------- chunk indexes
_CHUNK_INDEX = struct.Struct("<HHI")


def pack_chunk_index(buf: bytearray, off: int, advise: int, device_id: int, blkaddr: int) -> None:
    _CHUNK_INDEX.pack_into(buf, off, advise, device_id, blkaddr)


def unpack_chunk_index(buf: bytes, off: int) -> tuple[int, int, int]:
    """(advise, device_id, blkaddr)."""
    return _CHUNK_INDEX.unpack_from(buf, off)


def chunk_format(chunk_size: int) -> int:
    if chunk_size < BLOCK_SIZE or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk size {chunk_size} is not a power of two >= {BLOCK_SIZE}")
    bits = chunk_size.bit_length() - 1 - BLKSZ_BITS
    if bits > CHUNK_FORMAT_BLKBITS_MASK:
        raise ValueError(f"chunk size {chunk_size} too large")
    return CHUNK_FORMAT_INDEXES | bits


# ---------------------------------------------------------------------------- xattrs
XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_SECURITY = 6

# (index, prefix); the full ACL names are matched exactly (empty suffix)
XATTR_PREFIXES: dict[int, bytes] = {
    XATTR_INDEX_USER: b"user.",
    XATTR_INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
    XATTR_INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    XATTR_INDEX_TRUSTED: b"trusted.",
    XATTR_INDEX_SECURITY: b"security.",
}
_XATTR_ENTRY = struct.Struct("<BBH")
_XATTR_HEADER = struct.Struct("<IB7x")


def split_xattr_name(name: bytes) -> tuple[int, bytes]:
    for idx in (XATTR_INDEX_POSIX_ACL_ACCESS, XATTR_INDEX_POSIX_ACL_DEFAULT):
        if name == XATTR_PREFIXES[idx]:
            return idx, b""
    for idx in (XATTR_INDEX_USER, XATTR_INDEX_TRUSTED, XATTR_INDEX_SECURITY):
        prefix = XATTR_PREFIXES[idx]
        if name.startswith(prefix) and len(name) > len(prefix):
            return idx, name[len(prefix):]
    raise ValueError(
        f"xattr {name!r}: EROFS inline xattrs support only user.*, trusted.*, security.* and "
        "system.posix_acl_access/default")


def encode_xattrs(xattrs: dict[bytes, bytes]) -> tuple[bytes, int]:
    """The inline xattr body (header + entries) and its xattr_icount; (b"", 0) if none."""
    if not xattrs:
        return b"", 0
    parts = [_XATTR_HEADER.pack(0, 0)]
    for name in sorted(xattrs):
        value = xattrs[name]
        idx, suffix = split_xattr_name(name)
        if len(suffix) > 255:
            raise ValueError(f"xattr name {name!r} too long (suffix > 255 bytes)")
        if len(value) > 0xFFFF:
            raise ValueError(f"xattr {name!r} value longer than 65535 bytes")
        entry = _XATTR_ENTRY.pack(len(suffix), idx, len(value)) + suffix + value
        parts.append(entry + b"\0" * (-len(entry) % 4))
    body = b"".join(parts)
    icount = (len(body) - 12) // 4 + 1
    if icount > 0xFFFF:
        raise ValueError("inline xattrs too large")
    return body, icount


def decode_xattrs(buf: bytes, off: int, icount: int) -> dict[bytes, bytes]:
    if icount == 0:
        return {}
    size = xattr_ibody_size(icount)
    end = off + size
    if end > len(buf):
        raise ValueError("xattr body past the end of the image")
    _filter, shared = _XATTR_HEADER.unpack_from(buf, off)
    if shared:
        raise ValueError("shared xattrs are not supported")
    pos = off + 12
    out: dict[bytes, bytes] = {}
    while pos + 4 <= end:
        nlen, idx, vlen = _XATTR_ENTRY.unpack_from(buf, pos)
        if idx not in XATTR_PREFIXES:
            raise ValueError(f"unknown xattr name index {idx}")
        pos += 4
        if pos + nlen + vlen > end:
            raise ValueError("xattr entry crosses the end of the xattr body")
        name = XATTR_PREFIXES[idx] + bytes(buf[pos:pos + nlen])
        out[name] = bytes(buf[pos + nlen:pos + nlen + vlen])
        pos += nlen + vlen
        pos += -(pos - off) % 4
    return out
