"""`fscached-image convert DIR --whiteout-spec oci|overlayfs|none`: a directory converted on
its own has nothing below it, so its whiteout markers are left out of the image (as
nydus-image does for a first layer); checked by fsck.erofs and on a kernel mount of the image."""
from __future__ import annotations

import os
import stat
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from erofs_image.demo import entry, tar_bytes, write_oci_layout
from erofs_image.reader import Bootstrap
from test_cli_errors import assert_one_line_error, run
from test_format_helpers import fsck, mount_erofs, umount

OPAQUE = "trusted.overlay.opaque"


def listing(top: Path) -> dict[str, tuple]:
    """A mounted (or source) tree: relative path -> ("dir", xattr names) | ("file", bytes) |
    ("chr", major, minor) | ("sym", target)."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(top))
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", tuple(sorted(os.listxattr(p, follow_symlinks=False))))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", p.read_bytes())
            elif stat.S_ISCHR(st.st_mode):
                out[rel] = ("chr", os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                assert stat.S_ISLNK(st.st_mode), rel
                out[rel] = ("sym", os.readlink(p))
    return out


@contextmanager
def converted_and_mounted(src: Path, out: Path, *options: str) -> Iterator[Path]:
    """`fscached-image convert SRC OUT --compressor none OPTIONS`, fsck.erofs, a kernel mount."""
    r = run("convert", src, out, "--compressor", "none", "--no-progress", *options)
    assert r.returncode == 0, r.stderr.decode()
    boot = Bootstrap.open(out / "image.boot")
    fsck(out / "image.boot", out / "blobs", boot.blobs)
    mnt = out.parent / f"{out.name}-mnt"
    mnt.mkdir()
    mount_erofs(out / "image.boot", mnt, [out / "blobs" / b.blob_id for b in boot.blobs])
    try:
        yield mnt
    finally:
        umount(mnt)


def test_oci_markers_are_left_out_with_what_is_under_them(tmp_path):
    src = tmp_path / "src"
    (src / "d" / "sub").mkdir(parents=True)
    (src / "d" / "kept").write_bytes(b"kept" * 100)
    (src / "d" / ".wh..wh..opq").write_bytes(b"")  # opaque marker: nothing below to hide
    (src / ".wh.gone").write_bytes(b"")  # whiteout of a lower layer's /gone
    (src / "keep").write_bytes(b"beside its own whiteout" * 10)
    (src / ".wh.keep").write_bytes(b"")  # hides lower layers only: /keep stays
    (src / ".wh..wh.plnk" / "1").mkdir(parents=True)  # AUFS metadata, a tree of it
    (src / ".wh..wh.plnk" / "1" / "x").write_bytes(b"aufs")
    (src / "not.wh.marker").write_bytes(b"only a prefix counts" * 10)
    (src / "d" / "sub" / ".wh.x").write_bytes(b"")
    out = tmp_path / "out"
    with converted_and_mounted(src, out) as mnt:
        assert listing(mnt) == {
            "d": ("dir", ()), "d/sub": ("dir", ()), "d/kept": ("file", b"kept" * 100),
            "keep": ("file", b"beside its own whiteout" * 10),
            "not.wh.marker": ("file", b"only a prefix counts" * 10),
        }
    r = run("convert", src, tmp_path / "out2", "--no-progress")  # the default spec is oci
    assert r.returncode == 0 and b"whiteouts  5 marker(s) left out (--whiteout-spec oci)" in r.stdout
    assert set(Bootstrap.open(tmp_path / "out2" / "image.boot").image.root.children) == \
        {b"d", b"keep", b"not.wh.marker"}


def test_overlayfs_whiteouts_and_opaque_marks_are_left_out(tmp_path):
    src = tmp_path / "src"
    (src / "opq").mkdir(parents=True)
    (src / "opq" / "inside").write_bytes(b"an opaque dir keeps what it holds" * 10)
    os.setxattr(src / "opq", OPAQUE, b"y")
    os.setxattr(src / "opq", "user.other", b"stays")
    (src / "plain").mkdir()
    os.setxattr(src / "plain", OPAQUE, b"n")  # not an opaque mark: a plain xattr
    os.mknod(src / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))  # overlayfs whiteout
    os.mknod(src / "opq" / "gone-too", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a real device
    (src / ".wh.x").write_bytes(b"an ordinary name under overlayfs rules")
    out = tmp_path / "out"
    with converted_and_mounted(src, out, "--whiteout-spec", "overlayfs") as mnt:
        assert listing(mnt) == {
            "opq": ("dir", ("user.other",)), "opq/inside": ("file", b"an opaque dir keeps what it holds" * 10),
            "plain": ("dir", (OPAQUE,)), "null": ("chr", 1, 3),
            ".wh.x": ("file", b"an ordinary name under overlayfs rules"),
        }
        assert os.getxattr(mnt / "plain", OPAQUE) == b"n"


def test_none_keeps_every_marker_as_it_is(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / ".wh.gone").write_bytes(b"")
    (src / ".wh..wh..opq").write_bytes(b"")
    os.mknod(src / "whiteout", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (src / "data").write_bytes(b"data" * 100)
    os.setxattr(src, OPAQUE, b"y")
    with converted_and_mounted(src, tmp_path / "out", "--whiteout-spec", "none") as mnt:
        assert listing(mnt) == {".wh.gone": ("file", b""), ".wh..wh..opq": ("file", b""),
                                "whiteout": ("chr", 0, 0), "data": ("file", b"data" * 100)}
        assert os.getxattr(mnt, OPAQUE) == b"y"


def test_whiteout_spec_errors_are_one_line_and_leave_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    r = run("convert", src, tmp_path / "out", "--whiteout-spec", "aufs")
    assert_one_line_error(r, "--whiteout-spec", "invalid choice: 'aufs'", code=2)
    layout = tmp_path / "oci"
    write_oci_layout(layout, [(tar_bytes([entry("etc/", None, tarfile.DIRTYPE, 0o755),
                                          entry("etc/.wh.x", b"")]), "gzip")])
    r = run("convert", layout, tmp_path / "out", "--whiteout-spec", "overlayfs")
    assert_one_line_error(r, f"{layout}: --whiteout-spec overlayfs is for a directory source: "
                             "the layers of an image use OCI whiteouts")
    assert not (tmp_path / "out").exists()
    assert run("convert", layout, tmp_path / "out", "--whiteout-spec", "oci").returncode == 0
