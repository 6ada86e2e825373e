"""convert() on a plain directory: file types, hard links, xattrs, sparse files."""
from __future__ import annotations

import ctypes
import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from erofs_image.builder import BuildError, convert, scan_directory
from erofs_image.reader import Bootstrap
from erofs_image.tree import lookup

MiB = 1 << 20


def _xattrs_supported(p: Path) -> bool:
    try:
        os.setxattr(p, "user.probe", b"1")
        os.removexattr(p, "user.probe")
        return True
    except OSError:
        return False


@pytest.fixture
def tree(tmp_path) -> Path:
    src = tmp_path / "src"
    (src / "d/e").mkdir(parents=True)
    (src / "d/e/f").write_bytes(os.urandom(2 * MiB + 17))
    (src / "small").write_bytes(b"small\n")
    os.link(src / "small", src / "d/hard")
    os.symlink("d/e/f", src / "sym")
    os.mkfifo(src / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(src / "sock"))
    s.close()
    if os.geteuid() == 0:
        os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    if _xattrs_supported(src / "small"):
        os.setxattr(src / "small", "user.k", b"v")
    os.chmod(src / "d", 0o750)
    os.utime(src / "small", ns=(1, 1_600_000_000_123_456_789))
    return src


def test_scan_directory(tree):
    scan = scan_directory(tree)
    root, jobs = scan.root, scan.jobs
    assert sorted(root.children) == sorted(os.fsencode(n) for n in os.listdir(tree))
    assert root.children[b"small"] is root.children[b"d"].children[b"hard"]
    assert len(jobs) == 2  # the hard link's data is read once
    assert stat.S_ISSOCK(root.children[b"sock"].mode)
    assert root.children[b"sym"].target == b"d/e/f"


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_convert_directory(tree, tmp_path, compressor):
    out = tmp_path / "out"
    rep = convert(tree, out, compressor=compressor, chunk_size=1 << 16, progress=False)
    assert rep.source_kind == "directory" and len(rep.blobs) == 1 and rep.files == 2
    bs = Bootstrap.open(out / "image.boot")
    root = bs.image.root
    assert bs.chunk_size == 1 << 16
    f = lookup(root, b"/d/e/f")
    assert bs.read_file(f, out / "blobs") == (tree / "d/e/f").read_bytes()
    small = lookup(root, b"/small")
    assert small.nid == lookup(root, b"/d/hard").nid
    assert (small.mtime, small.mtime_nsec) == (1_600_000_000, 123_456_789)
    if _xattrs_supported(tree / "d"):
        assert small.xattrs == {b"user.k": b"v"}
    assert stat.S_IMODE(lookup(root, b"/d").mode) == 0o750
    assert stat.S_ISSOCK(lookup(root, b"/sock").mode)
    assert stat.S_ISFIFO(lookup(root, b"/fifo").mode)
    if os.geteuid() == 0:
        assert lookup(root, b"/null").rdev == os.makedev(1, 3)


def test_huge_sparse_file_is_not_read(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    big = src / "sparse"
    with open(big, "wb") as f:
        f.truncate(64 << 30)  # 64 GiB, all holes but two
        f.seek(5 * MiB + 3)
        f.write(b"data in the middle")
        f.seek((64 << 30) - 10)
        f.write(b"last bytes")
    if os.stat(big).st_blocks * 512 >= 1 << 30:
        pytest.skip("filesystem does not keep holes")
    t = time.monotonic()
    rep = convert(src, tmp_path / "out", compressor="none", progress=False)
    assert time.monotonic() - t < 30
    assert rep.chunks == 2 and rep.holes == (64 << 10) - 2
    bs = Bootstrap.open(tmp_path / "out/image.boot")
    node = lookup(bs.image.root, b"/sparse")
    assert node.size == 64 << 30
    data_chunks = [i for i, r in enumerate(node.chunks) if r is not None]
    assert data_chunks == [5, (64 << 10) - 1]
    chunk = bs.read_chunk(node.chunks[5], tmp_path / "out/blobs" / bs.blobs[0].blob_id)
    assert chunk[3:21] == b"data in the middle" and chunk.count(0) == len(chunk) - 18


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_directory_mounts_and_diffs(tree, tmp_path):
    (tree / "sock").unlink()  # diff cannot compare sockets; the scan test covers them
    (tree / "fifo").unlink()
    if (tree / "null").exists():
        (tree / "null").unlink()
    out = tmp_path / "out"
    rep = convert(tree, out, compressor="none", progress=False)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"device={out}/blobs/{rep.blobs[0].blob_id}".encode()
    assert libc.mount(str(out / "image.boot").encode(), str(mnt).encode(), b"erofs", 1, opts) == 0, \
        os.strerror(ctypes.get_errno())
    try:
        r = subprocess.run(["diff", "-r", "--no-dereference", str(tree), str(mnt)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert os.stat(mnt / "small").st_mtime_ns == 1_600_000_000_123_456_789
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_unreadable_file_names_it(tmp_path):
    if os.geteuid() != 0:
        src = tmp_path / "src"
        src.mkdir()
        (src / "secret").write_text("x")
        os.chmod(src / "secret", 0)
        with pytest.raises(BuildError, match="secret"):
            convert(src, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
        return
    # root reads everything: convert in a forked child that gave up root
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="fscached-unreadable-", dir="/var/tmp"))
    try:
        os.chmod(work, 0o1777)
        src = work / "src"
        src.mkdir()
        os.chmod(src, 0o755)
        (src / "ok").write_text("fine")
        (src / "secret").write_text("x")
        os.chmod(src / "ok", 0o644)
        os.chmod(src / "secret", 0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: no exceptions may escape into pytest's machinery
            code = 3
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                try:
                    convert(src, work / "out", progress=False)
                    code = 2
                except BuildError as e:
                    os.write(write_end, str(e).encode())
                    code = 1
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            message = f.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 1, message
        assert "secret" in message and "\n" not in message, message
        assert not (work / "out").exists()
        assert [p.name for p in work.iterdir()] == ["src"], "no temp output left behind"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_missing_source(tmp_path):
    with pytest.raises(BuildError, match="no such file"):
        convert(tmp_path / "nope", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
