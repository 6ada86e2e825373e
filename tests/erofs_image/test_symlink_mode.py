"""Symlinks are lrwxrwxrwx in the image whatever mode their tar header carries, as tar, docker
and containerd leave them on Linux (a symlink's own mode cannot even be set there)."""
from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

import pytest

from erofs_image.builder import convert
from erofs_image.demo import entry, tar_bytes, write_oci_layout
from erofs_image.reader import Bootstrap
from erofs_image.tree import lookup
from test_format_helpers import erofs_available, mount_erofs, umount

LINKS = {  # path in the image -> (tar header mode, target)
    "usr/link-0644": (0o644, "target"),
    "usr/link-0000": (0o000, "target"),
    "usr/link-4755": (0o4755, "/usr/target"),
    "usr/link-0777": (0o777, "target"),
    "usr/replaced": (0o600, "target"),  # a symlink in the upper layer over a file below
}


def oci_source(tmp_path: Path) -> Path:
    lower = tar_bytes([
        entry("usr/", None, tarfile.DIRTYPE, 0o755),
        entry("usr/target", b"the target\n", mode=0o640),
        entry("usr/replaced", b"a file in the lower layer\n", mode=0o644),
    ])
    upper = tar_bytes([
        entry(path, None, tarfile.SYMTYPE, mode, linkname=target)
        for path, (mode, target) in LINKS.items()
    ])
    src = tmp_path / "oci"
    write_oci_layout(src, [(lower, "gzip"), (upper, "")])
    return src


def test_symlinks_are_0777_in_the_bootstrap(tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(oci_source(tmp_path), out, compressor="none", progress=False)
    root = Bootstrap.open(out / "image.boot").image.root
    for path, (_, target) in LINKS.items():
        node = lookup(root, path.encode())
        assert node.mode == stat.S_IFLNK | 0o777, f"{path}: {stat.filemode(node.mode)}"
        assert node.target == target.encode()
    target = lookup(root, b"usr/target")
    assert target.mode == stat.S_IFREG | 0o640  # other modes are the header's


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting EROFS needs root")
@pytest.mark.skipif(not erofs_available(), reason="kernel has no EROFS (not in /proc/filesystems)")
def test_symlinks_are_0777_through_a_kernel_mount(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = convert(oci_source(tmp_path), out, compressor="none", progress=False)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_erofs(out / "image.boot", mnt, [out / "blobs" / b.blob_id for b in report.blobs])
    try:
        for path, (_, target) in LINKS.items():
            st = os.lstat(mnt / path)
            assert st.st_mode == stat.S_IFLNK | 0o777, f"{path}: {stat.filemode(st.st_mode)}"
            assert os.readlink(mnt / path) == target
        assert (mnt / "usr/link-0644").read_bytes() == b"the target\n"
        assert os.lstat(mnt / "usr/target").st_mode == stat.S_IFREG | 0o640
    finally:
        umount(mnt)
