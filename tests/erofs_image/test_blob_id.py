"""`fscached-image convert --blob-id ID`: a blob id is the sha256 of the blob file (the device
tag the kernel asks for, the layer digest a registry serves the blob under, the daemon's cache
file name), so a given id is the one the build must come out with: anything else is refused in
one line and leaves no output."""
from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from erofs_image.demo import entry, tar_bytes, write_oci_layout
from erofs_image.reader import Bootstrap
from test_cli_errors import assert_one_line_error, run


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    (d / "bin").mkdir(parents=True)
    (d / "bin" / "tool").write_bytes(b"tool " * 50_000)
    (d / "etc").mkdir()
    (d / "etc" / "conf").write_bytes(b"conf\n")
    return d


def built_blob_id(out: Path) -> str:
    (blob,) = Bootstrap.open(out / "image.boot").blobs
    return blob.blob_id


def test_the_id_of_the_blob_built_is_accepted(src, tmp_path):
    r = run("convert", src, tmp_path / "first", "-q")
    assert r.returncode == 0, r.stderr
    blob_id = built_blob_id(tmp_path / "first")
    assert hashlib.sha256((tmp_path / "first" / "blobs" / blob_id).read_bytes()).hexdigest() == blob_id
    r = run("convert", src, tmp_path / "pinned", "--blob-id", blob_id)
    assert r.returncode == 0, r.stderr
    assert built_blob_id(tmp_path / "pinned") == blob_id
    assert (tmp_path / "pinned" / "blobs" / blob_id).is_file()
    assert f"blob       {tmp_path / 'pinned'}/blobs/{blob_id}" in r.stdout.decode()


def test_another_id_is_refused_naming_the_blob_built(src, tmp_path):
    r = run("convert", src, tmp_path / "first", "-q")
    actual = built_blob_id(tmp_path / "first")
    other = hashlib.sha256(b"some other blob").hexdigest()
    r = run("convert", src, tmp_path / "out", "--blob-id", other)
    assert_one_line_error(r, f"--blob-id {other}: the blob built is {actual} (a blob id is the sha256 "
                             "of the blob file")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "src"]  # no temp dir left either


@pytest.mark.parametrize("bad", ["abc", "A" * 64, "g" * 64, "a" * 63, "a" * 65,
                                 "sha256:" + "a" * 64, "../" + "a" * 61, ""])
def test_what_is_not_64_lowercase_hex_digits_is_refused_before_any_work(src, tmp_path, bad):
    r = run("convert", src, tmp_path / "out", "--blob-id", bad)
    assert_one_line_error(r, "argument --blob-id:", "is not a blob id: 64 lowercase hex digits", code=2)
    assert not (tmp_path / "out").exists()


def test_a_build_of_several_blobs_or_none_has_no_one_blob_to_check(tmp_path):
    layout = tmp_path / "oci"
    write_oci_layout(layout, [(tar_bytes([entry("a", b"first layer " * 1000)]), "gzip"),
                              (tar_bytes([entry("b", b"second layer " * 1000)]), "gzip")])
    some_id = "ab" * 32
    r = run("convert", layout, tmp_path / "out", "--blob-id", some_id)
    assert_one_line_error(r, f"--blob-id {some_id}: the build wrote 2 blobs (one per layer that brought "
                             "data), and a blob id names one blob")
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty"
    (empty / "d").mkdir(parents=True)
    (empty / "d" / "zero-length").write_bytes(b"")
    r = run("convert", empty, tmp_path / "out", "--blob-id", some_id)
    assert_one_line_error(r, "the build wrote no data blob (no file holds data)")
    assert not (tmp_path / "out").exists()
    # one layer, one blob: fine, like a directory
    single = tmp_path / "single"
    write_oci_layout(single, [(tar_bytes([entry("etc/", None, tarfile.DIRTYPE, 0o755),
                                          entry("etc/x", b"x" * 5000)]), "gzip")])
    assert run("convert", single, tmp_path / "single-out", "-q").returncode == 0
    blob_id = built_blob_id(tmp_path / "single-out")
    assert run("convert", single, tmp_path / "single-pinned", "--blob-id", blob_id).returncode == 0
