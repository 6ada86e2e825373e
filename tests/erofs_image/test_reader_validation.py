"""Bootstrap.open refuses bad input with one error type (BootstrapError: the path and what is
wrong, one line) before anything uses it: not a regular file, truncated, bad superblock fields,
offsets past the end, nids outside the file, directory loops, bad names, device ids past the
table, impossible blob / chunk sizes and absurd counts (refused before allocating).

Each case builds a valid image with the project's own builder, corrupts the exact field (found
through layout.py / rafs.py offsets) and checks the error."""
from __future__ import annotations

import os
import stat
import struct
import threading
import tracemalloc
from pathlib import Path

import pytest

from erofs_image import layout as L
from erofs_image import rafs as R
from erofs_image.builder import convert
from erofs_image.reader import Bootstrap, BootstrapError, BootstrapNotFoundError
from erofs_image.tree import Inode, lookup
from test_format_helpers import FIXTURE_DIR

BS = L.BLOCK_SIZE
CS = 64 * 1024
SB = L.SUPER_OFFSET
EXT = R.EXT_SUPER_OFFSET
NYDUS_BOOT = FIXTURE_DIR / "rafs-v6-2.2.boot"

# byte offsets of superblock fields (erofs_fs.h; docs/erofs-format.md)
SB_MAGIC, SB_BLKSZBITS, SB_ROOT_NID, SB_INOS = SB + 0, SB + 12, SB + 14, SB + 16
SB_META_BLKADDR, SB_XATTR_BLKADDR, SB_EXTRA_DEVICES, SB_DEVT_SLOTOFF = SB + 40, SB + 44, SB + 86, SB + 88
# extended (RAFS v6) superblock
EXT_BLOB_OFF, EXT_BLOB_SIZE, EXT_CHUNK_SIZE = EXT + 8, EXT + 16, EXT + 20
EXT_CHUNK_OFF, EXT_CHUNK_TSIZE, EXT_PREFETCH_OFF, EXT_PREFETCH_SIZE = EXT + 24, EXT + 32, EXT + 40, EXT + 48
# blob table entry fields, chunk table entry fields
BLOB_CHUNK_SIZE, BLOB_CHUNK_COUNT, BLOB_COMPRESSED, BLOB_UNCOMPRESSED = 68, 72, 88, 96
CI_BLOB_INDEX, CI_COMPRESSED_SIZE, CI_UNCOMPRESSED_SIZE = 32, 40, 44


# --------------------------------------------------------------------------- the valid image
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[bytes, Bootstrap]:
    """A small image built by convert(): nested dirs, a multi-chunk file, a symlink, a big
    directory (more than one block: its data sits in a separate block), a prefetch table."""
    tmp = tmp_path_factory.mktemp("valid")
    src = tmp / "src"
    (src / "d/e").mkdir(parents=True)
    (src / "d/e/f").write_bytes(os.urandom(3 * CS + 100))
    (src / "small").write_bytes(b"small\n")
    os.symlink("d/e/f", src / "sym")
    (src / "big").mkdir()
    for i in range(300):
        (src / "big" / f"entry-with-a-longish-name-{i:04d}").write_bytes(b"")
    convert(src, tmp / "out", compressor="zstd", chunk_size=CS, progress=False, prefetch=["/small"])
    raw = (tmp / "out/image.boot").read_bytes()
    boot = Bootstrap.open(tmp / "out/image.boot")
    assert boot.prefetch_nids and boot.chunk_table and len(boot.blobs) == 1
    return raw, boot


def _fix_checksum(buf: bytearray) -> None:
    """Recompute SB_CHKSUM (covers bytes 1024..4096: superblock, ext superblock, device table)."""
    struct.pack_into("<I", buf, SB + 4, L.superblock_checksum(bytes(buf[:BS])))


def _put(buf: bytearray, off: int, fmt: str, value: int) -> None:
    struct.pack_into("<" + fmt, buf, off, value)
    if off < BS:
        _fix_checksum(buf)


def _open(tmp_path: Path, buf: bytes | bytearray) -> Bootstrap:
    p = tmp_path / "bad.boot"
    p.write_bytes(bytes(buf))
    return Bootstrap.open(p)


def _refused(tmp_path: Path, buf: bytes | bytearray, match: str) -> BootstrapError:
    with pytest.raises(BootstrapError, match=match) as ei:
        _open(tmp_path, buf)
    msg = str(ei.value)
    assert msg.startswith(str(tmp_path / "bad.boot") + ": ") and "\n" not in msg
    return ei.value


