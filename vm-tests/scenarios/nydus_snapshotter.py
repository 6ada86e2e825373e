"""Guest side of test_vm_nydus.py: the error paths of fscached's `nydusd singleton` that the real
nydus-snapshotter cannot be made to take, its calls replayed as it makes them.

Everything the snapshotter does on a working node is checked against the real one
(test_vm_snapshotter.py: its command line, binds, `fsid=` and `domain_id=,fsid=` mounts,
unbinds and culls, sendfd, failover, hot upgrade, the liveness connection). What is left here:
  - a second bind of a bound image (not one a takeover gave back): 400 ALREADY_EXISTS;
  - an unbind of an entry that is not there: 404 whose message holds "blob_cache: cache entry
    not found" (the snapshotter matches that text);
  - a bind whose metadata_path is missing: 400 naming it, and nothing served for that id;
  - sendfd while nothing listens on the supervisor (the snapshotter gone): an error, not a hang;
  - a mount of an image after the snapshotter's unbind, umount and cull: refused;
  - the cull of a layer's blob (DELETE ?blob_id=<layer>): the snapshotter sends it only for
    plain files of its cache dir that no instance lists, and fscached's cachefiles cache there
    holds only directories.
The set-up is the snapshotter's: `nydusd singleton --fscache <cache> --apisock <root>/socket/<id>
/api.sock ... --id <id> --supervisor <sock> --log-file ...`, RUNNING, a bind (legacy entry,
localfs backend) and its `-o fsid=` mount; at the end PUT /api/v1/daemon/exit.

args: nydusd (the console script), image: {"snapshot_id", "bootstrap", "blobs"}.
Returns every HTTP status and body, and the daemon's log.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from scenarios.unix_http import request
from vmharness.guest import scratch_dir

DAEMON_ID = "d0fscached0nydus0compat"


def fscache_id(snapshot_id: str) -> str:
    return hashlib.sha256(f"nydus-snapshot-{snapshot_id}".encode()).hexdigest()


def call(sock: Path, method: str, path: str, body: Any = None) -> dict[str, Any]:
    status, raw = request(sock, method, path, body)
    return {"status": status, "body": json.loads(raw) if raw else None}


def bind_entry(fsid: str, snapshot: Path, blobs: str) -> dict[str, Any]:
    """The legacy entry the snapshotter writes (config/daemonconfig/fscache.go), localfs backend."""
    return {
        "type": "bootstrap", "id": fsid, "domain_id": fsid,
        "config": {
            "id": fsid, "backend_type": "localfs",
            "backend_config": {"dir": blobs, "readahead": False, "blob_file": ""},
            "cache_type": "fscache", "cache_config": {"work_dir": str(snapshot / "fs")},
            "prefetch_config": {"enable": False, "threads_count": 8, "merging_size": 1048576, "bandwidth_rate": 0,
                                "prefetch_all": False},
            "metadata_path": str(snapshot / "fs" / "image" / "image.boot"),
        },
    }


def mount(fsid: str, at: Path) -> dict[str, Any]:
    at.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "erofs", "none", "-o", f"fsid={fsid}", str(at)],
                          capture_output=True, text=True, timeout=300)
    return {"ok": proc.returncode == 0, "stderr": proc.stderr.strip()}


def run(args: dict[str, Any]) -> dict[str, Any]:
    root = scratch_dir() / "nydus-snapshotter"
    cache = root / "cache"
    sock = root / "socket" / DAEMON_ID / "api.sock"
    supervisor = root / "supervisor" / f"{DAEMON_ID}.sock"  # nothing listens there
    log_file = root / "logs" / DAEMON_ID / "nydusd.log"
    cmd = [args["nydusd"], "singleton", "--fscache", str(cache), "--apisock", str(sock), "--log-level", "info",
           "--log-rotation-size", "100", "--id", DAEMON_ID, "--supervisor", str(supervisor),
           "--log-file", str(log_file)]
    root.mkdir(parents=True, exist_ok=True)
    stderr_path = root / "nydusd.stderr"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(cmd, stdout=stderr, stderr=subprocess.STDOUT, env=env)
    mounted: list[Path] = []
    try:
        while True:  # the socket, then RUNNING (a request waits in the backlog until it is served)
            if proc.poll() is not None or time.monotonic() - t0 > 180:
                raise RuntimeError(f"nydusd did not serve (exit {proc.poll()}): "
                                   f"{stderr_path.read_text(errors='replace')[-2000:]}")
            if sock.exists() and call(sock, "GET", "/api/v1/daemon")["body"]["state"] == "RUNNING":
                break
            time.sleep(0.05)

        image = args["image"]
        fsid = fscache_id(image["snapshot_id"])
        snapshot = root / "snapshots" / image["snapshot_id"]
        (snapshot / "fs" / "image").mkdir(parents=True, exist_ok=True)  # the snapshotter's layout
        shutil.copy(image["bootstrap"], snapshot / "fs" / "image" / "image.boot")
        entry = bind_entry(fsid, snapshot, image["blobs"])
        out["bind"] = call(sock, "PUT", "/api/v2/blobs", entry)
        out["mount"] = mount(fsid, snapshot / "mnt")
        if out["mount"]["ok"]:
            mounted.append(snapshot / "mnt")

        out["second_bind"] = call(sock, "PUT", "/api/v2/blobs", entry)
        out["unbind_missing"] = call(sock, "DELETE", f"/api/v2/blobs?domain_id={fsid}&blob_id={'0' * 64}")
        ghost = fscache_id("ghost")
        ghost_snapshot = root / "snapshots" / "ghost"
        (ghost_snapshot / "fs").mkdir(parents=True, exist_ok=True)
        out["missing_metadata"] = call(sock, "PUT", "/api/v2/blobs", bind_entry(ghost, ghost_snapshot, image["blobs"]))
        out["missing_metadata_mount"] = mount(ghost, ghost_snapshot / "mnt")
        if out["missing_metadata_mount"]["ok"]:
            mounted.append(ghost_snapshot / "mnt")
        out["sendfd_nobody_listening"] = call(sock, "PUT", "/api/v1/daemon/fuse/sendfd")

        # the snapshotter's unmount (unbind, umount, cull), then a mount it would never make
        out["unbind"] = call(sock, "DELETE", f"/api/v2/blobs?domain_id={fsid}")
        umount = subprocess.run(["umount", str(snapshot / "mnt")], capture_output=True, text=True, timeout=120)
        out["umount_ok"] = umount.returncode == 0
        if out["umount_ok"]:
            mounted.remove(snapshot / "mnt")
        out["cull"] = call(sock, "DELETE", f"/api/v2/blobs?blob_id={fsid}")
        out["remount_after_unbind"] = mount(fsid, snapshot / "mnt2")
        if out["remount_after_unbind"]["ok"]:
            mounted.append(snapshot / "mnt2")
        layer = sorted(os.listdir(image["blobs"]))[0]
        out["cull_layer"] = call(sock, "DELETE", f"/api/v2/blobs?blob_id={layer}")
        out["info_after"] = call(sock, "GET", "/api/v1/daemon")
        out["exit"] = call(sock, "PUT", "/api/v1/daemon/exit")
        try:
            out["exit_code"] = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            out["exit_code"] = None
        out["socket_left"] = sock.exists()
    finally:
        for at in reversed(mounted):
            subprocess.run(["umount", str(at)], capture_output=True, timeout=120)
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        out["log_file"] = log_file.read_text(errors="replace")[-8000:] if log_file.exists() else None
        out["stderr"] = stderr_path.read_text(errors="replace")[-4000:]
    return out
