"""The daemon against a real kernel: images built by fscached-image, mounted with -o fsid=.

Each test boots a fresh guest (6.12 and 6.1), starts `fscached` from this checkout there, mounts,
and compares what the kernel shows with the source tree, byte for byte and field by field.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ocilayout import layer_tar, write_layout
from scenarios.serve_images import describe
from vmharness import find_kernel, run_scenario, selected_series

REPO = Path(__file__).resolve().parent.parent
SITE_PACKAGES = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
# A real tree of a few thousand files (pure-python packages: text, small binaries, symlink-free)
REAL_TREE_PACKAGES = ("pip", "setuptools", "pygments", "hypothesis", "_pytest")

pytestmark = pytest.mark.vm


def kernels() -> list[Any]:
    found = []
    for series in selected_series():
        kernel = find_kernel(series)
        found.append(pytest.param(kernel, id=series, marks=[] if kernel else pytest.mark.skip(
            reason=f"no bzImage-{series}: run vm-tests/kernel/build-kernel.sh {series}")))
    return found


def convert(source: Path, out: Path, compressor: str = "none", chunk_size: str | None = None) -> Path:
    cmd = [sys.executable, "-m", "erofs_image.cli", "convert", str(source), str(out), "--compressor", compressor]
    if chunk_size:
        cmd += ["--chunk-size", chunk_size]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    return out


def manifest(tree: Path, out: Path) -> str:
    """What the kernel must show for `tree`: every entry's metadata and content digest."""
    entries: dict[str, Any] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = "/" + str(full.relative_to(tree))
            entries[rel] = describe(full)
            st = os.lstat(full)
            if not os.path.isdir(full) and st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    data = {"entries": entries, "hardlinks": [g for g in inodes.values() if len(g) > 1]}
    out.write_text(json.dumps(data))
    return str(out)


def image_arg(fsid: str, built: Path, domain: str | None = None) -> dict[str, Any]:
    return {"fsid": fsid, "bootstrap": str(built / "image.boot"), "blobs": str(built / "blobs"), "domain": domain}


def run(kernel: Any, work: Path, images: list[dict[str, Any]], steps: list[dict[str, Any]], timeout: float = 600) -> dict[str, Any]:
    res = run_scenario(kernel, "serve_images", {"images": images, "steps": steps}, timeout=timeout,
                       share=[work], scratch_size="2G")
    result = res.result
    assert result["alive_before_stop"], result["daemon_log"]
    assert result["daemon_exit"] == 0, result["daemon_log"]
    return result


def assert_verified(step: dict[str, Any], at_least: int) -> None:
    assert step["op"] == "verify"
    assert not step["missing"] and not step["extra"] and not step["mismatches"], step
    assert step["hardlinks_ok"]
    assert step["checked"] >= at_least


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="module")
def real_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("real") / "tree"
    root.mkdir()
    for name in REAL_TREE_PACKAGES:
        shutil.copytree(SITE_PACKAGES / name, root / name, symlinks=True)
    # metadata the kernel must keep: hard links, symlinks, odd modes, xattrs, a device, a fifo
    (root / "extra").mkdir()
    (root / "extra" / "big.bin").write_bytes(os.urandom(3 << 20) + b"tail")
    os.link(root / "extra" / "big.bin", root / "extra" / "big-link.bin")
    os.symlink("../pip/__init__.py", root / "extra" / "link-to-pip")
    os.chmod(root / "extra" / "big.bin", 0o4751)
    os.chown(root / "extra" / "big.bin", 1234, 5678)
    os.setxattr(root / "extra" / "big.bin", "user.fscached", b"value\0with-nul")
    os.mknod(root / "extra" / "null", 0o666 | 0o020000, os.makedev(1, 3))
    os.mkfifo(root / "extra" / "fifo")
    whole_second_mtimes(root)
    return root


def whole_second_mtimes(root: Path) -> None:
    """Tar layers carry mtimes at microsecond precision at best: use whole seconds."""
    for path in [*root.rglob("*"), root]:
        st = os.lstat(path)
        whole = st.st_mtime_ns // 1_000_000_000 * 1_000_000_000
        os.utime(path, ns=(whole, whole), follow_symlinks=False)


@pytest.mark.parametrize("kernel", kernels())
def test_bootstrap_only_image(kernel: Any, work: Path) -> None:
    tree = work / "meta-only"
    (tree / "dir" / "sub").mkdir(parents=True)
    (tree / "empty").write_bytes(b"")
    os.symlink("dir/sub", tree / "link")
    os.mkfifo(tree / "dir" / "fifo")
    os.setxattr(tree / "dir", "user.note", b"bootstrap only")
    built = convert(tree, work / "built")
    assert not any((built / "blobs").iterdir()), "a tree without data must need no blob"
    result = run(kernel, work, [image_arg("metaonly", built)], [
        {"op": "mount", "fsid": "metaonly", "at": "m"},
        {"op": "verify", "at": "m", "manifest": manifest(tree, work / "m.json")},
    ])
    assert result["steps"][0]["ok"], result["steps"][0]
    assert_verified(result["steps"][1], at_least=5)


def split_layers(tree: Path, work: Path) -> Path:
    """The real tree as a two-layer OCI image (pip and setuptools below, the rest above)."""
    lower = {"pip", "setuptools"}
    upper = {p.name for p in tree.iterdir()} - lower
    return write_layout(work / "oci", [layer_tar(tree, include=lower), layer_tar(tree, include=upper)])


@pytest.mark.parametrize("kernel", kernels())
def test_real_tree_uncompressed_and_zstd_then_remount_from_cache(kernel: Any, work: Path, real_tree: Path) -> None:
    oci = split_layers(real_tree, work)
    plain = convert(oci, work / "plain", "none")
    packed = convert(oci, work / "zstd", "zstd", chunk_size="256K")
    assert len(list((plain / "blobs").iterdir())) == 2, "one blob per layer"
    m = manifest(real_tree, work / "real.json")
    result = run(kernel, work, [image_arg("plain", plain), image_arg("packed", packed)], [
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


@pytest.mark.parametrize("kernel", kernels())
def test_shared_domain_unknown_fsid_and_concurrent_readers(kernel: Any, work: Path, real_tree: Path) -> None:
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
    result = run(kernel, work, [image_arg("img-a", first, "dom"), image_arg("img-b", second, "dom")], [
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
