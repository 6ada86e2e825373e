"""fscached-image as a user runs it: bad inputs give one line on stderr, exit 1, no OUTDIR."""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from erofs_image.cli import parse_size
from erofs_image.demo import entry, tar_bytes, write_oci_layout

PREFIX = "fscached-image: error: "


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erofs_image.cli", *map(str, args)],
                          capture_output=True, **kw)


def assert_one_line_error(r, *needles, code=1):
    err = r.stderr.decode()
    assert r.returncode == code, err
    assert err.startswith(PREFIX) and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def _layer_blob(src: Path) -> Path:
    manifest = json.loads((src / "index.json").read_text())["manifests"][0]["digest"][7:]
    m = json.loads((src / "blobs/sha256" / manifest).read_text())
    return src / "blobs/sha256" / m["layers"][0]["digest"][7:]


def _replace_layer(src: Path, new: bytes) -> str:
    """Swap layer 0's bytes, fixing the manifest (and index) digests so only the tar is bad."""
    blobs = src / "blobs/sha256"
    index = json.loads((src / "index.json").read_text())
    mhex = index["manifests"][0]["digest"][7:]
    m = json.loads((blobs / mhex).read_text())
    (blobs / m["layers"][0]["digest"][7:]).unlink()
    h = hashlib.sha256(new).hexdigest()
    (blobs / h).write_bytes(new)
    m["layers"][0].update(digest="sha256:" + h, size=len(new))
    md = json.dumps(m).encode()
    mh = hashlib.sha256(md).hexdigest()
    (blobs / mh).write_bytes(md)
    index["manifests"][0].update(digest="sha256:" + mh, size=len(md))
    (src / "index.json").write_text(json.dumps(index))
    return h


def convert_fails(tmp_path, src, *needles):
    out = tmp_path / "out"
    r = run("convert", src, out)
    assert_one_line_error(r, *needles)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


BIG = os.urandom(200_000)


def test_truncated_tar(tmp_path):
    src = tmp_path / "oci"
    raw = tar_bytes([entry("etc/big", BIG)])
    write_oci_layout(src, [(raw, "")])
    h = _replace_layer(src, raw[:100_000])
    convert_fails(tmp_path, src, h, "etc/big", "truncated")


def test_corrupt_gzip(tmp_path):
    src = tmp_path / "oci"
    gz = bytearray(gzip.compress(tar_bytes([entry("etc/big", BIG)])))
    gz[5000:6000] = bytes(1000)
    write_oci_layout(src, [(tar_bytes([entry("x", b"")]), "")])
    h = _replace_layer(src, bytes(gz))
    convert_fails(tmp_path, src, h, "gzip")


def test_dotdot_escape(tmp_path):
    src = tmp_path / "oci"
    write_oci_layout(src, [(tar_bytes([entry("a/../../etc/shadow", b"x")]), "gzip")])
    convert_fails(tmp_path, src, _layer_blob(src).name, "a/../../etc/shadow", "'..'")


def test_absolute_symlink_as_parent(tmp_path):
    src = tmp_path / "oci"
    write_oci_layout(src, [
        (tar_bytes([entry("etc", None, tarfile.SYMTYPE, linkname="/host/etc")]), ""),
        (tar_bytes([entry("etc/passwd", b"pwned")]), "zstd"),
    ])
    convert_fails(tmp_path, src, "etc/passwd", "symlink")


def test_manifest_references_missing_blob(tmp_path):
    src = tmp_path / "oci"
    write_oci_layout(src, [(tar_bytes([entry("a", b"x")]), "gzip")])
    blob = _layer_blob(src)
    blob.unlink()
    convert_fails(tmp_path, src, f"blobs/sha256/{blob.name}", "missing")


def test_sparse_member(tmp_path):
    # GNU sparse member written with GNU tar when available; fall back to a hand-made header
    src = tmp_path / "oci"
    work = tmp_path / "w"
    work.mkdir()
    with open(work / "holes", "wb") as f:
        f.truncate(1 << 20)
        f.write(b"x")
    layer = tmp_path / "layer.tar"
    r = subprocess.run(["tar", "--sparse", "-cf", str(layer), "-C", str(work), "holes"],
                       capture_output=True)
    if r.returncode != 0:
        pytest.fail(f"GNU tar --sparse failed: {r.stderr.decode(errors='replace').strip()}")
    write_oci_layout(src, [(layer.read_bytes(), "")])
    convert_fails(tmp_path, src, "holes", "sparse")


def test_outdir_not_empty(tmp_path):
    src = tmp_path / "oci"
    write_oci_layout(src, [(tar_bytes([entry("a", b"x")]), "")])
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep").write_text("k")
    assert_one_line_error(run("convert", src, out), str(out), "not empty")
    assert os.listdir(out) == ["keep"]


@pytest.mark.parametrize("size", ["3000", "4095", "5K", "abc", "0"])
def test_bad_chunk_size_is_a_usage_error(tmp_path, size):
    r = run("convert", tmp_path, tmp_path / "out", "--chunk-size", size)
    assert_one_line_error(r, "chunk-size", code=2)
    assert not (tmp_path / "out").exists()


def test_parse_size():
    assert parse_size("4K") == 4096 and parse_size("4k") == 4096
    assert parse_size("1M") == parse_size("1048576") == parse_size("1MiB") == 1 << 20
    for bad in ("4097", "12K", "1.5M", "-4K", "2G"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_bad_compressor_and_missing_args(tmp_path):
    assert_one_line_error(run("convert", tmp_path, tmp_path / "o", "--compressor", "gzip"),
                          "compressor", code=2)
    assert_one_line_error(run("convert"), code=2)
    assert_one_line_error(run(), code=2)


def test_inspect_and_cat_errors(tmp_path):
    assert_one_line_error(run("inspect", tmp_path / "nope.boot"), "nope.boot")
    junk = tmp_path / "junk.boot"
    junk.write_bytes(b"\0" * 8192)
    assert_one_line_error(run("inspect", junk), "junk.boot")
    assert_one_line_error(run("cat", junk, "/x", "--blobs", tmp_path), "junk.boot")
