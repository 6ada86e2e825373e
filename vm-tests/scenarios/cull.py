"""Guest side of test_vm_cull: culling cachefiles objects through the API, and the cache budget.

Two images share one data blob: `img1` (a snapshotter-style hex fsid, no domain: volume
`erofs,<fsid>`) and `img2` (domain `dom`, one more blob). `fscached --apisock` serves them from
--image flags; every cull is `DELETE /api/v2/blobs?blob_id=` on the socket (fscached.api.server ->
fscached.cache_gc), every answer and what `<cache>/cache/` holds after it is recorded:

phase "cull": cull while mounted and bound (409), the snapshotter's unmount of img1 (unbind,
umount, cull <fsid>), the shared blob culled where it is free and kept where it is bound (409,
partly done), an object the kernel itself holds (img2 remounted from linked files, then unbound
through the API while still mounted: `inuse` answers EBUSY), then everything culled once
unmounted (right after umount: the kernel links and releases objects in a worker), the empty
volume of img1, 404 for what is gone, 400 for a bad id.

phase "budget": a second daemon on the same cache with `cache_budget = "1M"` and brun/bcull/bstop
20/10/5 in its config file (the kernel takes them before `bind ondemand`); both images mounted,
read and unmounted (their objects linked), img1 unbound through the API: the budget pass that
follows culls img1's objects and its empty volume, and leaves img2's (bound) alone.

args: {"images": {"img1": {fsid, bootstrap, blobs, digests}, "img2": {..., "domain"}},
       "shared": <blob id in both>, "only2": <blob id only in img2>}
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from vmharness.guest import scratch_dir

MOUNT_ROOT = Path("/tmp/mnt")
SOCK = Path("/run/fscached-cull/api.sock")


def call(method: str, path: str) -> dict[str, Any]:
    import aiohttp

    async def go() -> dict[str, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(SOCK))) as session:
            t0 = time.monotonic()
            async with session.request(method, f"http://unix{path}", timeout=aiohttp.ClientTimeout(total=120)) as resp:
                raw = await resp.read()
                return {"status": resp.status, "body": json.loads(raw) if raw else None,
                        "seconds": round(time.monotonic() - t0, 3)}
    return asyncio.run(go())


def cull(blob_id: str) -> dict[str, Any]:
    return call("DELETE", f"/api/v2/blobs?blob_id={quote(blob_id, safe='')}")


def mount(fsid: str, domain: str | None, at: Path) -> dict[str, Any]:
    at.mkdir(parents=True, exist_ok=True)
    opts = f"domain_id={domain},fsid={fsid}" if domain else f"fsid={fsid}"
    proc = subprocess.run(["mount", "-t", "erofs", "none", "-o", opts, str(at)], capture_output=True, text=True,
                          timeout=300)
    return {"ok": proc.returncode == 0, "stderr": proc.stderr.strip()}


def umount(at: Path) -> dict[str, Any]:
    proc = subprocess.run(["umount", str(at)], capture_output=True, text=True, timeout=120)
    return {"ok": proc.returncode == 0, "stderr": proc.stderr.strip()}


def wrong_files(at: Path, digests: dict[str, str]) -> list[str]:
    bad = []
    for rel, want in sorted(digests.items()):
        try:
            got = hashlib.sha256((at / rel).read_bytes()).hexdigest()
        except OSError as exc:
            got = f"error: {exc}"
        if got != want:
            bad.append(f"{rel}: {got}")
    return bad


def files(cache: Path) -> list[str]:
    """Every file under <cache>/cache, relative to the cache dir."""
    out = []
    for dirpath, _, names in os.walk(cache / "cache"):
        for name in names:
            out.append(str((Path(dirpath) / name).relative_to(cache)))
    return sorted(out)


def volumes(cache: Path) -> list[str]:
    try:
        return sorted(os.listdir(cache / "cache"))
    except FileNotFoundError:
        return []


def wait_files(cache: Path, count: int, prefix: str, timeout: float = 20) -> list[str]:
    """Until `count` files under <cache>/<prefix> are linked (the kernel does it after umount)."""
    deadline = time.monotonic() + timeout
    while True:
        now = [f for f in files(cache) if f.startswith(prefix)]
        if len(now) >= count or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


class Daemon:
    def __init__(self, work: Path, cache: Path, images: dict[str, dict[str, Any]], name: str,
                 config: str | None = None) -> None:
        self.log_path = work / f"{name}.log"
        ready = work / f"{name}.ready"
        cmd = [sys.executable, "-m", "fscached.cli", "--cache-dir", str(cache), "--backend", "cachefiles",
               "--apisock", str(SOCK), "--ready-file", str(ready), "--work-dir", str(work / "state"),
               "--log-level", "info"]
        if config is not None:
            (work / f"{name}.toml").write_text(config)
            cmd += ["--config", str(work / f"{name}.toml")]
        for image in images.values():
            spec = {k: image[k] for k in ("fsid", "bootstrap", "blobs", "domain") if image.get(k)}
            cmd += ["--image", ",".join(f"{k}={v}" for k, v in spec.items())]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (ready.exists() and SOCK.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fscached did not start ({self.proc.poll()}): {self.log_text()[-3000:]}")
            time.sleep(0.05)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def run(args: dict[str, Any]) -> dict[str, Any]:
    import aiohttp  # noqa: F401  # imported once, before anything is timed

    work = scratch_dir() / "cull"
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    images = args["images"]
    one, two = images["img1"], images["img2"]
    h, shared, only2 = one["fsid"], args["shared"], args["only2"]
    at1, at2 = MOUNT_ROOT / "one", MOUNT_ROOT / "two"
    out: dict[str, Any] = {}
    mounted: set[Path] = set()

    def do_mount(image: dict[str, Any], at: Path) -> dict[str, Any]:
        res = mount(image["fsid"], image.get("domain"), at)
        if res["ok"]:
            mounted.add(at)
            res["wrong"] = wrong_files(at, image["digests"])
        return res

    def do_umount(at: Path) -> dict[str, Any]:
        res = umount(at)
        if res["ok"]:
            mounted.discard(at)
        return res

    def step(name: str, result: dict[str, Any]) -> None:
        result["files"] = files(cache)
        out[name] = result

    # -- phase "cull" ------------------------------------------------------------------------
    daemon = Daemon(work, cache, images, "cull")
    try:
        out["mount1"] = do_mount(one, at1)
        out["mount2"] = do_mount(two, at2)
        out["files_while_mounted"] = files(cache)
        out["volumes_while_mounted"] = volumes(cache)
        step("cull_shared_mounted", cull(shared))
        step("cull_fsid_mounted", cull(h))
        # the snapshotter's unmount of img1; the linked objects are listed before the cull
        out["unbind1"] = call("DELETE", f"/api/v2/blobs?domain_id={h}")
        out["umount1"] = do_umount(at1)
        out["linked1"] = wait_files(cache, 2, f"cache/Ierofs,{h}/")
        step("cull_fsid", cull(h))
        step("cull_shared_partly", cull(shared))  # gone from erofs,<h>; bound in erofs,dom
        # img2's objects linked, then held by the kernel from the linked files
        out["umount2"] = do_umount(at2)
        out["linked2"] = wait_files(cache, 3, "cache/Ierofs,dom/")
        out["remount2"] = do_mount(two, at2)
        out["unbind2_mounted"] = call("DELETE", f"/api/v2/blobs?domain_id=dom&blob_id={two['fsid']}")
        step("cull_kernel_busy", cull(only2))
        out["umount2b"] = do_umount(at2)
        step("cull_only2", cull(only2))  # right after umount: waits for the kernel to let go
        step("cull_fsid2", cull(two["fsid"]))
        step("cull_shared", cull(shared))
        step("cull_shared_again", cull(shared))
        out["volumes_before_cull_h"] = volumes(cache)
        step("cull_h_volume", cull(h))
        out["volumes_after_cull_h"] = volumes(cache)
        out["graveyard_after_cull_h"] = sorted(os.listdir(cache / "graveyard"))
        step("cull_h_again", cull(h))
        step("cull_invalid", cull("../x"))
        step("cull_prefixed", cull("sha256:" + shared))
    finally:
        for at in list(mounted):
            do_umount(at)
        out["cull_exit"] = daemon.stop()
        out["cull_log"] = daemon.log_text()[-12000:]

    # -- phase "budget" ----------------------------------------------------------------------
    config = 'cache_budget = "1M"\nbrun = 20\nbcull = 10\nbstop = 5\n'
    daemon = Daemon(work, cache, images, "budget", config)
    try:
        out["b_mount1"] = do_mount(one, at1)
        out["b_umount1"] = do_umount(at1)
        out["b_mount2"] = do_mount(two, at2)
        out["b_umount2"] = do_umount(at2)
        out["b_linked"] = wait_files(cache, 5, "cache/")
        out["b_volumes_before"] = volumes(cache)
        out["b_unbind1"] = call("DELETE", f"/api/v2/blobs?domain_id={h}")
        deadline = time.monotonic() + 30  # the pass runs a second after the unbind
        while time.monotonic() < deadline and any(f.startswith(f"cache/Ierofs,{h}/") for f in files(cache)):
            time.sleep(0.1)
        time.sleep(1)
        out["b_files_after"] = files(cache)
        out["b_volumes_after"] = volumes(cache)
        out["b_remount2"] = do_mount(two, at2)  # img2's objects stayed: read from the cache
        out["b_umount2b"] = do_umount(at2)
    finally:
        for at in list(mounted):
            do_umount(at)
        out["budget_exit"] = daemon.stop()
        out["budget_log"] = daemon.log_text()[-12000:]
    return out
