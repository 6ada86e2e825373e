"""Guest side: replay nydus-snapshotter's calls (fs_driver = "fscache") against fscached's `nydusd`.

The sequence is the snapshotter's (pkg/manager, pkg/daemon, pkg/filesystem):
  start `nydusd singleton --fscache <cache> --apisock <root>/socket/<id>/api.sock --log-level info
         --log-rotation-size N --id <id> --supervisor <sock> --log-file <dir>/nydusd.log`,
  wait for the socket, hold a liveness connection on it (the monitor), wait for state RUNNING,
  `nydusd --version` Git Commit vs GET /api/v1/daemon version.git_commit,
  per image: PUT /api/v2/blobs (legacy "config" form, localfs backend), mount -t erofs
  -o fsid=<fscache_id> (or domain_id=D,fsid=F), sendfd;
  per image: DELETE the bind, umount, DELETE ?blob_id=<fscache_id> (cull);
  PUT /api/v1/daemon/exit.
Between them: the error paths (unbind of a missing entry, a second bind of the same bootstrap,
a bind whose metadata_path is missing) and the reads (sha256 of every file).

args:
  nydusd: the `nydusd` console script to run
  images: [{"snapshot_id", "bootstrap", "blobs", "domain"?: D, "digests": {relpath: sha256}}]
Returns every HTTP status and body, timings, the reads' mismatches, and the daemon's log.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from vmharness.guest import scratch_dir

RUN_ROOT = Path("/run/containerd-nydus")
DAEMON_ID = "d0fscached0nydus0compat"


def fscache_id(snapshot_id: str) -> str:
    return hashlib.sha256(f"nydus-snapshot-{snapshot_id}".encode()).hexdigest()


def call(sock: Path, method: str, path: str, body: Any = None) -> dict[str, Any]:
    import aiohttp

    async def go() -> dict[str, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as session:
            async with session.request(method, f"http://unix{path}",
                                       data=json.dumps(body) if body is not None else None,
                                       headers={"Content-Type": "application/json"} if body is not None else None,
                                       timeout=aiohttp.ClientTimeout(total=120)) as resp:
                raw = await resp.read()
                out: dict[str, Any] = {"status": resp.status, "content_type": resp.headers.get("Content-Type", "")}
                out["body"] = json.loads(raw) if raw else None
                return out
    return asyncio.run(go())


def file_digests(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            out[str(path.relative_to(root))] = h.hexdigest()
    return out


def bind_entry(fsid: str, domain: str, snapshot: Path, blobs: str) -> dict[str, Any]:
    """The legacy entry the snapshotter writes (config/daemonconfig/fscache.go), localfs backend."""
    return {
        "type": "bootstrap", "id": fsid, "domain_id": domain,
        "config": {
            "id": fsid, "backend_type": "localfs",
            "backend_config": {"dir": blobs, "readahead": False, "blob_file": ""},
            "cache_type": "fscache", "cache_config": {"work_dir": str(snapshot / "fs")},
            "prefetch_config": {"enable": True, "threads_count": 8, "merging_size": 1048576, "bandwidth_rate": 0,
                                "prefetch_all": False},
            "metadata_path": str(snapshot / "fs" / "image" / "image.boot"),
        },
    }


def mount(fsid: str, domain: str | None, at: Path) -> dict[str, Any]:
    at.mkdir(parents=True, exist_ok=True)
    opts = f"domain_id={domain},fsid={fsid}" if domain else f"fsid={fsid}"
    proc = subprocess.run(["mount", "-t", "erofs", "none", "-o", opts, str(at)],
                          capture_output=True, text=True, timeout=300)
    return {"ok": proc.returncode == 0, "stderr": proc.stderr.strip(), "options": opts}


def umount(at: Path) -> dict[str, Any]:
    proc = subprocess.run(["umount", str(at)], capture_output=True, text=True, timeout=120)
    return {"ok": proc.returncode == 0, "stderr": proc.stderr.strip()}


def hung_up(conn: socket.socket) -> bool:
    """The liveness monitor's view: has the daemon's end gone away?"""
    conn.setblocking(False)
    try:
        return conn.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def run(args: dict[str, Any]) -> dict[str, Any]:
    root = scratch_dir() / "nydus-snapshotter"
    cache = root / "cache"
    sock = RUN_ROOT / "socket" / DAEMON_ID / "api.sock"
    supervisor = RUN_ROOT / "supervisor" / f"{DAEMON_ID}.sock"
    log_file = root / "logs" / DAEMON_ID / "nydusd.log"
    out: dict[str, Any] = {}
    import aiohttp  # noqa: F401  # imported now: its import time is not the daemon's start-up time
    cmd = [args["nydusd"], "singleton", "--fscache", str(cache), "--apisock", str(sock), "--log-level", "info",
           "--log-rotation-size", "100", "--id", DAEMON_ID, "--supervisor", str(supervisor),
           "--log-file", str(log_file)]
    out["command"] = cmd
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    stderr_path = root / "nydusd.stderr"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(cmd, stdout=stderr, stderr=subprocess.STDOUT, env=env)
    mounted: list[Path] = []
    monitor: socket.socket | None = None
    try:
        while not sock.exists():  # the snapshotter: WaitUntilSocketExisted
            if proc.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError(f"nydusd did not create its socket (exit {proc.poll()}): "
                                   f"{stderr_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        out["socket_seconds"] = round(time.monotonic() - t0, 2)
        st = os.stat(sock)
        out["socket_mode"] = oct(st.st_mode & 0o777)
        out["socket_dir_mode"] = oct(os.stat(sock.parent).st_mode & 0o777)
        monitor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # the liveness monitor's connection
        monitor.connect(str(sock))
        states = []
        while True:  # WaitUntilState(RUNNING)
            info = call(sock, "GET", "/api/v1/daemon")
            states.append(info["body"]["state"])
            if info["body"]["state"] == "RUNNING" or time.monotonic() - t0 > 120:
                break
            time.sleep(0.05)
        out["running_seconds"] = round(time.monotonic() - t0, 2)
        out["states_seen"] = sorted(set(states))
        out["daemon_info"] = info
        version = subprocess.run([args["nydusd"], "--version"], capture_output=True, text=True, timeout=120)
        out["version_stdout"] = version.stdout
        out["version_rc"] = version.returncode

        images = []
        for image in args["images"]:
            fsid = fscache_id(image["snapshot_id"])
            snapshot = root / "snapshots" / image["snapshot_id"]
            (snapshot / "fs" / "image").mkdir(parents=True, exist_ok=True)  # the snapshotter's layout
            shutil.copy(image["bootstrap"], snapshot / "fs" / "image" / "image.boot")
            domain = image.get("domain")
            entry = bind_entry(fsid, domain or fsid, snapshot, image["blobs"])
            res: dict[str, Any] = {"fsid": fsid, "domain": domain, "entry": entry}
            res["bind"] = call(sock, "PUT", "/api/v2/blobs", entry)
            res["mount"] = mount(fsid, domain, snapshot / "mnt")
            if res["mount"]["ok"]:
                mounted.append(snapshot / "mnt")
            res["sendfd"] = call(sock, "PUT", "/api/v1/daemon/fuse/sendfd")
            got = file_digests(snapshot / "mnt") if res["mount"]["ok"] else {}
            want = image["digests"]
            res["files_checked"] = len(got)
            res["mismatches"] = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))[:20]
            res["metrics"] = call(sock, "GET", f"/api/v1/metrics/blobcache?id=/{fsid}")
            images.append(res)
        out["images"] = images
        out["info_with_images"] = call(sock, "GET", "/api/v1/daemon")
        out["monitor_alive_while_serving"] = not hung_up(monitor)

        # the error paths
        first = images[0]
        errors: dict[str, Any] = {}
        errors["second_bind"] = call(sock, "PUT", "/api/v2/blobs", first["entry"])
        shared = next((i["domain"] for i in images if i["domain"]), "no-such-domain")
        errors["unbind_missing"] = call(sock, "DELETE", f"/api/v2/blobs?domain_id={shared}&blob_id={'0' * 64}")
        ghost = fscache_id("ghost")
        ghost_snapshot = root / "snapshots" / "ghost"
        (ghost_snapshot / "fs").mkdir(parents=True, exist_ok=True)
        errors["missing_metadata"] = call(sock, "PUT", "/api/v2/blobs",
                                          bind_entry(ghost, ghost, ghost_snapshot, first["entry"]["config"]
                                                     ["backend_config"]["dir"]))
        errors["missing_metadata_mount"] = mount(ghost, None, ghost_snapshot / "mnt")
        if errors["missing_metadata_mount"]["ok"]:
            mounted.append(ghost_snapshot / "mnt")
        out["errors"] = errors

        # the snapshotter's unmount: unbind, umount, cull the fscache id; then a layer's blob
        teardown = []
        for image, res in zip(args["images"], images):
            snapshot = root / "snapshots" / image["snapshot_id"]
            fsid, domain = res["fsid"], res["domain"]
            query = f"domain_id={domain}&blob_id={fsid}" if domain else f"domain_id={fsid}"
            step: dict[str, Any] = {"unbind": call(sock, "DELETE", f"/api/v2/blobs?{query}")}
            step["umount"] = umount(snapshot / "mnt")
            if step["umount"]["ok"] and snapshot / "mnt" in mounted:
                mounted.remove(snapshot / "mnt")
            step["cull"] = call(sock, "DELETE", f"/api/v2/blobs?blob_id={fsid}")
            step["remount_after_unbind"] = mount(fsid, domain, snapshot / "mnt2")
            if step["remount_after_unbind"]["ok"]:
                mounted.append(snapshot / "mnt2")
            teardown.append(step)
        out["teardown"] = teardown
        layer = sorted(os.listdir(args["images"][0]["blobs"]))[0]
        out["cull_layer"] = call(sock, "DELETE", f"/api/v2/blobs?blob_id={layer}")
        out["info_after"] = call(sock, "GET", "/api/v1/daemon")
        out["monitor_alive_before_exit"] = not hung_up(monitor)
        out["exit"] = call(sock, "PUT", "/api/v1/daemon/exit")
        try:
            out["exit_code"] = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            out["exit_code"] = None
        out["monitor_saw_hangup"] = hung_up(monitor)
        out["socket_left"] = sock.exists()
    finally:
        for at in reversed(mounted):
            subprocess.run(["umount", str(at)], capture_output=True, timeout=120)
        if monitor is not None:
            monitor.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        out["log_file"] = log_file.read_text(errors="replace")[-8000:] if log_file.exists() else None
        out["stderr"] = stderr_path.read_text(errors="replace")[-4000:]
    return out
