"""Guest side of bench/serve.py: cold, warm and memory numbers, each with its baseline.

args: big: {bootstrap, blobs, file}  (an uncompressed image holding one large file)
      small: [{fsid, bootstrap, blobs, file}]  (images mounted together for the RSS figure)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from scenarios.serve_images import DaemonProcess, mount
from vmharness.guest import scratch_dir

MNT = Path("/tmp/mnt")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed_cat(path: Path) -> float:
    drop_caches()
    start = time.monotonic()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - start


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def run(args: dict[str, Any]) -> dict[str, Any]:
    work = scratch_dir() / "bench"
    local = work / "image"
    # the blobs live on the guest's own disk, like a node's local blob store
    shutil.copytree(Path(args["big"]["blobs"]), local / "blobs")
    shutil.copy2(args["big"]["bootstrap"], local / "image.boot")
    blob = next((local / "blobs").iterdir())
    size = blob.stat().st_size
    out: dict[str, Any] = {"blob_bytes": size}
    out["cat_blob_seconds"] = timed_cat(blob)

    images = [{"fsid": "big", "bootstrap": str(local / "image.boot"), "blobs": str(local / "blobs")}]
    images += [{k: v for k, v in s.items() if k != "file"} for s in args["small"]]
    daemon = DaemonProcess(images, work / "daemon")
    try:
        if mount("big", None, MNT / "big").returncode != 0:
            raise RuntimeError("mount of the big image failed")
        target = MNT / "big" / args["big"]["file"].lstrip("/")
        out["fscached_cold_seconds"] = timed_cat(target)
        out["fscached_warm_seconds"] = timed_cat(target)
        rss_before = rss_kib(daemon.proc.pid)
        for s in args["small"]:
            at = MNT / s["fsid"]
            if mount(s["fsid"], None, at).returncode != 0:
                raise RuntimeError(f"mount of {s['fsid']} failed")
            subprocess.run(["cat", str(at / s["file"].lstrip("/"))], stdout=subprocess.DEVNULL, check=True)
        out["daemon_rss_kib_one_mount"] = rss_before
        out["daemon_rss_kib"] = rss_kib(daemon.proc.pid)
        out["mounts"] = 1 + len(args["small"])
        out["stats"] = daemon.stats()
        for s in args["small"]:
            subprocess.run(["umount", str(MNT / s["fsid"])], check=False)
        subprocess.run(["umount", str(MNT / "big")], check=True)
    finally:
        daemon.stop()
    # the ceiling for warm reads: the same image mounted file-backed, no fscache at all
    # (mount(2) itself: util-linux `mount` would want a loop device, which this kernel lacks)
    from tests.erofs_image.test_format_helpers import mount_erofs, umount

    fb = MNT / "filebacked"
    fb.mkdir(parents=True, exist_ok=True)
    try:
        mount_erofs(local / "image.boot", fb, [blob])
    except OSError as exc:
        out["filebacked_error"] = str(exc)
    else:
        out["filebacked_seconds"] = timed_cat(fb / args["big"]["file"].lstrip("/"))
        umount(fb)
    return out
