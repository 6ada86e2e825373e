"""Build-time benchmark: fscached-image convert vs mkfs.erofs on the same directory tree.

    python bench/build.py [TREE] [--runs 3] [--gen-1g DIR]

TREE defaults to this Python's site-packages. --gen-1g DIR writes a ~1 GiB tree into DIR
(once; reused when it already exists) and benchmarks that. Both builders run uncompressed
(fscached-image --compressor none; mkfs.erofs --chunksize 1048576), best of --runs each.
Goal: time ratio fscached-image / mkfs.erofs <= 1.5, and peak RSS < 300 MiB for 1 GiB of input.
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

GOAL_RATIO = 1.5
GOAL_RSS_MIB = 300


def generate(dest: Path, total: int = 1 << 30) -> Path:
    """~`total` bytes: a few big files, many small ones, some duplicated content."""
    marker = dest / ".complete"
    if marker.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(42)
    written = 0
    big = os.urandom(8 << 20)
    i = 0
    while written < total * 3 // 4:  # large files: 1-16 MiB, half of them partial duplicates
        size = rng.randint(1, 16) << 20
        d = dest / f"big{i % 16:02d}"
        d.mkdir(exist_ok=True)
        with open(d / f"f{i}.bin", "wb") as f:
            left = size
            while left:
                n = min(left, 4 << 20)
                f.write(big[:n] if i % 2 else os.urandom(n))
                left -= n
        written += size
        i += 1
    j = 0
    while written < total:  # small files: 1-64 KiB in a deep-ish tree
        size = rng.randint(1, 64) << 10
        d = dest / "small" / f"d{j % 64:02d}" / f"e{j % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"s{j}.dat").write_bytes(os.urandom(size))
        written += size
        j += 1
    marker.write_text(f"{written}\n")
    return dest


def tree_size(path: Path) -> tuple[int, int]:
    n = files = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                n += os.lstat(p).st_size
                files += 1
    return n, files


def best_of(runs: int, cmd_for, cleanup) -> float:
    best = float("inf")
    for _ in range(runs):
        cleanup()
        t = time.perf_counter()
        r = subprocess.run(cmd_for(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(f"bench: {cmd_for()[0]} failed: {r.stderr.decode(errors='replace').strip()}")
        best = min(best, elapsed)
    cleanup()
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tree", nargs="?", type=Path,
                    default=Path(sysconfig.get_paths()["purelib"]))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gen-1g", type=Path, metavar="DIR",
                    help="generate (or reuse) a ~1 GiB tree in DIR and benchmark it")
    args = ap.parse_args(argv)
    tree = generate(args.gen_1g) if args.gen_1g else args.tree
    if not tree.is_dir():
        sys.exit(f"bench: {tree}: not a directory")
    mkfs = shutil.which("mkfs.erofs")
    size, files = tree_size(tree)
    print(f"tree {tree}: {files} files, {size / (1 << 20):.1f} MiB; best of {args.runs}")

    with tempfile.TemporaryDirectory(prefix="fscached-bench-") as tmp:
        tmp = Path(tmp)
        out = tmp / "out"
        ours = best_of(args.runs,
                       lambda: [sys.executable, "-m", "erofs_image.cli", "convert", str(tree),
                                str(out), "--compressor", "none", "--no-progress", "-q"],
                       lambda: shutil.rmtree(out, ignore_errors=True))
        # ru_maxrss of the children waited for so far: only fscached-image runs (KiB on Linux)
        rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"fscached-image convert --compressor none: {ours:.2f} s "
              f"({size / (1 << 20) / ours:.0f} MiB/s), peak RSS {rss_mib:.0f} MiB")
        if not mkfs:
            print("mkfs.erofs not installed (apt-get install erofs-utils): no comparison")
            return 0
        img = tmp / "mkfs.img"
        theirs = best_of(args.runs,
                         lambda: [mkfs, "--chunksize=1048576", str(img), str(tree)],
                         lambda: img.unlink(missing_ok=True))
        print(f"mkfs.erofs --chunksize=1048576:          {theirs:.2f} s "
              f"({size / (1 << 20) / theirs:.0f} MiB/s)")
    ratio = ours / theirs
    print(f"ratio fscached-image / mkfs.erofs = {ratio:.2f} "
          f"(goal <= {GOAL_RATIO}: {'met' if ratio <= GOAL_RATIO else 'NOT met'})")
    per_gib = rss_mib if size >= 1 << 30 else None
    rss_note = (f"{'met' if rss_mib < GOAL_RSS_MIB else 'NOT met'}" if per_gib is not None
                else f"input is {size / (1 << 30):.2f} GiB; use --gen-1g DIR for the 1 GiB goal")
    print(f"peak RSS {rss_mib:.0f} MiB (goal < {GOAL_RSS_MIB} MiB for 1 GiB of input: {rss_note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
