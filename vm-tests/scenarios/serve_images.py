"""Guest side: run the fscached daemon from this checkout against the real kernel.

args:
  images: [{fsid, bootstrap, blobs, domain?}]    what the daemon serves
  steps:  a list of operations, run in order; each appends a result to "steps":
    {"op": "mount", "fsid": F, "domain": D?, "at": NAME}       mount -t erofs -o fsid=..
    {"op": "mount_fail", "fsid": F, "at": NAME}               expect the mount to fail
    {"op": "umount", "at": NAME}
    {"op": "verify", "at": NAME, "manifest": PATH}           every file's sha256 + metadata
    {"op": "concurrent", "at": NAME, "manifest": PATH, "threads": N}
    {"op": "stats"}                                           the daemon's counters now
    {"op": "read_file", "at": NAME, "path": P}                sha256 + size of one file
The daemon's log and final counters come back as "daemon_log" / "final_stats".
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vmharness.guest import scratch_dir

MOUNT_ROOT = Path("/tmp/mnt")
REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_MISMATCHES = 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def describe(path: Path, with_data: bool = True) -> dict[str, Any]:
    """The same record tests/erofs_image manifests hold for a source tree."""
    st = os.lstat(path)
    entry: dict[str, Any] = {
        "mode": st.st_mode,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime_ns": st.st_mtime_ns,
        "xattrs": {
            name: os.getxattr(path, name, follow_symlinks=False).hex()
            for name in sorted(os.listxattr(path, follow_symlinks=False))
        },
    }
    if stat.S_ISREG(st.st_mode):
        entry["size"] = st.st_size
        if with_data:
            entry["sha256"] = sha256_file(path)
    elif stat.S_ISLNK(st.st_mode):
        entry["target"] = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        entry["rdev"] = st.st_rdev
    return entry


def walk(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            found["/" + str(full.relative_to(root))] = full
    return found


class DaemonProcess:
    def __init__(self, images: list[dict[str, Any]], work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.stats_file = work / "stats.json"
        self.ready_file = work / "ready"
        self.log_path = work / "daemon.log"
        cache = work / "cache"
        cmd = [sys.executable, "-m", "fscached.cli", "--cache-dir", str(cache),
               "--ready-file", str(self.ready_file), "--stats-file", str(self.stats_file),
               "--log-level", "info"]
        cmd += ["--work-dir", str(work / "state")]
        for image in images:
            cmd += ["--image", ",".join(f"{k}={v}" for k, v in image.items() if v is not None)]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"fscached exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"fscached not ready after 120 s: {self.log_text()[-2000:]}")
            time.sleep(0.05)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stats(self) -> dict[str, int]:
        before = self.stats_file.stat().st_mtime_ns if self.stats_file.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.stats_file.exists() and self.stats_file.stat().st_mtime_ns != before:
                try:
                    return json.loads(self.stats_file.read_text())
                except json.JSONDecodeError:
                    pass
            time.sleep(0.05)
        raise RuntimeError("fscached did not write its stats file")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def mount(fsid: str, domain: str | None, at: Path) -> subprocess.CompletedProcess[str]:
    at.mkdir(parents=True, exist_ok=True)
    opts = f"domain_id={domain},fsid={fsid}" if domain else f"fsid={fsid}"
    return subprocess.run(["mount", "-t", "erofs", "none", "-o", opts, str(at)],
                          capture_output=True, text=True, timeout=300)


def verify(at: Path, manifest_path: str, part: list[int] | None = None) -> dict[str, Any]:
    """Compare the mount with the manifest; `part` [k, n]: only the k-th of n slices of it."""
    manifest = json.loads(Path(manifest_path).read_text())
    entries: dict[str, dict[str, Any]] = manifest["entries"]
    if part is not None:
        k, n = part
        names = sorted(entries)
        chosen = names[k * len(names) // n:(k + 1) * len(names) // n]
        entries = {p: entries[p] for p in chosen}
    found = walk(at)
    mismatches: list[str] = []
    missing = sorted(set(entries) - set(found))
    extra = sorted(set(found) - set(entries)) if part is None else []
    checked = 0
    for path, want in entries.items():
        if path not in found:
            continue
        got = describe(found[path])
        checked += 1
        for key, value in want.items():
            if got.get(key) != value and len(mismatches) < MAX_MISMATCHES:
                mismatches.append(f"{path}: {key} is {got.get(key)!r}, want {value!r}")
    links_ok = True
    for group in manifest.get("hardlinks", []):
        inodes = {os.lstat(found[p]).st_ino for p in group if p in found}
        if len(inodes) != 1:
            links_ok = False
            mismatches.append(f"hard-link group {group[:3]} spans inodes {sorted(inodes)}")
    return {"checked": checked, "missing": missing[:MAX_MISMATCHES], "extra": extra[:MAX_MISMATCHES],
            "mismatches": mismatches, "hardlinks_ok": links_ok}


def concurrent(at: Path, manifest_path: str, threads: int) -> dict[str, Any]:
    entries = json.loads(Path(manifest_path).read_text())["entries"]
    files = sorted(p for p, e in entries.items() if "sha256" in e)
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads)

    def reader(worker: int) -> int:
        barrier.wait()
        done = 0
        # every thread reads every file, each starting at a different place
        order = files[worker * len(files) // threads:] + files[: worker * len(files) // threads]
        for path in order:
            try:
                digest = sha256_file(at / path.lstrip("/"))
            except OSError as exc:
                with lock:
                    errors.append(f"{path}: {exc}")
                continue
            if digest != entries[path]["sha256"]:
                with lock:
                    errors.append(f"{path}: wrong bytes")
            done += 1
        return done

    start = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        reads = sum(pool.map(reader, range(threads)))
    return {"reads": reads, "errors": errors[:MAX_MISMATCHES], "error_count": len(errors),
            "seconds": round(time.monotonic() - start, 2)}


class Services:
    """A registry (and a stand-in Dragonfly peer) on the guest's loopback, when asked for."""

    def __init__(self, args: dict[str, Any], work: Path) -> None:
        self.registry = None
        self.peer: subprocess.Popen[bytes] | None = None
        self.peer_socket = work / "dfdaemon.sock"
        if args.get("registry_storage"):
            from tests.registry_server import RegistryServer

            shutil.copytree(args["registry_storage"], work / "registry" / "storage")
            self.registry = RegistryServer(work / "registry").start()
        if args.get("peer"):
            self.peer_log = open(work / "dfdaemon.log", "wb")
            self.peer = subprocess.Popen([sys.executable, "-m", "tests.standins.dfdaemon", "--socket", str(self.peer_socket)],
                                         stdout=self.peer_log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
            deadline = time.monotonic() + 60
            while not self.peer_socket.exists():
                if self.peer.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"stand-in dfdaemon did not start: {(work / 'dfdaemon.log').read_text()[-2000:]}")
                time.sleep(0.05)

    def fill(self, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Put the registry's address and the peer's socket into the image specs."""
        host = self.registry.host if self.registry else ""
        return [{k: (v.format(registry=host, peer=self.peer_socket) if isinstance(v, str) else v)
                 for k, v in image.items()} for image in images]

    def kill_peer(self) -> None:
        if self.peer is not None:
            self.peer.kill()
            self.peer.wait()

    def stop(self) -> None:
        self.kill_peer()
        if self.registry is not None:
            self.registry.stop()


def run(args: dict[str, Any]) -> dict[str, Any]:
    work = scratch_dir() / "fscached"
    work.mkdir(parents=True, exist_ok=True)
    services = Services(args, work)
    try:
        return run_steps(args, work, services)
    finally:
        services.stop()


def run_steps(args: dict[str, Any], work: Path, services: Services) -> dict[str, Any]:
    daemon = DaemonProcess(services.fill(args["images"]), work)
    results: list[dict[str, Any]] = []
    out: dict[str, Any] = {"steps": results}
    mounted: list[Path] = []
    try:
        for step in args["steps"]:
            op = step["op"]
            at = MOUNT_ROOT / step.get("at", "x")
            t0 = time.monotonic()
            res: dict[str, Any] = {"op": op}
            if op == "mount":
                proc = mount(step["fsid"], step.get("domain"), at)
                res.update(ok=proc.returncode == 0, stderr=proc.stderr.strip())
                if proc.returncode == 0:
                    mounted.append(at)
            elif op == "mount_fail":
                proc = mount(step["fsid"], step.get("domain"), at)
                res.update(failed=proc.returncode != 0, stderr=proc.stderr.strip())
                if proc.returncode == 0:
                    mounted.append(at)
            elif op == "umount":
                proc = subprocess.run(["umount", str(at)], capture_output=True, text=True, timeout=120)
                res.update(ok=proc.returncode == 0, stderr=proc.stderr.strip())
                if at in mounted:
                    mounted.remove(at)
            elif op == "verify":
                res.update(verify(at, step["manifest"], step.get("part")))
            elif op == "cli_error":  # a second fscached with these flags must refuse to start
                proc = subprocess.run([sys.executable, "-m", "fscached.cli", *step["args"]],
                                      capture_output=True, text=True, timeout=120)
                res.update(returncode=proc.returncode, stderr=proc.stderr.strip())
            elif op == "kill_peer":
                services.kill_peer()
            elif op == "concurrent":
                res.update(concurrent(at, step["manifest"], int(step.get("threads", 16))))
            elif op == "read_file":
                path = at / step["path"].lstrip("/")
                res.update(sha256=sha256_file(path), size=path.stat().st_size)
            elif op == "stats":
                res.update(stats=daemon.stats())
            else:
                raise ValueError(f"unknown step {op!r}")
            res["seconds"] = round(time.monotonic() - t0, 3)
            results.append(res)
    finally:
        for at in reversed(mounted):
            subprocess.run(["umount", str(at)], capture_output=True, timeout=120)
        out["alive_before_stop"] = daemon.proc.poll() is None
        out["daemon_exit"] = daemon.stop()
        out["daemon_log"] = daemon.log_text()[-6000:]
        try:
            out["final_stats"] = json.loads(daemon.stats_file.read_text())
        except (OSError, json.JSONDecodeError):
            out["final_stats"] = None
    return out
