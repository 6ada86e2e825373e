"""writer -> reader round trips, error handling, and the chunk store's blobs."""
from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

import pytest

from erofs_image import layout as L
from erofs_image.chunks import ChunkStore
from erofs_image.reader import Bootstrap, BootstrapError, ChunkVerifyError, read_blob_ci_table
from erofs_image.tree import BlobInfo, ChunkRef, Image, Inode, lookup, walk
from erofs_image.writer import build_bootstrap, write_bootstrap
from test_format_helpers import assert_same_tree, d, fsck, reg

CS = 64 * 1024


def _everything(store: ChunkStore) -> Image:
    rnd = os.urandom(3 * CS + 123)
    shared = reg(store, b"hard link body\n", uid=70000, gid=70001, mtime=1234, mtime_nsec=5)
    big_dir = d({b"e%05d" % i: Inode(mode=stat.S_IFREG | 0o600) for i in range(10_000)})
    root = d({
        b"file": reg(store, rnd, xattrs={b"user.a": b"1", b"trusted.b": b"\0\xff",
                                         b"security.selinux": b"system_u:object_r:x:s0\0",
                                         b"system.posix_acl_access": b"\x02\0\0\0",
                                         b"system.posix_acl_default": b"\x02\0\0\0"}),
        b"dup": reg(store, rnd),  # deduplicated against "file"
        b"holes": reg(store, bytes(CS) + b"x" * 10 + bytes(2 * CS)),
        b"empty": Inode(mode=stat.S_IFREG | 0o644),
        b"link1": shared, b"link2": shared,
        b"sym": Inode(mode=stat.S_IFLNK | 0o777, target=b"file", size=4),
        b"longsym": Inode(mode=stat.S_IFLNK | 0o777, target=b"a/" * 2000, size=4000),
        b"chr": Inode(mode=stat.S_IFCHR | 0o600, rdev=os.makedev(1, 3)),
        b"blk": Inode(mode=stat.S_IFBLK | 0o600, rdev=os.makedev(259, 70000)),
        b"fifo": Inode(mode=stat.S_IFIFO | 0o644),
        b"sock": Inode(mode=stat.S_IFSOCK | 0o755, mtime=99, mtime_nsec=999_999_999),
        b"n" * 255: Inode(mode=stat.S_IFREG | 0o644),
        b"\xff\xfe\x80latin1-\xe9": d({b"inner": Inode(mode=stat.S_IFREG | 0o644)}),
        b"-before-dot": Inode(mode=stat.S_IFREG | 0o644),
        b"big": big_dir,
        b"sub": d({b"deep": d({b"x": Inode(mode=stat.S_IFREG)})}, uid=1, gid=2),
    }, xattrs={b"user.root": b"r" * 300})
    # > 4 GiB of holes with one real chunk at the end: extended inode
    huge = Inode(mode=stat.S_IFREG | 0o644, size=(4 << 30) + CS + 5)
    n = -(-huge.size // CS)
    huge.chunks = [None] * (n - 1) + [store.add_chunk(b"tail!")]
    root.children[b"huge"] = huge
    store.finish_blob()
    return Image(root=root, blobs=store.blobs, chunk_size=CS, prefetch=[b"/file", b"/sub/deep"])


def test_round_trip_everything(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "blobs", CS, "zstd")
    img = _everything(store)
    write_bootstrap(img, tmp_path / "image.boot")
    fsck(tmp_path / "image.boot", tmp_path / "blobs", img.blobs)
    b = Bootstrap.open(tmp_path / "image.boot")
    assert_same_tree(img, b.image)
    r = b.image.root
    assert r.children[b"link1"] is r.children[b"link2"]
    assert r.children[b"dup"].chunks == r.children[b"file"].chunks
    assert b.read_file(r.children[b"holes"], tmp_path / "blobs") == bytes(CS) + b"x" * 10 + bytes(2 * CS)
    assert b.read_file(r.children[b"dup"], tmp_path / "blobs") == b.read_file(r.children[b"file"], tmp_path / "blobs")
    assert b.image.prefetch == [b"/file", b"/sub/deep"]
    assert len(r.children[b"big"].children) == 10_000
    # the inode forms chosen
    def disk(path: bytes) -> L.DiskInode:
        n = lookup(b.image.root, path)
        return L.DiskInode.unpack(Path(tmp_path / "image.boot").read_bytes(),
                                  b.superblock.meta_blkaddr * 4096 + 32 * n.nid)
    assert disk(b"/huge").extended and disk(b"/huge").size > 1 << 32
    assert disk(b"/link1").extended and disk(b"/link1").nlink == 2
    assert not disk(b"/empty").extended and disk(b"/empty").layout == L.LAYOUT_FLAT_PLAIN
    assert disk(b"/sym").layout == L.LAYOUT_FLAT_INLINE
    assert disk(b"/file").layout == L.LAYOUT_CHUNK_BASED
    assert disk(b"/").nlink == 2 + 3 and disk(b"/sub").nlink == 3
    # as nydus-image: the inode area starts one block past meta_blkaddr, so no nid is 0 (nydusd
    # takes the nid for the inode number)
    assert b.image.root.nid == 128 and b.superblock.root_nid == 128


def test_dirents_sorted_across_blocks_and_dotdot(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "blobs", CS, "none")
    img = _everything(store)
    raw = build_bootstrap(img)
    b = Bootstrap.parse(raw)
    big = lookup(b.image.root, b"/big")
    di = L.DiskInode.unpack(raw, b.superblock.meta_blkaddr * 4096 + 32 * big.nid)
    assert di.size > 4096 * 10
    names = []
    for o in range(0, di.size, 4096):  # FLAT_PLAIN or the full blocks of FLAT_INLINE
        if di.layout == L.LAYOUT_FLAT_INLINE and o + 4096 > di.size:
            break
        blk = raw[di.i_u * 4096 + o: di.i_u * 4096 + min(o + 4096, di.size)]
        ents = L.unpack_dirents(blk)
        names += [n for n, _, _ in ents]
        dot = {n: nid for n, nid, _ in ents}
        if b"." in dot:
            assert dot[b"."] == big.nid and dot[b".."] == b.image.root.nid
    assert names == sorted(names)
    root_di = L.DiskInode.unpack(raw, b.superblock.meta_blkaddr * 4096 + 32 * b.superblock.root_nid)
    assert root_di.mode & stat.S_IFDIR


def test_compact_inodes_take_build_time(tmp_path: Path) -> None:
    img = Image(root=d({b"a": Inode(mode=stat.S_IFREG | 0o644, mtime=777)}, mtime=777), build_time=777)
    raw = build_bootstrap(img)
    b = Bootstrap.parse(raw)
    assert_same_tree(img, b.image)
    di = L.DiskInode.unpack(raw, b.superblock.meta_blkaddr * 4096 + 32 * b.image.root.children[b"a"].nid)
    assert not di.extended and di.isize == 32


@pytest.mark.parametrize("compressor", ["none", "zstd", "lz4_block"])
def test_chunk_store_blobs(tmp_path: Path, compressor: str) -> None:
    store = ChunkStore(tmp_path / "blobs", 16384, compressor)
    a = os.urandom(20000) + b"A" * 30000  # random chunk, compressible chunks
    f1 = reg(store, a)
    store.start_blob()
    f2 = reg(store, a + b"B" * 5000)  # dedups a's chunks into blob 0
    f3 = reg(store, bytes(40000))  # all holes
    store.finish_blob()
    assert store.finish_blob() is None
    assert len(store.blobs) == 2 and f3.chunks == [None, None, None]
    assert f2.chunks[:3] == f1.chunks[:3] and {c.blob_index for c in f2.chunks[3:]} == {1}
    assert store.stats.deduped == 3
    for blob in store.blobs:
        path = tmp_path / "blobs" / blob.blob_id
        assert hashlib.sha256(path.read_bytes()).hexdigest() == blob.blob_id
        assert blob.uncompressed_size % 4096 == 0
        if compressor == "none":  # the blob is the device image
            assert blob.compressed_size == blob.uncompressed_size
    img = Image(root=d({b"1": f1, b"2": f2, b"3": f3}), blobs=store.blobs, chunk_size=16384)
    write_bootstrap(img, tmp_path / "i.boot")
    fsck(tmp_path / "i.boot", tmp_path / "blobs", store.blobs)
    b = Bootstrap.open(tmp_path / "i.boot")
    assert b.read_file(b.image.root.children[b"1"], tmp_path / "blobs") == a
    assert b.read_file(b.image.root.children[b"2"], tmp_path / "blobs") == a + b"B" * 5000
    assert b.read_file(b.image.root.children[b"3"], tmp_path / "blobs") == bytes(40000)
    # each blob's own chunk-info table agrees with the bootstrap chunk table
    for bi, blob in enumerate(b.blobs):
        header, entries = read_blob_ci_table(tmp_path / "blobs" / blob.blob_id)
        assert header.ci_entries == blob.chunk_count == len(entries)
        mine = [c for c in b.chunk_table if c.blob_index == bi]
        assert [c.index for c in mine] == list(range(len(entries)))
        for c in mine:
            e = entries[c.index]
            assert (e.compressed_offset, e.compressed_size, e.uncompressed_offset, e.uncompressed_size,
                    e.compressed) == (c.compressed_offset, c.compressed_size, c.uncompressed_offset,
                                      c.uncompressed_size, c.compressed)
    if compressor != "none":
        assert any(c.compressed for c in b.chunk_table)


def test_chunk_store_abort_removes_files(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "blobs", 16384, "zstd")
    reg(store, os.urandom(50000))
    store.finish_blob()
    reg(store, os.urandom(50000))
    assert len(list((tmp_path / "blobs").iterdir())) == 2
    store.abort()
    assert list((tmp_path / "blobs").iterdir()) == []


def test_read_chunk_detects_corruption(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "blobs", 16384, "none")
    f = reg(store, os.urandom(10000))
    store.finish_blob()
    write_bootstrap(Image(root=d({b"f": f}), blobs=store.blobs, chunk_size=16384), tmp_path / "i.boot")
    b = Bootstrap.open(tmp_path / "i.boot")
    path = tmp_path / "blobs" / store.blobs[0].blob_id
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(raw)
    with pytest.raises(ChunkVerifyError, match="blake3"):
        b.read_file(b.image.root.children[b"f"], tmp_path / "blobs")


def test_writer_rejects_what_the_format_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="xattr"):
        build_bootstrap(Image(root=d(xattrs={b"foo.bar": b"x"})))
    with pytest.raises(ValueError, match="255"):
        build_bootstrap(Image(root=d({b"n" * 256: Inode(mode=stat.S_IFREG)})))
    with pytest.raises(ValueError, match="at most 255"):
        blob = BlobInfo("0" * 64, "none", CS, 1, 4096, 4096)
        build_bootstrap(Image(root=d(), blobs=[blob] * 256))
    with pytest.raises(ValueError, match="chunks"):
        build_bootstrap(Image(root=d({b"f": Inode(mode=stat.S_IFREG, size=10)})))
    with pytest.raises(ValueError, match="linked twice"):
        sub = d()
        build_bootstrap(Image(root=d({b"a": sub, b"b": sub})))
    with pytest.raises(ValueError, match="power of two"):
        build_bootstrap(Image(root=d(), chunk_size=5000))


