"""convert() corner cases, each checked on a file-backed kernel mount of the uncompressed
result and by fsck.erofs: a 10,000-entry directory, 255-byte and non-UTF-8 names, a 5 GiB
sparse file (> 4 GiB: extended inode, 64-bit size) and whiteouts / opaque dirs over 3 layers."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from erofs_image import layout as L
from erofs_image.builder import BuildError, convert
from erofs_image.demo import entry, tar_bytes, write_oci_layout
from erofs_image.reader import Bootstrap
from erofs_image.tree import lookup
from test_format_helpers import erofs_available, fsck, mount_erofs, umount

MiB = 1 << 20
GiB = 1 << 30
DIR, SYM = tarfile.DIRTYPE, tarfile.SYMTYPE

needs_mount = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting EROFS needs root"),
    pytest.mark.skipif(not erofs_available(), reason="kernel has no EROFS"),
]


def _root_marks(f):
    for m in needs_mount:
        f = m(f)
    return f


@contextmanager
def built_and_mounted(tmp_path: Path, source: Path):
    """convert(source) uncompressed, fsck.erofs it, mount it; yields (out, report, mountpoint)."""
    out = tmp_path / "out"
    rep = convert(source, out, compressor="none", progress=False)
    fsck(out / "image.boot", out / "blobs", rep.blobs)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_erofs(out / "image.boot", mnt, [out / "blobs" / b.blob_id for b in rep.blobs])
    try:
        yield out, rep, mnt
    finally:
        umount(mnt)


def oci(tmp_path: Path, layers: list[tuple[bytes, str]]) -> Path:
    src = tmp_path / "oci"
    write_oci_layout(src, layers)
    return src


def snapshot(top: Path) -> dict[bytes, object]:
    """Mounted tree -> {relative bytes path: "dir" | file bytes | ("sym", target)}; also checks
    that every directory's nlink is 2 + its subdirectories (what the kernel reports)."""
    got: dict[bytes, object] = {}
    base = os.fsencode(top)

    def walk(d: bytes, rel: bytes) -> None:
        subdirs = 0
        for name in os.listdir(d):
            p, r = d + b"/" + name, (rel + b"/" + name if rel else name)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                subdirs += 1
                got[r] = "dir"
                walk(p, r)
            elif stat.S_ISLNK(st.st_mode):
                got[r] = ("sym", os.readlink(p))
            else:
                assert stat.S_ISREG(st.st_mode), r
                with open(p, "rb") as f:
                    got[r] = f.read()
                assert st.st_size == len(got[r]), r
        assert os.stat(d).st_nlink == 2 + subdirs, d

    walk(base, b"")
    return got


# --------------------------------------------------------------------------- 1. 10,000 entries

NFILES, NDIRS = 7000, 3000


def _big_dir_names() -> tuple[list[str], list[str]]:
    # varying lengths (dirent blocks end at irregular places); some names sort before "." and
    # ".." ("!", "+", "-" < ".") and some after every ASCII letter ("~")
    lead = "!+-_~aZ"
    files = [f"{lead[i % 7]}f{i:05d}" + "x" * (i % 61) for i in range(NFILES)]
    dirs = [f"{lead[(i + 3) % 7]}d{i:05d}" + "y" * (i % 37) for i in range(NDIRS)]
    return files, dirs


def _big_content(i: int) -> bytes:
    return (b"file %d\n" % i) * (1 + i % 900)  # 7 bytes .. ~8 KiB (multi-block chunks)


@_root_marks
def test_ten_thousand_entries_in_one_directory(tmp_path):
    files, dirs = _big_dir_names()
    ents = [entry("big/", None, DIR, 0o755)]
    for i, name in enumerate(files):
        ents.append(entry(f"big/{name}", _big_content(i)))
    for i, name in enumerate(dirs):
        ents.append(entry(f"big/{name}/", None, DIR, 0o750))
        if i % 10 == 0:
            ents.append(entry(f"big/{name}/inner", b"inner %d" % i))
    src = oci(tmp_path, [(tar_bytes(ents), "gzip")])
    with built_and_mounted(tmp_path, src) as (out, _rep, mnt):
        big = mnt / "big"
        listing = os.listdir(big)
        assert len(listing) == NFILES + NDIRS
        assert set(listing) == set(files) | set(dirs)
        assert os.stat(big).st_nlink == 2 + NDIRS
        # every name can be looked up (the kernel binary-searches the dirent blocks) and has
        # the right type; readdir's d_type agrees
        types = {e.name: e.is_dir(follow_symlinks=False) for e in os.scandir(big)}
        for name in files:
            assert stat.S_ISREG(os.lstat(big / name).st_mode), name
            assert not types[name]
        for name in dirs:
            st = os.lstat(big / name)
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750, name
            assert types[name]
        for i in list(range(0, NFILES, 97)) + [NFILES - 1]:
            assert (big / files[i]).read_bytes() == _big_content(i), files[i]
        for i in range(0, NDIRS, 10):
            assert os.listdir(big / dirs[i]) == ["inner"]
            assert (big / dirs[i] / "inner").read_bytes() == b"inner %d" % i
            assert os.stat(big / dirs[i]).st_nlink == 2
        assert os.listdir(big / dirs[1]) == []
    # the directory spans many blocks: its size as the reader sees it is consistent
    bs = Bootstrap.open(out / "image.boot")
    node = lookup(bs.image.root, b"/big")
    assert len(node.children) == NFILES + NDIRS
    assert node.size > 40 * L.BLOCK_SIZE