def _inode_off(boot: Bootstrap, node: Inode) -> int:
    return boot.superblock.meta_blkaddr * BS + L.ISLOT_SIZE * node.nid


def _dir_data_off(raw: bytes, boot: Bootstrap, node: Inode) -> int:
    """Where a directory's first data block starts (separate block or inline tail)."""
    off = _inode_off(boot, node)
    di = L.DiskInode.unpack(raw, off)
    if di.size >= BS or di.layout == L.LAYOUT_FLAT_PLAIN:
        return di.i_u * BS
    return off + di.isize + di.xattr_size


def _dirent_off(raw: bytes, boot: Bootstrap, node: Inode, name: bytes) -> int:
    """Offset of the dirent naming `name` in a (one-block) directory."""
    start = _dir_data_off(raw, boot, node)
    di = L.DiskInode.unpack(raw, _inode_off(boot, node))
    for i, (n, _, _) in enumerate(L.unpack_dirents(raw[start:start + min(di.size, BS)])):
        if n == name:
            return start + i * L.DIRENT_SIZE
    raise KeyError(name)


def _chunk_index_off(raw: bytes, boot: Bootstrap, node: Inode) -> int:
    off = _inode_off(boot, node)
    di = L.DiskInode.unpack(raw, off)
    return (off + di.isize + di.xattr_size + 7) // 8 * 8


# --------------------------------------------------------------------------- still opens
def test_valid_images_open(built, tmp_path) -> None:
    raw, _ = built
    boot = _open(tmp_path, raw)
    assert lookup(boot.image.root, b"/d/e/f").size == 3 * CS + 100
    assert len(lookup(boot.image.root, b"/big").children) == 300
    assert boot.image.prefetch == [b"/small"]


def test_nydus_fixture_opens() -> None:
    assert NYDUS_BOOT.exists(), f"the nydus-built fixture is missing: {NYDUS_BOOT}"
    boot = Bootstrap.open(NYDUS_BOOT)
    assert sorted(boot.image.root.children) == [b"lib.rs", b"sync_io.rs"]


@pytest.mark.parametrize("compressor", ["none", "lz4_block", "zstd"])
def test_images_of_every_compressor_open(tmp_path, compressor) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a/x").write_bytes(os.urandom(10_000) + bytes(20_000))
    os.symlink("a/x", src / "s")
    convert(src, tmp_path / "out", compressor=compressor, chunk_size=4096, progress=False)
    boot = Bootstrap.open(tmp_path / "out/image.boot")
    assert boot.read_file(lookup(boot.image.root, b"/a/x"), tmp_path / "out/blobs") == (src / "a/x").read_bytes()


# --------------------------------------------------------------------------- not a regular file
def test_missing_file_is_a_bootstrap_error_and_file_not_found(tmp_path) -> None:
    with pytest.raises(BootstrapNotFoundError, match="no such file") as ei:
        Bootstrap.open(tmp_path / "nope.boot")
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, BootstrapError)


@pytest.mark.parametrize("kind", ["directory", "FIFO", "character device"])
def test_not_a_regular_file(tmp_path, kind) -> None:
    p = tmp_path / "thing"
    if kind == "directory":
        p.mkdir()
    elif kind == "FIFO":
        os.mkfifo(p)  # opening it for reading would block without a writer
    else:
        p = Path("/dev/null")
    result: list[BaseException | None] = []

    def attempt() -> None:
        try:
            Bootstrap.open(p)
            result.append(None)
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the thread (it opened the FIFO) before failing
        with open(p, "wb"):
            pass
        pytest.fail(f"Bootstrap.open blocked on a {kind}")
    assert isinstance(result[0], BootstrapError), result
    assert f"not a regular file ({kind})" in str(result[0]) and str(p) in str(result[0])


# --------------------------------------------------------------------------- superblock
@pytest.mark.parametrize("size", [0, 100, SB + 100, 2000])
def test_too_short(built, tmp_path, size) -> None:
    raw, _ = built
    _refused(tmp_path, raw[:size], "truncated")


def test_bad_magic(built, tmp_path) -> None:
    buf = bytearray(built[0])
    _put(buf, SB_MAGIC, "I", 0x12345678)
    _refused(tmp_path, buf, "bad superblock magic 0x12345678")


