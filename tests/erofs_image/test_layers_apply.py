"""Layer application on the Image model, with an in-memory stand-in for ChunkStore."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile

import pytest
import zstandard

from erofs_image.layers import BuildError, apply_layer
from erofs_image.tree import ChunkRef, Image, Inode, lookup, walk


class FakeStore:
    """Chunks by chunk_size, all-zero chunks are holes, remembers bytes by digest."""

    def __init__(self, chunk_size: int = 4096):
        self.chunk_size = chunk_size
        self.data: dict[bytes, bytes] = {}
        self.max_read = 0

    def add_stream(self, read, size):
        out = []
        left = size
        while left:
            n = min(self.chunk_size, left)
            self.max_read = max(self.max_read, n)
            piece = read(n)
            assert len(piece) == n
            left -= n
            if piece.count(0) == n:
                out.append(None)
                continue
            d = hashlib.sha256(piece).digest()
            self.data[d] = piece
            out.append(ChunkRef(0, 0, n, 0, n, False, d))
        return out

    def content(self, inode: Inode) -> bytes:
        parts = []
        for i, ref in enumerate(inode.chunks):
            n = min(self.chunk_size, inode.size - i * self.chunk_size)
            parts.append(b"\0" * n if ref is None else self.data[ref.digest])
        return b"".join(parts)


def new_image() -> Image:
    return Image(root=Inode(mode=stat.S_IFDIR | 0o755))


def ti(name, type=tarfile.REGTYPE, data=b"", mode=0o644, **kw):
    t = tarfile.TarInfo(name)
    t.type = type
    t.mode = mode
    t.mtime = kw.pop("mtime", 1_700_000_000)
    for k, v in kw.items():
        setattr(t, k, v)
    if type in (tarfile.REGTYPE,):
        t.size = len(data)
    return t, data


def make_tar(entries, compression="", fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for t, data in entries:
            tf.addfile(t, io.BytesIO(data) if t.isreg() else None)
    raw = buf.getvalue()
    if compression == "gzip":
        return gzip.compress(raw)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def apply(image, store, entries, compression="", name="layer", fmt=tarfile.PAX_FORMAT):
    return apply_layer(image, io.BytesIO(make_tar(entries, compression, fmt)), store, name)


def names(image):
    return [p for p, _ in walk(image.root)]


@pytest.mark.parametrize("compression", ["", "gzip", "zstd"])
def test_basic_types(compression):
    img, st = new_image(), FakeStore()
    data = os.urandom(10_000) + b"\0" * 8192 + b"tail"
    apply(img, st, [
        ti("./", tarfile.DIRTYPE, mode=0o755),
        ti("./etc/", tarfile.DIRTYPE, mode=0o700, uid=5, gid=6),
        ti("./etc/file", data=data, mode=0o4755),
        ti("./etc/link", tarfile.SYMTYPE, linkname="file"),
        ti("./dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
        ti("./dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
        ti("./fifo", tarfile.FIFOTYPE),
        ti("./etc/hard", tarfile.LNKTYPE, linkname="./etc/file"),
    ], compression)
    f = lookup(img.root, b"/etc/file")
    assert stat.S_ISREG(f.mode) and stat.S_IMODE(f.mode) == 0o4755
    assert st.content(f) == data
    assert None in f.chunks  # the zero chunk became a hole
    assert lookup(img.root, b"/etc/hard") is f
    e = lookup(img.root, b"/etc")
    assert e.is_dir and stat.S_IMODE(e.mode) == 0o700 and (e.uid, e.gid) == (5, 6)
    ln = lookup(img.root, b"/etc/link")
    assert ln.is_symlink and ln.target == b"file" and ln.size == 4
    assert lookup(img.root, b"/dev/null").rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(lookup(img.root, b"/dev/sda").mode)
    assert stat.S_ISFIFO(lookup(img.root, b"/fifo").mode)
    assert lookup(img.root, b"/dev").is_dir  # implicit parent
    assert st.max_read <= st.chunk_size


def test_three_layers_whiteouts_and_opaque():
    img, st = new_image(), FakeStore()
    apply(img, st, [
        ti("a/", tarfile.DIRTYPE),
        ti("a/keep", data=b"keep"),
        ti("a/gone", data=b"gone"),
        ti("o/", tarfile.DIRTYPE),
        ti("o/lower1", data=b"1"),
        ti("o/sub/", tarfile.DIRTYPE),
        ti("o/sub/deep", data=b"d"),
        ti("d/", tarfile.DIRTYPE),
        ti("d/x", data=b"x"),
    ])
    # layer 2: whiteout a file and a whole dir; opaque o/ with the marker AFTER new entries
    apply(img, st, [
        ti("a/.wh.gone"),
        ti(".wh.d"),
        ti("o/", tarfile.DIRTYPE, mode=0o711),
        ti("o/new", data=b"new"),
        ti("o/sub/", tarfile.DIRTYPE),
        ti("o/sub/mine", data=b"m"),
        ti("o/.wh..wh..opq"),
    ])
    assert names(img) == [b"/", b"/a", b"/a/keep", b"/o", b"/o/new", b"/o/sub", b"/o/sub/mine"]
    assert stat.S_IMODE(lookup(img.root, b"/o").mode) == 0o711
    # layer 3: recreate d, whiteout of something this layer adds itself is ignored
    apply(img, st, [
        ti(".wh..wh..opq"),  # opaque root: only layer-3 entries survive ...
        ti("a/", tarfile.DIRTYPE),
        ti("a/keep", data=b"keep3"),
        ti("d/y", data=b"y"),
        ti("d/.wh.y"),
    ])
    assert names(img) == [b"/", b"/a", b"/a/keep", b"/d", b"/d/y"]
    assert st.content(lookup(img.root, b"/a/keep")) == b"keep3"


def test_dir_reappearing_keeps_children_and_replacing_types():
    img, st = new_image(), FakeStore()
    apply(img, st, [ti("d/", tarfile.DIRTYPE, mode=0o755), ti("d/f", data=b"f"),
                    ti("x", data=b"file"), ti("y/", tarfile.DIRTYPE), ti("y/z", data=b"z")])
    apply(img, st, [ti("d/", tarfile.DIRTYPE, mode=0o700, uid=3),
                    ti("x/", tarfile.DIRTYPE), ti("x/in", data=b"i"),
                    ti("y", tarfile.SYMTYPE, linkname="/tmp")])
    d = lookup(img.root, b"/d")
    assert stat.S_IMODE(d.mode) == 0o700 and d.uid == 3 and b"f" in d.children
    assert lookup(img.root, b"/x").is_dir and lookup(img.root, b"/y").is_symlink


def test_hard_links_across_layers():
    img, st = new_image(), FakeStore()
    apply(img, st, [ti("bin/", tarfile.DIRTYPE), ti("bin/busybox", data=b"BB" * 5000, mode=0o755)])
    apply(img, st, [ti("bin/sh", tarfile.LNKTYPE, linkname="bin/busybox"),
                    ti("/usr/bin/ls", tarfile.LNKTYPE, linkname="/bin/busybox")])
    bb = lookup(img.root, b"/bin/busybox")
    assert lookup(img.root, b"/bin/sh") is bb and lookup(img.root, b"/usr/bin/ls") is bb
    # replacing one name later does not change the other
    apply(img, st, [ti("bin/busybox", data=b"new")])
    assert st.content(lookup(img.root, b"/bin/sh")) == b"BB" * 5000


def test_hard_link_missing_target():
    with pytest.raises(BuildError, match=r"L1: member 'h'.*hard link target 'nope' does not exist"):
        apply(new_image(), FakeStore(), [ti("h", tarfile.LNKTYPE, linkname="nope")], name="L1")


def test_hard_link_escape():
    img = new_image()
    with pytest.raises(BuildError, match=r"member 'h'.*'\.\.'"):
        apply(img, FakeStore(), [ti("f", data=b"x"), ti("h", tarfile.LNKTYPE, linkname="../f")])


def test_pax_long_names_xattrs_nsec():
    img, st = new_image(), FakeStore()
    long = "d/" + "x" * 150 + "/" + "é" * 90 + ".txt"
    t, data = ti(long, data=b"long")
    t.pax_headers = {"SCHILY.xattr.user.color": "blue", "SCHILY.xattr.security.capability": "\x01\x02",
                     "mtime": "1700000000.123456789"}
    lt, _ = ti("lnk", tarfile.SYMTYPE, linkname="/" + "t" * 200)
    apply(img, st, [(t, data), (lt, b"")])
    node = lookup(img.root, os.fsencode("/" + long))
    assert st.content(node) == b"long"
    assert node.xattrs == {b"user.color": b"blue", b"security.capability": b"\x01\x02"}
    assert (node.mtime, node.mtime_nsec) == (1_700_000_000, 123_456_789)
    assert lookup(img.root, b"/lnk").target == b"/" + b"t" * 200


def test_gnu_long_names():
    img, st = new_image(), FakeStore()
    long = "g/" + "y" * 300
    apply(img, st, [ti(long, data=b"gnu"), ti("l", tarfile.SYMTYPE, linkname="z" * 200)],
          fmt=tarfile.GNU_FORMAT)
    assert st.content(lookup(img.root, os.fsencode("/" + long))) == b"gnu"
    assert lookup(img.root, b"/l").target == b"z" * 200


def test_sparse_member_refused():
    # a GNU sparse member (type 'S'), written by hand: one 512-byte data block at offset 0
    hdr = bytearray(512)
    hdr[0:8] = b"sparsef\0"
    hdr[100:108] = b"0000644\0"
    hdr[108:116] = hdr[116:124] = b"0000000\0"
    hdr[124:136] = b"00000001000\0"  # stored size 512
    hdr[136:148] = b"00000000000\0"
    hdr[156:157] = b"S"
    hdr[257:265] = b"ustar  \0"
    hdr[386:398] = b"00000000000\0"  # sparse[0].offset
    hdr[398:410] = b"00000001000\0"  # sparse[0].numbytes
    hdr[483:495] = b"00000100000\0"  # realsize 32768
    hdr[148:156] = b"        "
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    raw = bytes(hdr) + b"A" * 512 + b"\0" * 1024
    with pytest.raises(BuildError, match=r"L: member 'sparsef'.*sparse"):
        apply_layer(new_image(), io.BytesIO(raw), FakeStore(), "L")


def test_dotdot_escape_refused():
    with pytest.raises(BuildError, match=r"member '\.\./evil'.*'\.\.'"):
        apply(new_image(), FakeStore(), [ti("../evil", data=b"x")])
    with pytest.raises(BuildError, match=r"'a/\.\./\.\./evil'"):
        apply(new_image(), FakeStore(), [ti("a/../../evil", data=b"x")])


def test_symlink_parent_refused():
    img = new_image()
    apply(img, FakeStore(), [ti("etc", tarfile.SYMTYPE, linkname="/tmp")])
    with pytest.raises(BuildError, match=r"member 'etc/passwd'.*'etc' is a symlink"):
        apply(img, FakeStore(), [ti("etc/passwd", data=b"x")])
    img = new_image()
    with pytest.raises(BuildError, match="is a symlink"):
        apply(img, FakeStore(), [ti("l", tarfile.SYMTYPE, linkname="."), ti("l/x", data=b"")])


def test_truncated_tar():
    raw = make_tar([ti("big", data=os.urandom(100_000))])
    with pytest.raises(BuildError, match=r"L: member 'big': truncated"):
        apply_layer(new_image(), io.BytesIO(raw[:50_000]), FakeStore(), "L")


def test_truncated_and_corrupt_gzip():
    gz = make_tar([ti("big", data=os.urandom(100_000))], "gzip")
    with pytest.raises(BuildError, match=r"^L: .*(truncated|corrupt gzip)"):
        apply_layer(new_image(), io.BytesIO(gz[:40_000]), FakeStore(), "L")
    bad = bytearray(gz)
    bad[20:400] = b"\xff" * 380
    with pytest.raises(BuildError, match=r"^L: .*(corrupt gzip|truncated)"):
        apply_layer(new_image(), io.BytesIO(bytes(bad)), FakeStore(), "L")


def test_corrupt_zstd():
    z = make_tar([ti("big", data=os.urandom(100_000))], "zstd")
    bad = bytearray(z)
    bad[30:2000] = b"\x00" * 1970
    with pytest.raises(BuildError, match=r"^L: "):
        apply_layer(new_image(), io.BytesIO(bytes(bad)), FakeStore(), "L")


def test_not_a_tar():
    with pytest.raises(BuildError, match=r"^L: "):
        apply_layer(new_image(), io.BytesIO(b"hello world" * 100), FakeStore(), "L")
