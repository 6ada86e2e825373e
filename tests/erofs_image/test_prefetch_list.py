"""`fscached-image convert --prefetch-list FILE`: paths as bytes, as Linux names are; entries
as nydus-image takes them (directories expanded, symlinks and missing paths skipped with a
warning)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from erofs_image import prefetch, reader
from erofs_image.builder import convert as build, scan_directory
from erofs_image.layers import BuildError
from erofs_image.reader import Bootstrap
from erofs_image.tree import lookup

LATIN1 = b"caf\xe9"  # "café" in Latin-1: not UTF-8


def convert(src: Path, out: Path, listing: bytes, tmp: Path) -> subprocess.CompletedProcess:
    lst = tmp / "prefetch.list"
    lst.write_bytes(listing)
    return subprocess.run([sys.executable, "-m", "erofs_image.cli", "convert", str(src), str(out),
                           "--prefetch-list", str(lst), "-q", "--no-progress"], capture_output=True)


def source(tmp: Path) -> Path:
    src = tmp / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "app").write_bytes(b"#!/bin/sh\n" * 100)
    with open(os.path.join(os.fsencode(src), LATIN1), "wb") as f:
        f.write(b"latin-1 named" * 300)
    os.mkdir(os.path.join(os.fsencode(src), b"dir-\xff"))
    with open(os.path.join(os.fsencode(src), b"dir-\xff", b"\x80inner"), "wb") as f:
        f.write(b"inner" * 300)
    return src


def test_lines_that_are_not_utf8_name_files_by_their_bytes(tmp_path):
    src = source(tmp_path)
    r = convert(src, tmp_path / "out", b"/bin/app\n/" + LATIN1 + b"\n  /dir-\xff/\x80inner \n", tmp_path)
    assert r.returncode == 0, r.stderr
    boot = Bootstrap.open(tmp_path / "out" / "image.boot")
    want = [b"/bin/app", b"/" + LATIN1, b"/dir-\xff/\x80inner"]
    assert boot.image.prefetch == want
    assert boot.prefetch_nids == [lookup(boot.image.root, p).nid for p in want]


def test_a_line_with_a_nul_byte_is_refused_naming_file_and_line(tmp_path):
    src = source(tmp_path)
    r = convert(src, tmp_path / "out", b"/bin/app\n\n/bin/\0app\n", tmp_path)
    assert r.returncode == 1
    assert r.stderr.decode() == (f"fscached-image: error: {tmp_path / 'prefetch.list'}: line 3: "
                                 "holds a NUL byte (a path is any bytes but NUL)\n")
    assert not (tmp_path / "out").exists()


def run_ok(src: Path, out: Path, listing: bytes, tmp: Path) -> tuple[Bootstrap, list[str]]:
    """Convert with the list; (the bootstrap, the warning lines on stderr)."""
    r = convert(src, out, listing, tmp)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b""  # -q
    boot = Bootstrap.open(out / "image.boot")
    assert boot.prefetch_nids == [lookup(boot.image.root, p).nid for p in boot.image.prefetch]
    return boot, r.stderr.decode().splitlines()


def tree(tmp: Path) -> Path:
    """/etc/{a, sub/{b, c}, z, link -> a}, /usr/{x, x-hard (a hard link), dev, fifo},
    /usr/lib -> ../etc, /empty/"""
    src = tmp / "src"
    for d in ("etc/sub", "usr", "empty"):
        (src / d).mkdir(parents=True)
    for name in ("etc/a", "etc/sub/b", "etc/sub/c", "etc/z", "usr/x"):
        (src / name).write_bytes(name.encode() * 500)
    os.link(src / "usr/x", src / "usr/x-hard")
    os.symlink("a", src / "etc/link")
    os.symlink("../etc", src / "usr/lib")
    os.mknod(src / "usr/dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mkfifo(src / "usr/fifo")
    return src


def test_a_directory_means_every_file_under_it_in_tree_order_after_what_came_before(tmp_path):
    boot, warnings = run_ok(tree(tmp_path), tmp_path / "out", b"/usr/x\n/etc\n/etc/z\n/empty\n", tmp_path)
    # /usr/x first (listed first); /etc's files depth first in byte order; /etc/z not twice;
    # the symlink under /etc is not a file to fetch (and not warned about: it was not listed)
    assert boot.image.prefetch == [b"/usr/x", b"/etc/a", b"/etc/sub/b", b"/etc/sub/c", b"/etc/z"]
    assert warnings == []


def test_root_means_every_file_of_the_image_once(tmp_path):
    boot, warnings = run_ok(tree(tmp_path), tmp_path / "out", b"/etc/z\n/\n/usr/x-hard\n", tmp_path)
    # x and x-hard are one file: listed once, under the first name the walk meets
    assert boot.image.prefetch == [b"/etc/z", b"/etc/a", b"/etc/sub/b", b"/etc/sub/c", b"/usr/x"]
    assert warnings == []


def test_symlinks_missing_paths_and_files_without_data_are_skipped_with_one_warning_each(tmp_path):
    lst = tmp_path / "prefetch.list"
    boot, warnings = run_ok(tree(tmp_path), tmp_path / "out", b"\n".join([
        b"/etc/link", b"/nope", b"/usr/lib/a", b"/usr/dev", b"/etc/sub/b", b"/usr/fifo", b"/etc/../usr/x",
        b"/nope-\xfe", b"/etc/sub/b/deeper"]) + b"\n", tmp_path)
    assert boot.image.prefetch == [b"/etc/sub/b"]
    assert warnings == [
        f"fscached-image: warning: {lst}:1: /etc/link: skipped: a symlink (not followed)",
        f"fscached-image: warning: {lst}:2: /nope: skipped: no such file in the image",
        f"fscached-image: warning: {lst}:3: /usr/lib/a: skipped: /usr/lib is a symlink (not followed)",
        f"fscached-image: warning: {lst}:4: /usr/dev: skipped: a character device (no data to fetch)",
        f"fscached-image: warning: {lst}:6: /usr/fifo: skipped: a FIFO (no data to fetch)",
        f"fscached-image: warning: {lst}:7: /etc/../usr/x: skipped: '..' in a prefetch path",
        f"fscached-image: warning: {lst}:8: /nope-\\xfe: skipped: no such file in the image",
        f"fscached-image: warning: {lst}:9: /etc/sub/b/deeper: skipped: no such file in the image",
    ]


def test_paths_beyond_what_a_bootstrap_may_name_are_refused(tmp_path, monkeypatch):
    src = tree(tmp_path)
    monkeypatch.setattr(reader, "MAX_PREFETCH_PATH_BYTES", 30)  # the 5 files' paths: 38 bytes
    with pytest.raises(BuildError, match=r"^prefetch list: 5 files with 38 bytes of paths, more than"):
        build(src, tmp_path / "out", progress=False, prefetch=[b"/"])
    assert not (tmp_path / "out").exists()
    paths, _ = prefetch.resolve(scan_directory(src).root, [b"/etc/a", b"/usr/x"])  # 12 bytes: fine
    assert paths == [b"/etc/a", b"/usr/x"]
