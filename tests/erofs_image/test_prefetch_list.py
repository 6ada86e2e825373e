"""`fscached-image convert --prefetch-list FILE`: paths as bytes, as Linux names are."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_a_missing_non_utf8_path_is_named_in_one_readable_line(tmp_path):
    src = source(tmp_path)
    r = convert(src, tmp_path / "out", b"/bin/app\n/nope-\xfe\n", tmp_path)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "internal error" not in err
    assert f"{tmp_path / 'prefetch.list'}:2: /nope-\\xfe: " in err
    assert not (tmp_path / "out").exists()