# --------------------------------------------------------------------------- 2. names

N255 = {  # name -> what it is; every name is exactly 255 bytes
    "file": "f" * 255,
    "dir": "d" * 255,
    "sub": "e" * 255,
    "deep": "g" * 255,
    "sym": "s" * 255,
    "hard": "h" * 255,
    "utf8": "\u00e9" * 127 + "x",  # 128 characters, 255 bytes
}
CAFE = os.fsdecode(b"caf\xe9")  # latin-1 bytes: not UTF-8
FFFE = os.fsdecode(b"\xff\xfe")
FF255 = os.fsdecode(b"\xff" * 255)
DEEP = f"{N255['dir']}/{N255['sub']}/{N255['deep']}"  # 767 characters: a PAX path record


def _name_layers(fmt: int) -> list[tuple[bytes, str]]:
    assert all(len(os.fsencode(n)) == 255 for n in N255.values())
    l1 = tar_bytes([
        entry(N255["file"], b"255-byte name"),
        entry(N255["dir"] + "/", None, DIR, 0o755),
        entry(f"{N255['dir']}/{N255['sub']}/", None, DIR, 0o755),
        entry(DEEP, b"reached through a long path"),
        entry(N255["sym"], None, SYM, 0o777, linkname=N255["file"]),
        # a symlink whose target is > 100 bytes (PAX linkpath / GNU longlink)
        entry("longtarget", None, SYM, 0o777, linkname=DEEP),
        entry(N255["hard"], None, tarfile.LNKTYPE, linkname=DEEP),
        entry(N255["utf8"], b"multibyte"),
        entry(CAFE, b"latin-1 name"),
        entry(FFFE + "/", None, DIR, 0o755),
        entry(f"{FFFE}/{CAFE}", b"nested non-utf8"),
        entry(f"{FFFE}/{FF255}", b"255 bytes of 0xff"),
        entry("badsym", None, SYM, 0o777, linkname=f"{FFFE}/{CAFE}"),
    ], fmt=fmt)
    return [(l1, "zstd")]


@_root_marks
@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_and_non_utf8_names(tmp_path, fmt):
    # tar_bytes writes with tarfile's defaults: encoding = the filesystem encoding,
    # errors="surrogateescape"; the non-UTF-8 bytes survive only if that encoding is UTF-8
    if tarfile.ENCODING != "utf-8":
        pytest.skip(f"tarfile encoding is {tarfile.ENCODING}")
    src = oci(tmp_path, _name_layers(fmt))
    b = {k: v.encode() for k, v in N255.items()}
    with built_and_mounted(tmp_path, src) as (_out, _rep, mnt):
        m = os.fsencode(mnt)
        assert set(os.listdir(m)) == {b["file"], b["dir"], b["sym"], b["hard"], b["utf8"],
                                      b"caf\xe9", b"\xff\xfe", b"longtarget", b"badsym"}
        assert os.listdir(m + b"/" + b["dir"]) == [b["sub"]]
        assert os.listdir(m + b"/" + b["dir"] + b"/" + b["sub"]) == [b["deep"]]
        assert set(os.listdir(m + b"/\xff\xfe")) == {b"caf\xe9", b"\xff" * 255}
        deep = m + b"/" + os.fsencode(DEEP)

        def read(p: bytes) -> bytes:
            with open(p, "rb") as f:
                return f.read()

        assert read(m + b"/" + b["file"]) == b"255-byte name"
        assert read(deep) == b"reached through a long path"
        assert os.readlink(m + b"/" + b["sym"]) == b["file"]
        assert read(m + b"/" + b["sym"]) == b"255-byte name"
        assert os.readlink(m + b"/longtarget") == os.fsencode(DEEP)
        assert read(m + b"/longtarget") == b"reached through a long path"
        hard = os.lstat(m + b"/" + b["hard"])
        assert hard.st_ino == os.lstat(deep).st_ino and hard.st_nlink == 2
        assert read(m + b"/" + b["utf8"]) == b"multibyte"
        assert read(m + b"/caf\xe9") == b"latin-1 name"
        assert read(m + b"/\xff\xfe/caf\xe9") == b"nested non-utf8"
        assert read(m + b"/\xff\xfe/" + b"\xff" * 255) == b"255 bytes of 0xff"
        assert os.readlink(m + b"/badsym") == b"\xff\xfe/caf\xe9"
        assert read(m + b"/badsym") == b"nested non-utf8"


