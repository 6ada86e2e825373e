"""fscached-image convert / inspect / cat on a real image, run as a user would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

from erofs_image.demo import entry, tar_bytes, write_oci_layout

DATA = os.urandom(300_000)


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erofs_image.cli", *map(str, args)],
                          capture_output=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    src = tmp / "oci"
    write_oci_layout(src, [
        (tar_bytes([entry("bin/", None, tarfile.DIRTYPE, 0o755), entry("bin/tool", DATA, mode=0o755),
                    entry("bin/alias", None, tarfile.SYMTYPE, linkname="tool")]), "gzip"),
        (tar_bytes([entry("copy", DATA), entry("zeros", bytes(20_000))]), "zstd"),
    ])
    out = tmp / "out"
    r = run("convert", src, out, "--compressor", "lz4", "--chunk-size", "64K")
    assert r.returncode == 0, r.stderr.decode()
    assert b"built" in r.stdout and b"lz4_block" in r.stdout
    return out


def test_inspect_json(built):
    r = run("inspect", built / "image.boot", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["chunk_size"] == 64 << 10
    assert [b["compressor"] for b in s["blobs"]] == ["lz4_block"]  # layer 2 added no new chunk
    paths = {e["path"]: e for e in s["tree"]}
    assert set(paths) == {"/", "/bin", "/bin/tool", "/bin/alias", "/copy", "/zeros"}
    assert paths["/bin/alias"]["target"] == "tool"
    per_file = -(-len(DATA) // (64 << 10))
    assert s["chunk_refs"] == 2 * per_file and s["unique_chunks"] == per_file
    assert s["dedup_ratio"] == 2.0
    assert s["compressed_bytes"] == s["blobs"][0]["compressed_size"]
    assert s["uncompressed_bytes"] >= len(DATA)


def test_inspect_text(built):
    r = run("inspect", built / "image.boot")
    assert r.returncode == 0
    text = r.stdout.decode()
    assert "/bin/alias -> tool" in text and "dedup ratio 2.00" in text and "unique chunks" in text


def test_cat(built):
    for path, want in (("/bin/tool", DATA), ("copy", DATA), ("/zeros", bytes(20_000))):
        r = run("cat", built / "image.boot", path, "--blobs", built / "blobs")
        assert r.returncode == 0, r.stderr
        assert r.stdout == want


def test_cat_errors(built):
    boot, blobs = built / "image.boot", built / "blobs"
    for path, why in (("/nope", "no such file"), ("/bin", "is a directory"),
                      ("/bin/alias", "symlink")):
        r = run("cat", boot, path, "--blobs", blobs)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.count("\n") == 1 and why in err, err
    r = run("cat", boot, "/copy", "--blobs", built)  # wrong directory: blob missing
    assert r.returncode == 1 and "blob file missing" in r.stderr.decode()


def test_console_script_declared():
    import tomllib
    from pathlib import Path

    py = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert py["project"]["scripts"]["fscached-image"] == "erofs_image.cli:main"


def test_convert_prefetch_list(tmp_path):
    import subprocess
    import sys

    from erofs_image.reader import Bootstrap
    from erofs_image.tree import lookup

    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "app").write_bytes(b"#!/bin/sh\n" * 100)
    (src / "data").write_bytes(b"d" * 5000)
    good = tmp_path / "list"
    good.write_text("/bin/app\n\n data\n")
    r = subprocess.run([sys.executable, "-m", "erofs_image.cli", "convert", str(src), str(tmp_path / "out"),
                        "--prefetch-list", str(good), "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    boot = Bootstrap.open(tmp_path / "out" / "image.boot")
    assert boot.image.prefetch == [b"/bin/app", b"/data"]
    assert boot.prefetch_nids == [lookup(boot.image.root, b"/bin/app").nid, lookup(boot.image.root, b"/data").nid]
    # (directories, symlinks, missing paths: tests/erofs_image/test_prefetch_list.py)
