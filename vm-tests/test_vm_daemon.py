"""The daemon against a real kernel: images built by fscached-image, mounted with -o fsid=.

Each test boots a fresh guest (6.12 and 6.1), starts `fscached` from this checkout there, mounts,
and compares what the kernel shows with the source tree, byte for byte and field by field.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from ocilayout import layer_tar, write_layout
from trees import assert_verified, convert, image_arg, make_real_tree, manifest, run, whole_second_mtimes

pytestmark = pytest.mark.vm
NYDUS_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nydus-rafs-v6"
NYDUS_BLOB = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"


def nydus_fixture_files() -> dict[str, bytes]:
    """The fixture's two files, decoded straight from its blob at the offsets erofs-format.md
    documents (zstd chunks), without the project's reader."""
    import zstandard

    raw = (NYDUS_FIXTURE / NYDUS_BLOB).read_bytes()
    dec = zstandard.ZstdDecompressor()
    return {"lib.rs": dec.decompress(raw[0:4828], max_output_size=16931),
            "sync_io.rs": dec.decompress(raw[4828:7802], max_output_size=13400)}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="module")
def real_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_real_tree(tmp_path_factory.mktemp("real") / "tree")

def test_bootstrap_only_image(vm_kernel: Any, work: Path) -> None:
    tree = work / "meta-only"
    (tree / "dir" / "sub").mkdir(parents=True)
    (tree / "empty").write_bytes(b"")
    os.symlink("dir/sub", tree / "link")
    os.mkfifo(tree / "dir" / "fifo")
    os.setxattr(tree / "dir", "user.note", b"bootstrap only")
    built = convert(tree, work / "built")
    assert not any((built / "blobs").iterdir()), "a tree without data must need no blob"
    spec = f"fsid=x,bootstrap={built / 'image.boot'}"
    # the same image once more, mounted by the daemon itself (image key mountpoint=)
    self_mounted = {**image_arg("selfmounted", built), "mountpoint": "/tmp/mnt/self"}
    # and the image nydus-image built (shared/fixtures): both of its files byte-exact
    nydus = work / "nydus"
    shutil.copytree(NYDUS_FIXTURE, nydus)
    nydus_image = {"fsid": "nydus", "bootstrap": str(nydus / "rafs-v6-2.2.boot"), "blobs": str(nydus)}
    result = run(vm_kernel, work, [image_arg("metaonly", built), self_mounted, nydus_image], [
        {"op": "mount", "fsid": "metaonly", "at": "m"},
        {"op": "verify", "at": "m", "manifest": manifest(tree, work / "m.json")},
        {"op": "verify", "at": "self", "manifest": manifest(tree, work / "m.json")},
        {"op": "mount", "fsid": "nydus", "at": "n"},
        {"op": "read_file", "at": "n", "path": "lib.rs"},
        {"op": "read_file", "at": "n", "path": "sync_io.rs"},
        # start-up errors a user meets, each one line and exit status 1
        {"op": "cli_error", "args": ["--cache-dir", "/mnt/second", "--image", spec]},
        {"op": "cli_error", "args": ["--cache-dir", "/tmp/on-tmpfs", "--image", spec]},
    ])
    steps = result["steps"]
    assert steps[0]["ok"], steps[0]
    assert_verified(steps[1], at_least=5)
    # --backend auto (the default): this kernel has cachefiles on-demand, no pre-content events
    assert "kernel path: cachefiles (no fanotify pre-content events" in result["daemon_log"], result["daemon_log"][:2000]
    assert_verified(steps[2], at_least=5)
    assert "image selfmounted mounted on /tmp/mnt/self" in result["daemon_log"]
    assert "unmounted /tmp/mnt/self" in result["daemon_log"]  # a clean stop unmounts what it mounted
    assert steps[3]["ok"], steps[3]
    for step, (name, data) in zip(steps[4:6], nydus_fixture_files().items()):
        assert (step["sha256"], step["size"]) == (hashlib.sha256(data).hexdigest(), len(data)), (name, step)
    busy, tmpfs = steps[6], steps[7]
    assert busy["returncode"] == 1 and "\n" not in busy["stderr"], busy
    assert "holds /dev/cachefiles" in busy["stderr"], busy
    assert tmpfs["returncode"] == 1 and "\n" not in tmpfs["stderr"], tmpfs
    assert "tmpfs" in tmpfs["stderr"], tmpfs


def split_layers(tree: Path, work: Path) -> Path:
    """The real tree as a two-layer OCI image (pip and setuptools below, the rest above)."""
    lower = {"pip", "setuptools"}
    upper = {p.name for p in tree.iterdir()} - lower
    return write_layout(work / "oci", [layer_tar(tree, include=lower), layer_tar(tree, include=upper)])


