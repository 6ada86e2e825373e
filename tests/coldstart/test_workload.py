"""The workload image: built once, reused from the cache, the right shape."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from coldstart import ColdstartError
from coldstart.workload import (MARKER, Workload, _debian_uris, build_workload, cache_key,
                                         packages_for)


def test_cached_workload_is_reused_without_debootstrap(small_workload: Workload) -> None:
    marker = small_workload.path / MARKER
    before = marker.stat().st_mtime_ns
    t0 = time.monotonic()
    again = build_workload("small")
    assert again.reused, "the second build did not come from the cache"
    assert time.monotonic() - t0 < 5, "reusing the cached workload took as long as a build"
    assert marker.stat().st_mtime_ns == before
    assert again.expected_line == small_workload.expected_line


def test_workload_shape(small_workload: Workload) -> None:
    w = small_workload
    assert w.expected_line.startswith(f"numpy {w.versions['numpy']} sum=499500")
    assert w.command == ["python3", "/app/start.py"]
    index = json.loads((w.oci / "index.json").read_text())
    manifest = json.loads((w.oci / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    assert [layer["mediaType"] for layer in manifest["layers"]] == ["application/vnd.oci.image.layer.v1.tar+gzip"] * 3
    assert sum(layer["size"] for layer in manifest["layers"]) == w.layer_bytes
    assert w.layer_bytes < w.uncompressed_bytes
    assert (w.nydus / "image.boot").is_file() and (w.nydus / "oci" / "index.json").is_file()
    assert w.nydus_blob_bytes == sum(p.stat().st_size for p in (w.nydus / "blobs").iterdir())
    # the cache lives outside the checkout, and no build directory was left behind
    assert not str(w.path).startswith(str(Path(__file__).resolve().parents[2]))
    assert not list(w.path.parent.glob(f".tmp-{w.key}-*"))


def test_check_output_names_what_was_wrong(small_workload: Workload) -> None:
    small_workload.check_output([small_workload.expected_line, "more"])
    with pytest.raises(ColdstartError, match=r"expected 'numpy .*got 'nope'"):
        small_workload.check_output(["nope"], "test")
    with pytest.raises(ColdstartError, match="no output"):
        small_workload.check_output([], "test")


def test_cache_key_and_sizes() -> None:
    assert cache_key("small", packages_for("small")) != cache_key("full", packages_for("full"))
    assert cache_key("small", ("numpy",)) == cache_key("small", ("numpy",))
    with pytest.raises(ColdstartError, match="size 'huge' is unknown"):
        packages_for("huge")


def test_mirror_from_apt_sources() -> None:
    deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n"
    assert list(_debian_uris(deb822, deb822=True)) == ["http://mirror.example/debian"]
    legacy = "# comment\ndeb [arch=amd64] http://m.example/debian bookworm main\ndeb-src http://x/debian b main\n"
    assert list(_debian_uris(legacy, deb822=False)) == ["http://m.example/debian"]


def test_interrupted_build_of_a_dead_builder_is_removed(small_workload: Workload, tmp_path: Path) -> None:
    """A `.tmp-<key>-<dead pid>` directory (no marker) is never taken for a workload: the next
    build removes it. Checked on a copy of the cache entry's marker in a private cache root."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    key = small_workload.key
    root = tmp_path / "cache"
    leftover = root / f".tmp-{key}-{dead.pid}"
    (leftover / "oci").mkdir(parents=True)
    entry = root / key
    entry.mkdir()
    (entry / MARKER).write_text(small_workload.to_json())  # a complete entry: reused, not rebuilt
    w = build_workload("small", cache=root)
    assert w.reused and w.path == entry
    assert not leftover.exists()
    assert os.path.isdir(entry)