def test_reader_rejects_bad_images(tmp_path: Path) -> None:
    good = bytearray(build_bootstrap(Image(root=d({b"a": Inode(mode=stat.S_IFREG)}))))
    Bootstrap.parse(bytes(good))
    with pytest.raises(BootstrapError, match="truncated"):
        Bootstrap.parse(bytes(good[:1100]))
    bad = bytearray(good)
    bad[1024] ^= 1
    with pytest.raises(BootstrapError, match="magic"):
        Bootstrap.parse(bytes(bad))
    # written without SB_CHKSUM (nydusd refuses a non-zero checksum); one that has it is checked
    assert good[1028:1032] == bytes(4) and not good[1024 + 8] & L.FEATURE_COMPAT_SB_CHKSUM
    good[1024 + 8] |= L.FEATURE_COMPAT_SB_CHKSUM
    good[1028:1032] = L.superblock_checksum(bytes(good[:4096])).to_bytes(4, "little")
    Bootstrap.parse(bytes(good))
    bad = bytearray(good)
    bad[1024 + 64] ^= 1  # a uuid byte: checksum mismatch
    with pytest.raises(BootstrapError, match="checksum"):
        Bootstrap.parse(bytes(bad))
    bad = bytearray(good)
    bad[1024 + 80] |= 0x80  # unknown incompat feature (checksum fixed up)
    bad[1028:1032] = L.superblock_checksum(bytes(bad[:4096])).to_bytes(4, "little")
    with pytest.raises(BootstrapError, match="incompat"):
        Bootstrap.parse(bytes(bad))
    with pytest.raises(BootstrapError, match=r"truncated|past the end"):
        Bootstrap.parse(bytes(good[:4096 * 1]))


