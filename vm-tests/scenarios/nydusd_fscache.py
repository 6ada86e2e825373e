"""Guest side of test_vm_nydusd_fscache.py: the real nydusd (nydus-rs 2.2.0) in fscache mode
serving an image fscached-image built, wired as bench/nydusd_guest.py wires it (its
FscacheNydusd: `nydusd singleton --fscache`, the snapshotter's bind entry, `mount -o fsid=`,
then umount, unbind, SIGTERM), and what the mount shows compared with the source tree's manifest.

args: nydusd (the binary), bootstrap, blobs (the image, copied to the guest's disk first),
      manifest (vm-tests/trees.py's manifest of the source tree).
Returns the verify step (serve_images.verify), what stopping said, and nydusd's error lines.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from scenarios.serve_images import verify
from vmharness.guest import scratch_dir


def run(args: dict[str, Any]) -> dict[str, Any]:
    from bench.nydusd_guest import FscacheNydusd

    image = scratch_dir() / "image"
    (image / "blobs").mkdir(parents=True)
    shutil.copy2(args["bootstrap"], image / "image.boot")
    for blob in Path(args["blobs"]).iterdir():
        shutil.copy2(blob, image / "blobs" / blob.name)
    nydusd = FscacheNydusd(Path(args["nydusd"]), scratch_dir() / "nydusd", image / "image.boot",
                           {"type": "localfs", "config": {"dir": str(image / "blobs")}}, fsid="compat")
    out: dict[str, Any] = {}
    try:
        nydusd.start()
        out["verify"] = verify(nydusd.mnt, args["manifest"])
    finally:
        out["stop"] = nydusd.stop()
        out["errors"] = nydusd.errors()
        out["log_tail"] = nydusd.log_lines()[-20:]
    return out
