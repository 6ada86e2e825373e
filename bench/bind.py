#!/usr/bin/env python3
"""What a bind costs: the daemon's read of a bootstrap (its chunk index) vs the whole tree parsed.

  workload      : the cold-start workload's bootstrap (bench/coldstart.py's, when built in
                  /var/cache/fscached/workload): the catalog's add of the image, the way a bind
                  does it (goal <= 50 ms for the full workload)
  500k inodes   : a generated bootstrap of 500,000 files of one chunk each (goal <= 0.5 s, with
                  memory bounded: the RSS the bind added is printed beside the file's size)
The baseline of each row, measured in the same run, is the whole image parsed (Bootstrap.open and
the chunk map built from its tree: what a bind did before the index). Best of --runs, each in a
fresh process (no warm caches of the Python objects; the file itself is in the page cache).
Usage: bench/bind.py [--runs 5] [--inodes 500000] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

GEN_DIR = Path("/var/tmp/fscached-bench-bind")
WORKLOADS = Path("/var/cache/fscached/workload")

# one measurement in a fresh interpreter: seconds, peak RSS growth (KiB), chunks
PROBE = r"""
import json, sys, time
from pathlib import Path
mode, path = sys.argv[1], Path(sys.argv[2])
def rss():  # KiB resident now (ru_maxrss would carry the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
from fscached.config import ImageSpec
from fscached.core.catalog import Catalog, open_bootstrap
from fetcher.chain import SourceChain
from fetcher.local import LocalDirectorySource
spec = ImageSpec(fsid="b", bootstrap=path, blobs=path.parent / "blobs")
chain = SourceChain([LocalDirectorySource(path.parent / "blobs")])
before = rss()
start = time.perf_counter()
if mode == "index":
    parsed = open_bootstrap(spec, path)
else:
    from erofs_image.reader import Bootstrap
    parsed = Bootstrap.open(path)
catalog = Catalog()
catalog.add_image(spec, path, chain, parsed)
seconds = time.perf_counter() - start
peak = rss()
chunks = sum(len(blob.chunk_map) for blob in catalog.devices[(spec.volume, spec.fsid)])
print(json.dumps({"seconds": seconds, "rss_kib": peak - before, "chunks": chunks, "kind": type(parsed).__name__}))
"""


def generate(inodes: int) -> Path:
    """A bootstrap of `inodes` regular files (1,000 a directory), one 4 KiB chunk each, in one
    blob (never read: a bind reads only the bootstrap)."""
    from erofs_image.tree import BlobInfo, ChunkRef, Image, Inode
    from erofs_image.writer import write_bootstrap

    out = GEN_DIR / f"inodes-{inodes}" / "image.boot"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "blobs").mkdir(exist_ok=True)
    blob_id = hashlib.sha256(f"bench-bind-{inodes}".encode()).hexdigest()
    blob = BlobInfo(blob_id, "none", 4096, inodes, inodes * 4096, inodes * 4096)
    root = Inode(mode=stat.S_IFDIR | 0o755)
    per_dir = 1000
    for d in range((inodes + per_dir - 1) // per_dir):
        directory = Inode(mode=stat.S_IFDIR | 0o755)
        root.children[f"d{d:04d}".encode()] = directory
        for k in range(min(per_dir, inodes - d * per_dir)):
            i = d * per_dir + k
            digest = hashlib.blake2s(i.to_bytes(8, "little")).digest()
            ref = ChunkRef(0, i * 4096, 4096, i * 4096, 4096, False, digest, i)
            directory.children[f"f{k:04d}".encode()] = Inode(mode=stat.S_IFREG | 0o644, size=4096, chunks=[ref])
    image = Image(root=root, blobs=[blob], chunk_size=4096)
    tmp = out.with_suffix(".tmp")
    write_bootstrap(image, tmp)
    os.rename(tmp, out)
    return out


def probe(mode: str, path: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode, str(path)], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(label: str, path: Path, runs: int, goal_s: float) -> dict[str, Any]:
    index: list[dict[str, Any]] = []
    tree: list[dict[str, Any]] = []
    for _ in range(runs):  # interleaved: the two see the same machine
        index.append(probe("index", path))
        tree.append(probe("tree", path))
    si = [r["seconds"] for r in index]
    st = [r["seconds"] for r in tree]
    best_i = index[si.index(min(si))]
    best_t = tree[st.index(min(st))]
    return {"label": label, "bootstrap": str(path), "bootstrap_bytes": path.stat().st_size,
            "chunks": best_i["chunks"], "kind": best_i["kind"],
            "index_seconds": si, "tree_seconds": st, "index_best": min(si), "tree_best": min(st),
            "index_rss_kib": best_i["rss_kib"], "tree_rss_kib": best_t["rss_kib"],
            "ratio": min(st) / min(si), "goal_seconds": goal_s, "met": min(si) <= goal_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--inodes", type=int, default=500_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for boot in sorted(WORKLOADS.glob("*/nydus/image.boot")):
        name = boot.parent.parent.name.split("-")[0]
        rows.append(measure(f"workload ({name})", boot, args.runs, 0.05))
    started = time.monotonic()
    generated = generate(args.inodes)
    print(f"generated {generated} in {time.monotonic() - started:.0f} s (cached for later runs)", file=sys.stderr)
    rows.append(measure(f"{args.inodes:,} inodes", generated, args.runs, 0.5))
    print(f"{'bootstrap':24} {'MiB':>6} {'chunks':>8} {'bind (index)':>12} {'spread':>17} {'RSS +MiB':>9} "
          f"{'whole tree':>11} {'RSS +MiB':>9} {'x faster':>9} {'goal':>8}  met")
    for r in rows:
        si = r["index_seconds"]
        print(f"{r['label']:24} {r['bootstrap_bytes'] / 2**20:6.1f} {r['chunks']:>8} "
              f"{1000 * r['index_best']:10.1f}ms {1000 * min(si):7.1f}-{1000 * max(si):6.1f}ms "
              f"{r['index_rss_kib'] / 1024:9.1f} {1000 * r['tree_best']:9.0f}ms "
              f"{r['tree_rss_kib'] / 1024:9.1f} {r['ratio']:9.1f} "
              f"{1000 * r['goal_seconds']:6.0f}ms  {'met' if r['met'] else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
