"""Guest side of bench/fetch.py --vm: a registry on the guest's loopback; `curl` of a blob vs
`cat` of the same bytes through fscached, both cold, in one boot."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from scenarios.bench_serve import drop_caches, timed_cat
from scenarios.serve_images import DaemonProcess, mount
from vmharness.guest import scratch_dir


def run(args: dict[str, Any]) -> dict[str, Any]:
    from tests.registry_server import RegistryServer

    work = scratch_dir() / "bench-fetch"
    shutil.copytree(args["storage"], work / "registry" / "storage")
    out: dict[str, Any] = {}
    with RegistryServer(work / "registry") as registry:
        url = f"http://{registry.host}/v2/{args['repo']}/blobs/sha256:{args['blob_id']}"
        drop_caches()
        start = time.monotonic()
        subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True)
        out["curl_seconds"] = time.monotonic() - start
        image = {"fsid": "cold", "bootstrap": args["bootstrap"],
                 "registry": f"{registry.host}/{args['repo']}", "scheme": "http"}
        daemon = DaemonProcess([image], work / "daemon")
        try:
            at = Path("/tmp/mnt/cold")
            if mount("cold", None, at).returncode != 0:
                raise RuntimeError("mount failed")
            out["fscached_seconds"] = timed_cat(at / args["file"].lstrip("/"))
            out["stats"] = daemon.stats()
            subprocess.run(["umount", str(at)], check=False)
        finally:
            daemon.stop()
    return out