def test_real_tree_uncompressed_and_zstd_then_remount_from_cache(vm_kernel: Any, work: Path, real_tree: Path) -> None:
    oci = split_layers(real_tree, work)
    plain = convert(oci, work / "plain", "none")
    packed = convert(oci, work / "zstd", "zstd", chunk_size="256K")
    assert len(list((plain / "blobs").iterdir())) == 2, "one blob per layer"
    m = manifest(real_tree, work / "real.json")
    result = run(vm_kernel, work, [image_arg("plain", plain), image_arg("packed", packed)], [
        {"op": "mount", "fsid": "plain", "at": "p"},
        {"op": "mount", "fsid": "packed", "at": "z"},
        {"op": "verify", "at": "p", "manifest": m},
        {"op": "verify", "at": "z", "manifest": m},
        {"op": "umount", "at": "z"},
        {"op": "stats"},
        {"op": "mount", "fsid": "packed", "at": "z"},
        {"op": "verify", "at": "z", "manifest": m},
        {"op": "stats"},
    ], timeout=900)
    steps = result["steps"]
    assert steps[0]["ok"] and steps[1]["ok"], steps[:2]
    assert_verified(steps[2], at_least=2000)
    assert_verified(steps[3], at_least=2000)
    assert steps[4]["ok"] and steps[6]["ok"]
    assert_verified(steps[7], at_least=2000)
    before, after = steps[5]["stats"], steps[8]["stats"]
    assert before["read"] > 0
    # remount: everything is in the kernel's cache, so not one READ reaches the daemon
    assert after["read"] == before["read"], (before, after)
    assert after["open"] > before["open"]
    assert result["final_stats"].get("verify_failures", 0) == 0


def test_shared_domain_unknown_fsid_and_concurrent_readers(vm_kernel: Any, work: Path, real_tree: Path) -> None:
    # image B = image A's layer + one more layer (adds a file, whites one out): the first
    # layer's blob is the same file in both, so the domain shares it
    base = real_tree / "pygments"
    removed = "lexers/_php_builtins.py"
    extra = work / "extra-layer"
    extra.mkdir()
    (extra / "only-in-b.txt").write_text("second image\n" * 1000)
    whole_second_mtimes(extra)
    first = convert(write_layout(work / "oci-a", [layer_tar(base)]), work / "a", "zstd")
    second = convert(write_layout(work / "oci-b", [layer_tar(base), layer_tar(extra, [removed])]), work / "b", "zstd")
    blobs_a = {p.name for p in (first / "blobs").iterdir()}
    blobs_b = {p.name for p in (second / "blobs").iterdir()}
    assert blobs_a & blobs_b, "test premise: the two images share a blob"
    second_tree = work / "second"
    shutil.copytree(base, second_tree, symlinks=True)
    shutil.copy2(extra / "only-in-b.txt", second_tree / "only-in-b.txt")
    lexers_mtime = os.lstat(second_tree / "lexers").st_mtime_ns
    (second_tree / removed).unlink()  # the whiteout does not touch the directory's metadata
    os.utime(second_tree / "lexers", ns=(lexers_mtime, lexers_mtime))
    m1 = manifest(base, work / "a.json")
    m2 = manifest(second_tree, work / "b.json")
    result = run(vm_kernel, work, [image_arg("img-a", first, "dom"), image_arg("img-b", second, "dom")], [
        {"op": "mount", "fsid": "img-a", "domain": "dom", "at": "a"},
        {"op": "mount", "fsid": "img-b", "domain": "dom", "at": "b"},
        {"op": "mount_fail", "fsid": "no-such-image", "at": "bad"},
        {"op": "concurrent", "at": "a", "manifest": m1, "threads": 16},
        {"op": "verify", "at": "b", "manifest": m2},
        {"op": "stats"},
    ], timeout=900)
    steps = result["steps"]
    assert steps[0]["ok"] and steps[1]["ok"], steps[:2]
    assert steps[2]["failed"], "mounting an unknown fsid must fail"
    conc = steps[3]
    assert conc["error_count"] == 0, conc["errors"]
    assert conc["reads"] >= 16 * 100
    assert_verified(steps[4], at_least=100)
    stats = steps[5]["stats"]
    assert stats["open_unknown"] >= 1
    assert stats.get("read_failed", 0) == 0
    # the shared blob is one cookie in the domain: opened once for both images
    assert stats["open"] - stats["open_unknown"] == 2 + len(blobs_a | blobs_b), stats
