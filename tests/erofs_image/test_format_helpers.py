"""Helpers shared by the test_format_* tests (no tests here)."""
from __future__ import annotations

import ctypes
import os
import shutil
import stat
import subprocess
from pathlib import Path

from erofs_image.chunks import ChunkStore
from erofs_image.tree import Image, Inode, walk

FIXTURE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "nydus-rafs-v6"
if not FIXTURE_DIR.is_dir():
    FIXTURE_DIR = Path("/work/shared/fixtures/nydus-rafs-v6")


def fsck(boot: Path, blobs_dir: Path, blobs) -> None:
    """fsck.erofs (without --extract: 1.5 mis-extracts holes) must accept the image."""
    exe = shutil.which("fsck.erofs")
    if exe is None:
        return
    cmd = [exe] + [f"--device={blobs_dir / b.blob_id}" for b in blobs] + [str(boot)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"fsck.erofs failed: {r.stdout}{r.stderr}"


def reg(store: ChunkStore, data: bytes, **kw) -> Inode:
    view = memoryview(data)
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        out = bytes(view[pos:pos + n])
        pos += len(out)
        return out

    return Inode(mode=kw.pop("mode", stat.S_IFREG | 0o644), size=len(data),
                 chunks=store.add_stream(read, len(data)), **kw)


def d(children: dict[bytes, Inode] | None = None, **kw) -> Inode:
    return Inode(mode=kw.pop("mode", stat.S_IFDIR | 0o755), children=children or {}, **kw)


def assert_same_tree(a: Image, b: Image, *, check_chunks: bool = True) -> None:
    """Same paths, metadata, content refs and hard-link structure."""
    pa = list(walk(a.root))
    pb = list(walk(b.root))
    assert [p for p, _ in pa] == [p for p, _ in pb]
    ids_a: dict[int, bytes] = {}
    ids_b: dict[int, bytes] = {}
    for (path, x), (_, y) in zip(pa, pb):
        assert ids_a.setdefault(id(x), path) == ids_b.setdefault(id(y), path), f"hard links differ at {path!r}"
        assert (x.mode, x.uid, x.gid, x.mtime, x.mtime_nsec) == (y.mode, y.uid, y.gid, y.mtime, y.mtime_nsec), path
        assert x.xattrs == y.xattrs, path
        if x.is_reg:
            assert x.size == y.size, path
            if check_chunks:
                assert x.chunks == y.chunks, path
        if x.is_symlink:
            assert x.target == y.target, path
        if x.is_device:
            assert x.rdev == y.rdev, path


# ------------------------------------------------------------------ kernel mounts
_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY = 1


def erofs_available() -> bool:
    try:
        return any(line.split()[-1] == "erofs" for line in open("/proc/filesystems"))
    except OSError:
        return False


def mount_erofs(boot: Path, target: Path, devices: list[Path]) -> None:
    """File-backed EROFS mount via mount(2) (util-linux `mount` would set up a loop device)."""
    opts = ",".join(f"device={p}" for p in devices)
    if _libc.mount(str(boot).encode(), str(target).encode(), b"erofs", MS_RDONLY, opts.encode()):
        e = ctypes.get_errno()
        raise OSError(e, f"mount -t erofs {boot} ({opts}): {os.strerror(e)}")


def umount(target: Path) -> None:
    if _libc.umount2(str(target).encode(), 0):
        e = ctypes.get_errno()
        raise OSError(e, f"umount {target}: {os.strerror(e)}")