def test_name_of_256_bytes_is_refused(tmp_path):
    src = oci(tmp_path, [(tar_bytes([entry("ok", b"x"), entry("n" * 256, b"too long")]), "")])
    with pytest.raises(BuildError, match="256 bytes"):
        convert(src, tmp_path / "out", compressor="none", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# --------------------------------------------------------------------------- 3. > 4 GiB

SPARSE_SIZE = 5 * GiB
REGIONS = {  # offset -> data (a few MiB each, not chunk aligned in the middle one)
    0: os.urandom(3 * MiB),
    4 * GiB + MiB + 12345: os.urandom(2 * MiB + 7),
    SPARSE_SIZE - 2 * MiB - 1: os.urandom(2 * MiB + 1),  # ends exactly at 5 GiB
}


def _disk_inode(out: Path, bs: Bootstrap, nid: int) -> L.DiskInode:
    data = (out / "image.boot").read_bytes()
    return L.DiskInode.unpack(data, bs.superblock.meta_blkaddr * L.BLOCK_SIZE + nid * L.ISLOT_SIZE)


@_root_marks
def test_sparse_file_larger_than_4gib(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    big = src / "big"
    with open(big, "wb") as f:
        f.truncate(SPARSE_SIZE)
        for off, data in REGIONS.items():
            f.seek(off)
            f.write(data)
    (src / "small").write_bytes(b"small")
    # mtime 0 == the image build time, uid/gid 0, nlink 1: the only reason left for an
    # extended inode is the size
    for p in (big, src / "small"):
        os.utime(p, ns=(0, 0))
    os.utime(src, ns=(0, 0))
    if os.stat(big).st_blocks * 512 >= GiB:
        pytest.skip("filesystem does not keep holes")
    cs = 1 << 20
    with built_and_mounted(tmp_path, src) as (out, rep, mnt):
        st = os.stat(mnt / "big")
        assert st.st_size == SPARSE_SIZE
        with open(mnt / "big", "rb") as f:
            fd = f.fileno()
            for off, data in REGIONS.items():
                assert os.pread(fd, len(data), off) == data, off
                # a few bytes around each region: zeros on both sides (except at 0 / EOF)
                if off:
                    assert os.pread(fd, 4096, off - 4096) == bytes(4096)
                end = off + len(data)
                assert os.pread(fd, 4096, end) == (bytes(4096) if end < SPARSE_SIZE else b"")
            # holes, one of them across the 4 GiB line (32-bit offsets would wrap there)
            for hole in (2 * GiB, 4 * GiB - MiB // 2, 4 * GiB + 100 * MiB):
                assert os.pread(fd, MiB, hole) == bytes(MiB), hole
            assert os.pread(fd, 100, SPARSE_SIZE - 10) == REGIONS[SPARSE_SIZE - 2 * MiB - 1][-10:]
        assert (mnt / "small").read_bytes() == b"small"
    bs = Bootstrap.open(out / "image.boot")
    node = lookup(bs.image.root, b"/big")
    assert node.size == SPARSE_SIZE
    assert len(node.chunks) == SPARSE_SIZE // cs
    data_chunks = set()
    for off, data in REGIONS.items():
        data_chunks |= set(range(off // cs, (off + len(data) - 1) // cs + 1))
    assert {i for i, r in enumerate(node.chunks) if r is not None} == data_chunks
    assert all(node.chunks[i] is None for i in range(3, 4096 + 1))  # the empty middle
    assert bs.read_chunk(node.chunks[4097], out / "blobs" / bs.blobs[0].blob_id) == \
        REGIONS[4 * GiB + MiB + 12345][:cs - 12345].rjust(cs, b"\0")
    assert rep.holes == SPARSE_SIZE // cs - len(data_chunks)
    di = _disk_inode(out, bs, node.nid)
    assert di.extended and di.size == SPARSE_SIZE and di.layout == L.LAYOUT_CHUNK_BASED
    small = _disk_inode(out, bs, lookup(bs.image.root, b"/small").nid)
    assert not small.extended and small.size == 5  # the control: same metadata, small size
    if shutil.which("dump.erofs"):  # erofs-utils' own view of the inode
        r = subprocess.run(["dump.erofs", *[f"--device={out}/blobs/{b.blob_id}" for b in rep.blobs],
                            f"--nid={node.nid}", str(out / "image.boot")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"Size: {SPARSE_SIZE} " in r.stdout and "Inode size: 64 " in r.stdout, r.stdout


# --------------------------------------------------------------------------- 4. whiteouts


def _whiteout_layers() -> list[tuple[bytes, str]]:
    l1 = tar_bytes([
        entry("etc/", None, DIR, 0o755),
        entry("etc/conf", b"conf v1"),
        entry("etc/keep", b"removed in layer 2"),
        entry("a/", None, DIR, 0o755),
        entry("a/gone", b"layer 1 content of a/gone"),
        entry("a/link", None, tarfile.LNKTYPE, linkname="a/gone"),  # outlives a/gone
        entry("a/stay", b"stay"),
        entry("a/dir/", None, DIR, 0o755),
        entry("a/dir/x", b"x"),
        entry("w/", None, DIR, 0o755),
        entry("w/f", b"wf"),
        entry("w/sub/", None, DIR, 0o755),
        entry("w/sub/deep", b"deep"),
        entry("o/", None, DIR, 0o755),
        entry("o/old1", b"old1"),
        entry("o/sub/", None, DIR, 0o755),
        entry("o/sub/old2", b"old2"),
        entry("o2/", None, DIR, 0o755),
        entry("o2/low", b"low"),
        entry("o2/lowdir/", None, DIR, 0o755),
        entry("lnk", None, SYM, 0o777, linkname="a/gone"),
    ])
    l2 = tar_bytes([
        entry("a/.wh.gone"),
        entry("a/dir/.wh.x"),
        entry(".wh.w"),
        entry("etc/.wh.keep"),
        entry("o/", None, DIR, 0o755),
        entry("o/.wh..wh..opq"),
        entry("o/new2", b"new2"),
        entry("o/sub/", None, DIR, 0o755),  # re-created under the opaque dir: old2 is gone
        entry("o/sub/n", b"n2"),
        entry("b/", None, DIR, 0o755),
        entry("b/file", b"b2"),
    ])
    l3 = tar_bytes([
        entry("a/gone", b"layer 3 re-creates a/gone, longer and different", mode=0o600),
        entry("w/", None, DIR, 0o711),  # re-created: w/f and w/sub must not come back
        entry("w/g", b"wg"),
        entry("o/new3", b"new3"),  # not opaque here: new2 and sub/ stay
        entry("o2/keep3", b"k3"),  # before this layer's opaque marker: kept
        entry("o2/.wh..wh..opq"),
        entry("b/.wh.file"),
    ])
    return [(l1, ""), (l2, "gzip"), (l3, "zstd")]


WHITEOUT_EXPECTED = {
    b"etc": "dir", b"etc/conf": b"conf v1",
    b"a": "dir", b"a/gone": b"layer 3 re-creates a/gone, longer and different",
    b"a/link": b"layer 1 content of a/gone", b"a/stay": b"stay", b"a/dir": "dir",
    b"w": "dir", b"w/g": b"wg",
    b"o": "dir", b"o/new2": b"new2", b"o/new3": b"new3", b"o/sub": "dir", b"o/sub/n": b"n2",
    b"o2": "dir", b"o2/keep3": b"k3",
    b"b": "dir",
    b"lnk": ("sym", b"a/gone"),
}


@_root_marks
def test_whiteouts_and_opaque_dirs_across_three_layers(tmp_path):
    src = oci(tmp_path, _whiteout_layers())
    with built_and_mounted(tmp_path, src) as (_out, rep, mnt):
        assert snapshot(mnt) == WHITEOUT_EXPECTED
        gone = os.lstat(mnt / "a/gone")
        assert stat.S_IMODE(gone.st_mode) == 0o600 and gone.st_nlink == 1
        link = os.lstat(mnt / "a/link")  # the whited-out name's hard link: its own file now
        assert link.st_nlink == 1 and link.st_ino != gone.st_ino
        assert stat.S_IMODE(link.st_mode) == 0o644
        assert stat.S_IMODE(os.lstat(mnt / "w").st_mode) == 0o711
        assert (mnt / "lnk").read_bytes() == WHITEOUT_EXPECTED[b"a/gone"]
    assert rep.layers == 3