@pytest.mark.parametrize("bits", [9, 13, 16, 255])
def test_bad_block_size(built, tmp_path, bits) -> None:
    buf = bytearray(built[0])
    _put(buf, SB_BLKSZBITS, "B", bits)
    _refused(tmp_path, buf, rf"block size 2\^{bits} unsupported")


def test_inode_area_past_the_end(built, tmp_path) -> None:
    buf = bytearray(built[0])
    _put(buf, SB_META_BLKADDR, "I", 0xFFFFFF)
    _refused(tmp_path, buf, "inode area at block 16777215 .* past the end of the file")


def test_root_nid_past_the_end(built, tmp_path) -> None:
    buf = bytearray(built[0])
    _put(buf, SB_ROOT_NID, "H", 0xFFFF)
    _refused(tmp_path, buf, "root inode nid 65535 is past the end")


def test_xattr_area_past_the_end(built, tmp_path) -> None:
    buf = bytearray(built[0])
    _put(buf, SB_XATTR_BLKADDR, "I", 0x100000)
    _refused(tmp_path, buf, "shared xattr area at block 1048576 is past the end")


def test_absurd_inode_count_refused(built, tmp_path) -> None:
    buf = bytearray(built[0])
    _put(buf, SB_INOS, "Q", 1 << 32)
    _refused(tmp_path, buf, "superblock claims 4294967296 inodes, the inode area holds at most")


# --------------------------------------------------------------------------- tables past the end
def test_device_table_past_the_end(built, tmp_path) -> None:
    buf = bytearray(built[0])
    _put(buf, SB_DEVT_SLOTOFF, "H", 0xFFFF)
    _refused(tmp_path, buf, "device table .* past the end of the file")


def test_blob_table_past_the_end(built, tmp_path) -> None:
    buf = bytearray(built[0])
    _put(buf, EXT_BLOB_OFF, "Q", len(buf) - 100)
    _refused(tmp_path, buf, "blob table at offset .* past the end of the file")


def test_chunk_table_past_the_end(built, tmp_path) -> None:
    buf = bytearray(built[0])
    _put(buf, EXT_CHUNK_OFF, "Q", 1 << 40)
    _refused(tmp_path, buf, "chunk table at offset 1099511627776 .* past the end of the file")


def test_prefetch_table_past_the_end(built, tmp_path) -> None:
    buf = bytearray(built[0])
    _put(buf, EXT_PREFETCH_OFF, "Q", len(buf) - 2)
    _refused(tmp_path, buf, "prefetch table at offset .* past the end of the file")


def test_directory_data_past_the_end(built, tmp_path) -> None:
    raw, boot = built
    buf = bytearray(raw)
    big = lookup(boot.image.root, b"/big")
    di = L.DiskInode.unpack(raw, _inode_off(boot, big))
    assert di.size > BS and di.i_u  # a block of its own
    _put(buf, _inode_off(boot, big) + 16, "I", 0x7FFFFFFF)  # compact inode: i_u at 16
    _refused(tmp_path, buf, "directory data .* past the end of the file")


def test_chunk_indexes_past_the_end(built, tmp_path) -> None:
    raw, boot = built
    buf = bytearray(raw)
    f = lookup(boot.image.root, b"/d/e/f")
    di = L.DiskInode.unpack(raw, _inode_off(boot, f))
    size_at = _inode_off(boot, f) + 8  # i_size: u64 @8 (extended), u32 @8 (compact)
    _put(buf, size_at, "Q" if di.extended else "I", 0xFFFF0000)
    _refused(tmp_path, buf, "chunk indexes .* past the end of the file")


# --------------------------------------------------------------------------- the tree
def test_dirent_naming_a_nid_outside_the_file(built, tmp_path) -> None:
    raw, boot = built
    buf = bytearray(raw)
    _put(buf, _dirent_off(raw, boot, boot.image.root, b"small"), "Q", 1 << 40)
    _refused(tmp_path, buf, "entry b'small' names nid 1099511627776, outside the file")


def test_directory_loop_terminates_with_an_error(built, tmp_path) -> None:
    raw, boot = built
    root = boot.image.root
    d = lookup(root, b"/d")
    for loop_to in (root, d):  # /d/e -> / and /d/e -> /d
        buf = bytearray(raw)
        _put(buf, _dirent_off(raw, boot, d, b"e"), "Q", loop_to.nid)
        _refused(tmp_path, buf, "directory loop")
    buf = bytearray(raw)  # /d/e -> /d/e itself
    e = lookup(root, b"/d/e")
    _put(buf, _dirent_off(raw, boot, e, b"f"), "Q", e.nid)
    _refused(tmp_path, buf, "directory loop")