def test_chunk_index_over_16_bits_round_trips(tmp_path: Path) -> None:
    blob = BlobInfo("ab" * 32, "none", 4096, 70001, 4096 * 70001, 4096 * 70001)
    refs = [ChunkRef(0, 4096 * i, 4096, 4096 * i, 4096, False, bytes([i % 256]) * 32, i)
            for i in (3, 65536, 70000)]
    f = Inode(mode=stat.S_IFREG | 0o644, size=3 * 4096, chunks=list(refs))
    raw = build_bootstrap(Image(root=d({b"f": f}), blobs=[blob], chunk_size=4096))
    b = Bootstrap.parse(raw)
    assert b.image.root.children[b"f"].chunks == refs
    fnode = b.image.root.children[b"f"]
    base = b.superblock.meta_blkaddr * 4096 + 32 * fnode.nid + 32
    idx = [L.unpack_chunk_index(raw, base + 8 * i) for i in range(3)]
    assert idx == [(3, 1, 3), (0, 0x101, 65536), (70000 & 0xFFFF, 0x101, 70000)]


def test_scales_to_100k_inodes(tmp_path: Path) -> None:
    root = d()
    for i in range(100):
        root.children[b"d%03d" % i] = d({b"f%04d" % j: Inode(mode=stat.S_IFREG | 0o644, mtime=j)
                                         for j in range(1000)})
    t = time.monotonic()
    write_bootstrap(Image(root=root), tmp_path / "big.boot")
    b = Bootstrap.open(tmp_path / "big.boot")
    assert time.monotonic() - t < 60
    assert b.superblock.inos == 1 + 100 + 100_000
    assert sum(1 for _ in walk(b.image.root)) == 100_101
    fsck(tmp_path / "big.boot", tmp_path, [])
