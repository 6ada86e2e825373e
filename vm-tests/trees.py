"""Helpers shared by the VM tests: real trees, manifests of what the kernel must show, images."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from scenarios.serve_images import describe
from vmharness import run_scenario

REPO = Path(__file__).resolve().parent.parent
SITE_PACKAGES = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
# A real tree of a few thousand files (pure-python packages: text, small binaries, symlink-free)
REAL_TREE_PACKAGES = ("pip", "setuptools", "pygments", "hypothesis", "_pytest")

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


def run(kernel: Any, work: Path, images: list[dict[str, Any]], steps: list[dict[str, Any]],
        timeout: float = 600, **services: Any) -> dict[str, Any]:
    """Boot, run serve_images (daemon + mounts + steps) in the guest; the daemon must survive."""
    res = run_scenario(kernel, "serve_images", {"images": images, "steps": steps, **services},
                       timeout=timeout, share=[work], scratch_size="2G")
    result = res.result
    assert result["alive_before_stop"], result["daemon_log"]
    assert result["daemon_exit"] == 0, result["daemon_log"]
    return result


def assert_verified(step: dict[str, Any], at_least: int) -> None:
    assert step["op"] == "verify"
    assert not step["missing"] and not step["extra"] and not step["mismatches"], step
    assert step["hardlinks_ok"]
    assert step["checked"] >= at_least


def make_real_tree(root: Path) -> Path:
    """A few thousand real files plus every kind of metadata the kernel must keep."""
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