def test_directory_linked_twice(built, tmp_path) -> None:
    raw, boot = built
    buf = bytearray(raw)
    e = lookup(boot.image.root, b"/d/e")
    _put(buf, _dirent_off(raw, boot, boot.image.root, b"small"), "Q", e.nid)
    _refused(tmp_path, buf, "linked twice")


def test_name_past_its_block(built, tmp_path) -> None:
    raw, boot = built
    buf = bytearray(raw)
    # the last entry of root's (inline, one-block) directory: its name starts past the data
    root = boot.image.root
    last = _dirent_off(raw, boot, root, max(root.children))
    _put(buf, last + 8, "H", 4000)
    _refused(tmp_path, buf, r"directory / \(nid \d+\), block 0: entry \d+: name at 4000 runs past the end "
                            r"of its block \(\d+ bytes\)")


def test_name_longer_than_name_max(built, tmp_path) -> None:
    raw, boot = built
    buf = bytearray(raw)
    start = _dir_data_off(raw, boot, lookup(boot.image.root, b"/big"))  # a full 4 KiB block
    ents = L.unpack_dirents(raw[start:start + BS])
    first = len(ents) * L.DIRENT_SIZE
    for i in range(1, len(ents)):  # entry 0's name now runs 300 bytes
        struct.pack_into("<H", buf, start + i * L.DIRENT_SIZE + 8, first + 300)
    _refused(tmp_path, buf, r"directory /big .*entry 0: name of 300 bytes .* \(longer than 255\)")


def test_nameoff_inside_the_entry_table(built, tmp_path) -> None:
    raw, boot = built
    buf = bytearray(raw)
    root = boot.image.root
    _put(buf, _dirent_off(raw, boot, root, b"small") + 8, "H", 12)
    _refused(tmp_path, buf, r"entry \d+: nameoff 12 points into the entry table")


def test_bad_entry_name(built, tmp_path) -> None:
    raw, boot = built
    buf = bytearray(raw)
    d = lookup(boot.image.root, b"/d")
    at = _dir_data_off(raw, boot, d)
    names = [n for n, _, _ in L.unpack_dirents(raw[at:at + 64 + 12 * 3])]
    assert names == [b".", b"..", b"e"]
    nameoff = struct.unpack_from("<H", raw, _dirent_off(raw, boot, d, b"e") + 8)[0]
    buf[at + nameoff] = ord("/")
    _refused(tmp_path, buf, r"bad entry name b'/'")


def test_unknown_file_type(built, tmp_path) -> None:
    raw, boot = built
    buf = bytearray(raw)
    small = lookup(boot.image.root, b"/small")
    off = _inode_off(boot, small)
    mode = struct.unpack_from("<H", raw, off + 4)[0]
    _put(buf, off + 4, "H", (mode & 0o7777) | 0o170000)
    _refused(tmp_path, buf, "unknown file type in mode 0o17")


def test_inodes_sharing_bytes_are_refused(built, tmp_path) -> None:
    """Corrupt inodes claiming the same bytes many times over (here: symlinks whose targets
    are the whole file) would multiply memory; the reader refuses them."""
    raw, boot = built
    buf = bytearray(raw)
    for name in sorted(lookup(boot.image.root, b"/big").children)[:3]:
        off = _inode_off(boot, lookup(boot.image.root, b"/big/" + name))
        L.DiskInode(False, L.LAYOUT_FLAT_PLAIN, 0, stat.S_IFLNK | 0o777, 1, len(raw) - BS, 1, 0, 0,
                    0).pack_into(buf, off)
    _refused(tmp_path, buf, "overlaps other metadata")


# --------------------------------------------------------------------------- devices and blobs
def test_chunk_on_a_device_past_the_table(built, tmp_path) -> None:
    raw, boot = built
    buf = bytearray(raw)
    f = lookup(boot.image.root, b"/d/e/f")
    at = _chunk_index_off(raw, boot, f)
    _advise, dev, blkaddr = L.unpack_chunk_index(raw, at)
    assert dev & 0xFF == 1 and blkaddr != L.NULL_ADDR
    _put(buf, at + 2, "H", (dev & 0xFF00) | 9)
    _refused(tmp_path, buf, r"chunk 0 on device 9, past the device/blob table \(1 blobs\)")


