"""Guest side of test_vm_systemd.py's real-systemd test: Debian's own systemd runs fscached from
contrib/fscached.service (ExecStart pointed at this checkout, the image added) on the real
cachefiles path. Not as PID 1 (the harness's PID 1 is its guest-init.sh): as a service manager
of its own, `systemd --user` run by root, which implements the same service machinery (Type=notify,
the watchdog, the fd store, Restart=, LISTEN_FDS). The guest is made to look booted with systemd
(/run/systemd/system, cgroup2 on /sys/fs/cgroup) for it.

  start     systemctl start: READY=1 (systemctl returns), the device and the state in the store
  kill      4 readers on `files.kill`; systemctl kill -s KILL: Restart=on-failure, LISTEN_FDS
  restart   4 readers on `files.restart`; systemctl restart (busy mount left to the next process)
  watchdog  the daemon stopped (SIGSTOP): systemd's watchdog kills it and starts it again
  stop      systemctl stop: unmounted, the store emptied

args: bootstrap, blobs, unit (path of contrib/fscached.service), files, readers, watchdog_sec
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vmharness.guest import scratch_dir

from scenarios.readers import Reader, start_readers, wait_into
from scenarios.systemd_failover import FSID

RUNTIME = Path("/run/user/0")
UNIT = "fscached.service"


def longest_gap(reader: Reader, at: float) -> float | None:
    """The longest wait between two reads from `at` on: how long the reader stalled."""
    times = list(reader.times)
    prev = max((t for t in times if t <= at), default=at)
    gaps = []
    for t in times:
        if t > at:
            gaps.append(t - prev)
            prev = t
    return round(max(gaps), 3) if gaps else None


def systemctl(*args: str, timeout: float = 600, check: bool = True) -> str:
    env = dict(os.environ, XDG_RUNTIME_DIR=str(RUNTIME))
    r = subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"systemctl --user {' '.join(args)}: {r.returncode} {r.stdout} {r.stderr}")
    return r.stdout


def show(*props: str) -> dict[str, str]:
    text = systemctl("show", UNIT, *(f"-p{p}" for p in props))
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {what}")
        time.sleep(0.1)


def unit_text(args: dict[str, Any], cache: Path, work: Path, mnt: Path) -> str:
    text = Path(args["unit"]).read_text()
    exec_start = shlex.join([sys.executable, "-m", "fscached.cli", "--backend", "cachefiles", "--cache-dir", str(cache),
                             "--work-dir", str(work), "--read-window", "256K", "--image",
                             f"fsid={FSID},bootstrap={args['bootstrap']},blobs={args['blobs']},mountpoint={mnt}"])
    repo = Path(__file__).resolve().parents[2]
    log = cache.parent / "fscached.log"  # no journald in the guest: the daemon's log into a file
    text = re.sub(r"^ExecStart=.*$", f"ExecStart={exec_start}\nWorkingDirectory={repo}\n"
                  f"StandardOutput=append:{log}\nStandardError=inherit", text, flags=re.M)
    text = re.sub(r"^WatchdogSec=.*$", f"WatchdogSec={args.get('watchdog_sec', 30)}s", text, flags=re.M)
    return text


def run(args: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"events": []}
    root = scratch_dir() / "sdreal"
    cache, work, mnt = root / "cache", root / "work", Path("/tmp/sdrealmnt")
    cache.mkdir(parents=True, exist_ok=True)
    # look booted with systemd, give it a cgroup2 hierarchy and a runtime dir
    Path("/run/systemd/system").mkdir(parents=True, exist_ok=True)
    if "cgroup2" not in Path("/proc/self/mountinfo").read_text():
        subprocess.run(["mount", "-t", "cgroup2", "none", "/sys/fs/cgroup"], check=True)
    (RUNTIME / "systemd" / "user").mkdir(parents=True, exist_ok=True)
    os.chmod(RUNTIME, 0o700)
    (RUNTIME / "systemd" / "user" / UNIT).write_text(unit_text(args, cache, work, mnt))
    manager_log = open(root / "manager.log", "wb")
    xdg = {"XDG_RUNTIME_DIR": str(RUNTIME)}  # a user manager's State/CacheDirectory= live in these:
    for name in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"):  # the root fs is read-only
        xdg[name] = str(root / name.lower())
        Path(xdg[name]).mkdir(parents=True, exist_ok=True)
    manager = subprocess.Popen(["/lib/systemd/systemd", "--user", "--log-target=console", "--log-level=info"],
                               env=dict(os.environ, **xdg), stdout=manager_log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    count = int(args.get("readers", 4))
    t0 = time.monotonic()
    try:
        wait_for(lambda: (RUNTIME / "systemd" / "private").exists() or manager.poll() is not None, 120,
                 "systemd --user to listen")
        if manager.poll() is not None:
            raise RuntimeError(f"systemd --user exited {manager.returncode}")
        out["systemd"] = subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        begin = time.monotonic()
        systemctl("start", UNIT)  # Type=notify: returns once READY=1 came
        out["start_seconds"] = round(time.monotonic() - begin, 2)
        out["after_start"] = show("MainPID", "NFileDescriptorStore", "ActiveState", "StatusText")

        for key in ("kill", "restart", "watchdog"):
            readers = start_readers(mnt / args["files"][key], count)
            wait_into(readers, float(args.get("into", 0.1)))
            before = show("MainPID", "NRestarts")
            at = time.monotonic()
            if key == "kill":
                systemctl("kill", "-s", "KILL", "--kill-whom=main", UNIT)
            elif key == "restart":
                systemctl("restart", UNIT)
            else:
                os.kill(int(before["MainPID"]), signal.SIGSTOP)

            def new_and_active(old_pid: str = before["MainPID"]) -> bool:
                now = show("MainPID", "ActiveState", "SubState")
                return now["MainPID"] not in ("0", old_pid) and now["SubState"] == "running"

            wait_for(new_and_active, 600, f"a new {UNIT} after {key}")
            ready_at = time.monotonic()
            for r in readers:
                r.join(1800)
            after = show("MainPID", "NRestarts", "NFileDescriptorStore", "Result")
            out["events"].append({
                "what": key, "running_again": round(ready_at - at, 2),
                "stalls": [longest_gap(r, at) for r in readers],
                "before": before, "after": after,
                "readers": [{"digest": r.digest, "error": r.error, "bytes": r.done} for r in readers]})
        systemctl("stop", UNIT)
        out["after_stop"] = show("NFileDescriptorStore", "ActiveState", "Result")
        out["mounted_after_stop"] = str(mnt) in Path("/proc/self/mountinfo").read_text()
    finally:
        journal = subprocess.run(["systemctl", "--user", "status", "--no-pager", "-l", "-n", "0", UNIT],
                                 capture_output=True, text=True, env=dict(os.environ, XDG_RUNTIME_DIR=str(RUNTIME)))
        out["status"] = journal.stdout[-3000:]
        manager.send_signal(signal.SIGTERM)
        try:
            manager.wait(60)
        except subprocess.TimeoutExpired:
            manager.kill()
        manager_log.close()
        text = (root / "manager.log").read_text(errors="replace")
        out["manager_log"] = text[-8000:]
        daemon_log = root / "fscached.log"
        dtext = daemon_log.read_text(errors="replace") if daemon_log.exists() else ""
        out["daemon_log"] = dtext[-8000:]
        out["log_errors"] = [line for line in dtext.splitlines() if " ERROR " in line][:40]
        out["log_counts"] = {
            "kept_device": dtext.count("took /dev/cachefiles back from systemd's fd store"),
            "read_failed": len(re.findall(r"READ req=msg:\d+ .* failed: ", dtext)),
            "watchdog": text.count("Watchdog timeout"),
        }
        out["seconds"] = round(time.monotonic() - t0, 1)
        if str(mnt) in Path("/proc/self/mountinfo").read_text():
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    return out
