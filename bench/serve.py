#!/usr/bin/env python3
"""Serving benchmark in a real kernel (QEMU): ratios against baselines from the same boot.

  cold  = cat of the raw blob file / cat through fscached on a cold cache   (goal >= 0.8)
  warm  = cat through a file-backed EROFS mount / cat through the warm cache (goal >= 0.95)
  RSS   = the daemon's resident memory while serving 20 mounts              (goal < 80 MiB)
All times are guest times under software emulation: compare them only with each other.
Usage: bench/serve.py [--size-mib 256] [--kernel 6.12]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "vm-tests"), str(REPO)]

from vmharness import find_kernel, run_scenario  # noqa: E402


def convert(src: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "erofs_image.cli", "convert", str(src), str(out),
                    "--compressor", "none"], check=True, cwd=REPO)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--kernel", default="6.12")
    parser.add_argument("--mounts", type=int, default=20)
    args = parser.parse_args()
    kernel = find_kernel(args.kernel)
    if kernel is None:
        print(f"no kernel {args.kernel}: run vm-tests/kernel/build-kernel.sh {args.kernel}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="fscached-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        big_tree = work / "big-tree"
        big_tree.mkdir()
        with open(big_tree / "big.bin", "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        big = convert(big_tree, work / "big")
        small = []
        for i in range(args.mounts - 1):
            tree = work / f"small-tree-{i}"
            tree.mkdir()
            (tree / "file.txt").write_bytes(os.urandom(64 << 10))
            built = convert(tree, work / f"small-{i}")
            small.append({"fsid": f"small{i}", "bootstrap": str(built / "image.boot"),
                          "blobs": str(built / "blobs"), "file": "/file.txt"})
        res = run_scenario(kernel, "bench_serve", {
            "big": {"bootstrap": str(big / "image.boot"), "blobs": str(big / "blobs"), "file": "/big.bin"},
            "small": small,
        }, timeout=3600, scratch_size="4G", memory_mb=2048)
    r = res.result
    cold = r["cat_blob_seconds"] / r["fscached_cold_seconds"]
    print(f"kernel {kernel.series}, {args.size_mib} MiB file, guest times under TCG")
    print(f"cold read : cat blob {r['cat_blob_seconds']:.2f}s, fscached {r['fscached_cold_seconds']:.2f}s, "
          f"ratio {cold:.2f} (goal >= 0.8)")
    if "filebacked_seconds" in r:
        warm = r["filebacked_seconds"] / r["fscached_warm_seconds"]
        print(f"warm read : file-backed {r['filebacked_seconds']:.2f}s, fscached cache {r['fscached_warm_seconds']:.2f}s, "
              f"ratio {warm:.2f} (goal >= 0.95)")
    else:
        print(f"warm read : fscached cache {r['fscached_warm_seconds']:.2f}s; file-backed baseline unavailable: "
              f"{r['filebacked_error']}")
    print(f"daemon RSS: {r['daemon_rss_kib'] / 1024:.1f} MiB with {r['mounts']} mounts "
          f"({r['daemon_rss_kib_one_mount'] / 1024:.1f} MiB with one) (goal < 80 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
