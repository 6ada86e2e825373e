"""Kernel oracle: the running kernel mounts our bootstrap + uncompressed blobs file-backed and
shows exactly the source tree (content via diff -r, metadata via a walk)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from erofs_image.chunks import ChunkStore
from erofs_image.tree import BlobInfo, ChunkRef, Image, Inode
from erofs_image.writer import write_bootstrap
from test_format_helpers import erofs_available, fsck, mount_erofs, umount

pytestmark = [pytest.mark.root]


@pytest.fixture(autouse=True)
def can_mount_erofs() -> None:
    if os.geteuid() != 0:
        pytest.fail("mounting EROFS needs root")
    if not erofs_available():
        pytest.fail("the kernel has no EROFS (not in /proc/filesystems)")
SITE = Path(__file__).resolve().parents[2] / ".venv" / "lib" / "python3.11" / "site-packages"


def _make_source(src: Path) -> None:
    pkgs = [p for p in ("pygments", "_pytest", "iniconfig") if (SITE / p).is_dir()]
    if pkgs:
        for p in pkgs:
            shutil.copytree(SITE / p, src / "site" / p, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
    else:  # generate instead
        for i in range(300):
            (src / "site").mkdir(exist_ok=True)
            (src / "site" / f"f{i}.py").write_bytes(os.urandom(i * 37))
    (src / "big.bin").write_bytes(os.urandom(3 * (1 << 20) + 17))
    with open(src / "sparse", "wb") as f:
        f.truncate(5 << 20)
        f.write(b"head")
        f.seek(4 << 20)
        f.write(b"middle")
    (src / "hello").write_bytes(b"hello\n")
    os.link(src / "hello", src / "hello.hardlink")
    os.symlink("hello", src / "sym")
    os.symlink("x" * 3000, src / "longsym")
    os.mkfifo(src / "fifo")
    os.mknod(src / "cdev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(src / "bdev", stat.S_IFBLK | 0o600, os.makedev(7, 300))
    os.setxattr(src / "hello", "user.greeting", b"hi there")
    os.setxattr(src / "hello", "trusted.overlay.opaque", b"y")
    os.chown(src / "hello", 70000, 123)
    (src / "many").mkdir()
    for i in range(600):
        (src / "many" / (f"{i:04d}-" + "n" * 200)).write_bytes(b"%d" % i)
    os.utime(src / "sym", ns=(0, 1_600_000_000_123_456_789), follow_symlinks=False)


def _import(path: bytes, store: ChunkStore, seen: dict) -> Inode:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in seen:
        return seen[(st.st_dev, st.st_ino)]
    n = Inode(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime=st.st_mtime_ns // 10**9,
              mtime_nsec=st.st_mtime_ns % 10**9)
    for x in os.listxattr(path, follow_symlinks=False):
        n.xattrs[os.fsencode(x)] = os.getxattr(path, x, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        for name in sorted(os.listdir(path)):
            if path.endswith(b"/site") or name == b"site":
                store.start_blob()  # a second blob, like a second layer
            n.children[name] = _import(os.path.join(path, name), store, seen)
    elif stat.S_ISREG(st.st_mode):
        n.size = st.st_size
        with open(path, "rb") as f:
            n.chunks = store.add_stream(f.read, st.st_size)
    elif stat.S_ISLNK(st.st_mode):
        n.target = os.readlink(path)
        n.size = len(n.target)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        n.rdev = st.st_rdev
    seen[(st.st_dev, st.st_ino)] = n
    return n


def _metadata(root: Path) -> dict:
    out = {}
    inode_groups: dict[int, list[str]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [""] + dirs + files:
            p = os.path.join(dirpath, name) if name else dirpath
            if not name and dirpath != str(root):
                continue
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            xa = {x: os.getxattr(p, x, follow_symlinks=False) for x in os.listxattr(p, follow_symlinks=False)}
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_nlink,
                        st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                        st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
                        os.readlink(p) if stat.S_ISLNK(st.st_mode) else None, tuple(sorted(xa.items())))
            if not stat.S_ISDIR(st.st_mode):
                inode_groups.setdefault(st.st_ino, []).append(rel)
    out["<hardlinks>"] = sorted(sorted(g) for g in inode_groups.values() if len(g) > 1)
    return out


def test_kernel_mount_matches_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _make_source(src)
    os.utime(src, ns=(0, 1_000_000_000))
    store = ChunkStore(tmp_path / "blobs", 1 << 20, "none")
    root = _import(os.fsencode(src), store, {})
    store.finish_blob()
    assert len(store.blobs) >= 2
    img = Image(root=root, blobs=store.blobs, chunk_size=1 << 20, build_time=0)
    boot = tmp_path / "image.boot"
    write_bootstrap(img, boot)
    fsck(boot, tmp_path / "blobs", store.blobs)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_erofs(boot, mnt, [tmp_path / "blobs" / b.blob_id for b in store.blobs])
    try:
        r = subprocess.run(["diff", "-r", "--no-dereference", str(src), str(mnt)],
                           capture_output=True, text=True)
        # diff cannot compare FIFOs / device nodes by content; anything else is a real difference
        real = [ln for ln in r.stdout.splitlines() if not ln.endswith(("is a fifo", "is a character special file",
                                                                     "is a block special file"))]
        assert not real and r.returncode in (0, 1), r.stdout + r.stderr
        want, got = _metadata(src), _metadata(mnt)
        assert want.keys() == got.keys()
        for k in want:
            w, g = want[k], got[k]
            assert w == g, f"{k}: source {w} != mounted {g}"
    finally:
        umount(mnt)


def test_kernel_accepts_chunk_index_in_advise_and_device_id_high_byte(tmp_path: Path) -> None:
    """nydus stores the chunk index in advise (bits 0-15) and device_id's high byte (16-23);
    the kernel must mask device_id. Indexes >= 65536 set that high byte."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    # an uncompressed 'blob' of 3 blocks; the chunk refs carry large chunk indexes
    payload = [bytes([65 + i]) * 4096 for i in range(3)]
    blob_path = blobs / ("cd" * 32)
    blob_path.write_bytes(b"".join(payload))
    blob = BlobInfo("cd" * 32, "none", 4096, 3, 3 * 4096, 3 * 4096)
    refs = [ChunkRef(0, 4096 * i, 4096, 4096 * i, 4096, False, b"\0" * 32, idx)
            for i, idx in enumerate((5, 65536 + 7, 0xFFFFFF))]
    f = Inode(mode=stat.S_IFREG | 0o644, size=3 * 4096, chunks=refs)
    img = Image(root=Inode(mode=stat.S_IFDIR | 0o755, children={b"f": f}), blobs=[blob], chunk_size=4096)
    boot = tmp_path / "image.boot"
    write_bootstrap(img, boot)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_erofs(boot, mnt, [blob_path])
    try:
        assert (mnt / "f").read_bytes() == b"".join(payload)
    finally:
        umount(mnt)