def test_chunk_table_entry_blob_index_past_the_table(built, tmp_path) -> None:
    raw, boot = built
    buf = bytearray(raw)
    _put(buf, boot.ext.chunk_table_offset + CI_BLOB_INDEX, "I", 7)
    _refused(tmp_path, buf, "chunk table entry 0: blob index 7 past the blob table")


def test_device_table_and_blob_table_disagree(built, tmp_path) -> None:
    buf = bytearray(built[0])
    _put(buf, SB_EXTRA_DEVICES, "H", 2)
    _refused(tmp_path, buf, "device table has 2 slots but the blob table 1 entries")


@pytest.mark.parametrize("field,fmt,value,match", [
    (BLOB_UNCOMPRESSED, "Q", 1 << 60, "impossible uncompressed size"),
    (BLOB_COMPRESSED, "Q", 1 << 60, "impossible compressed size"),
    (BLOB_CHUNK_COUNT, "I", 0xFFFFFFFF, "impossible chunk count 4294967295"),
    (BLOB_CHUNK_SIZE, "I", 3, "chunk size 3 is not a power of two"),
    (BLOB_CHUNK_SIZE, "I", 1 << 30, "chunk size 1073741824 is not a power of two"),
    (76, "I", 99, "unknown compression algorithm id 99"),
    (0, "2s", 0x2E2E, "id b'..' is not a usable blob id"),  # blob id "..": a path, not a name
])
def test_blob_table_entry_with_impossible_values(built, tmp_path, field, fmt, value, match) -> None:
    raw, boot = built
    buf = bytearray(raw)
    at = boot.ext.blob_table_offset + field
    if fmt == "2s":
        buf[at:at + 64] = b"..".ljust(64, b"\0")
    else:
        _put(buf, at, fmt, value)
    _refused(tmp_path, buf, "blob 0.*" + match)


@pytest.mark.parametrize("field,value,match", [
    (CI_UNCOMPRESSED_SIZE, 0x80000000, "impossible uncompressed size 2147483648"),
    (CI_UNCOMPRESSED_SIZE, 0, "impossible uncompressed size 0"),
    (CI_COMPRESSED_SIZE, 0xFFFFFFFF, "impossible compressed size 4294967295"),
])
def test_chunk_table_entry_with_impossible_sizes(built, tmp_path, field, value, match) -> None:
    raw, boot = built
    buf = bytearray(raw)
    _put(buf, boot.ext.chunk_table_offset + field, "I", value)
    _refused(tmp_path, buf, "chunk table entry 0: " + match)


# --------------------------------------------------------------------------- absurd counts
@pytest.mark.parametrize("field,fmt,value,match", [
    (EXT_CHUNK_TSIZE, "Q", 80 << 34, "chunk table at offset .* past the end"),  # 2^34 entries
    (EXT_PREFETCH_SIZE, "I", 0xFFFFFFFC, "prefetch table at offset .* past the end"),
    (EXT_BLOB_SIZE, "I", 0xFFFFFF00, "blob table claims 16777215 blobs"),
    (SB_EXTRA_DEVICES, "H", 0xFFFF, "device table .* past the end"),
])
def test_absurd_table_sizes_refused_before_allocating(built, tmp_path, field, fmt, value, match) -> None:
    buf = bytearray(built[0])
    _put(buf, field, fmt, value)
    tracemalloc.start()
    try:
        _refused(tmp_path, buf, match)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(buf) + (1 << 20)


def test_terabyte_file_refused_before_allocating(built, tmp_path) -> None:
    """A 1 TiB regular file in 4 KiB chunks would be 2^28 chunk indexes (2 GiB of them, tens of
    GiB as objects): refused from the inode's size alone."""
    raw, boot = built
    buf = bytearray(raw)
    f = lookup(boot.image.root, b"/d/e/f")
    off = _inode_off(boot, f)
    di = L.DiskInode.unpack(raw, off)
    assert di.extended
    di.size = 1 << 40
    di.i_u = L.CHUNK_FORMAT_INDEXES  # chunkbits 0: 4 KiB chunks
    di.pack_into(buf, off)
    tracemalloc.start()
    try:
        _refused(tmp_path, buf, r"268435456 chunk indexes .* past the end of the file")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(buf) + (1 << 20)


def test_bad_extended_chunk_size(built, tmp_path) -> None:
    buf = bytearray(built[0])
    _put(buf, EXT_CHUNK_SIZE, "I", 12345)
    _refused(tmp_path, buf, "chunk size 12345 in the extended superblock")
